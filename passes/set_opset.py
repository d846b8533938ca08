"""Declare the default-domain opset 18 once only version-stable ops remain.

Conv, Relu, MaxPool, Add, GlobalAveragePool, Flatten and Gemm mean the same from opset 9 to 28
for the attributes the canonical form uses (later versions only added types, optional inputs and
attributes with backward-compatible defaults; opset 22's MaxPool only states that a ceil_mode
window starting in the right padding is ignored, as torch always did), so relabelling the opset
does not change results.

The IR version is raised with it to the least one that onnx pairs with the opset (8 for opset
18): an older one (< 4) would require every initializer to be a graph input, which the canonical
form and every later pass break.
"""

from __future__ import annotations

__all__ = ["SetOpsetPass", "STABLE_OPS", "min_ir_version"]

import logging

import onnx.helper
import onnx_ir as ir

from bnncc.domain import CANONICAL_OPSET, SUPPORTED_OPSETS
from bnncc.errors import BnnccError
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)

STABLE_OPS = frozenset({"Conv", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Flatten", "Gemm"})


def min_ir_version(opset: int) -> int:
    """The IR version onnx.helper pairs with default-domain ``opset`` (8 for opset 18)."""
    return onnx.helper.OP_SET_ID_VERSION_MAP[("ai.onnx", opset)]


@register_pass("set_opset")
class SetOpsetPass(ir.passes.InPlacePass):
    """Set the model's default-domain opset to ``version`` (default 18) and the IR version to match.

    1. Every node is a default-domain op in :data:`STABLE_OPS`, opset 9..28: opset set, per-node
       versions cleared, IR version raised to :func:`min_ir_version` if it is lower.
    2. The opset is already ``version``: only the IR version is raised if it is lower.
    3. Any other op is present, or the opset is outside 9..28: left alone (the front end reports
       the op).
    """

    def __init__(self, version: int = CANONICAL_OPSET) -> None:
        super().__init__()
        if version not in SUPPORTED_OPSETS:
            raise BnnccError(f"set_opset: version must be one of {min(SUPPORTED_OPSETS)} to "
                             f"{max(SUPPORTED_OPSETS)}, got {version}")
        self.version = version

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", None)
        stable = all(node.domain == "" and node.op_type in STABLE_OPS for node in model.graph)
        if current == self.version:
            return ir.passes.PassResult(model, self._raise_ir_version(model))
        if current not in SUPPORTED_OPSETS or not stable:
            return ir.passes.PassResult(model, False)
        model.opset_imports[""] = self.version
        for node in model.graph:
            node.version = None
        self._raise_ir_version(model)
        logger.debug("default opset %d -> %d", current, self.version)
        return ir.passes.PassResult(model, True)

    def _raise_ir_version(self, model: ir.Model) -> bool:
        wanted = min_ir_version(self.version)
        if model.ir_version is not None and model.ir_version >= wanted:
            return False
        logger.debug("IR version %s -> %d", model.ir_version, wanted)
        model.ir_version = wanted
        return True
