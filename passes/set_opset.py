"""Declare the default-domain opset 18 once only version-stable ops remain.

Conv, Relu, MaxPool, Add, GlobalAveragePool, Flatten and Gemm mean the same from opset 9 to 21
for the attributes the canonical form uses (later versions only added types, optional inputs and
attributes with backward-compatible defaults), so relabelling the opset does not change results.
"""

from __future__ import annotations

__all__ = ["SetOpsetPass", "STABLE_OPS"]

import logging

import onnx_ir as ir

from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)

STABLE_OPS = frozenset({"Conv", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Flatten", "Gemm"})


@register_pass("set_opset")
class SetOpsetPass(ir.passes.InPlacePass):
    """Set the model's default-domain opset to ``version`` (default 18).

    1. Every node is a default-domain op in :data:`STABLE_OPS`, opset 9..21: opset set, per-node
       versions cleared.
    2. Any other op is present, or the opset is outside 9..21, or already ``version``: left alone
       (the front end reports the op).
    """

    def __init__(self, version: int = 18) -> None:
        super().__init__()
        self.version = version

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", None)
        stable = all(node.domain == "" and node.op_type in STABLE_OPS for node in model.graph)
        if current == self.version or current is None or not 9 <= current <= 21 or not stable:
            return ir.passes.PassResult(model, False)
        model.opset_imports[""] = self.version
        for node in model.graph:
            node.version = None
        logger.debug("default opset %d -> %d", current, self.version)
        return ir.passes.PassResult(model, True)
