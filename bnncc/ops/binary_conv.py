"""BinaryConv: a k x k convolution of binarized activations with binarized weights, TF SAME padding.

Forward, for X (N, Cin, H, W) and W (Cout, Cin, k, k)::

    Xb = BinarizeAct(X)                 # +-B/2
    Wb = sign(W) * max|W[o]| / 2        # per output channel
    Y  = conv(pad(Xb, SAME, value 0), Wb, stride s)

The padding is applied after binarization, so padded cells contribute 0 (not +-B/2).
TF SAME padding per spatial axis: out = ceil(H / s), total = max((out - 1) * s + k - H, 0),
before = total // 2, after = total - before (3x3 stride 2 on an even size: 0 before, 1 after).
No bias. Backward: binarize_act's clipped STE for X, binarize_weights' clipped one for W.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from onnxscript import script

from bnncc.domain import DEFAULT_CLIP_BOUND
from bnncc.ops import checks
from bnncc.ops._opset import bnncc_opset, op
from bnncc.ops.binarize import BinarizeAct, binarize_act, binarize_weights
from bnncc.ops.counting import conv_layer
from bnncc.ops.qonnx_nodes import QONNX_DOMAIN
from bnncc.ops.registry import OpDef, register

__all__ = ["BinaryConv", "binary_conv", "same_pads", "binary_layer", "emit_qonnx"]


@script(bnncc_opset, default_opset=op)
def BinaryConv(X, W, kernel_shape: Sequence[int], strides: Sequence[int], clip_bound: float = DEFAULT_CLIP_BOUND):
    # SAME_UPPER is TF SAME (the odd cell after); Conv pads the already binarized input with 0.
    xb = BinarizeAct(X, clip_bound=clip_bound)
    wmax = op.ReduceMax(op.Abs(W), op.Constant(value_ints=[1, 2, 3]), keepdims=1)
    half = wmax * op.CastLike(0.5, W)
    wb = op.Where(W >= op.CastLike(0.0, W), half, op.Neg(half))
    return op.Conv(xb, wb, kernel_shape=kernel_shape, strides=strides, auto_pad="SAME_UPPER")


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) TF SAME padding of one spatial axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def binary_conv(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    clip_bound: float = DEFAULT_CLIP_BOUND,
    quantize_weights: bool = True,
) -> torch.Tensor:
    """Torch BinaryConv; ``quantize_weights=False`` keeps float weights (first training phase)."""
    top, bottom = same_pads(x.shape[2], kernel_shape[0], strides[0])
    left, right = same_pads(x.shape[3], kernel_shape[1], strides[1])
    xb = binarize_act(x, clip_bound)
    wb = binarize_weights(w) if quantize_weights else w
    if (top, left) == (bottom, right):  # symmetric: conv2d's own zero padding saves a padded copy
        return F.conv2d(xb, wb, stride=tuple(strides), padding=(top, left))
    return F.conv2d(F.pad(xb, (left, right, top, bottom)), wb, stride=tuple(strides))


def binary_layer(node, shapes, **part):
    """The binary conv's layer: 1-bit weights and activations (``part``: see ``conv_layer``)."""
    return conv_layer(node, shapes, 1, 1, 1, **part)


def emit_qonnx(e, node, inputs, dims) -> str:
    """``BipolarQuant(X, B/2)`` and ``BipolarQuant(W, max|W[o]|/2)`` (y = scale * (x >= 0 ? 1 : -1)),
    then an explicit zero ``Pad`` (TF SAME) and ``Conv`` with no padding: the border contributes 0."""
    x, w_name = inputs[:2]
    shape_in = dims(node.inputs[0])
    bound = node.attributes["clip_bound"].as_float()
    k = list(node.attributes["kernel_shape"].as_ints())
    s = list(node.attributes["strides"].as_ints())
    w = e.value(w_name)
    xq = e.node("BipolarQuant", [x, e.const(f"{node.name}.xscale", np.float32(bound / 2))], f"{node.name}.xq",
                domain=QONNX_DOMAIN)
    wscale = (np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 2).reshape(-1, 1, 1, 1).astype(np.float32)
    wq = e.node("BipolarQuant", [w_name, e.const(f"{node.name}.wscale", wscale)], f"{node.name}.wq",
                domain=QONNX_DOMAIN)
    (top, bottom), (left, right) = same_pads(shape_in[2], k[0], s[0]), same_pads(shape_in[3], k[1], s[1])
    padded = e.node("Pad", [xq, e.const(f"{node.name}.pads", np.array([0, 0, top, left, 0, 0, bottom, right]))],
                    f"{node.name}.pad")
    return e.node("Conv", [padded, wq], node.name, kernel_shape=k, strides=s)


def _layers(node, shapes, float_bits: int):
    return [binary_layer(node, shapes)]


def _check(node) -> None:
    checks.required_attributes(node, ("kernel_shape", "strides"))
    checks.positive_attribute(node, "clip_bound", DEFAULT_CLIP_BOUND)


OP = register(OpDef("BinaryConv", (BinaryConv,), torch=binary_conv, layers=_layers, weight_inputs=(1,),
                    qonnx=emit_qonnx, check=_check))
