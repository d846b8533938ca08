"""Export a PokeBNN graph as QONNX, the quantized-ONNX dialect that FINN and hls4ml read.

Each ``ai.bnncc`` op becomes standard ONNX ops plus QONNX quantizers (domain
``qonnx.custom_op.general``), all values carried in float ("fake quant") as QONNX does:

- BinaryConv: ``BipolarQuant(X, B/2)`` and ``BipolarQuant(W, max|W[o]|/2)`` (y = scale * (x >= 0 ? 1 : -1)),
  then an explicit zero ``Pad`` (TF SAME) and ``Conv`` with no padding, so the border contributes 0.
- QuantConv / QuantGemm / the SE convs: ``IntQuant`` on weights (narrow signed, scale max|W[o]|/m, HALF_UP) and on
  activations (per input channel: signed scale Bc/(2^(a-1)-1) with HALF_UP, or unsigned scale Bc/2^a with FLOOR),
  then ``Conv`` / ``Gemm``. Activations whose bounds are all uncalibrated (<= 0) stay float.
- DPReLU, ReshapeAdd (gather + group mean, SAME average pool counting pads) and the SE gate's pool, ReLU and
  hard-sigmoid become standard ops with constant tensors.

QONNX's HALF_UP rounds ties away from zero where bnncc's reference rounds them up (floor(x + 0.5)):
the two differ only for values exactly halfway between two grid points.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from bnncc.errors import BnnccError
from bnncc.fileio import atomic_path
from bnncc.ops import DOMAIN
from bnncc.ops.binary_conv import same_pads

__all__ = ["QONNX_DOMAIN", "export_qonnx", "to_qonnx"]

logger = logging.getLogger(__name__)

QONNX_DOMAIN = "qonnx.custom_op.general"


class _Emitter:
    """Collects the new graph's nodes and constant initializers, with unique names."""

    def __init__(self, model: ir.Model):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.consts = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()
                       if v.const_value is not None}
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}__q{self.count}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op_type: str, inputs: list[str], base: str, domain: str = "", **attrs) -> str:
        out = self.name(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def value(self, name: str) -> np.ndarray:
        if name not in self.consts:
            raise BnnccError(f"'{name}' must be a constant initializer for the QONNX export")
        return self.consts[name]


def _int_quant(e: _Emitter, x: str, scale: np.ndarray, bits: int, signed: bool, base: str, rounding: str) -> str:
    return e.node("IntQuant", [x, e.const(f"{base}.scale", scale.astype(np.float32)),
                               e.const(f"{base}.zeropt", np.float32(0)), e.const(f"{base}.bits", np.float32(bits))],
                  base, domain=QONNX_DOMAIN, signed=int(signed), narrow=int(signed), rounding_mode=rounding)


def _weights(e: _Emitter, w_name: str, bits: int, base: str) -> str:
    w = e.value(w_name)
    m = 2 ** (bits - 1) - 1
    wmax = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    scale = (np.where(wmax > 0, wmax, 1.0) / m).reshape((-1,) + (1,) * (w.ndim - 1))
    return _int_quant(e, w_name, scale, bits, True, f"{base}.wq", "HALF_UP")


def _acts(e: _Emitter, x: str, bound_name: str, bits: int, signed: bool, rank: int, base: str) -> str:
    bound = e.value(bound_name).astype(np.float64)
    calibrated = bound > 0
    if not calibrated.any():
        return x  # not calibrated: the reference keeps these activations float
    per_channel = (1, -1) + (1,) * (rank - 2)
    safe = np.where(calibrated, bound, 1.0)
    scale = (safe / (2 ** (bits - 1) - 1) if signed else safe / 2**bits).reshape(per_channel)
    quantized = _int_quant(e, x, scale, bits, signed, f"{base}.aq", "HALF_UP" if signed else "FLOOR")
    if calibrated.all():
        return quantized
    # Channels never seen nonzero in calibration stay float, as in the reference.
    mask = e.const(f"{base}.calibrated", calibrated.reshape(per_channel))
    return e.node("Where", [mask, quantized, x], f"{base}.aq_or_float")


def _binary_conv(e: _Emitter, node: ir.Node, x: str, w_name: str, shape_in) -> str:
    bound = node.attributes["clip_bound"].as_float()
    k = list(node.attributes["kernel_shape"].as_ints())
    s = list(node.attributes["strides"].as_ints())
    w = e.value(w_name)
    xq = e.node("BipolarQuant", [x, e.const(f"{node.name}.xscale", np.float32(bound / 2))], f"{node.name}.xq",
                domain=QONNX_DOMAIN)
    wscale = (np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 2).reshape(-1, 1, 1, 1).astype(np.float32)
    wq = e.node("BipolarQuant", [w_name, e.const(f"{node.name}.wscale", wscale)], f"{node.name}.wq",
                domain=QONNX_DOMAIN)
    (top, bottom), (left, right) = same_pads(shape_in[2], k[0], s[0]), same_pads(shape_in[3], k[1], s[1])
    padded = e.node("Pad", [xq, e.const(f"{node.name}.pads", np.array([0, 0, top, left, 0, 0, bottom, right]))],
                    f"{node.name}.pad")
    return e.node("Conv", [padded, wq], node.name, kernel_shape=k, strides=s)


def _per_channel(e: _Emitter, name: str, base: str) -> str:
    return e.const(base, e.value(name).reshape(1, -1, 1, 1).astype(np.float32))


def _dprelu(e: _Emitter, node: ir.Node, x: str, params: list[str]) -> str:
    bx, by, ps, ns = (_per_channel(e, p, f"{node.name}.{i}") for i, p in enumerate(params))
    t = e.node("Sub", [x, bx], f"{node.name}.t")
    positive = e.node("GreaterOrEqual", [t, e.const(f"{node.name}.zero", np.float32(0))], f"{node.name}.pos")
    slope = e.node("Where", [positive, ps, ns], f"{node.name}.slope")
    return e.node("Sub", [e.node("Mul", [slope, t], f"{node.name}.mul"), by], node.name)


def _reshape_add(e: _Emitter, node: ir.Node, y: str, r: str, y_shape, r_shape) -> str:
    method = node.attributes["method"].as_string()
    ci, co, h = r_shape[1], y_shape[1], r_shape[2]
    k = max(ci // co, 1)
    index = np.arange(co * k)
    source = index % ci if method == "tile" else np.minimum(index, ci - 1)
    keep = np.ones(co * k, np.float32) if method == "tile" else (index < ci).astype(np.float32)
    gathered = e.node("Gather", [r, e.const(f"{node.name}.src", source.astype(np.int64))], f"{node.name}.gather", axis=1)
    masked = e.node("Mul", [gathered, e.const(f"{node.name}.keep", keep.reshape(1, -1, 1, 1))], f"{node.name}.mask")
    grouped = e.node("Reshape", [masked, e.const(f"{node.name}.shape", np.array([0, co, k, h, r_shape[3]]))],
                     f"{node.name}.group")
    matched = e.node("ReduceMean", [grouped, e.const(f"{node.name}.axes", np.array([2]))], f"{node.name}.mean",
                     keepdims=0)
    if h != y_shape[2]:
        (top, bottom), (left, right) = same_pads(h, 3, 2), same_pads(r_shape[3], 3, 2)
        matched = e.node("AveragePool", [matched], f"{node.name}.pool", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[top, left, bottom, right], count_include_pad=1)
    return e.node("Add", [y, matched], node.name)


def _quant_conv(e: _Emitter, base: str, x: str, w: str, bound: str, b: str, w_bits: int, a_bits: int, signed: bool,
                rank: int, **conv_attrs) -> str:
    xq = _acts(e, x, bound, a_bits, signed, rank, base)
    wq = _weights(e, w, w_bits, base)
    if rank == 2:
        return e.node("Gemm", [xq, wq, b], base, transB=1)
    return e.node("Conv", [xq, wq, b], base, **conv_attrs)


def _se_gate(e: _Emitter, node: ir.Node, inputs: list[str]) -> str:
    r, w1, bound1, b1, w2, bound2, b2 = inputs
    bits = dict(w_bits=node.attributes["w_bits"].as_int(), a_bits=node.attributes["a_bits"].as_int())
    g = e.node("GlobalAveragePool", [r], f"{node.name}.pool")
    h = _quant_conv(e, f"{node.name}.conv1", g, w1, bound1, b1, signed=True, rank=4, kernel_shape=[1, 1], **bits)
    h = e.node("Relu", [h], f"{node.name}.relu")
    h = _quant_conv(e, f"{node.name}.conv2", h, w2, bound2, b2, signed=False, rank=4, kernel_shape=[1, 1], **bits)
    return e.node("HardSigmoid", [h], node.name, alpha=1.0 / 6.0, beta=0.5)


def _with_shapes(model: ir.Model, batch: int) -> ir.Model:
    """A copy of ``model`` at a fixed ``batch`` (FINN wants static shapes), every value's shape inferred."""
    from onnx_ir.passes.common import ShapeInferencePass

    from bnncc.ops import attach_functions

    copy = ir.from_proto(ir.to_proto(model))
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
    e = _Emitter(model)
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
        if node.domain != DOMAIN:
            out = e.node(node.op_type, inputs, node.name, domain=node.domain, **attrs)
        elif node.op_type == "BinaryConv":
            out = _binary_conv(e, node, inputs[0], inputs[1], dims(node.inputs[0]))
        elif node.op_type in ("QuantConv", "QuantGemm"):
            rank = len(dims(node.inputs[0]))
            conv = {k: attrs[k] for k in ("kernel_shape", "strides", "pads", "group") if k in attrs}
            out = _quant_conv(e, node.name, *inputs, attrs["w_bits"], attrs["a_bits"], bool(attrs["a_signed"]), rank,
                              **conv)
        elif node.op_type == "DPReLU":
            out = _dprelu(e, node, inputs[0], inputs[1:])
        elif node.op_type == "ReshapeAdd":
            out = _reshape_add(e, node, inputs[0], inputs[1], dims(node.inputs[0]), dims(node.inputs[1]))
        elif node.op_type == "SEGate":
            out = _se_gate(e, node, inputs)
        else:
            raise BnnccError(f"node '{node.name}' ({node.op_type}): no QONNX form for this op")
        renamed[node.outputs[0].name] = out

    graph_input = model.graph.inputs[0]
    graph_output = model.graph.outputs[0]
    e.nodes.append(helper.make_node("Identity", [src(graph_output)], [graph_output.name]))
    proto_in = ir.to_proto(model).graph
    graph = helper.make_graph(
        e.nodes, f"{model.graph.name or 'bnncc'}_qonnx", [i for i in proto_in.input if i.name == graph_input.name],
        [o for o in proto_in.output], initializer=[*proto_in.initializer, *e.initializers])
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(QONNX_DOMAIN, 1)],
                            producer_name="bnncc")
    out.ir_version = 9
    return out


def export_qonnx(model: ir.Model | str | Path, output: str | Path, batch: int = 1) -> Path:
    """Write the QONNX form of ``model`` (an ir.Model or a path) at a fixed ``batch`` to ``output`` atomically."""
    from bnncc.frontend import read

    if not isinstance(model, ir.Model):
        model = read(model)
    proto = to_qonnx(model, batch)
    output = Path(output)
    with atomic_path(output) as tmp:
        onnx.save(proto, tmp)
    return output
