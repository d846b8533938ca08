"""PokeBNN's layer graph for a width multiplier, built directly from pokebnn.md sections 2-3.

Independent of the rewrite passes: an ONNX graph of ai.bnncc nodes with a shape on every value
and zero initializers that are never materialised (lazy), so a 2x network costs no memory. No
function bodies are attached: the graph is for the cost model, not for onnxruntime.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from bnncc.ops import DOMAIN

STAGES = ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))  # blocks, base f, stride of the first block
SIZE = 224


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []

    def weight(self, name: str, *dims: int) -> ir.Value:
        tensor = ir.LazyTensor(lambda: ir.tensor(np.zeros(dims, np.float32)), dtype=ir.DataType.FLOAT,
                               shape=ir.Shape(dims), name=name)
        value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(dims), type=ir.TensorType(ir.DataType.FLOAT))
        self.initializers.append(value)
        return value

    def node(self, op_type: str, name: str, inputs: list[ir.Value], shape: tuple[int, ...], domain: str = DOMAIN,
             **attributes) -> ir.Value:
        out = ir.Value(name=f"{name}_out", shape=ir.Shape(("N", *shape)), type=ir.TensorType(ir.DataType.FLOAT))
        self.nodes.append(ir.node(op_type, inputs, attributes=attributes, domain=domain, name=name, outputs=[out]))
        return out

    def batch_norm(self, name: str, x: ir.Value, c: int, hw: int) -> ir.Value:
        params = [self.weight(f"{name}_{p}", c) for p in ("scale", "bias", "mean", "var")]
        return self.node("BatchNormalization", name, [x, *params], (c, hw, hw), domain="")

    def dprelu(self, name: str, x: ir.Value, c: int, hw: int) -> ir.Value:
        params = [self.weight(f"{name}_{p}", c) for p in ("bias_x", "bias_y", "pos_slope", "neg_slope")]
        return self.node("DPReLU", name, [x, *params], (c, hw, hw))

    def quant_conv(self, name: str, x: ir.Value, cin: int, cout: int, k: int, stride: int, group: int, pads: list[int],
                   out_hw: int) -> ir.Value:
        inputs = [x, self.weight(f"{name}_w", cout, cin // group, k, k), self.weight(f"{name}_bound", cin),
                  self.weight(f"{name}_b", cout)]
        return self.node("QuantConv", name, inputs, (cout, out_hw, out_hw), w_bits=8, a_bits=8, a_signed=1,
                         kernel_shape=[k, k], strides=[stride, stride], pads=pads, group=group)

    def vectors(self, name: str, c: int, keys: tuple[str, ...]) -> list[ir.Value]:
        return [self.weight(f"{name}_{key}", c) for key in keys]

    def poke_conv(self, name: str, x: ir.Value, cin: int, hw: int, cout: int, k: int, stride: int,
                  r1: tuple[ir.Value, int] | None) -> ir.Value:
        """A PokeConv node: BinaryConv, BN, local (zeropad) and block (tile) shortcuts, DPReLU,
        SEGate(x) (Cin -> Cin/8 -> Cout, 4 bits), Mul, BN, with its inputs in spec.md's order."""
        ho = math.ceil(hw / stride)
        hidden = cin // 8
        bn = ("scale", "bias", "mean", "var")
        inputs = [
            x, self.weight(f"{name}_w", cout, cin, k, k), *self.vectors(f"{name}_bn", cout, bn),
            *self.vectors(f"{name}_dprelu", cout, ("bias_x", "bias_y", "pos_slope", "neg_slope")),
            self.weight(f"{name}_se_w1", hidden, cin, 1, 1), self.weight(f"{name}_se_bound1", cin),
            self.weight(f"{name}_se_b1", hidden), self.weight(f"{name}_se_w2", cout, hidden, 1, 1),
            self.weight(f"{name}_se_bound2", hidden), self.weight(f"{name}_se_b2", cout),
            *self.vectors(f"{name}_bn_split", cout, bn),
        ] + ([r1[0]] if r1 is not None else [])
        out = self.node("PokeConv", name, inputs, (cout, ho, ho), kernel_shape=[k, k], strides=[stride, stride],
                        clip_bound=3.0, se_w_bits=4, se_a_bits=4)
        self.nodes[-1].overload = "block" if r1 is not None else ""  # the overload that adds R (spec.md)
        return out


def pokebnn_model(multiplier: float, num_classes: int = 1000) -> ir.Model:
    """PokeBNN-``multiplier``x at 224x224, batch symbolic ``N``."""
    b = _Builder()
    image = ir.Value(name="image", shape=ir.Shape(("N", 3, SIZE, SIZE)), type=ir.TensorType(ir.DataType.FLOAT))
    hw = SIZE // 4
    x = b.quant_conv("stem1", image, 3, 32, 4, 4, 1, [0, 0, 0, 0], hw)
    x = b.dprelu("stem1_dprelu", b.batch_norm("stem1_bn", x, 32, hw), 32, hw)
    x = b.quant_conv("stem2", x, 32, 64, 3, 1, 32, [1, 1, 1, 1], hw)
    x = b.dprelu("stem2_dprelu", b.batch_norm("stem2_bn", x, 64, hw), 64, hw)
    channels = 64
    index = 0
    for blocks, base, first_stride in STAGES:
        f = int(base * multiplier)
        for i in range(blocks):
            stride = first_stride if i == 0 else 1
            name = f"block{index}"
            r1 = (x, channels)
            y = b.poke_conv(f"{name}_1", x, channels, hw, f, 1, 1, None)
            y = b.poke_conv(f"{name}_2", y, f, hw, f, 3, stride, None)
            hw = math.ceil(hw / stride)
            x = b.poke_conv(f"{name}_3", y, f, hw, 4 * f, 1, 1, r1)
            channels = 4 * f
            index += 1
    x = b.node("GlobalAveragePool", "pool", [x], (channels, 1, 1), domain="")
    x = b.node("Flatten", "flatten", [x], (channels,), domain="")
    logits = b.node("QuantGemm", "head", [x, b.weight("head_w", num_classes, channels),
                                          b.weight("head_bound", channels), b.weight("head_b", num_classes)],
                    (num_classes,), w_bits=8, a_bits=8, a_signed=1)
    graph = ir.Graph([image], [logits], nodes=b.nodes, initializers=b.initializers, name="pokebnn",
                     opset_imports={"": 18, DOMAIN: 1})
    return ir.Model(graph, ir_version=10)
