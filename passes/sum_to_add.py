"""Rewrite ``Sum(a, b, ...)`` as ``Add``: Sum(a) = a, Sum(a, b, c) = Add(Add(a, b), c)."""

from __future__ import annotations

__all__ = ["SumToAddPass"]

import logging

import onnx_ir as ir

from bnncc.passes._util import take_over_output
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("sum_to_add")
class SumToAddPass(ir.passes.InPlacePass):
    """Replace every Sum by a left-to-right chain of Adds.

    1. Sum of two or more inputs: a chain of ``n - 1`` Adds; the last one takes over the output.
    2. Sum of one input that is not a graph output: removed, its users read the input.
    3. A one-input Sum that produces a graph output: left alone (nothing to rewire).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Sum" or node.domain != "":
                continue
            output = node.outputs[0]
            if len(node.inputs) == 1:
                if output.is_graph_output():
                    continue
                take_over_output(graph, node, node.inputs[0])
            else:
                self._rewrite_chain(graph, node)
            logger.debug("rewrote Sum %s as Add", node.name)
            modified = True
        return ir.passes.PassResult(model, modified)

    def _rewrite_chain(self, graph: ir.Graph, node: ir.Node) -> None:
        inputs = list(node.inputs)
        total = inputs[0]
        adds = []
        for i, term in enumerate(inputs[1:]):
            last = i == len(inputs) - 2
            add = ir.Node(
                "",
                "Add",
                [total, term],
                name=node.name if last else f"{node.name}_add{i}",
                outputs=[ir.Value(name=f"{node.outputs[0].name}_add{i}")] if not last else None,
            )
            adds.append(add)
            total = add.outputs[0]
        final = adds[-1].outputs[0]
        old = node.outputs[0]
        ir.convenience.replace_nodes_and_values(graph, node, [node], adds, [old], [final])
