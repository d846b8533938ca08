"""Int-k fake quantizers and the ops built on them: QuantConv and QuantGemm.

Weights, symmetric per output channel (axis 0), m = 2^(b-1) - 1::

    s = m / max|W[o]|,   Wq = clip(floor(W * s + 0.5), -m, m) / s

Activations, per input channel c (axis 1) with the calibrated bound Bc = act_bound[c]::

    signed:    s = (2^(a-1) - 1) / Bc,   q = clip(floor(x * s + 0.5), -(2^(a-1) - 1), 2^(a-1) - 1) / s
    unsigned:  s = 2^a / Bc,             q = clip(floor(x * s), 0, 2^a - 1) / s

A channel whose bound is <= 0 is not calibrated yet and passes through as float.
Backward: straight through (gradient 1) inside the clip range, 0 outside it; scales are
stop-gradient. QuantConv then runs Conv(+bias); QuantGemm runs Y = Xq Wq^T + B.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from onnx.helper import make_tensor
from onnxscript import FLOAT, INT64, script

from bnncc.ops._opset import bnncc_opset, op
from bnncc.ops.binarize import straight_through

__all__ = [
    "QuantizeWeights", "QuantizeActs", "QuantConv", "QuantGemm",
    "quantize_weights", "quantize_acts", "quant_conv", "quant_gemm",
]


@script(bnncc_opset, default_opset=op)
def QuantizeWeights(W, bits: int):
    b = op.Cast(op.Constant(value_int=bits), to=FLOAT.dtype)
    m = op.CastLike(op.Pow(op.Constant(value_float=2.0), b - op.Constant(value_float=1.0)) - op.Constant(value_float=1.0), W)
    # Per output channel: work on W flattened to (Cout, K), then restore W's shape.
    flat = op.Flatten(W, axis=1)
    wmax = op.ReduceMax(op.Abs(flat), op.Constant(value_ints=[1]), keepdims=1)
    safe = op.Where(wmax > op.CastLike(0.0, W), wmax, op.CastLike(1.0, W))
    s = m / safe
    q = op.Clip(op.Floor(flat * s + op.CastLike(0.5, W)), op.Neg(m), m) / s
    return op.Reshape(q, op.Shape(W))


@script(bnncc_opset, default_opset=op)
def QuantizeActs(X, bound, bits: int, signed: int):
    rank = op.Size(op.Shape(X))
    ones = op.ConstantOfShape(op.Reshape(rank - op.Constant(value_int=2), op.Constant(value_ints=[1])),
                              value=make_tensor("one", INT64.dtype, [1], [1]))
    b = op.Reshape(op.CastLike(bound, X), op.Concat(op.Constant(value_ints=[1, -1]), ones, axis=0))
    calibrated = b > op.CastLike(0.0, X)
    safe = op.Where(calibrated, b, op.CastLike(1.0, X))
    a = op.Cast(op.Constant(value_int=bits), to=FLOAT.dtype)
    two = op.Constant(value_float=2.0)
    one = op.Constant(value_float=1.0)
    ms = op.CastLike(op.Pow(two, a - one) - one, X)
    mu = op.CastLike(op.Pow(two, a), X)
    s_signed = ms / safe
    q_signed = op.Clip(op.Floor(X * s_signed + op.CastLike(0.5, X)), op.Neg(ms), ms) / s_signed
    s_unsigned = mu / safe
    q_unsigned = op.Clip(op.Floor(X * s_unsigned), op.CastLike(0.0, X), mu - op.CastLike(1.0, X)) / s_unsigned
    is_signed = op.Cast(op.Constant(value_int=signed), to=9)  # BOOL
    q = op.Where(calibrated, op.Where(is_signed, q_signed, q_unsigned), X)
    return op.Reshape(q, op.Shape(X))  # as in QuantizeWeights: keeps X's shape visible to inference


@script(bnncc_opset, default_opset=op)
def QuantConv(X, W, act_bound, B, w_bits: int, a_bits: int, a_signed: int, kernel_shape: Sequence[int],
              strides: Sequence[int], pads: Sequence[int], group: int):
    xq = QuantizeActs(X, act_bound, bits=a_bits, signed=a_signed)
    wq = QuantizeWeights(W, bits=w_bits)
    return op.Conv(xq, wq, B, kernel_shape=kernel_shape, strides=strides, pads=pads, group=group)


@script(bnncc_opset, default_opset=op)
def QuantGemm(X, W, act_bound, B, w_bits: int, a_bits: int, a_signed: int):
    xq = QuantizeActs(X, act_bound, bits=a_bits, signed=a_signed)
    wq = QuantizeWeights(W, bits=w_bits)
    return op.Gemm(xq, wq, B, transB=1)


@torch.no_grad()
def weight_grid(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The quantized weights' values (no gradient)."""
    m = 2.0 ** (bits - 1) - 1
    wmax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    s = m / torch.where(wmax > 0, wmax, 1.0)
    return torch.clamp(torch.floor(w * s + 0.5), -m, m) / s


def quantize_weights(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantized weights with the straight-through gradient (1)."""
    return straight_through(w, weight_grid(w, bits))


class ActGrid(NamedTuple):
    """What the activation quantizer's backward needs from its forward."""

    scaled: torch.Tensor  # the integer grid value before the clip
    weight: torch.Tensor  # per channel: 1 quantized, 0 uncalibrated (x passes through)
    window: tuple[float, float]  # (lo - 1/2, hi + 1/2) around the clip range [lo, hi]


@torch.no_grad()
def act_grid(x: torch.Tensor, bound: torch.Tensor, bits: int, signed: int) -> tuple[torch.Tensor, ActGrid]:
    """The quantized activations' values and what ``act_grid_backward`` needs.

    No bool tensor or where() on the activations (torch runs both unvectorized on CPU): the
    per-channel choice between the quantized and the float (uncalibrated) value is a lerp with
    weight 1 or 0, which gives one end or the other exactly (but for the sign of a zero: the
    ONNX Where may give -0.0 there)."""
    b = bound.to(x.dtype).reshape((1, -1) + (1,) * (x.dim() - 2))
    calibrated = b > 0  # per channel: a few elements, cheap
    s = (2.0 ** (bits - 1) - 1 if signed else 2.0**bits) / torch.where(calibrated, b, 1.0)
    lo, hi = (-(2.0 ** (bits - 1) - 1), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0**bits - 1)
    scaled = x * s
    if signed:
        scaled += 0.5
    scaled.floor_()
    q = torch.clamp(scaled, lo, hi).div_(s)
    weight = calibrated.to(x.dtype)
    return torch.lerp(x, q, weight), ActGrid(scaled, weight, (lo - 0.5, hi + 0.5))


def act_grid_backward(grad: torch.Tensor, grid: ActGrid) -> torch.Tensor:
    """The clipped straight-through gradient: ``grad`` where lo <= scaled <= hi (scaled is an
    integer, so hardtanh's backward on the widened window tests it) or the channel is float."""
    inside = torch.ops.aten.hardtanh_backward(grad, grid.scaled, *grid.window)
    return torch.lerp(grad, inside, grid.weight)


class _QuantizeActs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bound: torch.Tensor, bits: int, signed: int) -> torch.Tensor:
        q, grid = act_grid(x, bound, bits, signed)
        ctx.save_for_backward(grid.scaled, grid.weight)
        ctx.window = grid.window
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return act_grid_backward(grad, ActGrid(*ctx.saved_tensors, ctx.window)), None, None, None


def quantize_acts(x: torch.Tensor, bound: torch.Tensor, bits: int, signed: int) -> torch.Tensor:
    """Quantized activations with the clipped straight-through gradient."""
    return _QuantizeActs.apply(x, bound, bits, signed)


def quant_conv(
    x, w, act_bound, b, *, w_bits: int, a_bits: int, a_signed: int, kernel_shape: Sequence[int],
    strides: Sequence[int], pads: Sequence[int], group: int = 1, quantize_weights: bool = True,
) -> torch.Tensor:
    """Torch QuantConv; ``pads`` in ONNX order (top, left, bottom, right)."""
    xq = quantize_acts(x, act_bound, a_bits, a_signed)
    wq = _quantize_weights_fn(w, w_bits) if quantize_weights else w
    top, left, bottom, right = pads
    return F.conv2d(F.pad(xq, (left, right, top, bottom)), wq, b, stride=tuple(strides), groups=group)


def quant_gemm(x, w, act_bound, b, *, w_bits: int, a_bits: int, a_signed: int, quantize_weights: bool = True):
    """Torch QuantGemm: Xq Wq^T + B."""
    xq = quantize_acts(x, act_bound, a_bits, a_signed)
    wq = _quantize_weights_fn(w, w_bits) if quantize_weights else w
    return F.linear(xq, wq, b)


# quant_conv's keyword `quantize_weights` shadows the function inside its body.
_quantize_weights_fn = quantize_weights
