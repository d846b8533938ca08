import numpy as np
import pytest
import torch

from bnncc.ops import OPS

from opsref import run_onnx, same_pads_np


def binary_conv_np(x, w, k, s, bound=3.0):
    """Loops over output positions; padded cells are skipped, i.e. contribute 0."""
    n, ci, h, wd = x.shape
    co = w.shape[0]
    xb = np.where(x >= 0, bound / 2, -bound / 2)
    scale = np.abs(w).reshape(co, -1).max(axis=1) / 2
    wb = np.where(w >= 0, 1.0, -1.0) * scale[:, None, None, None]
    top, _ = same_pads_np(h, k, s)
    left, _ = same_pads_np(wd, k, s)
    ho, wo = int(np.ceil(h / s)), int(np.ceil(wd / s))
    out = np.zeros((n, co, ho, wo))
    for i in range(ho):
        for j in range(wo):
            for di in range(k):
                for dj in range(k):
                    r, c = i * s - top + di, j * s - left + dj
                    if 0 <= r < h and 0 <= c < wd:
                        out[:, :, i, j] += xb[:, :, r, c] @ wb[:, :, di, dj].T
    return out.astype(np.float32)


@pytest.mark.parametrize("k,s,h", [(3, 1, 7), (3, 2, 8), (3, 2, 14), (3, 2, 7), (1, 1, 5), (1, 2, 6)])
def test_matches_numpy_including_the_padded_border(k, s, h):
    rng = np.random.default_rng(k * 100 + s * 10 + h)
    x = rng.standard_normal((2, 5, h, h)).astype(np.float32)
    x[0, :, 0, 0] = 0.0  # sign(0) = +1 at a border cell
    w = rng.standard_normal((4, 5, k, k)).astype(np.float32)
    w[1, 0, 0, 0] = 0.0
    expected = binary_conv_np(x, w, k, s)
    attrs = dict(kernel_shape=[k, k], strides=[s, s], clip_bound=3.0)
    np.testing.assert_allclose(run_onnx("BinaryConv", [x, w], **attrs), expected, rtol=1e-5, atol=1e-5)
    got = OPS["BinaryConv"].torch(torch.from_numpy(x), torch.from_numpy(w), **attrs).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_stride_two_on_even_input_pads_zero_before_one_after():
    # All-ones input and weights: a corner output sums only the in-image taps.
    x = np.ones((1, 1, 4, 4), dtype=np.float32)
    w = np.ones((1, 1, 3, 3), dtype=np.float32)
    out = run_onnx("BinaryConv", [x, w], kernel_shape=[3, 3], strides=[2, 2], clip_bound=2.0)
    # x -> +1, w -> +0.5; output (0,0) covers rows 0..2 (9 taps), (1,1) covers rows 2..4 with row 4 padded (4 taps).
    np.testing.assert_allclose(out[0, 0], [[4.5, 3.0], [3.0, 2.0]])


def test_gradients_reach_input_and_weights():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((1, 3, 6, 6)), dtype=torch.float32, requires_grad=True)
    w = torch.tensor(rng.standard_normal((2, 3, 3, 3)), dtype=torch.float32, requires_grad=True)
    OPS["BinaryConv"].torch(x, w, kernel_shape=[3, 3], strides=[1, 1]).square().sum().backward()
    assert x.grad.abs().sum() > 0 and w.grad.abs().sum() > 0
    # STE window: inputs beyond the bound get no gradient.
    x2 = torch.full((1, 3, 6, 6), 5.0, requires_grad=True)
    OPS["BinaryConv"].torch(x2, w, kernel_shape=[3, 3], strides=[1, 1]).sum().backward()
    assert x2.grad.abs().sum() == 0


def test_float_weights_in_the_first_phase():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.standard_normal((1, 2, 5, 5)), dtype=torch.float32)
    w = torch.tensor(rng.standard_normal((3, 2, 1, 1)), dtype=torch.float32)
    got = OPS["BinaryConv"].torch(x, w, kernel_shape=[1, 1], strides=[1, 1], quantize_weights=False)
    expected = torch.nn.functional.conv2d(torch.where(x >= 0, 1.5, -1.5), w)
    torch.testing.assert_close(got, expected)
