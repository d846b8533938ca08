"""Collapse a chain of reshapes into one ``Reshape``.

torch's dynamo exporter writes a channels_last model's flatten as Reshape(x, [-1]) ->
Gather(indices) -> Reshape(., [N, C]), where the indices are 0, 1, ..., n - 1 laid out in some
shape: a Gather of a vector's elements in order is a Reshape to the indices' shape, and a
Reshape of a Reshape is one Reshape to the last target when that target copies no dimension
(no 0 with allowzero=0; -1 is fine, it is inferred from the element count).
"""

from __future__ import annotations

__all__ = ["CollapseReshapesPass"]

import logging

import numpy as np
import onnx_ir as ir

from bnncc.passes._util import add_initializer, const_array, int_attr, static_dims
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("collapse_reshapes")
class CollapseReshapesPass(ir.passes.InPlacePass):
    """Replace in-order Gathers by Reshapes, then Reshapes of Reshapes by one Reshape.

    1. Gather(axis=0) of a static rank-1 tensor of n elements with constant indices whose values
       are 0..n-1 in order: Reshape to the indices' shape.
    2. Reshape(Reshape(x, s1), s2), s2 constant and copying no dimension, the inner Reshape read
       only here: Reshape(x, s2).
    3. Any other Gather or Reshape: left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.domain == "" and node.op_type == "Gather" and _in_order(node):
                shape = add_initializer(graph, f"{node.name or 'gather'}_shape",
                                        np.array(const_array(node.inputs[1]).shape, np.int64))
                reshape = ir.Node("", "Reshape", [node.inputs[0], shape], name=node.name)
                ir.convenience.replace_nodes_and_values(graph, node, [node], [reshape], [node.outputs[0]],
                                                        [reshape.outputs[0]])
                logger.debug("rewrote Gather %s as Reshape", node.name)
                modified = True
        for node in list(graph):
            inner = node.inputs[0].producer() if node.op_type == "Reshape" and node.domain == "" else None
            if inner is None or inner.op_type != "Reshape" or inner.domain != "" or not _copies_none(node):
                continue
            if len(inner.outputs[0].uses()) != 1 or inner.outputs[0].is_graph_output():
                continue
            node.replace_input_with(0, inner.inputs[0])
            graph.remove(inner, safe=True)
            logger.debug("merged Reshape %s into %s", inner.name, node.name)
            modified = True
        return ir.passes.PassResult(model, modified)


def _in_order(gather: ir.Node) -> bool:
    dims = static_dims(gather.inputs[0])
    indices = const_array(gather.inputs[1])
    if dims is None or len(dims) != 1 or not isinstance(dims[0], int) or indices is None:
        return False
    return int_attr(gather, "axis", 0) == 0 and np.array_equal(indices.reshape(-1), np.arange(dims[0]))


def _copies_none(reshape: ir.Node) -> bool:
    target = const_array(reshape.inputs[1])
    return target is not None and (int_attr(reshape, "allowzero", 0) == 1 or not (target == 0).any())
