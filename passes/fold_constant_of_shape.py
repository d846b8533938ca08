"""Fold ``ConstantOfShape(shape)`` with a constant ``shape`` into an initializer.

Y = full(shape, value), value the one-element ``value`` attribute (default float32 0).
"""

from __future__ import annotations

__all__ = ["FoldConstantOfShapePass"]

import logging

import numpy as np
import onnx_ir as ir

from bnncc.passes._util import add_initializer, const_array
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("fold_constant_of_shape")
class FoldConstantOfShapePass(ir.passes.InPlacePass):
    """Replace ConstantOfShape nodes whose shape input is constant by initializers.

    1. ``ConstantOfShape(c)`` with ``c`` an initializer or Constant: folded.
    2. A computed shape input: left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "ConstantOfShape" or node.domain != "":
                continue
            shape = const_array(node.inputs[0])
            if shape is None:
                continue
            attr = node.attributes.get("value")
            fill = attr.as_tensor().numpy().reshape(-1) if attr is not None else np.zeros(1, np.float32)
            array = np.full(tuple(int(d) for d in shape), fill[0], dtype=fill.dtype)
            output = node.outputs[0]
            value = add_initializer(graph, output.name or f"{node.name}_value", array)
            ir.convenience.replace_all_uses_with(output, value, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            logger.debug("folded ConstantOfShape %s into initializer %s", node.name, value.name)
            modified = True
        return ir.passes.PassResult(model, modified)
