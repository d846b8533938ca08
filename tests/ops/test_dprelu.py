import numpy as np
import torch

from bnncc.ops import OPS

from opsref import run_onnx


def test_dprelu_matches_numpy_and_gradients_reach_all_parameters():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    params = [rng.standard_normal(4).astype(np.float32) for _ in range(4)]
    bx, by, ps, ns = (p.reshape(1, -1, 1, 1) for p in params)
    t = x - bx
    expected = np.where(t >= 0, ps * t, ns * t) - by
    np.testing.assert_allclose(run_onnx("DPReLU", [x, *params]), expected, rtol=1e-6, atol=1e-6)
    tensors = [torch.tensor(p, requires_grad=True) for p in params]
    got = OPS["DPReLU"].torch(torch.from_numpy(x), *tensors)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-6, atol=1e-6)
    got.square().sum().backward()
    assert all(t.grad.abs().sum() > 0 for t in tensors)


def test_dprelu_backward_matches_finite_differences():
    # float64 gradcheck of the hand-written backward, for the input and all four parameters
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.standard_normal((2, 3, 4, 4)), requires_grad=True)
    params = [torch.tensor(rng.standard_normal(3), requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(OPS["DPReLU"].torch, (x, *params))
