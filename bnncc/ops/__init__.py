"""The ``ai.bnncc`` op domain: each op once as an ONNX function (the reference) and once in torch.

The contract is ``spec.md`` beside this file. ``attach_functions`` adds the function bodies that a
graph needs, so onnxruntime runs any bnncc graph as it is; ``TORCH_OPS`` gives the torch
implementation (straight-through gradients) that the torch view dispatches to.
"""

from __future__ import annotations

from typing import Callable

import onnx
import onnx_ir as ir

from bnncc.errors import BnnccError
from bnncc.ops._opset import DEFAULT_OPSET, DOMAIN, VERSION, bnncc_opset as opset
from bnncc.ops.binarize import BinarizeAct, binarize_act
from bnncc.ops.binary_conv import BinaryConv, binary_conv
from bnncc.ops.dprelu import DPReLU, dprelu
from bnncc.ops.quant import QuantConv, QuantGemm, QuantizeActs, QuantizeWeights, quant_conv, quant_gemm
from bnncc.ops.reshape_add import ReshapeAdd, reshape_add
from bnncc.ops.se_gate import SEGate, se_gate

__all__ = ["DOMAIN", "VERSION", "opset", "FUNCTIONS", "TORCH_OPS", "function_protos", "attach_functions"]

# Every function of the domain, helpers (QuantizeActs, QuantizeWeights) included.
FUNCTIONS = {
    f.name: f
    for f in (BinarizeAct, BinaryConv, QuantizeWeights, QuantizeActs, QuantConv, QuantGemm, DPReLU, ReshapeAdd,
              SEGate)
}

TORCH_OPS: dict[str, Callable] = {
    "BinarizeAct": binarize_act,
    "BinaryConv": binary_conv,
    "QuantConv": quant_conv,
    "QuantGemm": quant_gemm,
    "DPReLU": dprelu,
    "ReshapeAdd": reshape_add,
    "SEGate": se_gate,
}

ML_DOMAIN = "ai.onnx.ml"  # ReshapeAdd reads its string attribute through LabelEncoder


def function_protos(names: set[str] | None = None) -> list[onnx.FunctionProto]:
    """FunctionProtos for ``names`` (all when None) and every function they call, callees first."""
    protos = {name: f.to_function_proto() for name, f in FUNCTIONS.items()}
    wanted = set(protos) if names is None else set(names)
    unknown = wanted - set(protos)
    if unknown:
        raise KeyError(f"not ai.bnncc ops: {sorted(unknown)}")
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        for node in protos[name].node:
            if node.domain == DOMAIN:
                visit(node.op_type)
        ordered.append(name)

    for name in sorted(wanted):
        visit(name)
    return [protos[n] for n in ordered]


def _used_ops(graph_nodes) -> set[str]:
    return {node.op_type for node in graph_nodes if node.domain == DOMAIN}


def _needed_opsets(protos: list[onnx.FunctionProto]) -> dict[str, int]:
    opsets = {DOMAIN: VERSION}
    for proto in protos:
        for imp in proto.opset_import:
            if imp.domain not in ("", DOMAIN):
                opsets[imp.domain] = imp.version
    return opsets


def _require_default_opset(version: int | None) -> None:
    # onnxruntime resolves the ops inside a function against the model's default opset.
    if version is None or version < DEFAULT_OPSET:
        raise BnnccError(f"ai.bnncc ops need default-domain opset >= {DEFAULT_OPSET}, the model imports {version}")


def attach_functions(model):
    """Add the ai.bnncc functions the graph uses (and their opset imports) to ``model``.

    Accepts an ``onnx_ir.Model`` (changed in place) or an ``onnx.ModelProto`` (changed in place);
    returns the model. Functions already present are replaced by the current definitions.
    The model must import the default domain at opset 18 or later (bnncc's canonical form).
    """
    if isinstance(model, onnx.ModelProto):
        if _used_ops(model.graph.node):
            _require_default_opset(next((i.version for i in model.opset_import if i.domain == ""), None))
        protos = function_protos(_used_ops(model.graph.node)) if _used_ops(model.graph.node) else []
        kept = [f for f in model.functions if f.domain != DOMAIN]
        del model.functions[:]
        model.functions.extend(kept + protos)
        present = {imp.domain for imp in model.opset_import}
        for domain, version in _needed_opsets(protos).items() if protos else ():
            if domain not in present:
                model.opset_import.append(onnx.helper.make_opsetid(domain, version))
        return model
    used = _used_ops(model.graph)
    if not used:
        return model
    _require_default_opset(model.opset_imports.get(""))
    protos = function_protos(used)
    for key in [k for k in model.functions if k[0] == DOMAIN]:
        del model.functions[key]
    for proto in protos:
        function = ir.serde.deserialize_function(proto)
        model.functions[function.identifier()] = function
    for domain, version in _needed_opsets(protos).items():
        model.opset_imports.setdefault(domain, version)
    return model
