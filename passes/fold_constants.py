"""Fold every node whose inputs are all constants, with onnxscript's constant folder.

Exporters compute constants in the graph: a ConstantOfShape of a constant shape (opset-9
exports), or torch's dynamo exporter without its optimizer (``optimize=False``), which builds
each conv's zero bias as ``Expand(CastLike(0, x), Expand(Shape(w), ...))``. Shapes are read only
where they are static: a Shape of a symbolic batch stays, for ``reshape_to_flatten`` to read.
"""

from __future__ import annotations

__all__ = ["fold_constants"]

import onnx_ir as ir
import onnxscript.optimizer

from bnncc.passmanager import register_pass

# The largest tensor folded, in elements: the largest weight of a 4x-wide ResNet-50 is 37.7M (its
# 3x3 2048->2048 convs); a hostile ConstantOfShape of more stays in the graph and is refused by name.
MAX_FOLDED_ELEMENTS = 1 << 26


class _FoldConstantsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # onnxscript keeps a ConstantOfShape by default (a few bytes in place of the tensor); the
        # canonical form has every weight an initializer
        result = onnxscript.optimizer.fold_constants(
            model, output_size_limit=MAX_FOLDED_ELEMENTS,
            should_fold=lambda node: True if node.op_type == "ConstantOfShape" else None)
        return ir.passes.PassResult(model, bool(result.modified))


@register_pass("fold_constants")
def fold_constants() -> ir.passes.PassBase:
    """Replace each node whose inputs are constants (of 8192 elements at most, onnxscript's limit;
    outputs up to MAX_FOLDED_ELEMENTS) by a constant holding its output; ``lift_constants`` makes
    any Constant node an initializer."""
    return _FoldConstantsPass()
