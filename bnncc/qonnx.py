"""Export a PokeBNN graph as QONNX, the quantized-ONNX dialect that FINN and hls4ml read.

Each ``ai.bnncc`` op becomes standard ONNX ops plus QONNX quantizers (domain
``qonnx.custom_op.general``), all values carried in float ("fake quant") as QONNX does. Each op's
emitter is its OpDef's ``qonnx`` face (``bnncc/ops``; the building blocks in
``bnncc/ops/qonnx_nodes.py``); PokeConv is expanded into its chain first
(``bnncc.ops.inline_functions``), whose ops have emitters:

- BinaryConv: ``BipolarQuant(X, B/2)`` and ``BipolarQuant(W, max|W[o]|/2)`` (y = scale * (x >= 0 ? 1 : -1)),
  then an explicit zero ``Pad`` (TF SAME) and ``Conv`` with no padding, so the border contributes 0.
- QuantConv / QuantGemm / the SE convs: ``IntQuant`` on weights (narrow signed, scale max|W[o]|/m, HALF_UP) and on
  activations (per input channel: signed scale Bc/(2^(a-1)-1) with HALF_UP, or unsigned scale Bc/2^a with FLOOR),
  then ``Conv`` / ``Gemm``. Activations whose bounds are all uncalibrated (<= 0) stay float.
- DPReLU, ReshapeAdd (gather + group mean, SAME average pool counting pads) and the SE gate's pool, ReLU and
  hard-sigmoid become standard ops with constant tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import helper
from onnx_ir.passes.common import ShapeInferencePass

from bnncc.domain import CANONICAL_OPSET, DOMAIN, MAX_BATCH
from bnncc.errors import BnnccError
from bnncc.fileio import atomic_path
from bnncc.frontend import read_pokebnn
from bnncc.ops import attach_functions, inline_functions, op_def
from bnncc.ops.qonnx_nodes import QONNX_DOMAIN, Emitter

__all__ = ["QONNX_DOMAIN", "export_qonnx", "to_qonnx"]

logger = logging.getLogger(__name__)


def _with_shapes(model: ir.Model, batch: int) -> ir.Model:
    """A copy of ``model`` at a fixed ``batch`` (FINN wants static shapes), PokeConvs expanded into
    their chains, every value's shape inferred."""
    copy = ir.from_proto(inline_functions(ir.to_proto(model)))
    for value in (*copy.graph.inputs, *copy.graph.outputs):
        if value.shape is not None and not isinstance(value.shape[0], int):
            value.shape = ir.Shape([batch, *list(value.shape)[1:]])
    for node in copy.graph:
        for value in node.outputs:
            if value not in copy.graph.outputs:
                value.shape = None
    attach_functions(copy)
    ShapeInferencePass()(copy)
    return copy


def to_qonnx(model: ir.Model, batch: int = 1) -> onnx.ModelProto:
    """The QONNX form of a PokeBNN graph at a fixed ``batch`` (``model`` is not changed)."""
    model = _with_shapes(model, batch)
    e = Emitter(model)
    renamed: dict[str, str] = {}

    def src(value: ir.Value | None) -> str:
        return renamed.get(value.name, value.name) if value is not None else ""

    def dims(value: ir.Value) -> tuple:
        if value.shape is None:
            raise BnnccError(f"'{value.name}': shape inference found no shape")
        return tuple(value.shape)

    for node in model.graph:
        inputs = [src(v) for v in node.inputs]
        attrs = {a.name: a.value for a in node.attributes.values()}
        op = op_def(node)
        if node.domain != DOMAIN:
            out = e.node(node.op_type, inputs, node.name, domain=node.domain, **attrs)
        elif op is None or op.qonnx is None:
            raise BnnccError(f"node '{node.name}' ({node.op_type}): no QONNX form for this op")
        else:
            out = op.qonnx(e, node, inputs, dims)
        renamed[node.outputs[0].name] = out

    graph_input = model.graph.inputs[0]
    graph_output = model.graph.outputs[0]
    e.nodes.append(helper.make_node("Identity", [src(graph_output)], [graph_output.name]))
    proto_in = ir.to_proto(model).graph
    graph = helper.make_graph(
        e.nodes, f"{model.graph.name or 'bnncc'}_qonnx", [i for i in proto_in.input if i.name == graph_input.name],
        [o for o in proto_in.output], initializer=[*proto_in.initializer, *e.initializers])
    opsets = [helper.make_opsetid("", CANONICAL_OPSET), helper.make_opsetid(QONNX_DOMAIN, 1)]
    out = helper.make_model(graph, opset_imports=opsets, producer_name="bnncc")
    out.ir_version = 9
    return out


def export_qonnx(model: ir.Model | str | Path, output: str | Path, batch: int = 1) -> Path:
    """Write the QONNX form of ``model`` (an ir.Model or a path) at a fixed ``batch`` to ``output`` atomically."""
    if not 1 <= batch <= MAX_BATCH:  # 2**64 reached onnx_ir as a weight it could not convert
        raise BnnccError(f"batch {batch}: expected 1 to {MAX_BATCH}")
    model = read_pokebnn(model, "export")
    proto = to_qonnx(model, batch)
    output = Path(output)
    with atomic_path(output) as tmp:
        onnx.save(proto, tmp)
    return output
