"""Fold every node whose inputs are all constants, with onnxscript's constant folder.

Exporters compute constants in the graph: a ConstantOfShape of a constant shape (opset-9
exports), or torch's dynamo exporter without its optimizer (``optimize=False``), which builds
each conv's zero bias as ``Expand(CastLike(0, x), Expand(Shape(w), ...))``. Shapes are read only
where they are static: a Shape of a symbolic batch stays, for ``reshape_to_flatten`` to read.
"""

from __future__ import annotations

__all__ = ["fold_constants"]

import logging
import math

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer

from bnncc.passes._util import const_array
from bnncc.passmanager import register_pass

# The largest tensor folded, in elements: the largest weight of a 4x-wide ResNet-50 is 37.7M (its
# 3x3 2048->2048 convs); a hostile ConstantOfShape of more stays in the graph and is refused by name.
MAX_FOLDED_ELEMENTS = 1 << 26


class _FoldConstantsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folder = logging.getLogger("onnxscript.optimizer")
        level = folder.level
        folder.setLevel(logging.ERROR)  # what is not folded is refused later, naming its node
        try:
            result = onnxscript.optimizer.fold_constants(model, output_size_limit=MAX_FOLDED_ELEMENTS,
                                                         should_fold=_should_fold)
        finally:
            folder.setLevel(level)
        return ir.passes.PassResult(model, bool(result.modified))


def _should_fold(node: ir.Node) -> bool | None:
    """Not a node that would make more than MAX_FOLDED_ELEMENTS, nor one of the ops that take
    their output's size from their inputs' values where that size cannot be read: onnxscript
    checks the size only after computing the output (a hostile ConstantOfShape asked numpy for
    4 TiB). A ConstantOfShape within it, yes: onnxscript keeps them by default (a few bytes in
    place of the tensor), where the canonical form has every weight an initializer. A Cast too,
    whatever its input's size: weights stored as float16, bfloat16 or double and cast to float32
    in the graph are float32 weights (onnxscript left those over 8192 elements, and a batch norm
    after such a conv was refused as one that "folds into no conv"). Others: onnxscript decides
    (their inputs are at most 8192 elements)."""
    size = _output_elements(node)
    if (size is None and node.op_type in _SIZED_BY_VALUES) or (size is not None and size > MAX_FOLDED_ELEMENTS):
        return False
    return True if node.op_type in ("ConstantOfShape", "Cast") else None


_SIZED_BY_VALUES = frozenset({"ConstantOfShape", "Expand", "Tile", "Range"})


def _output_elements(node: ir.Node) -> int | None:
    """The element count of the node's largest output, from the inferred shapes or, for the ops
    of _SIZED_BY_VALUES, from their constant inputs; None if unknown."""
    shapes = [v.shape for v in node.outputs]
    if all(shape is not None and all(isinstance(d, int) for d in shape) for shape in shapes):
        return max((math.prod(shape) for shape in shapes), default=0)
    values = [const_array(v) for v in node.inputs]
    data = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
    data = tuple(data) if data is not None and all(isinstance(d, int) for d in data) else None
    try:
        if node.op_type == "ConstantOfShape" and values[0] is not None:
            return math.prod(int(d) for d in values[0].reshape(-1))
        if node.op_type == "Expand" and data is not None and values[1] is not None:
            return math.prod(np.broadcast_shapes(data, tuple(int(d) for d in values[1].reshape(-1))))
        if node.op_type == "Tile" and data is not None and values[1] is not None:
            return math.prod(data) * math.prod(int(r) for r in values[1].reshape(-1))
        if node.op_type == "Range" and all(v is not None for v in values[:3]):
            start, limit, delta = (float(v.reshape(-1)[0]) for v in values[:3])
            return max(math.ceil((limit - start) / delta), 0) if delta else None
    except (ValueError, OverflowError, IndexError):  # shapes that do not broadcast, an infinite range, an input missing
        return None
    return None


@register_pass("fold_constants")
def fold_constants() -> ir.passes.PassBase:
    """Replace each node whose inputs are constants (of 8192 elements at most, onnxscript's limit;
    outputs up to MAX_FOLDED_ELEMENTS) by a constant holding its output; ``lift_constants`` makes
    any Constant node an initializer."""
    return _FoldConstantsPass()
