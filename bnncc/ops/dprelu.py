"""DPReLU: a PReLU with learned slopes on both sides and learned shifts, per channel (axis 1).

    t = x - bias_x
    y = (pos_slope if t >= 0 else neg_slope) * t - bias_y

Initialised bias_x = bias_y = 0, pos_slope = 1, neg_slope = 0.25 (pokebnn.md section 2).
"""

from __future__ import annotations

import torch
from onnxscript import script

from bnncc.ops import cpu_kernels
from bnncc.ops._opset import bnncc_opset, op
from bnncc.ops.reshape_add import match_shortcut

__all__ = ["DPReLU", "dprelu", "gated_dprelu"]


@script(bnncc_opset, default_opset=op)
def DPReLU(X, bias_x, bias_y, pos_slope, neg_slope):
    axes = op.Constant(value_ints=[0, 2, 3])
    t = X - op.Unsqueeze(bias_x, axes)
    slope = op.Where(t >= op.CastLike(0.0, X), op.Unsqueeze(pos_slope, axes), op.Unsqueeze(neg_slope, axes))
    return slope * t - op.Unsqueeze(bias_y, axes)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, 1, 1)


class _FusedDPReLU(torch.autograd.Function):
    """DPReLU of x plus up to two shortcuts, times an SE gate when one is given, as the fused CPU
    kernels (cpu_kernels.py): one pass over the activations each way where the torch composition
    below makes 16 (the adds and the gate's Mul 5 more)."""

    @staticmethod
    def forward(ctx, x, bias_x, bias_y, pos_slope, neg_slope, gate, *shortcuts):
        ctx.kernels = cpu_kernels.kernels_for(x)
        ctx.save_for_backward(x, bias_x, bias_y, pos_slope, neg_slope, gate, *shortcuts)
        return cpu_kernels.dprelu_forward(ctx.kernels, x, bias_x, bias_y, pos_slope, neg_slope, gate, shortcuts)

    @staticmethod
    def backward(ctx, grad):
        x, bias_x, bias_y, pos_slope, neg_slope, gate, *shortcuts = ctx.saved_tensors
        dx, *rest = cpu_kernels.dprelu_backward(ctx.kernels, grad, x, bias_x, bias_y, pos_slope, neg_slope, gate,
                                                shortcuts)
        return dx, *rest, *(dx for _ in shortcuts)  # an add passes its gradient to both sides


class _DPReLU(torch.autograd.Function):
    """The torch composition: max(t, 0) * pos + min(t, 0) * neg equals the ONNX function's
    where(t >= 0, pos, neg) * t exactly (one term is a zero, so fused or not the multiply-add
    rounds once), without bool tensors or where(), which torch runs unvectorized on CPU; the
    backward is written out for the same reason. Results are built in place: each pass over the
    activations costs a fresh buffer otherwise."""

    @staticmethod
    def forward(ctx, x, bias_x, bias_y, pos_slope, neg_slope):
        t = x - _per_channel(bias_x)
        positive = t.clamp_min(0)
        negative = t.sub_(positive)
        out = positive * _per_channel(pos_slope)
        out.addcmul_(negative, _per_channel(neg_slope)).sub_(_per_channel(bias_y))
        ctx.save_for_backward(positive, negative, pos_slope, neg_slope)
        return out

    @staticmethod
    def backward(ctx, grad):
        positive, negative, pos_slope, neg_slope = ctx.saved_tensors
        dims = (0, 2, 3)
        grad_pos = torch.ops.aten.threshold_backward(grad, positive, 0)  # grad where t > 0
        grad_neg = grad - grad_pos
        dx = grad_pos * _per_channel(pos_slope)
        dx.addcmul_(grad_neg, _per_channel(neg_slope))
        return dx, -dx.sum(dims), -grad.sum(dims), (grad * positive).sum(dims), (grad * negative).sum(dims)


def dprelu(x, bias_x, bias_y, pos_slope, neg_slope) -> torch.Tensor:
    if cpu_kernels.kernels_for(x) is not None:
        return _FusedDPReLU.apply(x, bias_x, bias_y, pos_slope, neg_slope, None)
    return _DPReLU.apply(x, bias_x, bias_y, pos_slope, neg_slope)


def gated_dprelu(x, bias_x, bias_y, pos_slope, neg_slope, gate, *shortcuts, methods=()) -> torch.Tensor:
    """``dprelu(reshape_add(x, shortcuts[0], methods[0]) ..., ...) * gate`` for a gate of shape
    (N, C, 1, 1), as one kernel where they run: the torch view runs a PokeConv's shortcut adds,
    DPReLU and SE gate's Mul as this one step. Each shortcut is matched to x's shape first."""
    matched = [match_shortcut(x, r, method) for r, method in zip(shortcuts, methods, strict=True)]
    fits = all(m.shape == x.shape and m.stride() == x.stride() for m in matched)
    if cpu_kernels.kernels_for(x) is not None and gate.shape == (x.shape[0], x.shape[1], 1, 1) and fits:
        return _FusedDPReLU.apply(x, bias_x, bias_y, pos_slope, neg_slope, gate, *matched)
    for m in matched:
        x = x + m
    return dprelu(x, bias_x, bias_y, pos_slope, neg_slope) * gate
