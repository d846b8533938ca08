"""The ``ai.bnncc`` op domain: every op once, with all of its faces, in ``registry.OPS``.

The contract is ``spec.md`` beside this file; each op's module defines its ONNX function (the
reference), its torch implementation, its cost rules and its QONNX emitter and registers them as
one ``OpDef`` (``registry.py``). ``attach_functions`` adds the function bodies that a graph needs,
so onnxruntime runs any bnncc graph as it is; ``inline_functions`` expands chosen ops into their
bodies for tools that want the plain chain.
"""

from __future__ import annotations

import onnx
import onnx.inliner
import onnx_ir as ir

from bnncc.domain import CANONICAL_OPSET, DEFAULT_DOMAINS, DOMAIN, VERSION
from bnncc.errors import BnnccError, first_line
from bnncc.ops import binarize, binary_conv, checks, dprelu, poke_conv, quant, reshape_add, se_gate  # noqa: F401 (register)
from bnncc.ops._opset import bnncc_opset as opset
from bnncc.ops.registry import OPS, OpDef, op_def

__all__ = ["DOMAIN", "VERSION", "opset", "OPS", "OpDef", "op_def", "function_protos", "attach_functions",
           "inline_functions", "check_graph"]


def check_graph(model: ir.Model) -> None:
    """Every node's constants within its op's domain (``bnncc.ops.checks``): each ai.bnncc op's by its
    ``check`` face, and the default domain's batch norms (the stem's), whose variance plus epsilon
    must be positive too; every node's stored float inputs finite float32, every ai.bnncc op's
    parameters stored. Raises a BnnccError naming the first node that is not."""
    for node in model.graph:
        try:
            _check_node(node)
        except TypeError as e:  # onnx_ir's typed getters: "Attribute 'clip_bound' is not of type FLOAT. ..."
            raise BnnccError(f"node {node.name!r} ({node.op_type}): {first_line(e)}") from None


def _check_node(node: ir.Node) -> None:
    checks.float32_constants(node)
    definition = op_def(node)
    if definition is not None:
        checks.stored_parameters(node, definition.activation_inputs)
    if definition is not None and definition.check is not None:
        definition.check(node)
    elif node.op_type == "BatchNormalization" and node.domain in DEFAULT_DOMAINS:
        checks.batch_norm(node, 4, node.attributes.get_float("epsilon", 1e-5))


def function_protos(names: set[str] | None = None) -> list[onnx.FunctionProto]:
    """FunctionProtos (every overload) of the ops ``names`` (all when None) and of every op their
    bodies call, callees first."""
    wanted = set(OPS) if names is None else set(names)
    unknown = wanted - set(OPS)
    if unknown:
        raise BnnccError(f"unknown {DOMAIN} op(s) {', '.join(sorted(unknown))}; the domain has {', '.join(sorted(OPS))}")
    protos = {name: OPS[name].protos() for name in OPS}
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        for proto in protos[name]:
            for node in proto.node:
                if node.domain == DOMAIN:
                    visit(node.op_type)
        ordered.append(name)

    for name in sorted(wanted):
        visit(name)
    return [proto for name in ordered for proto in protos[name]]


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
    # onnxruntime resolves the ops inside a function against the model's default opset, and onnx's
    # checker refuses a function whose ops that opset reads otherwise (Constant changed at 19): a
    # recipe's set_opset to 20 had ended in "the rewritten model is not valid ONNX"
    if version != CANONICAL_OPSET:
        raise BnnccError(f"ai.bnncc ops need default-domain opset {CANONICAL_OPSET} (their functions' opset), "
                         f"the model imports {version}; leave set_opset at its default")


# Function overloads (PokeConv's "block") need IR version 10.
_IR_VERSION = 10


def attach_functions(model):
    """Add the ai.bnncc functions the graph uses (and their opset imports) to ``model``.

    Accepts an ``onnx_ir.Model`` or an ``onnx.ModelProto`` (changed in place); returns the model.
    Functions already present are replaced by the current definitions. The model must import the
    default domain at opset 18 (bnncc's canonical form); its IR version is raised to 10
    where it is lower.
    """
    if isinstance(model, onnx.ModelProto):
        used = _used_ops(model.graph.node)
        if not used:
            return model
        _require_default_opset(next((i.version for i in model.opset_import if i.domain == ""), None))
        protos = function_protos(used)
        kept = [f for f in model.functions if f.domain != DOMAIN]
        del model.functions[:]
        model.functions.extend(kept + protos)
        present = {imp.domain for imp in model.opset_import}
        for domain, version in _needed_opsets(protos).items():
            if domain not in present:
                model.opset_import.append(onnx.helper.make_opsetid(domain, version))
        model.ir_version = max(model.ir_version, _IR_VERSION)
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
    model.ir_version = max(model.ir_version, _IR_VERSION)
    return model


def inline_functions(model: onnx.ModelProto, names: set[str] | None = None) -> onnx.ModelProto:
    """``model`` with the graph's nodes of the ai.bnncc ops ``names`` (default: PokeConv) replaced
    by their function bodies, once (the ops those bodies call stay as nodes); the functions are
    attached anew. For tools that want the expanded chain; onnxruntime runs either form."""
    names = {poke_conv.OP.name} if names is None else set(names)
    unknown = names - set(OPS)
    if unknown:
        raise BnnccError(f"not ai.bnncc ops: {sorted(unknown)}")
    inlined = onnx.inliner.inline_selected_functions(attach_functions(model), [(DOMAIN, n) for n in sorted(names)])
    return attach_functions(inlined)
