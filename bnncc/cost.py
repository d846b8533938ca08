"""The cost model: ACE, CPU64, MACs, parameters, weight bits and scalar ops, read from the graph alone.

Conventions (shared/reference/pokebnn.md section 1), per image (the leading batch dimension of every
activation counts as 1, fixed or symbolic):

- MACs of a conv = Ho * Wo * (kh * kw * Cin / groups) * Cout, i.e. output elements times the dot
  length ``prod(W.shape[1:])``; of a dense layer (Gemm, MatMul, QuantGemm) = output elements times
  the inner dimension; of an SEGate = its two 1x1 convs at 1x1 spatial: Ci*Ch + Ch*Co with Ch the
  hidden width (W1's first dimension, Ci // 8 in PokeBNN).
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
  activations, BinarizeAct, Add and Mul; kh*kw per output element of MaxPool/AveragePool; H*W*C
  adds and C multiplies of a global average pool. An SEGate adds its pool (H*W*Ci adds, Ci
  multiplies), ReLU (Ch) and hard-sigmoid (Co); a Mul by an SEGate's output counts as the SE
  multiply. A ReshapeAdd counts its channel shrink (Hi*Wi*Co*k adds and Hi*Wi*Co multiplies when
  Ci > Co, k = Ci // Co), its 3x3 shortcut pool (9*Ho*Wo*Co) and its add (Ho*Wo*Co; method
  "zeropad" is the local shortcut, "tile" the block shortcut). These are google/aqt's
  ``size_stats`` categories, except that the final global pool's C multiplies are counted too.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import onnx
import onnx_ir as ir
from rich import box
from rich.table import Table

from bnncc.errors import BnnccError
from bnncc.ops import DOMAIN

__all__ = ["CostReport", "Layer", "Elementwise", "ace", "read_model", "format_table"]

FLOAT_WEIGHT_BITS = 32  # float weights are stored as float32 whatever width their MACs are counted at


@dataclasses.dataclass(frozen=True)
class Layer:
    """One MAC-counting node: a conv (``part="conv"``) or a dense layer (``part="dense"``)."""

    name: str
    op_type: str
    part: str
    w_bits: int
    a_bits: int
    macs: int
    weights: int  # elements of the layer's weight tensor(s)
    weight_bits: int  # weights * w_bits (float weights at 32)

    @property
    def ace(self) -> int:
        return self.macs * self.w_bits * self.a_bits

    @property
    def binary(self) -> bool:
        return self.w_bits == 1 and self.a_bits == 1

    @property
    def cpu64(self) -> float:
        return self.macs / 64 if self.binary else float(self.macs)


@dataclasses.dataclass(frozen=True)
class Elementwise:
    """The scalar ops of one node, by category (see the module docstring)."""

    name: str
    op_type: str
    sops: dict[str, int]


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

    def by_op_type(self) -> dict[str, dict[str, int]]:
        """MACs, ACE and weight bits summed per op type (e.g. BinaryConv = the binary convs)."""
        groups: dict[str, dict[str, int]] = {}
        for layer in self.layers:
            group = groups.setdefault(layer.op_type, {"macs": 0, "ace": 0, "weight_bits": 0})
            group["macs"] += layer.macs
            group["ace"] += layer.ace
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
    if float_bits < 1:
        raise BnnccError(f"float_bits must be >= 1, got {float_bits}")
    if isinstance(model, (str, os.PathLike)):
        model = read_model(model)
    elif isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    shapes = _Shapes(model)
    layers: list[Layer] = []
    elementwise: list[Elementwise] = []
    for node in model.graph:
        key = (_domain(node), node.op_type)
        if key in _LAYERS:
            layers.append(_LAYERS[key](node, shapes, float_bits))
        if key in _SOPS:
            sops = _SOPS[key](node, shapes)
            if any(sops.values()):
                elementwise.append(Elementwise(node.name, node.op_type, sops))
    initializers = [v for v in model.graph.initializers.values() if v.uses() or v.is_graph_output()]
    weights = _inputs_at(model.graph, _WEIGHT_INPUTS)
    state = _inputs_at(model.graph, _STATE_INPUTS)
    return CostReport(
        float_bits=float_bits,
        layers=tuple(layers),
        elementwise=tuple(elementwise),
        params=sum(_numel(_initializer_shape(v)) for v in initializers),
        weight_params=sum(_numel(_initializer_shape(v)) for v in initializers if v in weights),
        state_params=sum(_numel(_initializer_shape(v)) for v in initializers if v in state and v not in weights),
    )


def _inputs_at(graph: ir.Graph, positions: dict[tuple[str, str], tuple[int, ...]]) -> set[ir.Value]:
    """The values that feed the given input positions of the given ops."""
    return {node.inputs[i] for node in graph if (_domain(node), node.op_type) in positions
            for i in positions[(_domain(node), node.op_type)] if i < len(node.inputs) and node.inputs[i] is not None}


def read_model(path: str | os.PathLike) -> ir.Model:
    """Read and check any ONNX file bnncc accepts (float or ai.bnncc graphs), without canonicalizing.

    The file checks are the front end's: missing, empty, truncated or non-ONNX files and external
    data outside the model's folder raise BnnccError naming the file.
    """
    from bnncc.frontend import _load_external_data, _read_proto  # the front end's reader, shared

    path = Path(path)
    proto = _read_proto(path)
    _load_external_data(proto, path)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BnnccError(f"{path}: invalid ONNX model: {first}") from None
    return ir.serde.deserialize_model(proto)


def format_table(report: CostReport, title: str = "", per_layer: bool = True) -> Table:
    """A rich table: one row per counted layer (optional), one per op type, then the totals, ACE in
    units of 1e9 (6 decimals: exact to 1000 ACE); the caption gives the exact ACE, the conventions
    (float width), the parameters and the scalar ops by category. Fits 80 columns."""
    table = Table(title=title or None, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    # the text columns keep a readable minimum; numbers are never wrapped or cut
    table.add_column("layer", min_width=12, overflow="fold")
    table.add_column("op w x a", min_width=14, overflow="fold")
    for column in ("MACs", "ACE 1e9", "CPU64", "weight bits"):
        table.add_column(column, justify="right", no_wrap=True)
    if per_layer:
        for layer in report.layers:
            table.add_row(layer.name, f"{layer.op_type} {layer.w_bits}x{layer.a_bits}", f"{layer.macs:,}",
                          f"{layer.ace / 1e9:.6f}", f"{layer.cpu64:,.0f}", f"{layer.weight_bits:,}")
        table.add_section()
    for op_type, group in report.by_op_type().items():
        table.add_row("all", op_type, f"{group['macs']:,}", f"{group['ace'] / 1e9:.6f}", "",
                      f"{group['weight_bits']:,}")
    table.add_section()
    table.add_row("total", "", f"{report.macs:,}", f"{report.total / 1e9:.6f}", f"{report.cpu64:,.0f}",
                  f"{report.weight_bits:,}")
    sops = ", ".join(f"{name} {count:,}" for name, count in sorted(report.sops.items()))
    table.caption = (
        f"ACE {report.total:,} (conv {report.conv:,}, dense {report.dense:,}); "
        f"float MACs at {report.float_bits} x {report.float_bits} bits, float weights at {FLOAT_WEIGHT_BITS} bits; "
        f"params {report.params:,} ({report.weight_params:,} weights, {report.extra_params:,} learned float extras, "
        f"{report.state_params:,} BN statistics and activation bounds); "
        f"scalar ops {report.sops_total:,}" + (f" ({sops})" if sops else "")
    )
    return table


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
    """Value name -> dims after onnx shape inference (which also looks into model-local functions)."""
    try:
        proto = onnx.shape_inference.infer_shapes(ir.to_proto(model), data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        raise BnnccError(f"shape inference failed: {str(e).strip().splitlines()[0]}") from None
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


def _numel(dims: Iterable[int]) -> int:
    return math.prod(dims)


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


# --------------------------------------------------------------------------- MAC layers

# The inputs that hold a layer's weights (counted in weight bits and weight parameters).
_WEIGHT_INPUTS = {("", "Conv"): (1,), ("", "Gemm"): (1,), ("", "MatMul"): (1,), (DOMAIN, "BinaryConv"): (1,),
                  (DOMAIN, "QuantConv"): (1,), (DOMAIN, "QuantGemm"): (1,), (DOMAIN, "SEGate"): (1, 4)}
# The inputs that hold state training does not learn: BN running statistics, activation bounds.
_STATE_INPUTS = {("", "BatchNormalization"): (3, 4), (DOMAIN, "QuantConv"): (2,), (DOMAIN, "QuantGemm"): (2,),
                 (DOMAIN, "SEGate"): (2, 5)}


def _bits(node: ir.Node, name: str) -> int:
    attr = node.attributes.get(name)
    if attr is None:
        raise BnnccError(f"node '{node.name}' ({node.op_type}): missing the attribute '{name}'")
    return attr.as_int()


def _conv_layer(node: ir.Node, shapes: _Shapes, w_bits: int, a_bits: int, weight_bits: int) -> Layer:
    """MACs = output pixels * Cout * dot length, the dot length being prod(W.shape[1:]) = kh*kw*Cin/groups."""
    weight = shapes.static(node, node.inputs[1])
    pixels = _numel(shapes.per_image(node, node.outputs[0])[1:])
    macs = pixels * _numel(weight)
    return Layer(node.name, node.op_type, "conv", w_bits, a_bits, macs, _numel(weight), _numel(weight) * weight_bits)


def _float_conv(node: ir.Node, shapes: _Shapes, float_bits: int) -> Layer:
    return _conv_layer(node, shapes, float_bits, float_bits, FLOAT_WEIGHT_BITS)


def _binary_conv(node: ir.Node, shapes: _Shapes, float_bits: int) -> Layer:
    return _conv_layer(node, shapes, 1, 1, 1)


def _quant_conv(node: ir.Node, shapes: _Shapes, float_bits: int) -> Layer:
    w_bits = _bits(node, "w_bits")
    return _conv_layer(node, shapes, w_bits, _bits(node, "a_bits"), w_bits)


def _se_gate(node: ir.Node, shapes: _Shapes, float_bits: int) -> Layer:
    """Two 1x1 convs on the pooled (1x1) vector: MACs = |W1| + |W2| = Ci*Ch + Ch*Co."""
    w_bits = _bits(node, "w_bits")
    weights = _numel(shapes.static(node, node.inputs[1])) + _numel(shapes.static(node, node.inputs[4]))
    return Layer(node.name, node.op_type, "conv", w_bits, _bits(node, "a_bits"), weights, weights, weights * w_bits)


def _dense_layer(node: ir.Node, weight: tuple[int, ...], rows: int, w_bits: int, a_bits: int,
                 weight_bits: int) -> Layer:
    """MACs = rows per image * in * out: every row of the input meets every weight once."""
    macs = rows * _numel(weight)
    return Layer(node.name, node.op_type, "dense", w_bits, a_bits, macs, _numel(weight), _numel(weight) * weight_bits)


def _gemm(node: ir.Node, shapes: _Shapes, float_bits: int) -> Layer:
    # Gemm's input is (N, in): one row per image, whatever W's layout (transB).
    return _dense_layer(node, shapes.static(node, node.inputs[1]), 1, float_bits, float_bits, FLOAT_WEIGHT_BITS)


def _matmul(node: ir.Node, shapes: _Shapes, float_bits: int) -> Layer:
    """Rows per image = the output dims between the batch and the last one (1 for (N, out))."""
    weight = shapes.static(node, node.inputs[1])
    rows = _numel(shapes.per_image(node, node.outputs[0])[:-1])
    return _dense_layer(node, weight[-2:], rows * _numel(weight[:-2]), float_bits, float_bits, FLOAT_WEIGHT_BITS)


def _quant_gemm(node: ir.Node, shapes: _Shapes, float_bits: int) -> Layer:
    w_bits = _bits(node, "w_bits")
    return _dense_layer(node, shapes.static(node, node.inputs[1]), 1, w_bits, _bits(node, "a_bits"), w_bits)


_LAYERS: dict[tuple[str, str], Callable[[ir.Node, _Shapes, int], Layer]] = {
    ("", "Conv"): _float_conv,
    ("", "Gemm"): _gemm,
    ("", "MatMul"): _matmul,
    (DOMAIN, "BinaryConv"): _binary_conv,
    (DOMAIN, "QuantConv"): _quant_conv,
    (DOMAIN, "QuantGemm"): _quant_gemm,
    (DOMAIN, "SEGate"): _se_gate,
}


# --------------------------------------------------------------------------- scalar ops


def _per_output(category: str) -> Callable[[ir.Node, _Shapes], dict[str, int]]:
    """One scalar op per output element."""

    def count(node: ir.Node, shapes: _Shapes) -> dict[str, int]:
        return {category: _numel(shapes.per_image(node, node.outputs[0]))}

    return count


def _pool(node: ir.Node, shapes: _Shapes) -> dict[str, int]:
    """kh * kw per output element (adds or comparisons)."""
    kernel = node.attributes["kernel_shape"].as_ints()
    return {"pool": _numel(shapes.per_image(node, node.outputs[0])) * _numel(kernel)}


def _global_pool(node: ir.Node, shapes: _Shapes) -> dict[str, int]:
    """H*W*C adds and, for the average, C multiplies."""
    dims = shapes.per_image(node, node.inputs[0])
    sops = {"global_pool": _numel(dims)}
    if node.op_type == "GlobalAveragePool":
        sops["global_pool_mul"] = dims[0]
    return sops


def _mul(node: ir.Node, shapes: _Shapes) -> dict[str, int]:
    """An elementwise multiply; by an SEGate's output it is the SE multiply."""
    by_gate = any(v is not None and v.producer() is not None and v.producer().op_type == "SEGate"
                  for v in node.inputs)
    return {"se_mul" if by_gate else "mul": _numel(shapes.per_image(node, node.outputs[0]))}


def _se_gate_sops(node: ir.Node, shapes: _Shapes) -> dict[str, int]:
    """Pool over H, W (H*W*Ci adds, Ci multiplies), ReLU on Ch, hard-sigmoid on Co."""
    ci, h, w = shapes.per_image(node, node.inputs[0])
    hidden = shapes.static(node, node.inputs[1])[0]
    co = shapes.static(node, node.inputs[4])[0]
    return {"se_pool": ci * h * w, "se_pool_mul": ci, "se_relu": hidden, "se_hardsigmoid": co}


def _reshape_add(node: ir.Node, shapes: _Shapes) -> dict[str, int]:
    """Channel shrink (Hi*Wi*Co*k adds, Hi*Wi*Co multiplies), 3x3 pool (9 per output), the add."""
    co, ho, wo = shapes.per_image(node, node.inputs[0])
    ci, hi, wi = shapes.per_image(node, node.inputs[1])
    method = node.attributes["method"].as_string()
    sops = {"local_residual_add" if method == "zeropad" else "block_residual_add": co * ho * wo}
    if ci > co:
        sops["shortcut_shrink"] = hi * wi * co * (ci // co)
        sops["shortcut_shrink_mul"] = hi * wi * co
    if (hi, wi) != (ho, wo):
        sops["shortcut_pool"] = 9 * co * ho * wo
    return sops


_ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Tanh")

_SOPS: dict[tuple[str, str], Callable[[ir.Node, _Shapes], dict[str, int]]] = {
    ("", "BatchNormalization"): _per_output("batch_norm"),
    **{("", op): _per_output("activation") for op in _ACTIVATIONS},
    ("", "Add"): _per_output("add"),
    ("", "Sum"): _per_output("add"),
    ("", "Sub"): _per_output("add"),
    ("", "Mul"): _mul,
    ("", "Div"): _per_output("mul"),
    ("", "MaxPool"): _pool,
    ("", "AveragePool"): _pool,
    ("", "GlobalAveragePool"): _global_pool,
    ("", "GlobalMaxPool"): _global_pool,
    (DOMAIN, "DPReLU"): _per_output("dprelu"),
    (DOMAIN, "BinarizeAct"): _per_output("binarize"),
    (DOMAIN, "SEGate"): _se_gate_sops,
    (DOMAIN, "ReshapeAdd"): _reshape_add,
}
