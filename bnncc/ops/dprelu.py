"""DPReLU: a PReLU with learned slopes on both sides and learned shifts, per channel (axis 1).

    t = x - bias_x
    y = (pos_slope if t >= 0 else neg_slope) * t - bias_y

Initialised bias_x = bias_y = 0, pos_slope = 1, neg_slope = 0.25 (pokebnn.md section 2).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from onnxscript import script

from bnncc.ops import cpu_kernels
from bnncc.ops._opset import bnncc_opset, op
from bnncc.ops.batch_norm import batch_norm, kernels_fit
from bnncc.ops.counting import per_output
from bnncc.ops.qonnx_nodes import per_channel
from bnncc.ops.registry import OpDef, register
from bnncc.ops.reshape_add import match_shortcut

__all__ = ["DPReLU", "dprelu", "normed_gated_dprelu"]


@script(bnncc_opset, default_opset=op)
def DPReLU(X, bias_x, bias_y, pos_slope, neg_slope):
    axes = op.Constant(value_ints=[0, 2, 3])
    t = X - op.Unsqueeze(bias_x, axes)
    slope = op.Where(t >= op.CastLike(0.0, X), op.Unsqueeze(pos_slope, axes), op.Unsqueeze(neg_slope, axes))
    return slope * t - op.Unsqueeze(bias_y, axes)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, 1, 1)


class _Norm(NamedTuple):
    """A training batch norm folded into the fused DPReLU: its running statistics (updated in
    place) and attributes; its gamma and beta are inputs of the autograd node."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    momentum: float
    eps: float


class _FusedDPReLU(torch.autograd.Function):
    """DPReLU of x plus up to two shortcuts, times an SE gate when one is given, as the fused CPU
    kernels (cpu_kernels.py): one pass over the activations each way where the torch composition
    below makes 16 (the adds and the gate's Mul 5 more). With a ``_Norm``, x is a convolution's
    output and the batch norm after it runs folded in: its statistics take a pass, its
    normalisation rides in the DPReLU's, and backward its sums ride in the DPReLU's backward,
    one pass each way fewer than the batch norm alone."""

    @staticmethod
    def forward(ctx, x, bias_x, bias_y, pos_slope, neg_slope, gate, kernels, norm: _Norm | None, gamma, beta,
                *shortcuts):
        ctx.kernels, ctx.norm = kernels, norm
        mean = var = scale = folded = None
        if norm is not None:
            mean, var, scale = cpu_kernels.batch_norm_stats(ctx.kernels, x, gamma, norm.eps, norm.momentum,
                                                            norm.running_mean, norm.running_var)
            folded = (mean, scale, beta)
        ctx.save_for_backward(x, bias_x, bias_y, pos_slope, neg_slope, gate, gamma, beta, mean, var, scale, *shortcuts)
        return cpu_kernels.dprelu_forward(ctx.kernels, x, bias_x, bias_y, pos_slope, neg_slope, gate, shortcuts, folded)

    @staticmethod
    def backward(ctx, grad):
        x, bias_x, bias_y, pos_slope, neg_slope, gate, gamma, beta, mean, var, scale, *shortcuts = ctx.saved_tensors
        folded = None if ctx.norm is None else (mean, scale, beta)
        d_in, *params, sums = cpu_kernels.dprelu_backward(ctx.kernels, grad, x, bias_x, bias_y, pos_slope, neg_slope,
                                                          gate, shortcuts, folded)
        dx, d_gamma, d_beta = d_in, None, None
        if ctx.norm is not None:
            dx, d_gamma, d_beta = cpu_kernels.batch_norm_backward(ctx.kernels, d_in, x, gamma, mean, var, ctx.norm.eps,
                                                                  sums)
        # an add passes its gradient to both sides
        return dx, *params, None, None, d_gamma, d_beta, *(d_in for _ in shortcuts)


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
    kernels = cpu_kernels.kernels_for(x)
    if kernels is not None:
        return _FusedDPReLU.apply(x, bias_x, bias_y, pos_slope, neg_slope, None, kernels, None, None, None)
    return _DPReLU.apply(x, bias_x, bias_y, pos_slope, neg_slope)


def _fused_kernels(x, gate, matched):
    """The kernel library when it runs x, a gate of shape (N, C, 1, 1) or None and the matched
    shortcuts, else None."""
    fits = (gate is None or gate.shape == (x.shape[0], x.shape[1], 1, 1)) and all(
        m.shape == x.shape and m.stride() == x.stride() for m in matched)
    return cpu_kernels.kernels_for(x) if fits else None


def _gated(x, bias_x, bias_y, pos_slope, neg_slope, gate, matched) -> torch.Tensor:
    kernels = _fused_kernels(x, gate, matched)
    if kernels is not None:
        return _FusedDPReLU.apply(x, bias_x, bias_y, pos_slope, neg_slope, gate, kernels, None, None, None, *matched)
    for m in matched:
        x = x + m
    y = dprelu(x, bias_x, bias_y, pos_slope, neg_slope)
    return y if gate is None else y * gate


def normed_gated_dprelu(x, scale, bias, mean, var, bias_x, bias_y, pos_slope, neg_slope, gate, *shortcuts,
                        methods=(), momentum: float, eps: float, training: bool) -> torch.Tensor:
    """``dprelu(batch_norm(x, scale, bias, mean, var, ...) + shortcuts[0] ..., ...) * gate``: ONNX
    BatchNormalization's inputs and batch_norm.py's semantics; each shortcut matched to x's shape
    first (reshape_add); a gate of shape (N, C, 1, 1), or None (a PokeConv without SE gate). One
    autograd node in training where the kernels run: the torch view runs a PokeConv's batch norm,
    shortcut adds, DPReLU and gate Mul as this step."""
    matched = [match_shortcut(x, r, method) for r, method in zip(shortcuts, methods, strict=True)]
    kernels = _fused_kernels(x, gate, matched) if training and kernels_fit(x, mean, var, scale, bias) else None
    if kernels is not None:
        return _FusedDPReLU.apply(x, bias_x, bias_y, pos_slope, neg_slope, gate, kernels,
                                  _Norm(mean, var, momentum, eps), scale, bias, *matched)
    y = batch_norm(x, scale, bias, mean, var, momentum=momentum, eps=eps, training=training)
    return _gated(y, bias_x, bias_y, pos_slope, neg_slope, gate, matched)


def emit_qonnx(e, node, inputs, dims) -> str:
    """Standard ops: t = X - bias_x; Where(t >= 0, pos, neg) * t - bias_y."""
    name = node.name
    x, params = inputs[0], inputs[1:5]
    bx, by, ps, ns = (per_channel(e, p, f"{name}.{i}") for i, p in enumerate(params))
    t = e.node("Sub", [x, bx], f"{name}.t")
    positive = e.node("GreaterOrEqual", [t, e.const(f"{name}.zero", np.float32(0))], f"{name}.pos")
    slope = e.node("Where", [positive, ps, ns], f"{name}.slope")
    return e.node("Sub", [e.node("Mul", [slope, t], f"{name}.mul"), by], name)


OP = register(OpDef("DPReLU", (DPReLU,), torch=dprelu, sops=per_output("dprelu"), qonnx=emit_qonnx))
