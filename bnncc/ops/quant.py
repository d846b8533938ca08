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

from typing import Sequence

import torch
import torch.nn.functional as F
from onnx.helper import make_tensor
from onnxscript import FLOAT, INT64, script

from bnncc.ops import checks, cpu_kernels, qonnx_nodes
from bnncc.ops._opset import bnncc_opset, op
from bnncc.ops.binarize import straight_through
from bnncc.ops.counting import bits_attr, conv_layer, dense_layer
from bnncc.ops.registry import OpDef, register

__all__ = [
    "QuantizeWeights", "QuantizeActs", "QuantConv", "QuantGemm",
    "quantize_weights", "quantize_acts", "quant_conv", "quant_gemm", "channel_absmax",
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
    kernels = cpu_kernels.weight_kernels_for(w)
    if kernels is not None:
        return cpu_kernels.quantize_weights(kernels, w, bits)
    m = 2.0 ** (bits - 1) - 1
    wmax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    safe = torch.where(wmax > 0, wmax, 1.0)
    s = safe.new_tensor(m) / safe  # a division, as the ONNX function's (torch's m / t multiplies by 1 / t)
    return torch.clamp(torch.floor(w * s + 0.5), -m, m) / s


def quantize_weights(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantized weights with the straight-through gradient (1)."""
    return straight_through(w, weight_grid(w, bits))


def _act_range(bits: int, signed: int) -> tuple[float, float, float]:
    """(m, lo, hi): the scale's numerator and the clip range of the integer levels."""
    if signed:
        m = 2.0 ** (bits - 1) - 1
        return m, -m, m
    return 2.0**bits, 0.0, 2.0**bits - 1


@torch.no_grad()
def _act_levels(x, bound, bits, signed, relu):
    """Torch composition: (the quantizer's input, scale, integer level before the clip, per-channel
    weight 1 where quantized and 0 where the channel is uncalibrated and passes through)."""
    if relu:
        x = torch.relu(x)
    b = bound.to(x.dtype).reshape((1, -1) + (1,) * (x.dim() - 2))
    calibrated = b > 0  # per channel: a few elements, cheap
    m, _, _ = _act_range(bits, signed)
    safe = torch.where(calibrated, b, 1.0)
    s = safe.new_tensor(m) / safe  # as in weight_grid
    levels = x * s
    if signed:
        levels += 0.5
    return x, s, levels.floor_(), calibrated.to(x.dtype)


@torch.no_grad()
def act_quantize(x: torch.Tensor, bound: torch.Tensor, bits: int, signed: int, relu: bool = False) -> torch.Tensor:
    """The quantized values of ``relu(x) if relu else x`` (no gradient).

    The fused CPU kernel where it runs; else torch ops without a bool tensor or where() on the
    activations (torch runs both unvectorized on CPU): the per-channel choice between the
    quantized and the float (uncalibrated) value is a lerp with weight 1 or 0, which gives one
    end or the other exactly (but for the sign of a zero: the ONNX Where may give -0.0 there)."""
    kernels = cpu_kernels.kernels_for(x)
    if kernels is not None:
        return cpu_kernels.quantize_acts(kernels, x, bound, bits, signed, relu)
    v, s, levels, weight = _act_levels(x, bound, bits, signed, relu)
    _, lo, hi = _act_range(bits, signed)
    return torch.lerp(v, levels.clamp_(lo, hi).div_(s), weight)


@torch.no_grad()
def act_quantize_backward(grad: torch.Tensor, x: torch.Tensor, bound: torch.Tensor, bits: int, signed: int,
                          relu: bool = False, divisor: float = 1.0) -> torch.Tensor:
    """The clipped straight-through gradient of ``act_quantize`` at ``x``: ``grad`` where the level
    lies in [lo, hi] or the channel is float, and with ``relu`` where x > 0; else 0. Divided by
    ``divisor``, when a mean's backward is folded in."""
    kernels = cpu_kernels.kernels_for(x)
    if kernels is not None:
        return cpu_kernels.quantize_acts_backward(kernels, grad, x, bound, bits, signed, relu, divisor)
    v, _, levels, weight = _act_levels(x, bound, bits, signed, relu)
    _, lo, hi = _act_range(bits, signed)
    # levels are integers, so hardtanh's backward on the window widened by 1/2 tests lo <= level <= hi
    dx = torch.lerp(grad, torch.ops.aten.hardtanh_backward(grad, levels, lo - 0.5, hi + 0.5), weight)
    if relu:
        dx = torch.ops.aten.threshold_backward(dx, v, 0)
    return dx if divisor == 1.0 else dx / divisor


class _QuantizeActs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bound: torch.Tensor, bits: int, signed: int) -> torch.Tensor:
        ctx.save_for_backward(x, bound)
        ctx.bits, ctx.signed = bits, signed
        return act_quantize(x, bound, bits, signed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, bound = ctx.saved_tensors
        return act_quantize_backward(grad, x, bound, ctx.bits, ctx.signed), None, None, None


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


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over every axis but the channel axis 1: what an activation bound calibrates on."""
    dims = [d for d in range(x.dim()) if d != 1]
    return x.detach().abs().amax(dim=dims)


def _observe_input(args: list[torch.Tensor], attrs: dict) -> torch.Tensor:
    """QuantConv/QuantGemm: the quantized activation is input X."""
    return channel_absmax(args[0])


def _conv_layers(node, shapes, float_bits: int):
    w_bits = bits_attr(node, "w_bits")
    return [conv_layer(node, shapes, w_bits, bits_attr(node, "a_bits"), w_bits)]


def _gemm_layers(node, shapes, float_bits: int):
    w_bits = bits_attr(node, "w_bits")
    return [dense_layer(node, shapes.static(node, node.inputs[1]), 1, w_bits, bits_attr(node, "a_bits"), w_bits)]


def _emit_qonnx(e, node, inputs, dims) -> str:
    """IntQuant on weights and activations, then Conv / Gemm (qonnx_nodes.quant_conv)."""
    attrs = {a.name: a.value for a in node.attributes.values()}
    conv = {k: attrs[k] for k in ("kernel_shape", "strides", "pads", "group") if k in attrs}
    return qonnx_nodes.quant_conv(e, node.name, *inputs, attrs["w_bits"], attrs["a_bits"], bool(attrs["a_signed"]),
                                  len(dims(node.inputs[0])), **conv)


def _check(node) -> None:
    """The attributes, bit widths, weight scales (input 1) and activation bounds (input 2) of QuantConv and
    QuantGemm."""
    checks.required_attributes(node, ("a_signed",) if node.op_type == "QuantGemm" else
                               ("a_signed", "kernel_shape", "strides", "pads"))
    checks.weight_scales(node, 1, checks.bits(node, "w_bits"))
    checks.act_bounds(node, 2, checks.bits(node, "a_bits"), bool(node.attributes.get_int("a_signed", 1)))


register(OpDef("QuantizeWeights", (QuantizeWeights,)))
register(OpDef("QuantizeActs", (QuantizeActs,)))
register(OpDef("QuantConv", (QuantConv,), torch=quant_conv, layers=_conv_layers, weight_inputs=(1,),
               state_inputs=(2,), bounds=((2, _observe_input),), qonnx=_emit_qonnx, check=_check))
register(OpDef("QuantGemm", (QuantGemm,), torch=quant_gemm, layers=_gemm_layers, weight_inputs=(1,),
               state_inputs=(2,), bounds=((2, _observe_input),), qonnx=_emit_qonnx, check=_check))
