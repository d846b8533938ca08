"""The torch view of an ONNX graph: a trainable ``nn.Module`` that runs the graph node by node.

``to_torch(model)`` turns a float or PokeBNN ONNX model into a :class:`GraphModule`; ``write_back``
copies what training changed back into the model's initializers. Between the two, the module is a
plain ``nn.Module``: an optimizer trains its parameters, ``train()``/``eval()`` switch the batch
norms, and ``state_dict`` saves it.

Mapping of initializers:

- float initializers become ``nn.Parameter`` (conv and gemm weights and biases, BN gamma/beta,
  DPReLU vectors, SE weights and biases), except
- the state inputs (``bnncc.cost.inputs_at``): BN running mean/var (inputs 3 and 4 of
  BatchNormalization) and each ai.bnncc op's OpDef ``state_inputs`` (the calibrated activation
  bounds of QuantConv, QuantGemm and SEGate, PokeConv's batch-norm statistics and SE gate bounds),
  and every non-float initializer, which become buffers.

Attribute names are the initializer names with every character outside ``[0-9A-Za-z_]`` replaced by
``_`` (suffixed ``_1``, ``_2``, ... on a clash); ``GraphModule.initializer_names`` maps them back.

Semantics of the standard ops follow the ONNX operator spec; BatchNormalization is
``F.batch_norm``: in train mode it normalises with the batch statistics and updates the running
statistics as ``running = (1 - m) * running + m * batch`` with ``m = 1 - onnx_momentum`` (0.1 for
the ONNX default 0.9), the running variance taking the unbiased batch variance as torch's BN does.
Ops of the ``ai.bnncc`` domain run their OpDef's torch face, ``op.torch(*inputs, **attributes)``
(``bnncc/ops/registry.py``), plus ``training`` and ``quantize_weights`` where its signature takes them;
the OpDef also says which inputs are state and which activation bounds calibration sets.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

import networkx as nx
import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from bnncc.cost import inputs_at
from bnncc.domain import DEFAULT_DOMAINS
from bnncc.errors import BnnccError
from bnncc.frontend import require_ir_model
from bnncc.ops import op_def
from bnncc.ops.batch_norm import batch_norm

__all__ = ["GraphModule", "to_torch", "write_back"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


# ---------------------------------------------------------------------------------------------
# Standard ops. Each planner reads a node's attributes once and returns the torch function and
# the keyword arguments it is called with at every step.


def _is_standard(node: ir.Node) -> bool:
    return node.domain in DEFAULT_DOMAINS


def _attributes(node: ir.Node) -> dict[str, Any]:
    """The node's attributes as plain Python values (ints, floats, strings and lists of them)."""
    out: dict[str, Any] = {}
    for name, attr in node.attributes.items():
        value = attr.value
        if attr.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
            value = list(value)
        elif attr.type not in (ir.AttributeType.INT, ir.AttributeType.FLOAT, ir.AttributeType.STRING):
            raise BnnccError(f"node {node.name!r} ({node.op_type}): attribute {name!r} of type "
                             f"{attr.type.name} is not supported by the torch view")
        out[name] = value
    return out


def _spatial_padding(node: ir.Node, attrs: dict[str, Any], spatial: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Split ONNX ``pads`` into a symmetric torch ``padding`` and, if asymmetric, an ``F.pad`` tuple.

    ONNX orders pads (begin_1, ..., begin_k, end_1, ..., end_k); ``F.pad`` wants
    (begin_k, end_k, ..., begin_1, end_1).
    """
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise BnnccError(f"node {node.name!r} ({node.op_type}): auto_pad={auto_pad} is not supported; "
                         "export with explicit pads")
    pads = attrs.get("pads", [0] * (2 * spatial)) if auto_pad == "NOTSET" else [0] * (2 * spatial)
    begin, end = pads[:spatial], pads[spatial:]
    if begin == end:
        return tuple(begin), None
    explicit = tuple(p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e))
    return (0,) * spatial, explicit


def _conv(x, w, b=None, *, stride, padding, dilation, groups, explicit_pad):
    """ONNX Conv (2-D): y = conv(pad(x), w) + b."""
    if explicit_pad is not None:
        x = F.pad(x, explicit_pad)
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def _plan_conv(node, attrs):
    padding, explicit = _spatial_padding(node, attrs, 2)
    return _conv, dict(stride=tuple(attrs.get("strides", [1, 1])), padding=padding,
                       dilation=tuple(attrs.get("dilations", [1, 1])), groups=attrs.get("group", 1),
                       explicit_pad=explicit)


def _max_pool(x, *, kernel_size, stride, padding, dilation, ceil_mode, explicit_pad):
    """ONNX MaxPool (2-D); asymmetric padding pads with -inf so padded cells never win."""
    if explicit_pad is not None:
        x = F.pad(x, explicit_pad, value=-math.inf)
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


def _plan_max_pool(node, attrs):
    padding, explicit = _spatial_padding(node, attrs, 2)
    return _max_pool, dict(kernel_size=tuple(attrs["kernel_shape"]),
                           stride=tuple(attrs.get("strides", [1, 1])), padding=padding,
                           dilation=tuple(attrs.get("dilations", [1, 1])),
                           ceil_mode=bool(attrs.get("ceil_mode", 0)), explicit_pad=explicit)


def _identity(x):
    """ONNX Identity."""
    return x


def _global_average_pool(x):
    """ONNX GlobalAveragePool (2-D): mean over H and W, keeping them as size 1."""
    return F.adaptive_avg_pool2d(x, 1)


def _flatten(x, *, axis):
    """ONNX Flatten: (d_0 ... d_{axis-1}) x (d_axis ... d_n) as a matrix."""
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _gemm(a, b, c=None, *, alpha, beta, trans_a, trans_b):
    """ONNX Gemm: y = alpha * A' B' + beta * C, with A' = A^T if transA, B' = B^T if transB."""
    a = a.t() if trans_a else a
    b = b.t() if trans_b else b
    if c is None:
        return alpha * (a @ b)
    return torch.addmm(c, a, b, beta=beta, alpha=alpha)


def _plan_gemm(node, attrs):
    return _gemm, dict(alpha=attrs.get("alpha", 1.0), beta=attrs.get("beta", 1.0),
                       trans_a=bool(attrs.get("transA", 0)), trans_b=bool(attrs.get("transB", 0)))


def _plan_batch_norm(node, attrs):
    return batch_norm, dict(momentum=1.0 - attrs.get("momentum", 0.9), eps=attrs.get("epsilon", 1e-5))


def _no_attributes(fn):
    def plan(node, attrs):
        if attrs:
            raise BnnccError(f"node {node.name!r} ({node.op_type}): unexpected attributes {sorted(attrs)}")
        return fn, {}
    return plan


_STANDARD_OPS: dict[str, Callable[[ir.Node, dict[str, Any]], tuple[Callable, dict[str, Any]]]] = {
    "Conv": _plan_conv,
    "Identity": _no_attributes(_identity),
    "Relu": _no_attributes(F.relu),
    "MaxPool": _plan_max_pool,
    "Add": _no_attributes(torch.add),
    "Mul": _no_attributes(torch.mul),
    "GlobalAveragePool": _no_attributes(_global_average_pool),
    "Flatten": lambda node, attrs: (_flatten, dict(axis=attrs.get("axis", 1))),
    "Gemm": _plan_gemm,
    "BatchNormalization": _plan_batch_norm,
}


# ---------------------------------------------------------------------------------------------
# The execution plan: a flat list of steps over numbered value slots.


class _Step(NamedTuple):
    fn: Callable[..., torch.Tensor]
    inputs: tuple[int, ...]  # value slots; slot 0 always holds None (an omitted optional input)
    output: int
    attrs: dict[str, Any]
    wants_training: bool  # BatchNormalization, PokeConv: pass the module's train/eval mode
    free: tuple[int, ...]  # slots whose last reader is this step; dropped after it to save memory
    probes: tuple["_Probe", ...]  # activation-bound observers (calibration only)
    label: str  # "node 'name' (OpType)", for messages
    weight_quantized: bool  # an ai.bnncc op with weights: follows set_weight_quantization


class _Probe(NamedTuple):
    bound: str  # attribute name of the bound buffer
    observe: Callable[[list[torch.Tensor], dict[str, Any]], torch.Tensor]  # inputs, attrs -> max|x|


def _bound_inputs(node: ir.Node) -> tuple[tuple[int, Callable], ...]:
    """The activation bounds of the node's op, but those at optional inputs the node omits."""
    op = op_def(node)
    if op is None:
        return ()
    return tuple((i, observe) for i, observe in op.bounds
                 if i not in op.optional_inputs or (i < len(node.inputs) and node.inputs[i] is not None))


def _probes(node: ir.Node, names: dict[str, str]) -> tuple[_Probe, ...]:
    """Observers for the activation bounds a quantized op reads (pokebnn.md §4)."""
    probes = []
    for i, observe in _bound_inputs(node):
        value = node.inputs[i] if i < len(node.inputs) else None
        if value is None or value.name not in names:
            raise BnnccError(f"node {node.name!r} ({node.op_type}): input {i} (activation bound) "
                             "must be an initializer")
        probes.append(_Probe(names[value.name], observe))
    return tuple(probes)


def _sanitize(name: str, taken: set[str], reserved: Callable[[str], bool]) -> str:
    """A torch attribute name for an initializer: [0-9A-Za-z_] only, unique, not a module attribute."""
    base = re.sub(r"[^0-9A-Za-z_]", "_", name) or "t"
    if base[0].isdigit():
        base = "t_" + base
    candidate, k = base, 0
    while candidate in taken or reserved(candidate):
        k += 1
        candidate = f"{base}_{k}"
    taken.add(candidate)
    return candidate


def _sorted_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The graph's nodes in a topological order that keeps the stored order where it can."""
    nodes = list(graph)
    index = {node: i for i, node in enumerate(nodes)}
    deps = nx.DiGraph()
    deps.add_nodes_from(range(len(nodes)))
    for node in nodes:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None:
                deps.add_edge(index[producer], index[node])
    try:
        order = nx.lexicographical_topological_sort(deps)
        return [nodes[i] for i in order]
    except nx.NetworkXUnfeasible:
        raise BnnccError(f"graph {graph.name!r}: the graph has a cycle") from None


@dataclass
class _Calibration:
    """Running "mean of max" per channel: m <- m + alpha (x - m), started at the first observation."""

    alpha: float
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # see GraphModule.calibrate_bounds
    ema: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: dict[str, torch.Tensor] = field(default_factory=dict)

    def observe(self, bound: str, batch_max: torch.Tensor) -> None:
        if self.reduce is not None:
            batch_max = self.reduce(batch_max)
        # A channel that is all zeros in this batch carries no information (zeros excluded).
        valid = batch_max > 0
        if bound not in self.ema:
            self.ema[bound] = torch.zeros_like(batch_max)
            self.seen[bound] = torch.zeros_like(valid)
        ema, seen = self.ema[bound], self.seen[bound]
        updated = torch.where(seen, ema + self.alpha * (batch_max - ema), batch_max)
        self.ema[bound] = torch.where(valid, updated, ema)
        self.seen[bound] = seen | valid


# ---------------------------------------------------------------------------------------------


class GraphModule(nn.Module):
    """An ONNX graph executed with torch ops, node by node, in topological order.

    ``forward(*inputs)`` takes the graph's (non-initializer) inputs in order and returns its output,
    or a tuple when the graph has several. The batch dimension is free; the others are the graph's
    (another shape is a BnnccError, as onnxruntime refuses it).
    """

    def __init__(self, model: ir.Model):
        super().__init__()
        graph = model.graph
        nodes = _sorted_nodes(graph)
        used = {v.name for node in nodes for v in node.inputs if v is not None}
        used |= {v.name for v in graph.outputs}
        # state that gradient descent does not train: BN running mean/var, calibrated activation bounds
        buffer_inputs = {value.name for value in inputs_at(graph, "state_inputs")}
        # ONNX initializer name -> torch attribute name; the inverse is public.
        names: dict[str, str] = {}
        taken: set[str] = set()
        for name, value in graph.initializers.items():
            if name not in used:
                continue
            if value.const_value is None:
                raise BnnccError(f"graph {graph.name!r}: initializer {name!r} has no data")
            attr = _sanitize(name, taken, lambda n: hasattr(self, n))
            tensor = torch.from_numpy(np.array(value.const_value.numpy(), copy=True))
            if value.const_value.dtype in _FLOAT_TYPES and name not in buffer_inputs:
                self.register_parameter(attr, nn.Parameter(tensor))
            else:
                self.register_buffer(attr, tensor)
            names[name] = attr
        self.initializer_names: dict[str, str] = {attr: name for name, attr in names.items()}

        self.input_names = [v.name for v in graph.inputs if v.name not in graph.initializers]
        # each input's dims, None where free: the batch, even where the graph fixes it (a PokeBNN file that
        # exported batch 1 fine-tunes in batches), and any dim the graph gives no number; None for no shape
        self._input_shapes = [None if v.shape is None else
                              tuple(None if i == 0 or not isinstance(d, int) else d for i, d in enumerate(v.shape))
                              for v in graph.inputs if v.name not in graph.initializers]
        self.output_names = [v.name for v in graph.outputs]
        # Slot 0 is None (omitted optional inputs); graph inputs and state come next.
        slot = {"": 0}
        for name in self.input_names + list(names):
            slot[name] = len(slot)
        self._input_slots = tuple(slot[n] for n in self.input_names)
        self._state = tuple((slot[n], names[n]) for n in names)
        plan = self._build_plan(nodes, slot, names)
        self._output_slots = tuple(slot[n] for n in self.output_names)
        self._plan = self._with_frees(plan)
        self._num_slots = len(slot)

    def _build_plan(self, nodes: list[ir.Node], slot: dict[str, int], names: dict[str, str]) -> list[_Step]:
        plan = []
        for node in nodes:
            attrs = _attributes(node)
            fn, kwargs = self._lower(node, attrs)
            outputs = [v for v in node.outputs if v.name]
            if len(outputs) != 1:
                raise BnnccError(f"node {node.name!r} ({node.op_type}): {len(outputs)} outputs; "
                                 "the torch view runs single-output nodes only")
            inputs = []
            for value in node.inputs:
                if value is not None and value.name not in slot:
                    raise BnnccError(f"node {node.name!r} ({node.op_type}): input {value.name!r} "
                                     "is produced by no node, input or initializer")
                inputs.append(0 if value is None else slot[value.name])
            slot[outputs[0].name] = len(slot)
            op = op_def(node)
            # an ai.bnncc op's torch signature says whether it takes the train/eval mode
            wants_training = (_is_standard(node) and node.op_type == "BatchNormalization") or (
                op is not None and "training" in inspect.signature(fn).parameters)
            plan.append(_Step(fn, tuple(inputs), slot[outputs[0].name], kwargs, wants_training,
                              (), _probes(node, names), f"node {node.name!r} ({node.op_type})",
                              op is not None and bool(op.weight_inputs)))
        return plan

    @staticmethod
    def _lower(node: ir.Node, attrs: dict[str, Any]) -> tuple[Callable, dict[str, Any]]:
        """The torch function and keyword arguments for one node."""
        if _is_standard(node) and node.op_type in _STANDARD_OPS:
            return _STANDARD_OPS[node.op_type](node, attrs)
        op = op_def(node)
        if op is not None and op.torch is not None:
            return op.torch, attrs
        raise BnnccError(f"node {node.name!r} ({node.domain or 'ai.onnx'}::{node.op_type}): "
                         "op not supported by the torch view")

    def _with_frees(self, plan: list[_Step]) -> list[_Step]:
        """Mark, on each step, the values nobody reads after it (the slot list is per call)."""
        last_read: dict[int, int] = {}
        for i, step in enumerate(plan):
            for s in step.inputs:
                last_read[s] = i
        keep = set(self._output_slots) | {0}
        frees: list[list[int]] = [[] for _ in plan]
        for s, i in last_read.items():
            if s not in keep:
                frees[i].append(s)
        return [step._replace(free=tuple(f)) for step, f in zip(plan, frees)]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self._run(inputs, None)

    def _run(self, inputs, calibration: _Calibration | None):
        if len(inputs) != len(self._input_slots):
            raise BnnccError(f"the graph takes {len(self._input_slots)} input(s) {self.input_names}, "
                             f"got {len(inputs)}")
        self._check_inputs(inputs)
        env: list[Any] = [None] * self._num_slots
        for s, x in zip(self._input_slots, inputs):
            env[s] = x
        # Fetched per call (not cached) so .to(), load_state_dict and functional_call all work.
        tensors = {**self._parameters, **self._buffers}
        for s, attr in self._state:
            env[s] = tensors[attr]
        training = self.training
        for step in self._plan:
            args = [env[s] for s in step.inputs]
            if calibration is not None:
                for probe in step.probes:
                    calibration.observe(probe.bound, probe.observe(args, step.attrs))
            if step.wants_training:
                env[step.output] = step.fn(*args, training=training, **step.attrs)
            else:
                env[step.output] = step.fn(*args, **step.attrs)
            for s in step.free:
                env[s] = None
        outputs = tuple(env[s] for s in self._output_slots)
        return outputs[0] if len(outputs) == 1 else outputs

    def _check_inputs(self, inputs) -> None:
        """Each input a tensor of its graph input's shape: a PokeBNN stem's quantizer broadcast a one-channel
        (N, 1, H, W) batch to the three channels it takes and gave logits without a word, where onnxruntime
        and the library refuse it; a numpy array failed inside, naming an attribute 'is_cpu'."""
        for name, shape, x in zip(self.input_names, self._input_shapes, inputs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"input {name!r}: expected a torch.Tensor, got {type(x).__name__}")
            if shape is not None and (x.dim() != len(shape) or
                                      any(d is not None and d != n for d, n in zip(shape, x.shape))):
                expected = ", ".join("N" if d is None else str(d) for d in shape)
                raise BnnccError(f"input {name!r} of shape {tuple(x.shape)}; the graph takes ({expected})")
            # the fused kernels divided by the batch (ZeroDivisionError), the compositions reshaped to (0, -1)
            if x.numel() == 0:
                raise BnnccError(f"input {name!r} of shape {tuple(x.shape)} holds no values; "
                                 f"the torch view runs a batch of one or more")

    # -- two-phase schedule ----------------------------------------------------------------------

    def set_weight_quantization(self, enabled: bool) -> None:
        """Quantize weights (``True``, the ONNX semantics) or run the quantized ops on float weights.

        PokeBNN's first phase (pokebnn.md §4) trains with binary activations and float weights in
        every layer: with ``enabled=False`` every ai.bnncc op with weights (PokeConv, BinaryConv,
        QuantConv, QuantGemm, SEGate; its torch face takes a ``quantize_weights`` switch) is called
        with ``quantize_weights=False`` and uses W as it is, activations still quantized. The ONNX
        graph always quantizes, so export (``write_back``) is meant for the second phase.
        """
        for i, step in enumerate(self._plan):
            if not step.weight_quantized:
                continue
            if not enabled and "quantize_weights" not in inspect.signature(step.fn).parameters:
                raise BnnccError(f"{step.label}: the torch op has no quantize_weights switch "
                                 "(bnncc.ops contract)")
            attrs = {k: v for k, v in step.attrs.items() if k != "quantize_weights"}
            if not enabled:
                attrs["quantize_weights"] = False
            self._plan[i] = step._replace(attrs=attrs)

    # -- activation bounds ----------------------------------------------------------------------

    @property
    def bound_names(self) -> list[str]:
        """Attribute names of the activation-bound buffers (act_bound, bound1, bound2)."""
        return sorted({p.bound for step in self._plan for p in step.probes})

    @torch.no_grad()
    def calibrate_bounds(self, batches: Iterable[torch.Tensor | tuple[torch.Tensor, ...]],
                         alpha: float = 0.1, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Set every activation bound to the per-input-channel "mean of max" of its input.

        With m_t the max |x| of channel c over batch t (all axes but the channel axis),
        bound_c <- bound_c + alpha * (m_t - bound_c), started at the first m_t (pokebnn.md §4).
        A batch where channel c is all zeros does not update it (zeros excluded). The model runs
        in eval mode with all bounds set to -1 first, so every observed activation is float, as in
        the reference schedule where bounds are computed once from float activations and then
        frozen (they are buffers: no gradient changes them). A channel never seen nonzero keeps
        bound -1 (left float) and is logged. ``reduce`` is applied to each m_t before it is used: under
        torchrun, where each process runs its part of the batch, their maximum over the processes.
        """
        bounds = self.bound_names
        tensors = dict(self.named_buffers())
        for name in bounds:
            tensors[name].fill_(-1.0)
        calibration = _Calibration(alpha, reduce)
        was_training = self.training
        self.eval()
        try:
            for batch in batches:
                self._run(batch if isinstance(batch, tuple) else (batch,), calibration)
        finally:
            self.train(was_training)
        unseen: dict[str, int] = {}
        for name in bounds:
            if name not in calibration.ema:
                raise BnnccError(f"calibration: bound {self.initializer_names[name]!r} was never observed "
                                 "(no batches?)")
            seen = calibration.seen[name]
            tensors[name].copy_(torch.where(seen, calibration.ema[name], -1.0))
            if not bool(seen.all()):
                unseen[self.initializer_names[name]] = int((~seen).sum())
                logger.debug("calibration: bound %r: %d channel(s) were always zero",
                             self.initializer_names[name], unseen[self.initializer_names[name]])
        if unseen:  # typically dead ReLU channels in SE gates; one line, not one per bound
            logger.warning("calibration: %d channel(s) in %d of %d bounds were always zero and stay float "
                           "(first: %r)", sum(unseen.values()), len(unseen), len(bounds), next(iter(unseen)))


def to_torch(model: ir.Model) -> GraphModule:
    """The trainable torch view of ``model`` (float or PokeBNN); ``model`` is not modified."""
    require_ir_model(model)
    return GraphModule(model)


@torch.no_grad()
def write_back(module: GraphModule, model: ir.Model) -> ir.Model:
    """Copy the module's parameters and buffers into ``model``'s initializers; return ``model``.

    Updates ``model`` in place (trained weights, BN running statistics, calibrated bounds). Each
    initializer keeps its name, shape and dtype; a mismatch means ``module`` was not made from
    this model and raises :class:`BnnccError`, before any initializer is written. ``module`` may
    be ``torch.compile``'s wrapper of the GraphModule.
    """
    require_ir_model(model)  # a path or onnx.load's ModelProto failed naming an attribute: 'initializers'
    initializers = model.graph.initializers
    arrays = {}
    for attr, name in module.initializer_names.items():
        value = initializers.get(name)
        if value is None or value.const_value is None:
            raise BnnccError(f"write_back: the model has no initializer {name!r}")
        old = value.const_value
        # read as attributes, not from named_parameters(): torch.compile's wrapper prefixes those
        # names with "_orig_mod." (a KeyError here) and passes attributes on to the module it wraps
        array = np.array(getattr(module, attr).detach().cpu().numpy(), dtype=old.dtype.numpy(), copy=True)
        if tuple(array.shape) != tuple(old.shape.numpy()):
            raise BnnccError(f"write_back: initializer {name!r} has shape {tuple(old.shape.numpy())}, "
                             f"the module's {attr!r} has {tuple(array.shape)}")
        arrays[name] = array
    # written only once every initializer matched: a refused model is left as it was, not half overwritten
    for name, array in arrays.items():
        initializers[name].const_value = ir.tensor(array, name=name)
    return model
