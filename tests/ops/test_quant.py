import numpy as np
import pytest
import torch

from bnncc.ops import OPS
from bnncc.ops.quant import quantize_acts, quantize_weights

from opsref import run_onnx


def quant_weights_np(w, bits):
    m = 2 ** (bits - 1) - 1
    wmax = np.abs(w).reshape(w.shape[0], -1).max(axis=1).reshape((-1,) + (1,) * (w.ndim - 1))
    s = m / wmax
    return np.clip(np.floor(w * s + 0.5), -m, m) / s


def quant_acts_np(x, bound, bits, signed):
    b = bound.reshape((1, -1) + (1,) * (x.ndim - 2))
    out = np.empty_like(x)
    for c in range(x.shape[1]):
        bc = bound[c]
        xc = x[:, c]
        if bc <= 0:
            out[:, c] = xc
        elif signed:
            m = 2 ** (bits - 1) - 1
            out[:, c] = np.clip(np.floor(xc * (m / bc) + 0.5), -m, m) / (m / bc)
        else:
            m = 2**bits
            out[:, c] = np.clip(np.floor(xc * (m / bc)), 0, m - 1) / (m / bc)
    assert b.shape[1] == x.shape[1]
    return out


def conv_np(x, w, b, stride, pads, group):
    t = torch.nn.functional.conv2d(
        torch.nn.functional.pad(torch.from_numpy(x).double(), (pads[1], pads[3], pads[0], pads[2])),
        torch.from_numpy(w).double(), torch.from_numpy(b).double(), stride=stride, groups=group)
    return t.numpy()


@pytest.mark.parametrize("signed", [1, 0])
@pytest.mark.parametrize("case", ["stem4x4", "grouped3x3"])
def test_quant_conv_matches_numpy(signed, case):
    rng = np.random.default_rng(7)
    if case == "stem4x4":
        x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
        w = rng.standard_normal((32, 3, 4, 4)).astype(np.float32)
        k, stride, pads, group = 4, 4, [0, 0, 0, 0], 1
    else:
        x = rng.standard_normal((2, 32, 8, 8)).astype(np.float32)
        w = rng.standard_normal((64, 1, 3, 3)).astype(np.float32)
        k, stride, pads, group = 3, 1, [1, 1, 1, 1], 32
    x[0, 0, 0, 0] = 0.0
    b = rng.standard_normal(w.shape[0]).astype(np.float32)
    bound = np.abs(rng.standard_normal(x.shape[1])).astype(np.float32) + 0.5
    bound[1] = -1.0  # not calibrated: float
    attrs = dict(w_bits=8, a_bits=8, a_signed=signed, kernel_shape=[k, k], strides=[stride, stride], pads=pads,
                 group=group)
    expected = conv_np(quant_acts_np(x, bound, 8, signed), quant_weights_np(w, 8), b, stride, pads, group)
    got_onnx = run_onnx("QuantConv", [x, w, bound, b], **attrs)
    np.testing.assert_allclose(got_onnx, expected, rtol=1e-4, atol=1e-4)
    got_torch = OPS["QuantConv"].torch(*map(torch.from_numpy, (x, w, bound, b)), **attrs).numpy()
    np.testing.assert_allclose(got_torch, expected, rtol=1e-4, atol=1e-4)


def test_quantizers_hit_integer_grids():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    wq = quant_weights_np(w, 4)
    grid = wq / (np.abs(w).max(axis=1, keepdims=True) / 7)
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-5)
    assert np.abs(grid).max() == pytest.approx(7)


def test_quant_gemm_matches_numpy():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 20)).astype(np.float32)
    w = rng.standard_normal((6, 20)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    bound = np.full(20, 2.0, dtype=np.float32)
    attrs = dict(w_bits=8, a_bits=8, a_signed=1)
    expected = quant_acts_np(x, bound, 8, 1) @ quant_weights_np(w, 8).T + b
    np.testing.assert_allclose(run_onnx("QuantGemm", [x, w, bound, b], **attrs), expected, rtol=1e-4, atol=1e-4)
    got = OPS["QuantGemm"].torch(*map(torch.from_numpy, (x, w, bound, b)), **attrs).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_an_all_zero_weight_channel_quantizes_to_zeros():
    """Output channel 1 of W all zeros: max|W| = 0, the quantizer's scale is taken as m / 1, its weights stay 0
    and the output is the bias alone (m / 0 would make 0 * inf = NaN), in onnxruntime and torch."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 5)).astype(np.float32)
    w = rng.standard_normal((3, 5)).astype(np.float32)
    w[1] = 0.0
    b = np.array([0.5, -0.25, 1.0], np.float32)
    bound = np.full(5, 2.0, np.float32)
    attrs = dict(w_bits=4, a_bits=8, a_signed=1)
    for got in (run_onnx("QuantGemm", [x, w, bound, b], **attrs),
                OPS["QuantGemm"].torch(*map(torch.from_numpy, (x, w, bound, b)), **attrs).numpy()):
        np.testing.assert_array_equal(got[:, 1], [-0.25, -0.25])
        assert np.isfinite(got).all()


def test_activation_gradient_is_zero_outside_the_clip_range():
    x = torch.tensor([[-5.0, -1.0, 0.5, 1.9, 5.0]], requires_grad=True)
    w = torch.ones(1, 5, requires_grad=True)
    bound = torch.full((5,), 2.0)
    y = OPS["QuantGemm"].torch(x, w, bound, torch.zeros(1), w_bits=8, a_bits=8, a_signed=1)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[0, 1, 1, 1, 0]])
    assert w.grad.abs().sum() > 0


@pytest.mark.parametrize("signed", [1, 0])
@pytest.mark.parametrize("shape", [(64, 6), (4, 6, 3, 3)])
def test_activation_quantizer_values_and_straight_through_gradient_match_numpy(signed, shape):
    rng = np.random.default_rng(signed + len(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    bound = np.array([1.0, 2.5, -1.0, 0.0, 4.0, 0.7], dtype=np.float32)  # channels 2, 3 uncalibrated
    grad = rng.standard_normal(shape).astype(np.float32)
    bits = 4
    # gradient 1 where the integer grid value lies inside the clip range, and on uncalibrated channels
    b = bound.reshape((1, -1) + (1,) * (x.ndim - 2))
    with np.errstate(divide="ignore", invalid="ignore"):  # bound 0: the grid is unused there
        if signed:
            m = 2 ** (bits - 1) - 1
            grid, lo, hi = np.floor(x * (m / b) + 0.5), -m, m
        else:
            m = 2**bits
            grid, lo, hi = np.floor(x * (m / b)), 0, m - 1
    passes = ((grid >= lo) & (grid <= hi)) | (b <= 0)
    xt = torch.tensor(x, requires_grad=True)
    q = quantize_acts(xt, torch.tensor(bound), bits, signed)
    q.backward(torch.tensor(grad))
    np.testing.assert_allclose(q.detach().numpy(), quant_acts_np(x, bound, bits, signed), rtol=1e-6, atol=1e-6)
    assert 0 < passes.mean() < 1  # both sides of the clip are exercised
    np.testing.assert_array_equal(xt.grad.numpy(), np.where(passes, grad, 0))


def _boundary_inputs(scale: np.ndarray, rows: int, rng) -> np.ndarray:
    """Inputs at and one float32 step beside the points where the levels change, for per-channel
    ``scale`` (levels / bound, as the ONNX functions divide): where a scale taken as bound's
    reciprocal times levels is one rounding off, these fall on the other level."""
    k = rng.integers(-8, 9, size=(rows, scale.size)).astype(np.float32)
    x = (k + 0.5) / scale
    return np.stack([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))]).reshape(-1,
                                                                                                         scale.size)


@pytest.mark.parametrize("signed", [1, 0])
def test_torch_quantizers_match_onnxruntime_at_the_level_boundaries(monkeypatch, signed):
    """Bit for bit, both torch paths (the C kernels and the composition) against onnxruntime."""
    rng = np.random.default_rng(5)
    bits = 4
    bound = rng.uniform(0.1, 10.0, 64).astype(np.float32)
    levels = np.float32(2 ** (bits - 1) - 1 if signed else 2**bits)
    x = _boundary_inputs(levels / bound, 40, rng)
    if not signed:
        x = np.abs(x)
    wmax = rng.uniform(0.01, 1.0, 64).astype(np.float32)
    inside = _boundary_inputs(np.float32(2 ** (bits - 1) - 1) / wmax, 8, rng).T  # |levels| <= 8.5: clipped to 7
    w = np.concatenate([wmax[:, None], np.clip(inside, -wmax[:, None], wmax[:, None])], axis=1).reshape(64, 5, 5, 1)
    expected_x = run_onnx("QuantizeActs", [x, bound], bits=bits, signed=signed)
    expected_w = run_onnx("QuantizeWeights", [w], bits=bits)
    for kernels in ("1", "0"):
        monkeypatch.setenv("BNNCC_CPU_KERNELS", kernels)
        got_x = quantize_acts(torch.from_numpy(x), torch.from_numpy(bound), bits, signed).numpy()
        np.testing.assert_array_equal(got_x, expected_x, err_msg=f"BNNCC_CPU_KERNELS={kernels}")
        got_w = quantize_weights(torch.from_numpy(w), bits).numpy()
        np.testing.assert_array_equal(got_w, expected_w, err_msg=f"BNNCC_CPU_KERNELS={kernels}")
