"""PokeConv: a PokeBNN binary conv with everything around it, as one op (pokebnn.md section 2).

For the conv's input X (N, Cin, H, W) and weight W (Cout, Cin, k, k)::

    c = BinaryConv(X, W)                              # k x k, stride s, TF SAME, no bias
    b = BatchNormalization(c; bn_*)                   # gamma 0 on a bottleneck's last conv, else 1
    s = ReshapeAdd(b, X, method="zeropad")            # local shortcut, around every binary conv
    s = ReshapeAdd(s, R, method="tile")               # block shortcut: the "block" overload only
    d = DPReLU(s, bias_x, bias_y, pos_slope, neg_slope)
    g = SEGate(X, se_w1, se_bound1, se_b1, se_w2, se_bound2, se_b2)   # Cin -> Cin/8 -> Cout, int4
    Y = BatchNormalization(d * g; split_*)            # bn_split, gamma 1

The ONNX function is that chain of ai.bnncc functions (onnxruntime runs it; Netron expands it).
The block shortcut R (the bottleneck's input, read by its last conv) is the optional input 20:
a node that has it carries the ONNX overload ``"block"``, whose body adds it; ONNX functions
cannot test for an omitted input. Both batch norms share ``epsilon`` and ``momentum``.

Training runs the binary conv, the SE gate, then the first batch norm, the shortcuts, the DPReLU
and the gate's multiply as one fused step (``dprelu.normed_gated_dprelu``), then the second batch
norm. The TVM lowering makes one fused kernel of the whole op (``bnncc.targets.lower``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from onnxscript import script

from bnncc.domain import BN_EPSILON, BN_MOMENTUM, DEFAULT_CLIP_BOUND
from bnncc.ops._opset import bnncc_opset, op
from bnncc.ops.batch_norm import batch_norm
from bnncc.ops import reshape_add, se_gate as se
from bnncc.ops.binary_conv import BinaryConv, binary_conv, binary_layer
from bnncc.ops.counting import numel
from bnncc.ops.dprelu import DPReLU, normed_gated_dprelu
from bnncc.ops.registry import OpDef, register
from bnncc.ops.reshape_add import ReshapeAdd
from bnncc.ops.se_gate import SEGate, se_gate

__all__ = ["PokeConv", "PokeConvBlock", "poke_conv", "INPUTS", "BLOCK_OVERLOAD", "LOCAL_METHOD", "BLOCK_METHOD"]

# The inputs, in order; the positions below index them.
INPUTS = ("X", "W", "bn_scale", "bn_bias", "bn_mean", "bn_var", "bias_x", "bias_y", "pos_slope", "neg_slope",
          "se_w1", "se_bound1", "se_b1", "se_w2", "se_bound2", "se_b2",
          "split_scale", "split_bias", "split_mean", "split_var", "R")
BN = slice(2, 6)
DPRELU = slice(6, 10)
SE = (0, 10, 11, 12, 13, 14, 15)  # the SE gate's inputs (R, W1, bound1, B1, W2, bound2, B2)
SPLIT = slice(16, 20)
BLOCK = 20
BLOCK_OVERLOAD = "block"
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


def poke_conv(x, w, bn_scale, bn_bias, bn_mean, bn_var, bias_x, bias_y, pos_slope, neg_slope,
              se_w1, se_bound1, se_b1, se_w2, se_bound2, se_b2, split_scale, split_bias, split_mean, split_var,
              block=None, *, kernel_shape: Sequence[int], strides: Sequence[int],
              clip_bound: float = DEFAULT_CLIP_BOUND, se_w_bits: int = 4, se_a_bits: int = 4,
              epsilon: float = BN_EPSILON, momentum: float = BN_MOMENTUM, training: bool,
              quantize_weights: bool = True) -> torch.Tensor:
    """Torch PokeConv; ``momentum`` in ONNX's convention (running = momentum * running + ...)."""
    c = binary_conv(x, w, kernel_shape=kernel_shape, strides=strides, clip_bound=clip_bound,
                    quantize_weights=quantize_weights)
    gate = se_gate(x, se_w1, se_bound1, se_b1, se_w2, se_bound2, se_b2, w_bits=se_w_bits, a_bits=se_a_bits,
                   quantize_weights=quantize_weights)
    shortcuts, methods = ((x,), (LOCAL_METHOD,)) if block is None else ((x, block), (LOCAL_METHOD, BLOCK_METHOD))
    norm = dict(momentum=1.0 - momentum, eps=epsilon, training=training)
    d = normed_gated_dprelu(c, bn_scale, bn_bias, bn_mean, bn_var, bias_x, bias_y, pos_slope, neg_slope, gate,
                            *shortcuts, methods=methods, **norm)
    return batch_norm(d, split_scale, split_bias, split_mean, split_var, **norm)


def block_input(node):
    """The block shortcut R of a PokeConv node, or None."""
    return node.inputs[BLOCK] if len(node.inputs) > BLOCK else None


def _se_bits(node) -> tuple[int, int]:
    attrs = node.attributes
    return attrs.get_int("se_w_bits", 4), attrs.get_int("se_a_bits", 4)


def _layers(node, shapes, float_bits: int):
    """The binary conv and the SE gate, named as the ops they are (``<node>/binary``, ``<node>/se``)."""
    se_inputs = [node.inputs[i] for i in SE]
    return [binary_layer(node, shapes, float_bits, name=f"{node.name}/binary", op_type="BinaryConv"),
            se.layer(node, shapes, se_inputs, *_se_bits(node), f"{node.name}/se")]


def _sops(node, shapes) -> dict[str, int]:
    """Both batch norms, the shortcuts, the DPReLU, the SE gate and its multiply."""
    out = numel(shapes.per_image(node, node.outputs[0]))
    counts = {"batch_norm": 2 * out, "dprelu": out, "se_mul": out}
    parts = [reshape_add.sops(node, shapes, LOCAL_METHOD, node.inputs[0]),
             se.sops(node, shapes, [node.inputs[i] for i in SE])]
    if block_input(node) is not None:
        parts.append(reshape_add.sops(node, shapes, BLOCK_METHOD, block_input(node)))
    for part in parts:
        for key, value in part.items():
            counts[key] = counts.get(key, 0) + value
    return counts


def _observe_hidden(args, attrs):
    return se.observe_hidden(*(args[i] for i in SE[:4]), w_bits=attrs.get("se_w_bits", 4),
                             a_bits=attrs.get("se_a_bits", 4),
                             **{k: v for k, v in attrs.items() if k == "quantize_weights"})


OP = register(OpDef(
    "PokeConv", (PokeConv, PokeConvBlock), overloads=("", BLOCK_OVERLOAD), torch=poke_conv,
    layers=_layers, sops=_sops, weight_inputs=(1, 10, 13), state_inputs=(4, 5, 11, 14, 18, 19),
    bounds=((11, lambda args, attrs: se.observe_pool(args[0])), (14, _observe_hidden)),
))
