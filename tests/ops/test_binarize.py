import numpy as np
import pytest
import torch

from bnncc.ops import OPS
from bnncc.ops.binarize import binarize_weights

from opsref import run_onnx


def test_sign_of_zero_is_plus_and_values_are_half_bound():
    x = np.array([[-2.0, -0.0, 0.0, 1e-9, -1e-9, 5.0]], dtype=np.float32)
    expected = np.array([[-1.5, 1.5, 1.5, 1.5, -1.5, 1.5]], dtype=np.float32)  # -0.0 >= 0 is True
    np.testing.assert_array_equal(run_onnx("BinarizeAct", [x], clip_bound=3.0), expected)
    np.testing.assert_array_equal(OPS["BinarizeAct"].torch(torch.from_numpy(x), 3.0).numpy(), expected)


def test_bound_sets_magnitude():
    x = np.array([0.3, -0.3], dtype=np.float32)
    np.testing.assert_array_equal(run_onnx("BinarizeAct", [x], clip_bound=1.0), [0.5, -0.5])


def test_gradient_passes_only_inside_the_clip_bound():
    x = torch.tensor([-3.5, -3.0, -2.9, 0.0, 2.9, 3.0, 3.5], requires_grad=True)
    OPS["BinarizeAct"].torch(x, 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0, 0, 1, 1, 1, 0, 0])


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_binary_weights_pass_no_gradient_beyond_the_clip_of_their_channel(monkeypatch, kernels):
    # pokebnn.md §4: W / max|W[o]| is clipped to +-(1 - 2^-7) = +-0.9921875 before the floor, so the
    # channel's largest weights (its maximum, and 3.99 of a maximum of 4) get gradient 0, the others 1
    monkeypatch.setenv("BNNCC_CPU_KERNELS", kernels)
    w = torch.tensor([[4.0, -3.99, 1.0, -0.0], [-0.5, 0.0, 0.49, 0.25]]).reshape(2, 4, 1, 1).requires_grad_()
    grad = torch.tensor([[0.5, 2.0, -3.0, 4.0], [1.0, -2.0, 3.0, 0.25]]).reshape(2, 4, 1, 1)
    wq = binarize_weights(w)
    wq.backward(grad)
    expected = [[2.0, -2.0, 2.0, 2.0], [-0.25, 0.25, 0.25, 0.25]]
    np.testing.assert_array_equal(wq.detach().reshape(2, 4).numpy(), expected)
    np.testing.assert_array_equal(w.grad.reshape(2, 4).numpy(), [[0, 0, -3.0, 4.0], [0, -2.0, 3.0, 0.25]])


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_binary_weights_keep_no_mask_of_their_own_size_for_the_backward(monkeypatch, kernels):
    # a mask of the weights kept from the forward to the backward (compare, cast, product) took a
    # PokeBNN-1x step at 64 px from 0.56-0.58 s of CPU to 0.65-0.75 s and held 83 MB of masks; the
    # backward needs W itself and one clip per output channel
    monkeypatch.setenv("BNNCC_CPU_KERNELS", kernels)
    w = torch.randn(8, 16, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        wq = binarize_weights(w)
    assert [t.data_ptr() for t in saved if t.numel() == w.numel()] == [w.data_ptr()]
    assert sum(t.numel() for t in saved) == w.numel() + 8
    wq.backward(torch.ones_like(w))
    inside = w.detach().abs() < (1 - 2**-7) * w.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
    np.testing.assert_array_equal(w.grad.numpy(), inside.float().numpy())
