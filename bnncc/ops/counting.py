"""What the cost rules of ops are made of: the counted layer, the scalar ops of a node, and the
counting helpers every rule shares. ``bnncc.cost`` holds the conventions and sums them up; each
op's own rules live with the op (``OpDef.layers``, ``OpDef.sops``).

A rule receives ``shapes``, ``bnncc.cost``'s shape oracle: ``shapes.static(node, value)`` gives
every dim of a weight-like value, ``shapes.per_image(node, value)`` an activation's dims after
the batch dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

import onnx_ir as ir

from bnncc.errors import BnnccError

__all__ = ["FLOAT_WEIGHT_BITS", "Layer", "Elementwise", "numel", "bits_attr", "conv_layer", "dense_layer",
           "per_output"]

FLOAT_WEIGHT_BITS = 32  # float weights are stored as float32 whatever width their MACs are counted at


@dataclasses.dataclass(frozen=True)
class Layer:
    """One MAC-counting node: a conv (``part="conv"``) or a dense layer (``part="dense"``)."""

    name: str
    op_type: str
    part: str
    w_bits: int
    a_bits: int
    macs: int
    weights: int  # elements of the layer's weight tensor(s)
    weight_bits: int  # weights * w_bits (float weights at 32)

    @property
    def ace(self) -> int:
        return self.macs * self.w_bits * self.a_bits

    @property
    def binary(self) -> bool:
        return self.w_bits == 1 and self.a_bits == 1

    @property
    def cpu64(self) -> float:
        return self.macs / 64 if self.binary else float(self.macs)


@dataclasses.dataclass(frozen=True)
class Elementwise:
    """The scalar ops of one node, by category (see ``bnncc.cost``)."""

    name: str
    op_type: str
    sops: dict[str, int]


def numel(dims: Iterable[int]) -> int:
    return math.prod(dims)


def bits_attr(node: ir.Node, name: str) -> int:
    """An integer bit-width attribute the node must have."""
    attr = node.attributes.get(name)
    if attr is None:
        raise BnnccError(f"node '{node.name}' ({node.op_type}): missing the attribute '{name}'")
    return attr.as_int()


def conv_layer(node: ir.Node, shapes, w_bits: int, a_bits: int, weight_bits: int, *, name: str | None = None,
               op_type: str | None = None, weight: ir.Value | None = None, output: ir.Value | None = None) -> Layer:
    """MACs = output pixels * Cout * dot length, the dot length being prod(W.shape[1:]) = kh*kw*Cin/groups.

    ``weight`` and ``output`` default to the node's input 1 and output 0; ``name`` and ``op_type``
    to the node's (an op made of several layers names each part)."""
    dims = shapes.static(node, weight if weight is not None else node.inputs[1])
    pixels = numel(shapes.per_image(node, output if output is not None else node.outputs[0])[1:])
    return Layer(name or node.name, op_type or node.op_type, "conv", w_bits, a_bits, pixels * numel(dims),
                 numel(dims), numel(dims) * weight_bits)


def dense_layer(node: ir.Node, weight: tuple[int, ...], rows: int, w_bits: int, a_bits: int,
                weight_bits: int) -> Layer:
    """MACs = rows per image * in * out: every row of the input meets every weight once."""
    macs = rows * numel(weight)
    return Layer(node.name, node.op_type, "dense", w_bits, a_bits, macs, numel(weight), numel(weight) * weight_bits)


def per_output(category: str) -> Callable[[ir.Node, object], dict[str, int]]:
    """A sops rule: one scalar op per output element."""

    def count(node: ir.Node, shapes) -> dict[str, int]:
        return {category: numel(shapes.per_image(node, node.outputs[0]))}

    return count
