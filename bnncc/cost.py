"""The cost model: ACE, CPU64, MACs, parameters, weight bits and scalar ops, read from the graph alone.

Conventions (shared/reference/pokebnn.md section 1), per image (the leading batch dimension of every
activation counts as 1, fixed or symbolic):

- MACs of a conv = Ho * Wo * (kh * kw * Cin / groups) * Cout, i.e. output elements times the dot
  length ``prod(W.shape[1:])``; of a dense layer (Gemm, MatMul, QuantGemm) = output elements times
  the inner dimension; of an SEGate = its two 1x1 convs at 1x1 spatial: Ci*Ch + Ch*Co with Ch the
  hidden width (W1's first dimension, Ci // 8 in PokeBNN); a PokeConv counts its binary conv and
  its SE gate as these two layers (``<node>/binary``, ``<node>/se``; one without SE gate, the
  binary conv alone).
- ACE = MACs * w_bits * a_bits. BinaryConv is 1 x 1, QuantConv/QuantGemm/SEGate read their
  ``w_bits``/``a_bits`` attributes, float Conv/Gemm/MatMul count ``float_bits`` x ``float_bits``
  (16 x 16 = 256 by default: the paper's "bf16 x bf16").
- CPU64 = binary MACs / 64 + all other MACs (a 64-bit word does 64 XNOR-popcount MACs at once).
- Weight bits = w_bits per weight of every counted layer; float weights count 32 bits each.
- Parameters = the elements of every initializer that a node reads (a dangling one left behind by
  a rewrite is not part of the network), split into the weights of counted layers, the
  state that training does not learn (BN running mean and variance, activation bounds) and the
  learned float extras (BN gamma and beta, DPReLU, biases). The paper's "total params" is
  weights + extras (:attr:`CostReport.trainable_params`).
- Scalar ops ("sops", not in ACE) count one per output element of BatchNormalization, DPReLU,
  activations, BinarizeAct, Add (Sum and Sub too) and Mul (Div too); kh*kw per output element of
  MaxPool/AveragePool; H*W*C adds and C multiplies of a global average pool. An SEGate adds its
  pool (H*W*Ci adds, Ci multiplies), ReLU (Ch) and hard-sigmoid (Co); a PokeConv counts its two
  batch norms, its shortcuts, DPReLU, SE gate and the gate's multiply (``se_mul``; neither without
  the gate). A ReshapeAdd counts its channel shrink (Hi*Wi*Co*k adds and Hi*Wi*Co multiplies when
  Ci > Co, k = Ci // Co), its 3x3 shortcut pool (9*Ho*Wo*Co) and its add (Ho*Wo*Co; method
  "zeropad" is the local shortcut, "tile" the block shortcut). These are google/aqt's
  ``size_stats`` categories, except that the final global pool's C multiplies are counted too.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Callable

import onnx
import onnx_ir as ir
from rich import box
from rich.table import Table

from bnncc.domain import DEFAULT_DOMAINS, FLOAT_BITS
from bnncc.errors import BnnccError, first_line, printable
from bnncc.frontend import read as read_model
from bnncc.ops import attach_functions, op_def
from bnncc.ops.counting import (FLOAT_WEIGHT_BITS, Elementwise, Layer, conv_layer, dense_layer, numel,
                                per_output)

__all__ = ["CostReport", "Layer", "Elementwise", "ace", "read_model", "format_summary", "format_table", "inputs_at"]


@dataclasses.dataclass(frozen=True)
class CostReport:
    """What :func:`ace` measures. ``float(report)`` is the total ACE."""

    float_bits: int
    layers: tuple[Layer, ...]
    elementwise: tuple[Elementwise, ...]
    params: int  # the elements of every initializer that a node reads
    weight_params: int  # the initializer elements that are weights of counted layers
    state_params: int  # BN running statistics and activation bounds: not learned

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def conv(self) -> int:
        """ACE of the conv layers (BinaryConv, QuantConv, SEGate, Conv)."""
        return sum(layer.ace for layer in self.layers if layer.part == "conv")

    @property
    def dense(self) -> int:
        """ACE of the dense layers (QuantGemm, Gemm, MatMul)."""
        return sum(layer.ace for layer in self.layers if layer.part == "dense")

    @property
    def total(self) -> int:
        return self.conv + self.dense

    @property
    def cpu64(self) -> float:
        return sum(layer.cpu64 for layer in self.layers)

    @property
    def binary_macs(self) -> int:
        return sum(layer.macs for layer in self.layers if layer.binary)

    @property
    def weight_bits(self) -> int:
        return sum(layer.weight_bits for layer in self.layers)

    @property
    def extra_params(self) -> int:
        """Learned float parameters that are not weights of counted layers: biases, BN gamma/beta, DPReLU."""
        return self.params - self.weight_params - self.state_params

    @property
    def trainable_params(self) -> int:
        return self.weight_params + self.extra_params

    @property
    def sops(self) -> dict[str, int]:
        """Scalar ops by category, summed over the graph."""
        totals: dict[str, int] = {}
        for op in self.elementwise:
            for category, count in op.sops.items():
                totals[category] = totals.get(category, 0) + count
        return totals

    @property
    def sops_total(self) -> int:
        return sum(self.sops.values())

    def by_op_type(self) -> dict[str, dict[str, int | float]]:
        """MACs, ACE, CPU64 (a float: binary MACs / 64, other MACs as they are) and weight bits summed per
        op type (e.g. BinaryConv = the binary convs)."""
        groups: dict[str, dict[str, int | float]] = {}
        for layer in self.layers:
            group = groups.setdefault(layer.op_type, {"macs": 0, "ace": 0, "cpu64": 0.0, "weight_bits": 0})
            group["macs"] += layer.macs
            group["ace"] += layer.ace
            group["cpu64"] += layer.cpu64
            group["weight_bits"] += layer.weight_bits
        return groups

    def __float__(self) -> float:
        return float(self.total)

    def to_dict(self) -> dict:
        """A JSON-ready summary: totals, the per-op-type breakdown, scalar ops and every layer."""
        return {
            "float_bits": self.float_bits,
            "float_weight_bits": FLOAT_WEIGHT_BITS,
            "ace": self.total,
            "conv_ace": self.conv,
            "dense_ace": self.dense,
            "macs": self.macs,
            "binary_macs": self.binary_macs,
            "cpu64": self.cpu64,
            "weight_bits": self.weight_bits,
            "params": self.params,
            "weight_params": self.weight_params,
            "state_params": self.state_params,
            "extra_params": self.extra_params,
            "trainable_params": self.trainable_params,
            "by_op_type": self.by_op_type(),
            "sops": self.sops,
            "sops_total": self.sops_total,
            "layers": [dict(dataclasses.asdict(layer), ace=layer.ace, cpu64=layer.cpu64) for layer in self.layers],
        }


def ace(model: ir.Model | onnx.ModelProto | str | os.PathLike, float_bits: int = 16) -> CostReport:
    """Measure ``model`` (an onnx_ir Model, a ModelProto or a path); float MACs at ``float_bits``^2."""
    # 16.0 is in the range and made every float layer's bits and ACE a float; True counted 1 bit
    if isinstance(float_bits, bool) or not isinstance(float_bits, numbers.Integral):
        raise TypeError(f"float_bits is an integer number of bits, not {type(float_bits).__name__} {float_bits!r}")
    if float_bits not in FLOAT_BITS:
        raise BnnccError(f"float_bits must be {FLOAT_BITS.start} to {FLOAT_BITS[-1]} (a float's width), "
                         f"got {float_bits}")
    if isinstance(model, (str, os.PathLike)):
        path, model = model, read_model(model)
        try:
            return _measure(model, float_bits)
        except BnnccError as e:  # it names a node or value of the graph (a dynamic shape); the file too
            raise BnnccError(f"{path}: {e}") from None
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    elif not isinstance(model, ir.Model):  # None failed deep inside, naming a missing attribute 'graph'
        raise TypeError(f"ace takes an onnx_ir Model, a ModelProto or a path, not {type(model).__name__}")
    return _measure(model, float_bits)


def _measure(model: ir.Model, float_bits: int) -> CostReport:
    shapes = _Shapes(model)
    layers: list[Layer] = []
    elementwise: list[Elementwise] = []
    for node in model.graph:
        layer_rule, sops_rule = _rules(node)
        if layer_rule is not None:
            layers.extend(layer_rule(node, shapes, float_bits))
        if sops_rule is not None:
            sops = sops_rule(node, shapes)
            if any(sops.values()):
                elementwise.append(Elementwise(node.name, node.op_type, sops))
    initializers = [v for v in model.graph.initializers.values() if v.uses() or v.is_graph_output()]
    weights = inputs_at(model.graph, "weight_inputs")
    state = inputs_at(model.graph, "state_inputs")
    return CostReport(
        float_bits=float_bits,
        layers=tuple(layers),
        elementwise=tuple(elementwise),
        params=sum(numel(_initializer_shape(v)) for v in initializers),
        weight_params=sum(numel(_initializer_shape(v)) for v in initializers if v in weights),
        state_params=sum(numel(_initializer_shape(v)) for v in initializers if v in state and v not in weights),
    )


def _rules(node: ir.Node) -> tuple[Callable | None, Callable | None]:
    """(layers rule, sops rule) of a node: an ai.bnncc op's own (its OpDef), else a standard op's."""
    op = op_def(node)
    if op is not None:
        return op.layers, op.sops
    if node.domain in DEFAULT_DOMAINS:
        return _LAYERS.get(node.op_type), _SOPS.get(node.op_type)
    return None, None


def _input_positions(node: ir.Node, kind: str) -> tuple[int, ...]:
    """``kind`` "weight_inputs" or "state_inputs" of a node (module docstring)."""
    op = op_def(node)
    if op is not None:
        return getattr(op, kind)
    standard = _WEIGHT_INPUTS if kind == "weight_inputs" else _STATE_INPUTS
    return standard.get(node.op_type, ()) if node.domain in DEFAULT_DOMAINS else ()


def inputs_at(graph: ir.Graph, kind: str) -> set[ir.Value]:
    """The values that feed the weight or state input positions of the graph's nodes."""
    return {node.inputs[i] for node in graph for i in _input_positions(node, kind)
            if i < len(node.inputs) and node.inputs[i] is not None}


def format_table(report: CostReport, per_layer: bool = True) -> Table:
    """A rich table: one row per counted layer (optional), one per op type, then the totals; MACs,
    CPU64 and weight bits in units of 1e6 (3 decimals: exact to 1000), ACE in units of 1e9 (6
    decimals: exact to 1000 ACE), so a float ResNet-50's 4e9 MACs and 1e12 ACE fit 80 columns.
    ``format_summary`` gives the exact figures beside it."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    # the text columns keep a readable minimum; numbers are never wrapped or cut
    table.add_column("layer", min_width=12, overflow="fold")
    table.add_column("op w x a", min_width=14, overflow="fold")
    for column in ("MACs 1e6", "ACE 1e9", "CPU64 1e6", "wbits 1e6"):
        table.add_column(column, justify="right", no_wrap=True)

    def mega(value: float) -> str:
        return f"{value / 1e6:,.3f}"

    def giga(value: int) -> str:  # grouped as the other columns: a float ResNet-50's ACE read "1046.306882"
        return f"{value / 1e9:,.6f}"

    if per_layer:
        for layer in report.layers:
            table.add_row(printable(layer.name), f"{layer.op_type} {layer.w_bits}x{layer.a_bits}", mega(layer.macs),
                          giga(layer.ace), mega(layer.cpu64), mega(layer.weight_bits))
        table.add_section()
    for op_type, group in report.by_op_type().items():
        table.add_row("all", op_type, mega(group["macs"]), giga(group["ace"]), mega(group["cpu64"]),
                      mega(group["weight_bits"]))
    table.add_section()
    table.add_row("total", "", mega(report.macs), giga(report.total), mega(report.cpu64), mega(report.weight_bits))
    return table


def format_summary(report: CostReport) -> str:
    """The exact ACE, MACs and weight bits, the conventions (float width), the parameters and the scalar
    ops by category: a paragraph of its own (as a table's caption rich wrapped it to the table's width)."""
    sops = ", ".join(f"{name} {count:,}" for name, count in sorted(report.sops.items()))
    return (
        f"ACE {report.total:,} (conv {report.conv:,}, dense {report.dense:,}); MACs {report.macs:,}; "
        f"weight bits {report.weight_bits:,}; "
        f"float MACs at {report.float_bits} x {report.float_bits} bits, float weights at {FLOAT_WEIGHT_BITS} bits; "
        f"params {report.params:,} ({report.weight_params:,} weights, {report.extra_params:,} learned float extras, "
        f"{report.state_params:,} BN statistics and activation bounds); "
        f"scalar ops {report.sops_total:,}" + (f" ({sops})" if sops else "")
    )


# --------------------------------------------------------------------------- shapes


class _Shapes:
    """Shapes of values: the IR's own, else onnx shape inference (run once, when first needed)."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.inferred: dict[str, tuple] | None = None

    def dims(self, node: ir.Node, value: ir.Value) -> tuple[int | str | None, ...]:
        """All dims of ``value`` (symbolic ones as their name or None)."""
        shape = value.shape
        if shape is None and value.const_value is not None:
            shape = value.const_value.shape
        if shape is not None:
            return tuple(d if isinstance(d, int) else d.value for d in shape)
        if self.inferred is None:
            self.inferred = _infer(self.model)
        if value.name in self.inferred:
            return self.inferred[value.name]
        raise BnnccError(f"node '{node.name}' ({node.op_type}): the shape of '{value.name}' is unknown")

    def static(self, node: ir.Node, value: ir.Value) -> tuple[int, ...]:
        """Every dim of a weight-like value; all must be known integers."""
        return self._ints(node, value, self.dims(node, value))

    def per_image(self, node: ir.Node, value: ir.Value) -> tuple[int, ...]:
        """The dims of an activation after the batch dim, which counts as 1; all must be known."""
        dims = self.dims(node, value)
        if not dims:
            raise BnnccError(f"node '{node.name}' ({node.op_type}): '{value.name}' has no batch dimension")
        return self._ints(node, value, dims[1:])

    @staticmethod
    def _ints(node: ir.Node, value: ir.Value, dims: tuple) -> tuple[int, ...]:
        if not all(isinstance(d, int) for d in dims):
            raise BnnccError(f"node '{node.name}' ({node.op_type}): '{value.name}' has the dynamic shape {dims}")
        return dims


def _infer(model: ir.Model) -> dict[str, tuple]:
    """Value name -> dims after onnx shape inference (which also looks into model-local functions: the
    ai.bnncc ops' are attached, as for onnxruntime, so a graph stored without them is measured as
    compile and export take it, where ace said that the shape of the stem's output is unknown)."""
    try:
        proto = onnx.shape_inference.infer_shapes(attach_functions(ir.to_proto(model)), data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        raise BnnccError(f"shape inference failed: {first_line(e)}") from None
    shapes = {}
    for info in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                      for d in info.type.tensor_type.shape.dim)
    return shapes


def _initializer_shape(value: ir.Value) -> tuple[int, ...]:
    shape = value.const_value.shape if value.const_value is not None else value.shape
    if shape is None:
        raise BnnccError(f"initializer '{value.name}': unknown shape")
    return tuple(shape)


# --------------------------------------------------------------------------- MAC layers of standard ops
# (the ai.bnncc ops' rules are their OpDefs': bnncc/ops)

# The inputs that hold a layer's weights (counted in weight bits and weight parameters).
_WEIGHT_INPUTS = {"Conv": (1,), "Gemm": (1,), "MatMul": (1,)}
# The inputs that hold state training does not learn: BN running statistics.
_STATE_INPUTS = {"BatchNormalization": (3, 4)}


def _float_conv(node: ir.Node, shapes: _Shapes, float_bits: int) -> list[Layer]:
    return [conv_layer(node, shapes, float_bits, float_bits, FLOAT_WEIGHT_BITS)]


def _gemm(node: ir.Node, shapes: _Shapes, float_bits: int) -> list[Layer]:
    # Gemm's input is (N, in): one row per image, whatever W's layout (transB).
    return [dense_layer(node, shapes.static(node, node.inputs[1]), 1, float_bits, float_bits, FLOAT_WEIGHT_BITS)]


def _matmul(node: ir.Node, shapes: _Shapes, float_bits: int) -> list[Layer]:
    """Rows per image = the output dims between the batch and the last one (1 for (N, out))."""
    weight = shapes.static(node, node.inputs[1])
    rows = numel(shapes.per_image(node, node.outputs[0])[:-1])
    return [dense_layer(node, weight[-2:], rows * numel(weight[:-2]), float_bits, float_bits, FLOAT_WEIGHT_BITS)]


_LAYERS: dict[str, Callable[[ir.Node, _Shapes, int], list[Layer]]] = {
    "Conv": _float_conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
}


# --------------------------------------------------------------------------- scalar ops


def _pool(node: ir.Node, shapes: _Shapes) -> dict[str, int]:
    """kh * kw per output element (adds or comparisons)."""
    kernel = node.attributes["kernel_shape"].as_ints()
    return {"pool": numel(shapes.per_image(node, node.outputs[0])) * numel(kernel)}


def _global_pool(node: ir.Node, shapes: _Shapes) -> dict[str, int]:
    """H*W*C adds and, for the average, C multiplies."""
    dims = shapes.per_image(node, node.inputs[0])
    sops = {"global_pool": numel(dims)}
    if node.op_type == "GlobalAveragePool":
        sops["global_pool_mul"] = dims[0]
    return sops


_ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Tanh")

_SOPS: dict[str, Callable[[ir.Node, _Shapes], dict[str, int]]] = {
    "BatchNormalization": per_output("batch_norm"),
    **{op: per_output("activation") for op in _ACTIVATIONS},
    "Add": per_output("add"),
    "Sum": per_output("add"),
    "Sub": per_output("add"),
    "Mul": per_output("mul"),
    "Div": per_output("mul"),
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _global_pool,
    "GlobalMaxPool": _global_pool,
}
