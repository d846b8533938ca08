"""ReshapeAdd: add a shortcut R to Y after matching its shape, with no parameters (pokebnn.md section 2).

For Y (N, Co, Ho, Wo) and R (N, Ci, Hi, Wi)::

    channels:  Ci > Co: k = Ci // Co, keep channels [0, Co*k), out[c] = mean(R[c*k .. c*k+k-1])
               Ci < Co: method "zeropad" appends zero channels; "tile" gives out[c] = R[c mod Ci]
    spatial:   Hi != Ho: 3x3 average pool, stride 2, TF SAME padding, padded cells counted (/9)
    Y + matched(R)

The function body expresses all channel cases as one gather: with k = max(Ci // Co, 1) and
n = Co * k, source channel j (j < n) is j mod Ci (tile) or min(j, Ci - 1) masked to 0 for
j >= Ci (zeropad), then groups of k are averaged. For Ci >= Co this is the grouped mean; for
Ci < Co, k = 1 and it is the plain expansion.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from onnxscript import FLOAT, script
from onnxscript import opset_ai_onnx_ml3 as ml

from bnncc.ops import cpu_kernels
from bnncc.ops._opset import bnncc_opset, op
from bnncc.ops.binary_conv import same_pads
from bnncc.ops.registry import OpDef, register

__all__ = ["ReshapeAdd", "reshape_add", "match_shortcut", "match_channels", "shortcut_pool"]

METHODS = ("zeropad", "tile")


@script(bnncc_opset, default_opset=op)
def ReshapeAdd(Y, R, method: str):
    ci = op.Shape(R, start=1, end=2)
    co = op.Shape(Y, start=1, end=2)
    k = op.Max(op.Div(ci, co), op.Constant(value_ints=[1]))
    n = op.Squeeze(co * k)
    ci_s = op.Squeeze(ci)
    one = op.Constant(value_int=1)
    idx = op.Range(op.Constant(value_int=0), n, one)
    # ONNX cannot compare strings inside a function: map the attribute to 0/1 with LabelEncoder.
    tile_flag = ml.LabelEncoder(op.Constant(value_string=method), keys_strings=["tile"], values_int64s=[1],
                                default_int64=0)
    is_tile = op.Cast(tile_flag, to=9)  # BOOL
    src = op.Where(is_tile, op.Mod(idx, ci_s), op.Min(idx, ci_s - one))
    keep = op.Where(is_tile, op.Constant(value_float=1.0), op.Cast(idx < ci_s, to=FLOAT.dtype))
    gathered = op.Gather(R, src, axis=1) * op.Reshape(op.CastLike(keep, R), op.Constant(value_ints=[1, -1, 1, 1]))
    grouped = op.Reshape(gathered, op.Concat(op.Shape(R, start=0, end=1), co, k, op.Shape(R, start=2), axis=0))
    matched = op.ReduceMean(grouped, op.Constant(value_ints=[2]), keepdims=0)
    # pooled where either side differs: a flat input's height reaches 1 while its width still halves
    if op.Or(op.Squeeze(op.Shape(R, start=2, end=3) != op.Shape(Y, start=2, end=3)),
             op.Squeeze(op.Shape(R, start=3, end=4) != op.Shape(Y, start=3, end=4))):
        size = op.Shape(R, start=2)
        two = op.Constant(value_ints=[2, 2])
        out = op.Div(size + op.Constant(value_ints=[1, 1]), two)
        total = op.Max((out - op.Constant(value_ints=[1, 1])) * two + op.Constant(value_ints=[3, 3]) - size,
                       op.Constant(value_ints=[0, 0]))
        before = op.Div(total, two)
        zeros = op.Constant(value_ints=[0, 0])
        padded = op.Pad(matched, op.Concat(zeros, before, zeros, total - before, axis=0))
        pooled = op.AveragePool(padded, kernel_shape=[3, 3], strides=[2, 2])
    else:
        pooled = op.Identity(matched)
    # The reshape to Y's shape lets ONNX shape inference see the output shape through the If.
    return Y + op.Reshape(pooled, op.Shape(Y))


def _empty(shape: torch.Size, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An uninitialised tensor in the given layout; a backward returns each input's gradient in
    the layout the input had, as autograd does."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout)


class _Tile(torch.autograd.Function):
    """out[:, c] = r[:, c mod ci] for c < co: one pass of the fused CPU kernel where it runs, else
    copies of r into channel blocks, the backward adding the blocks' gradients slice by slice.
    index_select's backward (index_add_) and the sum over a block axis both run a slow path in
    channels_last (4-7x slower at 224 px)."""

    @staticmethod
    def forward(ctx, r: torch.Tensor, co: int) -> torch.Tensor:
        n, ci, h, w = r.shape
        ctx.r_shape, ctx.channels_last = r.shape, r.is_contiguous(memory_format=torch.channels_last)
        out = _empty((n, co, h, w), r, ctx.channels_last)
        ctx.kernels = cpu_kernels.kernels_for(r)
        if ctx.kernels is not None:
            return cpu_kernels.tile(ctx.kernels, r, out)
        for begin in range(0, co, ci):
            out[:, begin : begin + ci] = r[:, : co - begin]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ci, co = ctx.r_shape[1], grad.shape[1]
        if ctx.kernels is not None:
            return cpu_kernels.tile_backward(ctx.kernels, grad, _empty(ctx.r_shape, grad, ctx.channels_last)), None
        dr = _empty(ctx.r_shape, grad, ctx.channels_last).copy_(grad[:, :ci])
        for begin in range(ci, co, ci):
            block = grad[:, begin : begin + ci]
            dr[:, : block.shape[1]] += block
        return dr, None


class _GroupMean(torch.autograd.Function):
    """out[:, c] = mean(r[:, c*k .. c*k+k-1]) for c < co; channels from co*k on are dropped.

    One pass of the fused CPU kernel where it runs (the same adds in the same order); else k - 1
    adds of strided channel slices, and the backward as one broadcast copy:
    ``mean(dim=2)`` over the k axis is a reduction over a short inner axis in channels_last
    (the trainer's format), which torch runs unvectorized (3x slower), and autograd's own
    backward of slices would build a zero tensor per slice."""

    @staticmethod
    def forward(ctx, r: torch.Tensor, co: int) -> torch.Tensor:
        k = r.shape[1] // co
        ctx.k, ctx.r_shape = k, r.shape
        ctx.channels_last = r.is_contiguous(memory_format=torch.channels_last)
        ctx.kernels = cpu_kernels.kernels_for(r)
        if ctx.kernels is not None:
            n, _, h, w = r.shape
            return cpu_kernels.group_mean(ctx.kernels, r, _empty((n, co, h, w), r, ctx.channels_last))
        groups = r[:, : co * k].unflatten(1, (co, k))
        total = groups[:, :, 0].clone()
        for j in range(1, k):
            total += groups[:, :, j]
        return total.div_(k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k, co = ctx.k, grad.shape[1]
        dr = _empty(ctx.r_shape, grad, ctx.channels_last)
        if ctx.kernels is not None:
            return cpu_kernels.group_mean_backward(ctx.kernels, grad, dr), None
        dr[:, : co * k].unflatten(1, (co, k)).copy_((grad / k).unsqueeze(2))
        dr[:, co * k:] = 0.0
        return dr, None


def match_channels(r: torch.Tensor, out_channels: int, method: str) -> torch.Tensor:
    """Channel step of ReshapeAdd on ``r`` (N, C, H, W)."""
    ci = r.shape[1]
    if ci == out_channels:
        return r
    if ci > out_channels:
        return _GroupMean.apply(r, out_channels)
    if method == "tile":
        return _Tile.apply(r, out_channels)
    return F.pad(r, (0, 0, 0, 0, 0, out_channels - ci))


def shortcut_pool(r: torch.Tensor) -> torch.Tensor:
    """3x3 stride-2 average pool with TF SAME padding, padded cells counted."""
    top, bottom = same_pads(r.shape[2], 3, 2)
    left, right = same_pads(r.shape[3], 3, 2)
    return F.avg_pool2d(F.pad(r, (left, right, top, bottom)), 3, 2)


def match_shortcut(y: torch.Tensor, r: torch.Tensor, method: str) -> torch.Tensor:
    """R with Y's shape: ReshapeAdd(Y, R) is ``y + match_shortcut(y, r, method)``."""
    if method not in METHODS:
        raise ValueError(f"ReshapeAdd method must be one of {METHODS}, got {method!r}")
    pool = r.shape[2:] != y.shape[2:]
    # The pool works per channel, so it commutes with the channel step; it runs on the narrower
    # side. Expanding (tile, zeropad) only copies channels or adds zeros, so pooling first gives
    # the same bits; the group mean pools after, in the order the ONNX function rounds in.
    if pool and r.shape[1] < y.shape[1]:
        return match_channels(shortcut_pool(r), y.shape[1], method)
    matched = match_channels(r, y.shape[1], method)
    return shortcut_pool(matched) if pool else matched


def reshape_add(y: torch.Tensor, r: torch.Tensor, *, method: str) -> torch.Tensor:
    return y + match_shortcut(y, r, method)


def sops(node, shapes, method: str | None = None, residual=None) -> dict[str, int]:
    """Channel shrink (Hi*Wi*Co*k adds, Hi*Wi*Co multiplies), 3x3 pool (9 per output), the add.

    ``method`` and ``residual`` default to the node's own (PokeConv counts its shortcuts with them)."""
    co, ho, wo = shapes.per_image(node, node.outputs[0])
    ci, hi, wi = shapes.per_image(node, residual if residual is not None else node.inputs[1])
    method = method or node.attributes["method"].as_string()
    counts = {"local_residual_add" if method == "zeropad" else "block_residual_add": co * ho * wo}
    if ci > co:
        counts["shortcut_shrink"] = hi * wi * co * (ci // co)
        counts["shortcut_shrink_mul"] = hi * wi * co
    if (hi, wi) != (ho, wo):
        counts["shortcut_pool"] = 9 * co * ho * wo
    return counts


def emit_qonnx(e, node, inputs, dims) -> str:
    """Gather + group mean for the channels, a count-padded SAME AveragePool, then Add."""
    name = node.name
    y, r = inputs[:2]
    y_shape, r_shape = dims(node.inputs[0]), dims(node.inputs[1])
    method = node.attributes["method"].as_string()
    ci, co, h = r_shape[1], y_shape[1], r_shape[2]
    k = max(ci // co, 1)
    index = np.arange(co * k)
    source = index % ci if method == "tile" else np.minimum(index, ci - 1)
    keep = np.ones(co * k, np.float32) if method == "tile" else (index < ci).astype(np.float32)
    gathered = e.node("Gather", [r, e.const(f"{name}.src", source.astype(np.int64))], f"{name}.gather", axis=1)
    masked = e.node("Mul", [gathered, e.const(f"{name}.keep", keep.reshape(1, -1, 1, 1))], f"{name}.mask")
    grouped = e.node("Reshape", [masked, e.const(f"{name}.shape", np.array([0, co, k, h, r_shape[3]]))],
                     f"{name}.group")
    matched = e.node("ReduceMean", [grouped, e.const(f"{name}.axes", np.array([2]))], f"{name}.mean", keepdims=0)
    if tuple(r_shape[2:]) != tuple(y_shape[2:]):
        (top, bottom), (left, right) = same_pads(h, 3, 2), same_pads(r_shape[3], 3, 2)
        matched = e.node("AveragePool", [matched], f"{name}.pool", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[top, left, bottom, right], count_include_pad=1)
    return e.node("Add", [y, matched], name)


OP = register(OpDef("ReshapeAdd", (ReshapeAdd,), torch=reshape_add, sops=sops, qonnx=emit_qonnx,
                    activation_inputs=(0, 1)))
