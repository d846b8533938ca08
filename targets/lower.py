"""Lower a PokeBNN ONNX graph (bnncc/ops/spec.md) to one TVM Relax module of our scheduled kernels.

The lowering of each op is registered by op name (``register_lowering``, as TVM's legalize
registry does): the graph is walked in order and each node goes to its op's lowering, which emits
one ``call_tir`` (``call_tir_inplace`` where a block's output overwrites its dead residual) of a
PrimFunc of ours. Activations are NHWC float32 inside (the stem's first conv reads the NCHW input
as it is; any other reader gets it transposed):

- ``QuantConv [-> BatchNormalization [-> DPReLU]]`` (the PokeInit stem): ``quant_conv2d`` with
  the bias, BN and DPReLU fused as its epilogue; float32 arithmetic on the quantized values.
  Every activation quantizer (stem, SE gate, head) runs the reference's float32 operations in
  its order (``quant.quantize_act``, with the product fenced from FMA contraction for the target),
  so equal inputs quantize identically; its inputs themselves (a conv, a mean) still differ from
  onnxruntime's by summation order, which ``bnncc.verification`` accounts for.
- ``PokeConv`` (bnncc/ops/poke_conv.py): its SE gate (``se_gate``), then one binary conv on packed
  bits whose epilogue is

      u = a1 * acc + b1 + match(x) [+ match(r)]
      y = ((u >= 0 ? pos * u : neg * u) - by) [* gate] + b2

  with acc the +-1 dot product, a1 = gamma1 / sqrt(var1 + eps) * (B/2) * (max|W|/2) (the
  BinaryConv scales folded into BN), b1 = beta1 - mean1 * gamma1 / sqrt(var1 + eps) - bias_x
  (the DPReLU's input shift), pos, neg, by the DPReLU's slopes and output shift times a2, the
  second BN's scale (a2 * (d * gate) = (a2 * d) * gate), and b2 its shift: the op's arithmetic
  with two operations an output fewer, a float32 rounding apart. A gated kernel first folds the
  gate into pos, neg and the shifts, per image and channel (two more operations an output
  fewer). ``match`` is the ReshapeAdd channel mean / zero-pad / tile and the 3x3/2 SAME
  count-pad average pool. With an even Cin the kernel computes (2 * a1) * (acc / 2), the same
  product (binary_conv2d's ``halved``: fewer integer instructions an output), unless it counts
  nibbles (whose sum is acc itself). It writes y
  (float, read by the next local shortcut and block shortcut) and, when a PokeConv reads y, y's
  packed sign bits (the next layer's input) and, when that PokeConv is gated, y's row sums
  (N, Ho, Cout), which its SE gate averages instead of reading y again. A PokeConv without SE
  gate (the "ungated" overloads) has no gate kernel, and its epilogue no gate input or multiply.
- ``SEGate``: ``se_gate`` (pool, int4 dense, relu, int4 dense, hard sigmoid) -> (N, Cout).
- ``GlobalAveragePool -> Flatten -> QuantGemm``: ``quant_head``.

Weights are packed (binary: 1 bit; int-k: int8 integers and a scale per channel) at compile
time and embedded as constants. The schedule is a parameter (``schedule``), so another target
swaps only its rules. One Relax function per batch size, named ``batch_<N>``, which calls the
private function ``image`` (the kernels) once per image with the whole batch and the image's
index: the stem's first conv reads its image in place (a split of the batch into images copied
it first: 4% of a batch of 8 on Zen 4).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from bnncc.domain import DEFAULT_CLIP_BOUND, DEFAULT_DOMAINS, DOMAIN, MAX_INPUT_PIXELS
from bnncc.errors import BnnccError
from bnncc.ops import check_graph, poke_conv as poke
from bnncc.passes._util import only_user
from bnncc.targets import x86_64
from bnncc.targets.kernels import KERNEL_ATTR, binary_conv, bitpack, quant
from bnncc.targets.kernels.binary_conv import Epilogue, average_pool, binary_conv2d, channel_mean, out_size, row_sums
from bnncc.targets.tvm_compat import Target, te, tirx
from tvm import ir as tvm_ir  # noqa: E402  (after tvm_compat, which configures TVM's threads before TVM loads)
from tvm import relax  # noqa: E402

__all__ = ["Lowered", "lower", "function_name", "register_lowering", "IMAGE_FUNCTION", "POKE_CONV_KERNEL"]

logger = logging.getLogger(__name__)

# the Relax function that runs one image of a batch: (batch, index) -> its logits (module docstring)
IMAGE_FUNCTION = "image"
# the symbol prefix of the fused PokeConv kernels (a binary_conv2d kernel with its epilogue)
POKE_CONV_KERNEL = "poke_conv"
# rows of the per-channel parameter table of a fused PokeConv epilogue
_A1, _B1, _POS, _NEG, _BY, _B2 = range(6)
# the most tensors one concat joins: TVM lowers a concat of n tensors to an index expression n deep, which its
# passes walk recursively, so the concat of a batch of 1026 logits overflowed the 8 MiB stack (a segmentation
# fault in compile); a batch's logits are joined in groups of at most this many
CONCAT_FAN_IN = 64
# the ops whose lowering reads their input as packed sign bits
_READS_BITS = frozenset({"PokeConv"})

# (domain, op type) -> lowering(walk, node): emits the node (and any node it fuses) into the walk
_LOWERINGS: dict[tuple[str, str], Callable] = {}


def register_lowering(op_type: str, domain: str = DOMAIN):
    """Register the decorated ``fn(walk, node)`` as the lowering of ``op_type`` in ``domain``."""

    def register(fn: Callable) -> Callable:
        if (domain, op_type) in _LOWERINGS:
            raise ValueError(f"a lowering of {domain}::{op_type} is registered twice")
        _LOWERINGS[(domain, op_type)] = fn
        return fn

    return register


def function_name(batch: int) -> str:
    """The Relax function that runs a batch of ``batch`` images."""
    return f"batch_{batch}"


@dataclass(frozen=True)
class Lowered:
    """The Relax module and what a caller needs to feed it: input (C, H, W) and class count."""

    module: object  # tvm.IRModule
    input_name: str
    input_chw: tuple[int, int, int]
    output_name: str
    classes: int


def lower(model: ir.Model, target: Target, batches: tuple[int, ...] = (1,), schedule=None) -> Lowered:
    """Build one Relax module with a function ``batch_<N>`` (NCHW float32 -> logits) per batch size,
    and ``batch_1`` in any case, each calling ``image`` (the kernels) per image.

    ``schedule(func, target)`` returns the scheduled PrimFunc or None (default: the x86-64 rules);
    a kernel no rule schedules is an error, because TVM's CPU pipeline would leave it naive. A
    constant outside its op's domain is an error too (``bnncc.ops.check_graph``).
    """
    schedule = schedule or x86_64.schedule
    check_graph(model)
    graph = model.graph
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        stored = [v.name for v in graph.inputs if v.const_value is not None]
        raise BnnccError(f"graph {graph.name!r}: expected one input and one output, got inputs "
                         f"{[v.name for v in graph.inputs]} and outputs {[v.name for v in graph.outputs]}"
                         + (f" ({', '.join(stored)} also an initializer: list only the image as the graph's input)"
                            if stored else ""))
    chw = _input_chw(graph.inputs[0])
    builder = relax.BlockBuilder()
    # The network is lowered once, for one image (``image``); every batch size calls it once per
    # image. So the library holds each kernel and constant once (batch-8 kernels of their own
    # added 1.6 MiB to 10), and an image's activations stay in cache: batch-8 kernels over
    # 8x56x56x256 floats were memory-bound, 13 ms per image against 9 at batch 1.
    x = relax.Var("input", relax.TensorType((tirx.Var("images", "int64"), *chw), "float32"))
    index = relax.Var("index", tvm_ir.PrimType("int64"))
    try:
        with builder.function(IMAGE_FUNCTION, [x, index], private=True):
            with builder.dataflow():
                walk = _Walk(builder, target, schedule, batch=1)
                logits = walk.run(graph, x, index)
                classes = int(logits.ty.shape[1])
                out = builder.emit_output(logits)
            builder.emit_func_output(out)
    except Exception:
        # the scopes leave a binding block open when they unwind, for which TVM would print a
        # warning on stderr (after the one-line error) when the builder is freed
        builder._end_block()  # noqa: SLF001  (no public way to close it)
        raise
    image = builder.get().get_global_var(IMAGE_FUNCTION)
    for batch in sorted(set(batches) | {1}):
        x = relax.Var("input", relax.TensorType((batch, *chw), "float32"))
        with builder.function(function_name(batch), [x]):
            with builder.dataflow():
                per_image = [builder.emit(relax.Call(image, [x, relax.prim_value(i)])) for i in range(batch)]
                while len(per_image) > CONCAT_FAN_IN:
                    per_image = [builder.emit(relax.op.concat(per_image[i:i + CONCAT_FAN_IN], axis=0))
                                 for i in range(0, len(per_image), CONCAT_FAN_IN)]
                out = builder.emit_output(per_image[0] if batch == 1 else relax.op.concat(per_image, axis=0))
            builder.emit_func_output(out)
    return Lowered(builder.get(), graph.inputs[0].name, chw, graph.outputs[0].name, classes)


def _input_chw(value: ir.Value) -> tuple[int, int, int]:
    """(C, H, W) of the NCHW graph input; the batch may be symbolic, the rest must be fixed."""
    dims = list(value.shape or [])
    if len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
        raise BnnccError(f"input {value.name!r}: expected NCHW with fixed C, H, W, got shape {value.shape}")
    c, h, w = (int(d) for d in dims[1:])
    if min(c, h, w) < 1 or h * w > MAX_INPUT_PIXELS:
        raise BnnccError(f"input {value.name!r}: C, H, W = {c}, {h}, {w}; the kernels take 1 to "
                         f"{MAX_INPUT_PIXELS} pixels")
    return c, h, w


def _const(value: ir.Value, node: ir.Node, shape: tuple | None = None) -> np.ndarray:
    """The constant ``value`` of ``node``; with ``shape`` (ints, None for any size), of that shape."""
    if value is None or value.const_value is None:
        raise BnnccError(f"node {node.name!r} ({node.op_type}): input {getattr(value, 'name', None)!r} "
                         f"is not a constant initializer")
    array = value.const_value.numpy()  # finite: lower's check_graph
    if shape is not None and (array.ndim != len(shape) or any(d is not None and d != n for d, n in zip(shape, array.shape))):
        expected = ", ".join("any" if d is None else str(d) for d in shape)
        raise BnnccError(f"node {node.name!r} ({node.op_type}): input {value.name!r} has shape {list(array.shape)}, "
                         f"expected ({expected})")
    return array


def _bits(node: ir.Node, name: str, default: int) -> int:
    """The bit width attribute ``name`` of ``node``: what the integer kernels hold (int4 or int8 weights,
    signed quantizers of at least one level each side)."""
    bits = node.attributes.get_int(name, default)
    if not 2 <= bits <= 8:
        raise BnnccError(f"node {node.name!r} ({node.op_type}): {name} = {bits}; the kernels take 2 to 8 bits")
    return bits


def _kernel_shape(node: ir.Node, weight: np.ndarray) -> tuple[int, int]:
    """(kh, kw) of a conv ``node``: its weights' (kernel_shape, where given, must agree)."""
    shape = tuple(weight.shape[2:])
    given = tuple(node.attributes.get_ints("kernel_shape", shape))
    if given != shape:
        raise BnnccError(f"node {node.name!r} ({node.op_type}): kernel_shape {list(given)} but weights of shape "
                         f"{list(weight.shape)}")
    return shape


def _strides(node: ir.Node) -> tuple[int, int]:
    """The strides of a conv ``node``: equal, at least 1."""
    strides = tuple(node.attributes.get_ints("strides", (1, 1)))
    if len(strides) != 2 or strides[0] != strides[1] or strides[0] < 1:
        raise BnnccError(f"node {node.name!r} ({node.op_type}): strides {list(strides)}; expected two equal "
                         f"strides >= 1")
    return strides


def _affine(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """A batch norm as y = a x + b: a = gamma / sqrt(var + eps), b = beta - mean a (float64)."""
    gamma, beta, mean, var = (v.astype(np.float64) for v in (gamma, beta, mean, var))
    a = gamma / np.sqrt(var + eps)  # var + eps > 0 (lower's check_graph)
    return a, beta - mean * a


def _float32_table(node: ir.Node, table: np.ndarray) -> np.ndarray:
    """An epilogue's per-channel parameters (folded in float64) as float32, which must hold them: a
    scale past float32's range (a batch norm's gamma of 3e38 times its binary scales) would compute
    infinities where the reference's own arithmetic overflows to NaN."""
    with np.errstate(over="ignore"):
        single = table.astype(np.float32)
    if not np.isfinite(single).all():
        raise BnnccError(f"node {node.name!r} ({node.op_type}): the scales and shifts folded from its batch norms "
                         f"and DPReLU overflow float32 (largest {np.abs(table).max():.3g}); the graph's arithmetic "
                         f"overflows there")
    return single


def _bn_affine(node: ir.Node, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A BatchNormalization node over ``channels`` as y = a x + b (``_affine``)."""
    return _affine(*(_const(v, node, (channels,)) for v in node.inputs[1:5]),
                   node.attributes.get_float("epsilon", 1e-5))


def _annotate(nodes, shape: tuple[int, ...]) -> None:
    """Give the outputs of ``nodes`` that have no shape the (NCHW) shape the lowering derived,
    so that later readers of the graph (the cost model) need no ONNX shape inference."""
    for node in nodes:
        if node is not None and node.outputs[0].shape is None:
            node.outputs[0].shape = ir.Shape(list(shape))


def _dprelu(t: tirx.PrimExpr, bx, by, ps, ns) -> tirx.PrimExpr:
    """DPReLU: u = t - bx; (u >= 0 ? ps : ns) * u - by.

    A ``Select`` of the slopes (a blend of two vectors), not an ``if_then_else``, which vectorizes
    as a select of addresses and a gather per vector; times u, then the shift: one multiply-add in
    every kernel. (A Select of the two products became that multiply-add in some kernels and a
    multiply, a blend and an add in others, one rounding apart.)"""
    u = t - bx
    return tirx.Select(u >= tirx.const(0, "float32"), ps, ns) * u - by


def _plus_match(s: tirx.PrimExpr, r: te.Tensor, idx: tuple, channels: int, method: str) -> tirx.PrimExpr:
    """s + ReshapeAdd's R, R already of the output's size, matched to ``channels``: zero-pad or tile
    (the channel mean and the average pool are stages of their own, ``binary_conv.channel_mean``
    and ``binary_conv.average_pool``). A zero-padded channel is s itself, not s + 0 (which LLVM
    must keep: it turns -0 into +0)."""
    n, y, z, c = idx
    ci = int(r.shape[3])
    if ci < channels and method == "zeropad":
        return tirx.if_then_else(c < ci, s + r[n, y, z, tirx.min(c, ci - 1)], s)
    if ci < channels:
        return s + r[n, y, z, tirx.floormod(c, ci)]
    return s + r[n, y, z, c]


class _Walk:
    """Lowers the nodes of one graph for a batch of ``batch`` images into the builder's current
    function; the registered lowerings emit through its helpers."""

    def __init__(self, builder, target: Target, schedule, batch: int) -> None:
        self.bb = builder
        self.kernels: dict[tuple, object] = {}  # kernel key -> GlobalVar, shared by every layer
        self.target = target
        self.schedule = schedule
        self.batch = batch
        # the int-k quantizers' x * s, rounded on its own as in the reference (quant.rounded_product)
        self.product = quant.rounded_product(target.kind.name)
        # for a binary conv of so many output channels: the channel vector by which its weights
        # are blocked (bitpack.blocked_weights; None: not blocked), and whether it counts nibbles
        # (binary_conv2d's ``nibbles``); both only on x86
        self.weight_lanes = lambda out_channels: x86_64.weight_lanes(target, out_channels)
        self.counts_nibbles = lambda out_channels: x86_64.counts_nibbles(target, out_channels)
        self.split: set[int] = set()  # ids of the PokeConv nodes whose weights come split ahead (run)
        self.floats: dict[str, object] = {}  # ONNX value name -> Relax NHWC float32 tensor
        self.bits: dict[str, object] = {}  # ONNX value name -> its packed sign bits
        self.row_sums: dict[str, object] = {}  # ONNX value name -> its (N, H, C) row sums, for an SE gate
        self.done: set[int] = set()  # ids of the nodes lowered (a lowering may fuse its readers)

    def run(self, graph: ir.Graph, x, index):
        # the NCHW batch and the index of this image in it; float() takes the image out, transposed,
        # for a kernel that reads NHWC
        self.input = (graph.inputs[0].name, x, index)
        self.split = _split_convs(graph, self.target)
        for node in graph:
            if id(node) in self.done:
                continue
            lowering = _LOWERINGS.get(("" if node.domain in DEFAULT_DOMAINS else node.domain, node.op_type))
            if lowering is None:
                raise BnnccError(f"node {node.name!r} ({node.op_type}): not supported by the lowering "
                                 f"(PokeBNN graphs only, bnncc/ops/spec.md)")
            lowering(self, node)
        output = graph.outputs[0].name
        if output not in self.floats:
            raise BnnccError(f"output {output!r}: not produced by a supported pattern")
        if len(self.floats[output].ty.shape) != 2:  # an NHWC feature map inside, NCHW in the graph
            raise BnnccError(f"output {output!r}: a feature map; a library gives the logits of the head "
                             f"(GlobalAveragePool -> Flatten -> QuantGemm)")
        return self.floats[output]

    def kernel(self, key: tuple, build):
        """The GlobalVar of a scheduled kernel; ``build()`` makes the PrimFunc the first time."""
        if key not in self.kernels:
            func = build()
            scheduled = self.schedule(func, self.target)
            if scheduled is None:
                raise BnnccError(f"target {self.target}: no schedule for kernel {func.attrs[KERNEL_ATTR]!r}")
            name = f"{key[0]}_{len(self.kernels)}"
            self.kernels[key] = self.bb.add_func(scheduled.with_attr("global_symbol", name), name)
        return self.kernels[key]

    def call(self, gvar, args: list, outputs: list[tuple[tuple, str]], in_place: list[int] | None = None):
        """Emit ``gvar(*args) -> outputs``; ``in_place[i] = j`` makes output i the argument j itself
        (-1: a new tensor), for a kernel whose parameter for output i comes right after its inputs."""
        types = [relax.TensorType(shape, dtype) for shape, dtype in outputs]
        out = types if len(types) > 1 else types[0]
        call = relax.call_tir_inplace(gvar, args, in_place, out) if in_place else relax.call_tir(gvar, args, out)
        result = self.bb.emit(call)
        if len(types) == 1:
            return result
        return [self.bb.emit(relax.TupleGetItem(result, i)) for i in range(len(types))]

    @staticmethod
    def shape(expr) -> tuple:
        """The shape of a tensor, its fixed dimensions as ints (the input batch's size is not)."""
        return tuple(int(d) if isinstance(d, tirx.IntImm) else d for d in expr.ty.shape)

    def float(self, value: ir.Value):
        """The NHWC float tensor of ``value``, lowered before (or the network input, transposed)."""
        if value.name not in self.floats:
            if value.name != self.input[0]:
                raise BnnccError(f"value {value.name!r}: read before a supported pattern produced it")
            _, batch, index = self.input
            image = self.bb.emit(relax.op.expand_dims(relax.op.take(batch, index, axis=0, mode="clip"), 0))
            self.floats[value.name] = self.bb.emit(relax.op.permute_dims(image, [0, 2, 3, 1]))
        return self.floats[value.name]

    def packed(self, value: ir.Value):
        """The packed sign bits of ``value``: made by the producing PokeConv, else a bitpack kernel."""
        if value.name not in self.bits:
            x = self.float(value)
            shape = self.shape(x)
            gvar = self.kernel((bitpack.KERNEL_NAME, shape), lambda: bitpack.sign_bitpack_func(*shape))
            out_shape = (*shape[:3], bitpack.words(shape[3]))
            self.bits[value.name] = self.call(gvar, [x], [(out_shape, bitpack.WORD_DTYPE)])
        return self.bits[value.name]

    def last_use(self, value: ir.Value, node: ir.Node) -> bool:
        """Whether ``node`` is the last reader of ``value``: every other reader is lowered already."""
        return not value.is_graph_output() and value.name != self.input[0] and all(
            use.node is node or id(use.node) in self.done for use in value.uses())


def _split_convs(graph: ir.Graph, target: Target) -> set[int]:
    """Ids of the PokeConv nodes whose kernels take their weights split into nibbles ahead: decided
    over the whole network, within a budget of library bytes (x86_64.split_convs), by position in
    the graph so that a build picks the same convs every time."""
    # (a node whose weights are no 4-D constant is left to _poke_conv, which names the problem)
    nodes = [node for node in graph if node.op_type == "PokeConv" and node.domain == DOMAIN
             and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None
             and len(node.inputs[1].const_value.shape) == 4]
    convs = {}
    for position, node in enumerate(nodes):
        cout, cin, kernel = node.inputs[1].const_value.shape[:3]
        convs[position] = (cin, cout, kernel)
    return {id(nodes[position]) for position in x86_64.split_convs(target, convs)}


# -- stem --------------------------------------------------------------------------------------------
@register_lowering("QuantConv")
def _quant_conv(walk: _Walk, node: ir.Node) -> None:
    """QuantConv [-> BN [-> DPReLU]]: one quant_conv2d with bias, BN and DPReLU fused."""
    weight = _const(node.inputs[1], node, (None, None, None, None))
    # the stem's first conv reads its image of the network's NCHW input batch as it is, at the
    # image's index (quant.quant_conv2d_func)
    layout = "NCHW" if node.inputs[0].name == walk.input[0] and weight.shape[1] > 1 else "NHWC"
    if layout == "NCHW":
        _, batch, index = walk.input
        inputs, shape = [batch, index], (1, *walk.shape(batch)[1:])
    else:
        x = walk.float(node.inputs[0])
        inputs, shape = [x], walk.shape(x)
    attrs = node.attributes
    if attrs.get_int("a_signed", 1) != 1:  # bnncc's stems quantize signed; the kernel has no other grid
        raise BnnccError(f"node {node.name!r} (QuantConv): unsigned activations are not supported")
    kh, kw = _kernel_shape(node, weight)
    stride = _strides(node)
    pads = tuple(attrs.get_ints("pads", (0, 0, 0, 0)))
    group = attrs.get_int("group", 1)
    if len(pads) != 4 or min(pads) < 0 or group < 1:
        raise BnnccError(f"node {node.name!r} (QuantConv): pads {list(pads)}, group {group}; expected four pads "
                         f">= 0 and a group >= 1")
    cin, cout = shape[1 if layout == "NCHW" else 3], weight.shape[0]
    if weight.shape[1] * group != cin:
        raise BnnccError(f"node {node.name!r} (QuantConv): weights of shape {list(weight.shape)} in {group} "
                         f"group(s) for a {cin}-channel input")
    bound, bias = _const(node.inputs[2], node, (cin,)), _const(node.inputs[3], node, (cout,))
    q, s = quant.quantize_weights(weight, _bits(node, "w_bits", 8))
    wq = (q.astype(np.float32) / s.reshape(-1, 1, 1, 1)).transpose(2, 3, 1, 0)
    a_bits = _bits(node, "a_bits", 8)
    scales = quant.act_scales(bound, a_bits, signed=True)
    a, b = np.ones(cout), bias.astype(np.float64)
    last = node
    bn = only_user(node.outputs[0], "BatchNormalization")
    dprelu_node = only_user(bn.outputs[0], "DPReLU", DOMAIN) if bn is not None else None
    if bn is not None:
        bn_a, bn_b = _bn_affine(bn, cout)
        a, b, last = bn_a, bn_a * b + bn_b, bn
    table = np.zeros((6, cout), np.float64)
    table[0], table[1] = a, b
    table[2:] = np.array([0, 0, 1, 1], np.float32)[:, None]  # DPReLU absent: identity
    if dprelu_node is not None:
        table[2:] = [_const(v, dprelu_node, (cout,)) for v in dprelu_node.inputs[1:5]]
        last = dprelu_node
    walk.done.update(id(n) for n in (node, bn, dprelu_node) if n is not None)
    h, w = shape[2:] if layout == "NCHW" else shape[1:3]
    ho = (h + pads[0] + pads[2] - kh) // stride[0] + 1
    wo = (w + pads[1] + pads[3] - kw) // stride[0] + 1
    if min(ho, wo) < 1:
        raise BnnccError(f"node {node.name!r} (QuantConv): its {kh}x{kw} window does not fit its {h}x{w} input")
    params = te.placeholder((6, cout), "float32", name="params")

    def epilogue(acc, idx):
        o = idx[3]
        t = params[0, o] * acc + params[1, o]
        return _dprelu(t, params[2, o], params[3, o], params[4, o], params[5, o])

    key = (quant.CONV_KERNEL_NAME, layout, shape, wq.shape, stride[0], pads, group, a_bits)
    gvar = walk.kernel(key, lambda: quant.quant_conv2d_func(
        shape, wq.shape, stride=stride[0], pads=pads, group=group, a_bits=a_bits,
        epilogue_inputs=(params,), epilogue=epilogue, product=walk.product, input_layout=layout))
    out = walk.call(gvar, [*inputs, relax.const(np.ascontiguousarray(wq)), relax.const(scales),
                           relax.const(_float32_table(node, table))],
                    [((walk.batch, ho, wo, cout), "float32")])
    walk.floats[last.outputs[0].name] = out
    _annotate([node, bn, dprelu_node], (walk.batch, cout, ho, wo))


# -- SE gate -----------------------------------------------------------------------------------------
def _se_gate_call(walk: _Walk, inputs: list[ir.Value], w_bits: int, a_bits: int, node: ir.Node):
    """The gate (N, Cout) float32 of an SE gate with ``inputs`` (R, W1, bound1, B1, W2, bound2, B2);
    it averages R's row sums where R's producer made them (``_poke_conv``)."""
    x = walk.float(inputs[0])
    rows = walk.row_sums.get(inputs[0].name)
    shape = walk.shape(x)
    w1, w2 = _const(inputs[1], node), _const(inputs[4], node)
    # (H, Cin) and (C, H), or as 1x1 conv weights (H, Cin, 1, 1) and (C, H, 1, 1)
    if (w1.ndim < 2 or w2.ndim < 2 or w1.shape[0] == 0 or int(np.prod(w1.shape[1:])) != shape[3]
            or int(np.prod(w2.shape[1:])) != w1.shape[0]):
        raise BnnccError(f"node {node.name!r} ({node.op_type}): SE weights of shapes {list(w1.shape)} and "
                         f"{list(w2.shape)}, expected (H, {shape[3]}) and (C, H)")
    hidden, cout = w1.shape[0], w2.shape[0]
    w1, w2 = w1.reshape(hidden, -1), w2.reshape(cout, -1)
    bound1, b1 = _const(inputs[2], node, (shape[3],)), _const(inputs[3], node, (hidden,))
    bound2, b2 = _const(inputs[5], node, (hidden,)), _const(inputs[6], node, (cout,))
    q1, s1 = quant.quantize_weights(w1, w_bits)
    q2, s2 = quant.quantize_weights(w2, w_bits)
    q1, q2 = quant.pack_dense(q1, w_bits), quant.pack_dense(q2, w_bits)
    key = (quant.SE_GATE_KERNEL_NAME, shape, hidden, cout, w_bits, a_bits, rows is not None)
    gvar = walk.kernel(key, lambda: quant.se_gate_func(shape, hidden, cout, w_bits, a_bits, walk.product,
                                                       from_row_sums=rows is not None))
    args = [x if rows is None else rows,
            relax.const(quant.act_scales(bound1, a_bits, signed=True)), relax.const(q1),
            relax.const(s1), relax.const(b1.astype(np.float32)),
            relax.const(quant.act_scales(bound2, a_bits, signed=False)), relax.const(q2),
            relax.const(s2), relax.const(b2.astype(np.float32))]
    return walk.call(gvar, args, [((walk.batch, cout), "float32")])


@register_lowering("SEGate")
def _se_gate(walk: _Walk, node: ir.Node) -> None:
    """SEGate(x) -> gate (N, Cout) float32."""
    gate = _se_gate_call(walk, list(node.inputs), _bits(node, "w_bits", 4), _bits(node, "a_bits", 4), node)
    walk.floats[node.outputs[0].name] = gate
    walk.done.add(id(node))
    _annotate([node], (walk.batch, int(gate.ty.shape[1]), 1, 1))


# -- PokeConv ----------------------------------------------------------------------------------------
@register_lowering("PokeConv")
def _poke_conv(walk: _Walk, node: ir.Node) -> None:
    """One fused kernel for the whole op (module docstring), after its SE gate's kernel if it has one."""
    required = (0, 1, *range(poke.BN.start, poke.DPRELU.stop), *range(poke.SPLIT.start, poke.SPLIT.stop))
    missing = [poke.INPUTS[i] for i in required if i >= len(node.inputs) or node.inputs[i] is None]
    if missing:
        raise BnnccError(f"node {node.name!r} (PokeConv): input(s) {', '.join(missing)} missing")
    x_value = node.inputs[0]
    x = walk.float(x_value)
    attrs = node.attributes
    se_inputs = poke.se_inputs(node)
    gated = se_inputs is not None
    gates = []  # the epilogue's gate input (N, Cout): none without an SE gate
    if gated:
        gates.append(_se_gate_call(walk, se_inputs, _bits(node, "se_w_bits", 4), _bits(node, "se_a_bits", 4), node))
    bits = walk.packed(x_value)
    weight = _const(node.inputs[1], node)
    channels = walk.shape(x)[3]
    if weight.ndim != 4 or weight.shape[1] != channels or weight.shape[2] != weight.shape[3]:
        raise BnnccError(f"node {node.name!r} (PokeConv): weights of shape {list(weight.shape)}, expected "
                         f"(Cout, {channels}, k, k) for its {channels}-channel input")
    kernel = _kernel_shape(node, weight)[0]
    stride = _strides(node)[0]
    clip_bound = attrs.get_float("clip_bound", DEFAULT_CLIP_BOUND)  # positive and finite (lower's check_graph)
    eps = attrs.get_float("epsilon", 1e-5)
    packed = bitpack.pack_weights(weight)
    n, h, w, cin = walk.shape(x)
    cout = weight.shape[0]
    ho, wo = out_size(h, stride), out_size(w, stride)
    # the conv's epilogue takes half the dot product (binary_conv2d's ``halved``) where it can; a
    # kernel counting nibbles sums the dot product itself (binary_conv2d's module docstring)
    lanes, nibbles, split = walk.weight_lanes(cout), walk.counts_nibbles(cout), id(node) in walk.split
    halved = bitpack.can_halve(cin, kernel) and not nibbles
    border = bitpack.halved_counts(packed.border, cin) if halved else packed.border

    table = np.zeros((6, cout), np.float64)
    a1, b1 = _affine(*(_const(v, node, (cout,)) for v in node.inputs[poke.BN]), eps)
    bias_x, bias_y, pos, neg = (_const(v, node, (cout,)).astype(np.float64) for v in node.inputs[poke.DPRELU])
    a2, table[_B2] = _affine(*(_const(v, node, (cout,)) for v in node.inputs[poke.SPLIT]), eps)
    table[_A1] = a1 * (clip_bound / 2) * packed.scale.astype(np.float64) * (2 if halved else 1)
    table[_B1] = b1 - bias_x
    table[_POS], table[_NEG], table[_BY] = a2 * pos, a2 * neg, a2 * bias_y

    block = poke.block_input(node)
    methods = (poke.LOCAL_METHOD,) if block is None else (poke.LOCAL_METHOD, poke.BLOCK_METHOD)
    residuals = [x] if block is None else [x, walk.float(block)]
    y_value = node.outputs[0]
    readers = [u.node for u in y_value.uses() if u.node.op_type in _READS_BITS and u.node.domain == DOMAIN and u.idx == 0]
    want_bits = bool(readers)
    # a gated PokeConv reading y as its input X averages it in its SE gate: y's row sums come with y
    want_rows = any(poke.se_inputs(r) is not None for r in readers)
    shapes = tuple(walk.shape(r) for r in residuals)
    # y may overwrite a block residual of its own shape (read at y's position only) whose last
    # reader this is: the kernel then writes into memory it has just read, where a new buffer
    # would first be fetched from memory only to be overwritten
    in_place = block is not None and shapes[-1] == (n, ho, wo, cout) and walk.last_use(block, node)
    key = (POKE_CONV_KERNEL, (n, h, w, cin), cout, kernel, stride, shapes, methods, gated, want_bits, want_rows,
           in_place, nibbles, lanes, split, halved)
    gvar = walk.kernel(key, lambda: _poke_conv_func((n, h, w, cin), cout, kernel, stride, shapes, methods, gated,
                                                    want_bits, want_rows, in_place, nibbles, lanes, split, halved))
    weight_bits = packed.bits if lanes is None else bitpack.blocked_weights(packed.bits, lanes, split)
    args = [bits, relax.const(weight_bits), relax.const(border), *residuals, *gates,
            relax.const(_float32_table(node, table))]
    outputs = [((n, ho, wo, cout), "float32")]
    if want_bits:
        outputs.append(((n, ho, wo, bitpack.words(cout)), bitpack.WORD_DTYPE))
    if want_rows:
        outputs.append(((n, ho, cout), "float32"))
    if in_place:
        # the kernel's y parameter (after its inputs) is bound to the block residual itself
        result = walk.call(gvar, [*args, residuals[-1]], outputs, in_place=[len(args)] + [-1] * (len(outputs) - 1))
    else:
        result = walk.call(gvar, args, outputs)
    result = result if len(outputs) > 1 else [result]
    walk.floats[y_value.name] = result[0]
    if want_bits:
        walk.bits[y_value.name] = result[1]
    if want_rows:
        walk.row_sums[y_value.name] = result[-1]
    walk.done.add(id(node))
    _annotate([node], (n, cout, ho, wo))


# -- head --------------------------------------------------------------------------------------------
@register_lowering("GlobalAveragePool", domain="")
def _head(walk: _Walk, node: ir.Node) -> None:
    """GlobalAveragePool -> Flatten -> QuantGemm as one kernel."""
    flatten = only_user(node.outputs[0], "Flatten")
    gemm = only_user(flatten.outputs[0], "QuantGemm", DOMAIN) if flatten is not None else None
    if gemm is None:
        raise BnnccError(f"node {node.name!r} (GlobalAveragePool): expected Flatten -> QuantGemm after it")
    x = walk.float(node.inputs[0])
    channels = walk.shape(x)[3]
    weight = _const(gemm.inputs[1], gemm, (None, channels))
    bound, bias = _const(gemm.inputs[2], gemm, (channels,)), _const(gemm.inputs[3], gemm, (weight.shape[0],))
    attrs = gemm.attributes
    if attrs.get_int("a_signed", 1) != 1:
        raise BnnccError(f"node {gemm.name!r} (QuantGemm): unsigned activations are not supported")
    a_bits = _bits(gemm, "a_bits", 8)
    q, s = quant.quantize_weights(weight, _bits(gemm, "w_bits", 8))
    shape = walk.shape(x)
    classes = q.shape[0]
    gvar = walk.kernel((quant.HEAD_KERNEL_NAME, shape, classes, a_bits),
                       lambda: quant.head_func(shape, classes, a_bits, walk.product))
    args = [x, relax.const(quant.act_scales(bound, a_bits, signed=True)), relax.const(quant.tile_columns(q.T)),
            relax.const(s), relax.const(bias.astype(np.float32))]
    walk.floats[gemm.outputs[0].name] = walk.call(gvar, args, [((walk.batch, classes), "float32")])
    walk.done.update(id(n) for n in (node, flatten, gemm))
    _annotate([node], (walk.batch, shape[3], 1, 1))
    _annotate([flatten], (walk.batch, shape[3]))
    _annotate([gemm], (walk.batch, classes))


def _poke_conv_func(x_shape: tuple[int, int, int, int], cout: int, kernel: int, stride: int,
                    residual_shapes: tuple, methods: tuple[str, ...], gated: bool, want_bits: bool,
                    want_rows: bool, in_place: bool = False, nibbles: bool = False, lanes: int | None = None,
                    split: bool = False, halved: bool = False) -> tirx.PrimFunc:
    """``f(bits, weights, border, x, [r,] [gate,] params, y[, y_bits][, y_row_sums])``: the fused
    PokeConv kernel.

    params rows: a1, b1, pos, neg, by, b2 (module docstring). ``gated``: the op's SE gate
    multiplies the DPReLU (a kernel without it takes no gate).
    ``in_place``: y will be r's memory (``_poke_conv``), so the parameters may alias and the
    compiler is not told otherwise. ``nibbles``: binary_conv2d's; ``lanes``, ``split``: its weights'
    layout (binary_conv.weight_shape, bitpack.blocked_weights). ``halved``: binary_conv2d's, the
    caller passing ``bitpack.halved_counts`` as border and 2 * a1 as a1 (the same products).
    """
    n, h, w, cin = x_shape
    words = bitpack.words(cin)
    bits = te.placeholder((n, h, w, words), bitpack.WORD_DTYPE, name="bits")
    weights = te.placeholder(binary_conv.weight_shape(kernel, cin, cout, lanes, split), bitpack.WORD_DTYPE,
                             name="weights")
    border = te.placeholder((kernel * kernel, kernel * kernel, cout), bitpack.BORDER_DTYPE, name="border")
    residuals = [te.placeholder(shape, "float32", name=f"residual{i}") for i, shape in enumerate(residual_shapes)]
    gate = te.placeholder((n, cout), "float32", name="gate") if gated else None
    params = te.placeholder((6, cout), "float32", name=binary_conv.PARAMS)
    ho, wo = out_size(h, stride), out_size(w, stride)

    # ReshapeAdd: a residual with more channels than the output is matched by its channel mean, one
    # of a larger size by the 3x3/2 average pool; the zero-pad or tile of fewer channels follows
    matched = []
    for r in residuals:
        r = channel_mean(r, cout) if int(r.shape[3]) > cout else r
        matched.append(average_pool(r) if (int(r.shape[1]), int(r.shape[2])) != (ho, wo) else r)

    if gated:
        # the gate folded into the slopes and shifts per image and channel (a stage of its own, which
        # the CPU schedule computes in each task for the task's channels):
        # ((pos * s or neg * s) - by) * g + b2 = (pos g) * s or (neg g) * s, + (b2 - by g)
        folded = te.compute((n, 3, cout), lambda i, row, c: tirx.Select(
            row < 2, params[_POS + row, c] * gate[i, c], params[_B2, c] - params[_BY, c] * gate[i, c]),
            name=binary_conv.GATED_PARAMS)

    def fn(acc, idx):
        i, c = idx[0], idx[3]
        s = params[_A1, c] * acc.astype("float32") + params[_B1, c]
        for r, method in zip(matched, methods):
            s = _plus_match(s, r, idx, cout, method)
        # a Select of the slopes, times s, as in _dprelu
        zero = tirx.const(0, "float32")
        if gated:
            return tirx.Select(s >= zero, folded[i, 0, c], folded[i, 1, c]) * s + folded[i, 2, c]
        return tirx.Select(s >= zero, params[_POS, c], params[_NEG, c]) * s - params[_BY, c] + params[_B2, c]

    epilogue = Epilogue(inputs=(*residuals, *([gate] if gated else []), params), fn=fn)
    y = binary_conv2d(bits, weights, border, in_channels=cin, stride=stride, epilogue=epilogue, nibbles=nibbles,
                      halved=halved)
    outputs = [y, *([bitpack.sign_bitpack(y)] if want_bits else []), *([row_sums(y)] if want_rows else [])]
    func = te.create_prim_func([bits, weights, border, *epilogue.inputs, *outputs])
    if in_place:
        func = func.with_attr("tirx.noalias", False)
    return func.with_attr(KERNEL_ATTR, binary_conv.KERNEL_NAME)
