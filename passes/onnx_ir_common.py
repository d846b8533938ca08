"""The generic onnx_ir passes the front end reuses, registered under bnncc's pass names."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from bnncc.passmanager import register_pass

__all__ = ["EliminateIdentityPass", "OpTypeNameGenerator"]


class OpTypeNameGenerator:
    """Name an unnamed node after its op type (``Conv``, ``Conv_1``, ...; NameFixPass dedupes)."""

    def generate_node_name(self, node: ir.Node) -> str:
        return node.name or node.op_type

    def generate_value_name(self, value: ir.Value) -> str:
        return value.name or "v"


@register_pass("lift_constants")
def lift_constants() -> ir.passes.PassBase:
    """Every Constant node becomes an initializer, whatever its size."""
    return common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)


register_pass("remove_initializer_inputs")(common.RemoveInitializersFromInputsPass)


@register_pass("eliminate_identity")
class EliminateIdentityPass(ir.passes.InPlacePass):
    """Remove redundant Identity nodes of the graph; the model's functions, the ai.bnncc ops' definitions, stay.

    onnx_ir's pass also edits function bodies, and broke ReshapeAdd's: its If branch returns
    ``Identity(matched)`` of the outer scope, and with the Identity removed the branch output is no
    node's output, so a recipe naming this pass after remove_projection_shortcuts wrote invalid ONNX.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        functions = dict(model.functions)
        model.functions.clear()
        try:
            return common.IdentityEliminationPass()(model)
        finally:
            model.functions.update(functions)


register_pass("remove_unused")(common.RemoveUnusedNodesPass)
register_pass("remove_unused_opsets")(common.RemoveUnusedOpsetsPass)
register_pass("topological_sort")(common.TopologicalSortPass)
register_pass("shape_inference")(common.ShapeInferencePass)


@register_pass("name_fix")
def name_fix() -> ir.passes.PassBase:
    """Unique names for every node and value; unnamed nodes are named after their op type."""
    return common.NameFixPass(name_generator=OpTypeNameGenerator())
