import numpy as np
import torch

from bnncc.ops import OPS

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
