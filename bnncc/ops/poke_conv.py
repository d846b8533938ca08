"""PokeConv: a PokeBNN binary conv with everything around it, as one op (pokebnn.md section 2).

For the conv's input X (N, Cin, H, W) and weight W (Cout, Cin, k, k)::

    c = BinaryConv(X, W)                              # k x k, stride s, TF SAME, no bias
    b = BatchNormalization(c; bn_*)                   # gamma 0 on a bottleneck's last conv, else 1
    s = ReshapeAdd(b, X, method="zeropad")            # local shortcut, around every binary conv
    s = ReshapeAdd(s, R, method="tile")               # block shortcut: the "block" overloads only
    d = DPReLU(s, bias_x, bias_y, pos_slope, neg_slope)
    g = SEGate(X, se_w1, se_bound1, se_b1, se_w2, se_bound2, se_b2)   # Cin -> Cin/8 -> Cout, int4
    Y = BatchNormalization(d * g; split_*)            # bn_split, gamma 1; BN(d) in the "ungated" overloads

The ONNX function is that chain of ai.bnncc functions (onnxruntime runs it; Netron expands it).
Two parts are optional, and ONNX functions cannot test for an omitted input, so the ONNX
overload of a node names the parts it has (``OVERLOADS``):

- the block shortcut R (the block's input, read by its last conv), input 20: overloads
  ``"block"`` and ``"block_ungated"`` add it;
- the SE gate, inputs 10-15: a node without it (Bi-Real Net's arrangement, the recipes
  ``resnet{18,34}_bireal``) omits all six (empty names) and carries ``"ungated"`` or
  ``"block_ungated"``, whose bodies leave out the gate and its multiply. One op with overloads
  rather than a second op: every face reads the same input positions, and the only difference,
  a multiply by a gate, is skipped, not computed with a gate of ones.

Both batch norms share ``epsilon`` and ``momentum``.

Training runs the binary conv, the SE gate, then the first batch norm, the shortcuts, the DPReLU
and the gate's multiply as one fused step (``dprelu.normed_gated_dprelu``), then the second batch
norm. The TVM lowering makes one fused kernel of the whole op (``bnncc.targets.lower``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from onnxscript import script

from bnncc.domain import BN_EPSILON, BN_MOMENTUM, DEFAULT_CLIP_BOUND
from bnncc.errors import BnnccError
from bnncc.ops._opset import bnncc_opset, op
from bnncc.ops.batch_norm import batch_norm
from bnncc.ops import checks, reshape_add, se_gate as se
from bnncc.ops.binary_conv import BinaryConv, binary_conv, binary_layer
from bnncc.ops.counting import numel
from bnncc.ops.dprelu import DPReLU, normed_gated_dprelu
from bnncc.ops.registry import OpDef, register
from bnncc.ops.reshape_add import ReshapeAdd
from bnncc.ops.se_gate import SEGate, se_gate

__all__ = ["PokeConv", "PokeConvBlock", "PokeConvUngated", "PokeConvBlockUngated", "poke_conv", "INPUTS",
           "OVERLOADS", "overload", "block_input", "se_inputs", "LOCAL_METHOD", "BLOCK_METHOD"]

# The inputs, in order; the positions below index them.
INPUTS = ("X", "W", "bn_scale", "bn_bias", "bn_mean", "bn_var", "bias_x", "bias_y", "pos_slope", "neg_slope",
          "se_w1", "se_bound1", "se_b1", "se_w2", "se_bound2", "se_b2",
          "split_scale", "split_bias", "split_mean", "split_var", "R")
BN = slice(2, 6)
DPRELU = slice(6, 10)
SE = (0, 10, 11, 12, 13, 14, 15)  # the SE gate's inputs (R, W1, bound1, B1, W2, bound2, B2)
SPLIT = slice(16, 20)
BLOCK = 20
# (has the SE gate, has the block shortcut) -> the node's ONNX overload
OVERLOADS = {(True, False): "", (True, True): "block", (False, False): "ungated", (False, True): "block_ungated"}
LOCAL_METHOD, BLOCK_METHOD = "zeropad", "tile"


@script(bnncc_opset, default_opset=op)
def PokeConv(X, W, bn_scale, bn_bias, bn_mean, bn_var, bias_x, bias_y, pos_slope, neg_slope,
             se_w1, se_bound1, se_b1, se_w2, se_bound2, se_b2, split_scale, split_bias, split_mean, split_var,
             kernel_shape: Sequence[int], strides: Sequence[int], clip_bound: float = DEFAULT_CLIP_BOUND,
             se_w_bits: int = 4, se_a_bits: int = 4, epsilon: float = BN_EPSILON, momentum: float = BN_MOMENTUM):
    c = BinaryConv(X, W, kernel_shape=kernel_shape, strides=strides, clip_bound=clip_bound)
    b = op.BatchNormalization(c, bn_scale, bn_bias, bn_mean, bn_var, epsilon=epsilon, momentum=momentum)
    d = DPReLU(ReshapeAdd(b, X, method="zeropad"), bias_x, bias_y, pos_slope, neg_slope)
    g = SEGate(X, se_w1, se_bound1, se_b1, se_w2, se_bound2, se_b2, w_bits=se_w_bits, a_bits=se_a_bits)
    return op.BatchNormalization(op.Mul(d, g), split_scale, split_bias, split_mean, split_var, epsilon=epsilon,
                                 momentum=momentum)


@script(bnncc_opset, default_opset=op)
def PokeConvBlock(X, W, bn_scale, bn_bias, bn_mean, bn_var, bias_x, bias_y, pos_slope, neg_slope,
                  se_w1, se_bound1, se_b1, se_w2, se_bound2, se_b2, split_scale, split_bias, split_mean, split_var,
                  R, kernel_shape: Sequence[int], strides: Sequence[int], clip_bound: float = DEFAULT_CLIP_BOUND,
                  se_w_bits: int = 4, se_a_bits: int = 4, epsilon: float = BN_EPSILON,
                  momentum: float = BN_MOMENTUM):
    # PokeConv's "block" overload: the same chain with the block shortcut R added after the local one
    c = BinaryConv(X, W, kernel_shape=kernel_shape, strides=strides, clip_bound=clip_bound)
    b = op.BatchNormalization(c, bn_scale, bn_bias, bn_mean, bn_var, epsilon=epsilon, momentum=momentum)
    s = ReshapeAdd(ReshapeAdd(b, X, method="zeropad"), R, method="tile")
    d = DPReLU(s, bias_x, bias_y, pos_slope, neg_slope)
    g = SEGate(X, se_w1, se_bound1, se_b1, se_w2, se_bound2, se_b2, w_bits=se_w_bits, a_bits=se_a_bits)
    return op.BatchNormalization(op.Mul(d, g), split_scale, split_bias, split_mean, split_var, epsilon=epsilon,
                                 momentum=momentum)


@script(bnncc_opset, default_opset=op)
def PokeConvUngated(X, W, bn_scale, bn_bias, bn_mean, bn_var, bias_x, bias_y, pos_slope, neg_slope,
                    se_w1, se_bound1, se_b1, se_w2, se_bound2, se_b2, split_scale, split_bias, split_mean, split_var,
                    kernel_shape: Sequence[int], strides: Sequence[int], clip_bound: float = DEFAULT_CLIP_BOUND,
                    epsilon: float = BN_EPSILON, momentum: float = BN_MOMENTUM):
    # PokeConv's "ungated" overload: no SE gate (se_* omitted, kept as formal inputs so that
    # every later input keeps its position), so no multiply before the second batch norm
    c = BinaryConv(X, W, kernel_shape=kernel_shape, strides=strides, clip_bound=clip_bound)
    b = op.BatchNormalization(c, bn_scale, bn_bias, bn_mean, bn_var, epsilon=epsilon, momentum=momentum)
    d = DPReLU(ReshapeAdd(b, X, method="zeropad"), bias_x, bias_y, pos_slope, neg_slope)
    return op.BatchNormalization(d, split_scale, split_bias, split_mean, split_var, epsilon=epsilon, momentum=momentum)


@script(bnncc_opset, default_opset=op)
def PokeConvBlockUngated(X, W, bn_scale, bn_bias, bn_mean, bn_var, bias_x, bias_y, pos_slope, neg_slope,
                         se_w1, se_bound1, se_b1, se_w2, se_bound2, se_b2, split_scale, split_bias, split_mean,
                         split_var, R, kernel_shape: Sequence[int], strides: Sequence[int],
                         clip_bound: float = DEFAULT_CLIP_BOUND, epsilon: float = BN_EPSILON,
                         momentum: float = BN_MOMENTUM):
    # PokeConv's "block_ungated" overload: the block shortcut, no SE gate
    c = BinaryConv(X, W, kernel_shape=kernel_shape, strides=strides, clip_bound=clip_bound)
    b = op.BatchNormalization(c, bn_scale, bn_bias, bn_mean, bn_var, epsilon=epsilon, momentum=momentum)
    s = ReshapeAdd(ReshapeAdd(b, X, method="zeropad"), R, method="tile")
    d = DPReLU(s, bias_x, bias_y, pos_slope, neg_slope)
    return op.BatchNormalization(d, split_scale, split_bias, split_mean, split_var, epsilon=epsilon, momentum=momentum)


def poke_conv(x, w, bn_scale, bn_bias, bn_mean, bn_var, bias_x, bias_y, pos_slope, neg_slope,
              se_w1, se_bound1, se_b1, se_w2, se_bound2, se_b2, split_scale, split_bias, split_mean, split_var,
              block=None, *, kernel_shape: Sequence[int], strides: Sequence[int],
              clip_bound: float = DEFAULT_CLIP_BOUND, se_w_bits: int = 4, se_a_bits: int = 4,
              epsilon: float = BN_EPSILON, momentum: float = BN_MOMENTUM, training: bool,
              quantize_weights: bool = True) -> torch.Tensor:
    """Torch PokeConv; ``momentum`` in ONNX's convention (running = momentum * running + ...).
    Without the SE gate (``se_*`` None, the "ungated" overloads) nothing multiplies the DPReLU."""
    c = binary_conv(x, w, kernel_shape=kernel_shape, strides=strides, clip_bound=clip_bound,
                    quantize_weights=quantize_weights)
    gate = None if se_w1 is None else se_gate(x, se_w1, se_bound1, se_b1, se_w2, se_bound2, se_b2, w_bits=se_w_bits,
                                              a_bits=se_a_bits, quantize_weights=quantize_weights)
    shortcuts, methods = ((x,), (LOCAL_METHOD,)) if block is None else ((x, block), (LOCAL_METHOD, BLOCK_METHOD))
    norm = dict(momentum=1.0 - momentum, eps=epsilon, training=training)
    d = normed_gated_dprelu(c, bn_scale, bn_bias, bn_mean, bn_var, bias_x, bias_y, pos_slope, neg_slope, gate,
                            *shortcuts, methods=methods, **norm)
    return batch_norm(d, split_scale, split_bias, split_mean, split_var, **norm)


def overload(gated: bool, block: bool) -> str:
    """The ONNX overload of a PokeConv node with or without the SE gate and the block shortcut."""
    return OVERLOADS[(gated, block)]


def block_input(node):
    """The block shortcut R of a PokeConv node, or None."""
    return node.inputs[BLOCK] if len(node.inputs) > BLOCK else None


def se_inputs(node) -> list | None:
    """The SE gate's inputs (R, W1, bound1, B1, W2, bound2, B2) of a PokeConv node, or None when it
    has no gate. A node whose SE inputs are partly omitted, or whose overload does not name the
    parts it has, is an error: onnxruntime would run another body than the other faces."""
    inputs = [node.inputs[i] if i < len(node.inputs) else None for i in SE]
    present = sum(v is not None for v in inputs[1:])
    if present not in (0, len(inputs) - 1):
        raise BnnccError(f"node {node.name!r} (PokeConv): SE gate inputs {SE[1]}-{SE[-1]} must be all given "
                         f"or all omitted, {present} of {len(inputs) - 1} are")
    gated, block = present > 0, block_input(node) is not None
    if node.overload != overload(gated, block):
        parts = f"{'with' if gated else 'without'} SE gate, {'with' if block else 'without'} block shortcut"
        raise BnnccError(f"node {node.name!r} (PokeConv): overload {node.overload!r} does not match its inputs "
                         f"({parts}): expected {overload(gated, block)!r}")
    return inputs if gated else None


def _se_bits(node) -> tuple[int, int]:
    attrs = node.attributes
    return attrs.get_int("se_w_bits", 4), attrs.get_int("se_a_bits", 4)


def _layers(node, shapes, float_bits: int):
    """The binary conv and the SE gate, named as the ops they are (``<node>/binary``, ``<node>/se``)."""
    gate = se_inputs(node)  # first: a malformed node is told as such, not as a shape left unknown
    layers = [binary_layer(node, shapes, name=f"{node.name}/binary", op_type="BinaryConv")]
    if gate is not None:
        layers.append(se.layer(node, shapes, gate, *_se_bits(node), f"{node.name}/se"))
    return layers


def _sops(node, shapes) -> dict[str, int]:
    """Both batch norms, the shortcuts, the DPReLU, and the SE gate and its multiply where it has one."""
    out = numel(shapes.per_image(node, node.outputs[0]))
    counts = {"batch_norm": 2 * out, "dprelu": out}
    parts = [reshape_add.sops(node, shapes, LOCAL_METHOD, node.inputs[0])]
    gate = se_inputs(node)
    if gate is not None:
        counts["se_mul"] = out
        parts.append(se.sops(node, shapes, gate))
    if block_input(node) is not None:
        parts.append(reshape_add.sops(node, shapes, BLOCK_METHOD, block_input(node)))
    for part in parts:
        for key, value in part.items():
            counts[key] = counts.get(key, 0) + value
    return counts


def _check(node) -> None:
    """The conv's attributes, the SE gate's weight scales and bounds where it has one, both batch norms'
    variances."""
    checks.required_attributes(node, ("kernel_shape", "strides"))
    checks.positive_attribute(node, "clip_bound", DEFAULT_CLIP_BOUND)
    if se_inputs(node) is not None:
        se.check_quantizers(node, SE, checks.bits(node, "se_w_bits", 4), checks.bits(node, "se_a_bits", 4))
    epsilon = node.attributes.get_float("epsilon", BN_EPSILON)
    for norm in (BN, SPLIT):
        checks.batch_norm(node, norm.stop - 1, epsilon)


def _observe_hidden(args, attrs):
    return se.observe_hidden(*(args[i] for i in SE[:4]), w_bits=attrs.get("se_w_bits", 4),
                             a_bits=attrs.get("se_a_bits", 4),
                             **se.switch(attrs))


OP = register(OpDef(
    "PokeConv", (PokeConv, PokeConvBlock, PokeConvUngated, PokeConvBlockUngated),
    overloads=(OVERLOADS[True, False], OVERLOADS[True, True], OVERLOADS[False, False], OVERLOADS[False, True]),
    torch=poke_conv, layers=_layers, sops=_sops, weight_inputs=(1, 10, 13), state_inputs=(4, 5, 11, 14, 18, 19),
    activation_inputs=(0, BLOCK), optional_inputs=(*SE[1:], BLOCK),
    bounds=((11, se.observe_first_input), (14, _observe_hidden)),
    check=_check,
))
