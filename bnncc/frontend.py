"""The ONNX front end: ``load`` reads and canonicalizes a float ResNet, ``recognize`` finds its parts.

Canonical form (every later stage relies on it; ``load`` guarantees it or raises BnnccError):

- default-domain opset 18, no other domain in use; IR version 8 or later (what onnx pairs with
  opset 18), so initializers need not be graph inputs;
- nodes are only Conv, Relu, MaxPool, Add, GlobalAveragePool, Flatten and Gemm:
  BatchNormalization is folded into the Conv before it, and every Conv has a bias initializer;
  Gemm has transB=1, W of shape (out, in) and a bias of shape (out,), no alpha/beta/transA;
- every weight is an initializer (constant computations are folded, Constants lifted) and no
  initializer is listed as a graph input; there is no Identity;
- every node has a unique name; every value has an inferred type and shape;
- exactly one graph input, float32 NCHW with fixed C, H and W and a symbolic batch ``N`` (an
  exported fixed batch is made symbolic), and exactly one output, the logits (an output Softmax
  or LogSoftmax is dropped).

Import variations normalised by the passes of :data:`CANONICAL_PASSES` (see ``passes/``):
Conv+BatchNormalization (opsets 7..28, incl. opset 9's ``spatial``), BN as per-channel Mul and Add
after the Conv, or BN already folded;
``Add`` or ``Sum``; ``GlobalAveragePool``, ``ReduceMean`` over H, W (axes as attribute or input)
or a whole-plane ``AveragePool``; ``Flatten``, a flattening ``Reshape`` (constant target or a
Shape/Gather/Unsqueeze/Concat chain, or a chain of reshapes and in-order Gathers, as dynamo writes
for a channels_last model) or ``Squeeze``; ``Gemm`` or ``MatMul`` + ``Add``;
``Identity``; ``Dropout`` out of training; ``Clip`` of min 0 and no max as ``Relu``; weights from ``Constant``
nodes, cast from float16, bfloat16 or double, or computed from constants
(``ConstantOfShape``, torch dynamo's unoptimized ``Shape``/``Expand``/``CastLike`` biases); opsets 9..28,
and 1..8 through onnx's version converter; fixed or symbolic batch; tf2onnx's Keras forms: zero ``Pad`` before a Conv or
MaxPool, an NHWC input transposed to NCHW, an NHWC mean before the classifier.

External data is read only from inside the model's folder.

Acceptance is decided here once: ``load`` reads, canonicalizes and recognises, and what it
refuses every command refuses with its line (``read`` puts a float graph through the same steps;
``recognize``, which ``rewrite`` calls first, refuses a model not in canonical form).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import google.protobuf.message
import networkx as nx
import numpy as np
import onnx
import onnx.external_data_helper
import onnx.inliner
import onnx.numpy_helper
import onnx.version_converter
import onnx_ir as ir

from bnncc.domain import (
    CANONICAL_OPSET, DEFAULT_DOMAINS, DOMAIN, IMPORT_NOTES_KEY, MAX_INPUT_PIXELS, SUPPORTED_OPSETS, UPGRADED_OPSETS,
    VERSION)
from bnncc.errors import BnnccError, first_line
from bnncc.fileio import require_file
from bnncc.ops import attach_functions, check_graph
from bnncc.ops.binary_conv import same_pads
# The pass modules of CANONICAL_PASSES, imported so that their passes are registered.
from bnncc.passes import (  # noqa: F401
    add_conv_bias,
    clip_to_relu,
    collapse_reshapes,
    eliminate_dropout,
    fold_batchnorm,
    fold_channel_affine,
    fold_constants,
    fold_pad,
    global_pool,
    matmul_add_to_gemm,
    nchw_input,
    normalize_gemm,
    onnx_ir_common,
    reshape_to_flatten,
    squeeze_to_flatten,
    strip_softmax,
    sum_to_add,
    symbolic_batch,
)
from bnncc.passes._util import const_array, int_attr, ints_attr, static_dims
from bnncc.passes.poke_stem import stem_window
from bnncc.passes.set_opset import STABLE_OPS
from bnncc.passmanager import PassManager
from bnncc.resnet import BasicBlock, Block, Bottleneck, Head, ResNet, Stem

__all__ = ["CANONICAL_PASSES", "input_files", "load", "read", "read_pokebnn", "recognize", "reference_session",
           "source_name", "stored_bytes"]

logger = logging.getLogger(__name__)


# Order matters: constants first (BN folding and the shape readers need them), then op rewrites,
# then the clean-up; set_opset only fires once nothing version-dependent is left.
CANONICAL_PASSES = (
    "remove_initializer_inputs",
    "fold_constants",
    "lift_constants",
    "eliminate_dropout",
    "eliminate_identity",
    "clip_to_relu",
    "nchw_input",
    "fold_pad",
    "fold_batchnorm",
    "add_conv_bias",
    "fold_channel_affine",
    "sum_to_add",
    "global_pool",
    "collapse_reshapes",
    "reshape_to_flatten",
    "squeeze_to_flatten",
    "matmul_add_to_gemm",
    "normalize_gemm",
    "strip_softmax",
    "remove_unused",
    "remove_unused_opsets",
    "symbolic_batch",
    "set_opset",
    "name_fix",
    "topological_sort",
)


# ---------------------------------------------------------------------------------------------
# load


def read(path: str | os.PathLike) -> ir.Model:
    """Read any bnncc graph: a rewritten one as it is (checked, external data loaded), a float one
    as ``load`` gives it.

    A float graph (no op of the ai.bnncc domain) must be one that ``load`` accepts, and is refused
    with ``load``'s message otherwise: every command takes the same float models, in one form (read
    as it was, an opset-9 export that lists its weights as graph inputs counted 2193 parameters).
    """
    path = require_path(path)
    proto = _read_checked(path)
    return _pokebnn(proto, path) if _is_pokebnn(proto.graph.node) else _canonical(proto, path)


def read_pokebnn(model: ir.Model | str | os.PathLike, command: str) -> ir.Model:
    """``model``, or the graph at that path, which must be a PokeBNN graph: ``command`` (compile,
    export) takes no float one, and refuses it before canonicalizing it."""
    source = source_name(model)
    if isinstance(model, ir.Model):
        pokebnn = _is_pokebnn(model.graph)
    else:
        proto = _read_checked(Path(model))
        pokebnn = _is_pokebnn(proto.graph.node)
    if not pokebnn:
        raise BnnccError(f"{source}: no {DOMAIN} op; {command} takes a PokeBNN graph (run `bnncc rewrite` first)")
    if not isinstance(model, ir.Model):
        return _pokebnn(proto, source)
    _check_pokebnn(model, source)
    return model


def source_name(model: ir.Model | str | os.PathLike) -> str:
    """How errors name ``model``: its path, or its graph's name when it is held in memory."""
    if isinstance(model, ir.Model):
        return f"graph {model.graph.name!r}"
    return str(require_path(model, "an onnx_ir.Model or the path of an ONNX file"))


def require_path(path: object, takes: str = "the path of an ONNX file") -> Path:
    """``path`` as a Path; a TypeError saying what the function ``takes`` where it is something else
    (onnx.load's ModelProto failed inside pathlib: "expected str, bytes or os.PathLike object")."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected {takes}, got {type(path).__name__}")
    return Path(path)


def _is_pokebnn(nodes) -> bool:
    """Whether a graph's ``nodes`` (onnx's or onnx_ir's) hold an op of bnncc's domain."""
    return any(node.domain == DOMAIN for node in nodes)


def _pokebnn(proto: onnx.ModelProto, path: Path) -> ir.Model:
    """The checked PokeBNN graph ``proto``, of the version of the ai.bnncc ops this bnncc knows."""
    versions = [o.version for o in proto.opset_import if o.domain == DOMAIN]
    if versions != [VERSION]:
        raise BnnccError(f"{path}: {DOMAIN} opset {versions[0] if len(versions) == 1 else versions}; this bnncc "
                         f"knows version {VERSION} of its ops")
    model = ir.serde.deserialize_model(proto)
    _check_pokebnn(model, path)
    return model


def _check_pokebnn(model: ir.Model, source) -> None:
    """What every command asks of a PokeBNN graph before using it, refused alike by all of them in
    one line starting with ``source``: every node used (``_check_every_node_used``) and of an op bnncc
    measures and compiles (``_check_measurable``), its constants within its ops' domains
    (``bnncc.ops.check_graph``), an input no larger than a float model's (``_check_input_size``), and
    onnxruntime able to run it (``_check_reference_runs``)."""
    try:
        _check_every_node_used(model)
        _check_measurable(model)
        check_graph(model)
        _check_input_size(model)
        _check_reference_runs(model)
    except BnnccError as e:
        raise BnnccError(f"{source}: {e}") from None


def _check_every_node_used(model: ir.Model) -> None:
    """Every node of the PokeBNN graph computes a value that its output depends on. ace counted the
    cost of nodes the output does not read (a graph whose output was its input or a constant measured
    as a whole network), while compile refused that graph."""
    used: set[int] = set()
    values = list(model.graph.outputs)
    while values:
        node = values.pop().producer()
        if node is not None and id(node) not in used:
            used.add(id(node))
            values.extend(value for value in node.inputs if value is not None)
    for node in model.graph:
        if id(node) not in used:
            outputs = ", ".join(repr(value.name) for value in model.graph.outputs)
            raise BnnccError(f"node {node.name!r} ({node.op_type}): the graph's output {outputs} does not depend "
                             f"on it")


def _check_measurable(model: ir.Model) -> None:
    """Every node of the PokeBNN graph is an ONNX or ai.bnncc op, as rewrite writes them: ace counted
    a node of a local function (a float conv inside, say) as no work at all, measuring a graph that
    compile then refused."""
    for node in model.graph:
        if node.domain not in (*DEFAULT_DOMAINS, DOMAIN):
            raise BnnccError(f"node {node.name!r} ({node.domain}:{node.op_type}): an op of domain "
                             f"'{node.domain}'; a PokeBNN graph holds ONNX and {DOMAIN} ops only")


def _check_input_size(model: ir.Model) -> None:
    """The PokeBNN graph's input has at most MAX_INPUT_PIXELS pixels, as a float model's must: the
    reference check runs an image of its size, and a graph edited to take 20000x20000 pixels had
    onnxruntime take tens of GiB and minutes (or fail to allocate) before ace or compile refused it."""
    for value in model.graph.inputs:
        dims = [d if isinstance(d, int) else None for d in (value.shape or [])]
        if _too_large(dims):
            raise BnnccError(f"input '{value.name}' of shape {dims}: at most {MAX_INPUT_PIXELS} pixels")


# Digests of the graphs onnxruntime has run in this process: convert reads each stage's graph for
# its ACE and again to compile it, and the check takes seconds on a ResNet-50 (about 2.8 s).
_REFERENCE_RAN: set[str] = set()


def _check_reference_runs(model: ir.Model) -> None:
    """onnxruntime, the reference every library is verified against, loads the PokeBNN graph and
    runs an image of zeros through it. A graph it cannot run (an op of an unknown domain, shapes its
    ops cannot take, two nodes of one name, a required input left out) is refused, rather than
    compiled into a library nothing can check or exported into a file its readers refuse."""
    serialized = attach_functions(ir.to_proto(model)).SerializeToString()
    digest = hashlib.sha256(serialized).hexdigest()
    if digest in _REFERENCE_RAN:
        return
    dims = [d if isinstance(d, int) else None for d in (model.graph.inputs[0].shape or [])] if model.graph.inputs else []
    try:
        session = reference_session(serialized, optimize=False)  # a check: no time optimizing
        if len(dims) > 1 and all(d is not None for d in dims[1:]):  # a fixed image size: run one
            session.run(None, {session.get_inputs()[0].name: np.zeros([dims[0] or 1, *dims[1:]], np.float32)})
    except Exception as e:  # noqa: BLE001  (onnxruntime's own error types, whatever it failed on)
        message = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(e))
        raise BnnccError(f"onnxruntime, the reference, cannot run this graph: {message}") from None
    _REFERENCE_RAN.add(digest)


def reference_session(serialized: bytes, *, optimize: bool):
    """The reference: onnxruntime on the CPU, running ``serialized`` (a graph with its ai.bnncc
    functions attached) with all of its graph optimizations (``optimize``) or with none."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: its errors are raised, and bnncc says them in its own line
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else
                                        ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])


def _read_checked(path: Path) -> onnx.ModelProto:
    proto = _read_proto(path)
    _load_external_data(proto, path)
    _check_text(proto, path)
    _name_unnamed_nodes(proto)
    _check_dense([*proto.graph.node, *(node for function in proto.functions for node in function.node)], path)
    _name_default_domain(proto)
    _sort_nodes(proto, path)
    proto = _upgrade_old_opset(proto, path)
    _check_opset(proto, path)  # before the checker, whose complaints about another opset's ops say less
    _check_model(proto, path)
    _check_tensor_data(proto, path)
    _check_interface(proto, path)
    return proto


def _name_unnamed_nodes(proto: onnx.ModelProto) -> None:
    """Each unnamed node of the graph takes the name of its first output, which the file holds and
    viewers show. Exporters and graph tools leave nodes unnamed (light_resnet50's 239 ConstantOfShape,
    whole graphs written with onnx.helper), and errors named them '' or by the name bnncc made up
    later ('Clip_3'), found nowhere in the file."""
    names = {node.name for node in proto.graph.node}
    for node in proto.graph.node:
        if not node.name and node.output and node.output[0] not in names:
            node.name = node.output[0]
            names.add(node.name)


def _sort_nodes(proto: onnx.ModelProto, path: Path) -> None:
    """The graph's nodes in a topological order that keeps the stored order where it can. ONNX asks
    for one, and the checker refuses a graph without it, but graph-editing tools and onnxruntime's
    float16 converter write others, and onnxruntime runs them. A cycle is refused, naming a node on it."""
    nodes = list(proto.graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    deps = nx.DiGraph()
    deps.add_nodes_from(range(len(nodes)))
    for i, node in enumerate(nodes):
        deps.add_edges_from((producer[name], i) for name in _node_inputs(node) if name in producer)
    try:
        order = list(nx.lexicographical_topological_sort(deps))
    except nx.NetworkXUnfeasible:
        node = nodes[nx.find_cycle(deps)[0][0]]
        raise BnnccError(f"{path}: invalid ONNX model: node {node.name!r} ({node.op_type}) is on a cycle: "
                         "it depends on its own output") from None
    if order != list(range(len(nodes))):
        del proto.graph.node[:]
        proto.graph.node.extend(nodes[i] for i in order)


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """The values a node reads: its inputs and those its subgraphs (If, Loop, Scan) read of the outer graph."""
    names = list(node.input)
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
            names.extend(name for inner in graph.node for name in _node_inputs(inner))
    return names


def _check_model(proto: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise BnnccError(f"{path}: invalid ONNX model: {_one_line(e)}") from None
    except (ValueError, google.protobuf.message.EncodeError):  # the checker serializes the model
        raise _over_protobuf_limit(path, stored_bytes(path)) from None


def _over_protobuf_limit(path: Path, size: int) -> BnnccError:
    """The refusal of the model at ``path``, of ``size`` bytes with its external data."""
    return BnnccError(f"{path}: {size / 2**30:.1f} GiB with its external data, over the 2 GiB of a protobuf message, "
                      "which onnx and onnxruntime need (ResNet-50's weights: 0.1 GiB)")


def _name_default_domain(proto: onnx.ModelProto) -> None:
    """"ai.onnx", the default domain's other name, as "" in the opset imports and nodes: ONNX
    accepts both, onnx_ir's passes and shape inference after them only the empty one."""
    if any(o.domain == "" for o in proto.opset_import):
        return
    for item in (*proto.opset_import, *proto.graph.node):
        if item.domain == "ai.onnx":
            item.domain = ""


def _default_opsets(proto: onnx.ModelProto) -> list[int]:
    """The versions the model imports of the default domain, by either of its names."""
    return [o.version for o in proto.opset_import if o.domain in DEFAULT_DOMAINS]


def _upgrade_old_opset(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """A model of an opset before SUPPORTED_OPSETS, brought to its first one by onnx's version converter.

    The ONNX model zoo's MXNet ResNets are opset 7 and its Caffe2 ones opsets 3 to 9; the converter's
    adapters rewrite their ops' old attributes (BatchNormalization's is_test and spatial, Gemm's
    broadcast). They need every tensor's shape, which the old BatchNormalization does not infer
    and a symbolic batch does not give: the batch is fixed at 1 (the canonical form makes it
    symbolic again) and the model converted one opset at a time, inferring shapes in between.
    Import notes record the conversion.
    """
    versions = _default_opsets(proto)
    if len(versions) != 1 or versions[0] not in UPGRADED_OPSETS:
        return proto
    old, new = versions[0], SUPPORTED_OPSETS.start
    _check_model(proto, path)  # the converter trusts its input
    upgraded = onnx.ModelProto()
    upgraded.CopyFrom(proto)
    notes = [f"converted from opset {old} to {new} by onnx's version converter", *_per_channel_spatial(upgraded, path)]
    for value in (*upgraded.graph.input, *upgraded.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    upgraded.graph.ClearField("value_info")
    try:
        for version in range(old + 1, new + 1):
            upgraded = onnx.shape_inference.infer_shapes(onnx.version_converter.convert_version(upgraded, version))
    except (RuntimeError, onnx.shape_inference.InferenceError) as e:  # the converter's failed assertion
        raise BnnccError(f"{path}: cannot convert opset {old} to {new}: "
                         f"{_one_line(e).split(' failed: ')[-1]}") from None
    recorded = {p.key: p.value for p in upgraded.metadata_props}
    onnx.helper.set_model_props(upgraded, {**recorded, IMPORT_NOTES_KEY: "\n".join(
        filter(None, [recorded.get(IMPORT_NOTES_KEY), *notes]))})
    return upgraded


def _per_channel_spatial(proto: onnx.ModelProto, path: Path) -> list[str]:
    """BatchNormalization's ``spatial=0`` (opsets before 9: statistics per activation) with
    parameters of one value a channel, as MXNet's exporter wrote until 2020 (the model zoo's files
    were regenerated), is per channel in onnxruntime, the reference: set to 1, with a note. With
    parameters of another shape it is refused."""
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    fixed = []
    for node in proto.graph.node:
        spatial = next((a for a in node.attribute if a.name == "spatial"), None)
        if node.op_type != "BatchNormalization" or spatial is None or spatial.i == 1:
            continue
        dims = [shapes.get(name) for name in node.input[1:5]]
        per_channel = all(d is not None and len(d) == 1 for d in dims) and len({d[0] for d in dims}) == 1
        if spatial.i != 0 or not per_channel:
            raise BnnccError(f"{path}: BatchNormalization '{node.name}': spatial={spatial.i} (statistics per "
                             "activation, not per channel) is not a ResNet's batch norm")
        spatial.i = 1
        fixed.append(node.name)
    return [f"{len(fixed)} batch norm(s) of spatial=0 with one parameter a channel read as spatial=1 (as "
            f"onnxruntime does), the first '{fixed[0]}'"] if fixed else []


def _check_dense(nodes, path: Path) -> None:
    """No attribute of ``nodes`` (and of the nodes of their subgraphs) holds a sparse tensor: onnx_ir reads
    none, and a Constant's sparse_value ended every command in 'unexpected SerdeError'."""
    for node in nodes:
        for attribute in node.attribute:
            if attribute.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
                raise BnnccError(f"{path}: node '{node.name}' ({node.op_type}): attribute '{attribute.name}' holds "
                                 "a sparse tensor, which bnncc does not read; store it dense")
            for graph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                _check_dense(graph.node, path)


def _check_text(message: google.protobuf.message.Message, path: Path) -> None:
    """Every string field (names, op types, attributes) must be UTF-8.

    ONNX is proto2, so protobuf does not check; a non-UTF-8 name comes back as bytes and breaks
    the checker and onnx_ir later with errors that cannot name it.
    """
    for field, value in message.ListFields():
        items = value if field.is_repeated else (value,)
        if field.type == field.TYPE_MESSAGE:
            for item in items:
                _check_text(item, path)
        elif field.type == field.TYPE_STRING and any(isinstance(item, bytes) for item in items):
            raise BnnccError(f"{path}: invalid ONNX model: a {message.DESCRIPTOR.name}.{field.name} is not valid UTF-8")


def _check_tensor_data(proto: onnx.ModelProto, path: Path) -> None:
    """Every constant tensor's data must fill its dims at its element type (the checker does not look)."""
    constants = [attr.t for node in proto.graph.node for attr in node.attribute if attr.HasField("t")]
    for tensor in [*proto.graph.initializer, *constants]:
        try:
            array = onnx.numpy_helper.to_array(tensor)
        except (ValueError, TypeError, KeyError) as e:  # KeyError: an unknown data type
            raise BnnccError(f"{path}: tensor '{tensor.name}' (data type {tensor.data_type}, dims "
                             f"{list(tensor.dims)}): data does not match its type and shape ({first_line(e)})") from None
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BnnccError(f"{path}: tensor '{tensor.name}' holds NaN or infinite values")


def load(path: str | os.PathLike) -> ir.Model:
    """Read ``path``, check it, infer shapes and return the model in canonical form.

    This is where bnncc decides which float models it takes: every refusal is a BnnccError whose
    one line starts with ``path``, raised before anything is written.
    """
    path = require_path(path)
    proto = _read_checked(path)
    if _is_pokebnn(proto.graph.node):  # its checks would fail on the ops' shapes
        raise BnnccError(f"{path}: a PokeBNN graph ({DOMAIN} ops), where a float ResNet is expected")
    return _canonical(proto, path)


def _canonical(proto: onnx.ModelProto, path: Path) -> ir.Model:
    """The checked float model ``proto`` in canonical form, recognised as a ResNet."""
    if proto.functions:  # torch's export_modules_as_functions: a Bottleneck op of the model's own
        proto = onnx.inliner.inline_local_functions(proto)
        _check_tensor_data(proto, path)
    _check_conv_attributes(proto, path)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        raise BnnccError(f"{path}: shape inference failed: {first_line(e)}") from None
    unread = _check_shapes(proto, path)
    model = ir.serde.deserialize_model(proto)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, in one line
            model = _infer_shapes(PassManager(CANONICAL_PASSES).run(model))
        _check_folded_weights(model)
        if unread:  # their weights are constants now
            _check_shapes(ir.to_proto(model), path)
        recognize(model)
    except BnnccError as e:
        message = str(e)
        raise BnnccError(message if message.startswith(f"{path}: ") else f"{path}: {message}") from None
    return model


def _check_folded_weights(model: ir.Model) -> None:
    """The canonical model's weights are finite: folding finite batch norms or affine Mul/Add into a conv
    can overflow float32 (a gamma of 3e38 over a variance of 1e-3). Such a model was accepted with numpy's
    overflow warnings on stderr, and its infinite weights refused only by compile, after rewrite and training."""
    for name, value in model.graph.initializers.items():
        array = value.const_value.numpy() if value.const_value is not None else None
        if array is not None and array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BnnccError(f"tensor '{name}': folding the batch norms and constants into it gives values beyond "
                             f"float32's range")


def _infer_shapes(model: ir.Model) -> ir.Model:
    """``model`` with every value's shape and type inferred. onnx_ir's pass logs a failure with its
    traceback and goes on; a canonical model whose shapes do not infer is refused first, here."""
    try:
        onnx.shape_inference.infer_shapes(ir.to_proto(model), check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        raise BnnccError(f"shape inference failed on the canonical model: {first_line(e)}") from None
    return PassManager(["shape_inference"]).run(model)


def _check_conv_attributes(proto: onnx.ModelProto, path: Path) -> None:
    """A conv's kernel_shape attribute must be its stored weights' spatial size: shape inference,
    which would fail on it, blames a node further on (the residual Add where the sizes meet).
    A conv has pads or an auto_pad, not both: ONNX forbids it and onnxruntime, the reference, refuses
    to run such a conv, which bnncc took, reading its auto_pad."""
    weights = {tensor.name: list(tensor.dims) for tensor in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "Conv":
            continue
        auto_pad = next((a.s.decode(errors="replace") for a in node.attribute if a.name == "auto_pad"), "NOTSET")
        if auto_pad != "NOTSET" and any(a.name == "pads" for a in node.attribute):
            raise BnnccError(f"{path}: node '{node.name}' (Conv): both pads and auto_pad {auto_pad}, which ONNX "
                             "forbids together")
        if len(node.input) < 2 or node.input[1] not in weights:
            continue
        kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)
        dims = weights[node.input[1]]
        if kernel is not None and kernel != dims[2:]:
            raise BnnccError(f"{path}: node '{node.name}' (Conv): kernel_shape {kernel} but weights of shape {dims}")


def _check_shapes(proto: onnx.ModelProto, path: Path) -> list[str]:
    """What ONNX's shape inference lets through and no CNN has: a dimension of 0 or less, a conv's
    weights of other input channels than its input has, a bias or batch norm parameter of another
    length than the channels it applies to. Returns the convs whose weights it could not check:
    computed in the graph, their dims not inferred (timm's weight-standardized convs)."""
    shapes = {value.name: [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
              for value in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]}
    shapes.update({tensor.name: list(tensor.dims) for tensor in proto.graph.initializer})

    def fail(node, problem: str):
        raise BnnccError(f"{path}: node '{node.name}' ({node.op_type}): {problem}")

    for value in proto.graph.input:
        dims = shapes[value.name]
        if any(d is not None and d <= 0 for d in dims):
            raise BnnccError(f"{path}: input '{value.name}' of shape {dims}: every dimension must be positive")
        if _too_large(dims):
            raise BnnccError(f"{path}: input '{value.name}' of shape {dims}: at most {MAX_INPUT_PIXELS} pixels")
    unread = []
    for node in proto.graph.node:
        for name in node.output:
            if any(d is not None and d <= 0 for d in shapes.get(name, [])):
                fail(node, f"output '{name}' of shape {shapes[name]}")
            if _too_large(shapes.get(name, [])):  # e.g. a padding of 10**5 pixels
                fail(node, f"output '{name}' of shape {shapes[name]}: at most {MAX_INPUT_PIXELS} pixels")
        x = shapes.get(node.input[0], []) if node.input else []
        channels = x[1] if len(x) > 1 else None
        if node.op_type == "Conv" and len(node.input) > 1:
            w = shapes.get(node.input[1], [])
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if None in w[:2]:
                unread.append(node.name)
                continue
            if channels is not None and len(w) > 1 and w[1] * group != channels:
                fail(node, f"weights of shape {w} in {group} group(s) for a {channels}-channel input")
            if len(node.input) > 2 and node.input[2] and w and not _may_be(shapes.get(node.input[2]), w[0]):
                fail(node, f"bias of shape {shapes[node.input[2]]} for {w[0]} output channels")
        if node.op_type == "BatchNormalization" and channels is not None:
            for name in node.input[1:5]:
                if not _may_be(shapes.get(name), channels):
                    fail(node, f"parameter '{name}' of shape {shapes[name]} for {channels} channels")
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and node.output[0] in shapes:
            # shape inference does not check C, and normalize_gemm leaves one that is no bias as it is: a C of
            # length 0 or of shape (out, 1), which onnxruntime refuses to run, was accepted and rewritten
            c, y = shapes.get(node.input[2]), shapes[node.output[0]]
            if c is not None and not _broadcasts_to(c, y):
                fail(node, f"C of shape {c} does not broadcast to its output of shape {y}")
    return unread


def _broadcasts_to(shape: list[int | None], target: list[int | None]) -> bool:
    """Whether a tensor of ``shape`` broadcasts one way to ``target`` (ONNX's unidirectional
    broadcasting, as Gemm's C; None: a dimension not inferred)."""
    return len(shape) <= len(target) and all(
        None in (d, t) or d in (1, t) for d, t in zip(reversed(shape), reversed(target)))


def _too_large(dims: list[int | None]) -> bool:
    """Whether a rank-4 tensor of ``dims`` has more pixels a channel than the kernels index."""
    return len(dims) == 4 and None not in dims[2:] and dims[2] * dims[3] > MAX_INPUT_PIXELS


def _may_be(shape: list[int | None] | None, length: int) -> bool:
    """Whether a tensor of ``shape`` (None: unknown; a None dimension: not inferred, as of a bias
    computed in the graph) may be a vector of ``length``."""
    return shape is None or (len(shape) == 1 and shape[0] in (None, length))


def _check_opset(proto: onnx.ModelProto, path: Path) -> None:
    """The canonicalization knows the default-domain ops of SUPPORTED_OPSETS only."""
    versions = _default_opsets(proto)
    if len(versions) != 1 or versions[0] not in SUPPORTED_OPSETS:
        found = f"opset {versions[0]}" if len(versions) == 1 else f"{len(versions)} default-domain opset imports"
        raise BnnccError(f"{path}: {found}; bnncc reads float models of opsets "
                         f"{UPGRADED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}")


def _one_line(error: Exception) -> str:
    """The whole message on one line: the ONNX checker names the node on the lines after the first."""
    return " ".join(str(error).replace("==> Context:", "").split()) or type(error).__name__


def _read_proto(path: Path) -> onnx.ModelProto:
    try:
        require_file(path, "an ONNX model")
        if path.stat().st_size > 2**31:  # no protobuf message is larger: a sparse file of 8 GiB was read whole
            raise _over_protobuf_limit(path, path.stat().st_size)
        data = path.read_bytes()
    except OSError as e:  # too long a name, no permission, ...
        raise BnnccError(f"{path}: cannot read the file: {e.strerror}") from None
    if not data:
        raise BnnccError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.ModelProto.FromString(data)
    except google.protobuf.message.DecodeError:
        raise BnnccError(f"{path}: not an ONNX model (truncated or not protobuf)") from None
    # Arbitrary bytes can decode as a protobuf message; a model has an IR version and a graph.
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.graph.node:
        raise BnnccError(f"{path}: not an ONNX model (no IR version or no graph)")
    return proto


def stored_bytes(path: str | os.PathLike) -> int:
    """What the model at ``path`` (one ``load`` took) takes on disk: its file and the external data
    files it names."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {location for _, location in _external_tensors(proto)}
    return path.stat().st_size + sum((path.parent / location).stat().st_size for location in locations)


def input_files(what: str, path: str | os.PathLike) -> dict[str, Path]:
    """``{what: path}`` and each external data file the ONNX model at ``path`` names, for
    ``fileio.refuse_overwriting``: a rewrite written onto its input's ``model.onnx.data`` replaced the
    input's weights, and the input no longer loaded. A file that is no model names none (loading it refuses it)."""
    path = Path(path)
    try:
        proto = _read_proto(path)
    except BnnccError:  # (the load that follows names the problem)
        return {what: path}
    # (a location holding a NUL is no path: the load refuses it)
    locations = sorted({location for _, location in _external_tensors(proto) if "\0" not in location})
    return {what: path, **{f"{what}'s external data '{location}'": path.parent / location for location in locations}}


def _external_tensors(proto: onnx.ModelProto) -> list[tuple[onnx.TensorProto, str]]:
    """The tensors of ``proto`` kept in external data, with their location: all that onnx's loader reads
    (its own private list of them), those of subgraphs (If, Loop) and functions too. Only the main graph's
    were checked: a tensor of an If's branch read a sparse file of 8 GiB whole, 'unexpected MemoryError'."""
    return [(tensor, next((e.value for e in tensor.external_data if e.key == "location"), ""))
            for tensor in onnx.external_data_helper._get_all_tensors(proto)
            if onnx.external_data_helper.uses_external_data(tensor)]


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Load external tensors, refusing any location outside the model's folder, and more bytes than a
    protobuf message holds before reading them."""
    folder = path.parent.resolve()
    total = 0  # the bytes onnx will read, refused beyond what a model can hold before any is read
    for tensor, location in _external_tensors(proto):
        keys = [entry.key for entry in tensor.external_data]
        if len(set(keys)) != len(keys):  # onnx reads the last of each, bnncc would check the first
            raise BnnccError(f"{path}: tensor '{tensor.name}': its external data names a key twice "
                             f"({', '.join(sorted({k for k in keys if keys.count(k) > 1}))})")
        if "\0" in location:
            raise BnnccError(f"{path}: tensor '{tensor.name}': its external data location holds a NUL character")
        try:
            target = (folder / location).resolve()
            if os.path.isabs(location) or not target.is_relative_to(folder):
                raise BnnccError(
                    f"{path}: tensor '{tensor.name}' keeps its data at '{location}', outside the model's folder"
                )
            if not target.is_file():
                problem = "is not a file" if target.exists() else "is missing"
                raise BnnccError(f"{path}: external data file '{location}' of tensor '{tensor.name}' {problem}")
            # without a length onnx reads to the end of the file: a sparse file of 8 GiB beside a model
            # that named it for a bias of 1000 floats was read whole (a MemoryError, or 8 GiB taken)
            entries = {entry.key: entry.value for entry in tensor.external_data}
            offset, length = (int(entries[key]) if key in entries else None for key in ("offset", "length"))
            stored = target.stat().st_size - (offset or 0)
            total += max(min(stored, length if length is not None else stored), 0)
        except ValueError as e:  # an offset or length that is no number
            raise BnnccError(f"{path}: cannot read its external data: {first_line(e)}") from None
        except OSError as e:  # e.g. a location longer than the file system allows
            raise BnnccError(f"{path}: tensor '{tensor.name}': its external data location ({len(location)} "
                             f"characters) cannot be opened: {e.strerror}") from None
    size = path.stat().st_size + total
    if size > 2**31:
        raise _over_protobuf_limit(path, size)
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(folder))
    except OSError as e:
        raise BnnccError(f"{path}: cannot read its external data: {e.strerror}") from None
    except (ValueError, onnx.checker.ValidationError) as e:  # an offset or length outside the data file
        raise BnnccError(f"{path}: cannot read its external data: {first_line(e)}") from None


def _check_interface(proto: onnx.ModelProto, path: Path) -> None:
    """One float32 NCHW input with static C, H, W, and one output."""
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    weights = {node.input[1] for node in graph.node if node.op_type in ("Conv", "Gemm") and len(node.input) > 1}
    unset = [i.name for i in inputs if i.name in weights]
    if unset:
        raise BnnccError(f"{path}: input '{unset[0]}' holds the weights of a layer, and {len(unset)} such inputs "
                         "have no values: export with the weights (torch: export_params=True)")
    if len(inputs) != 1 or len(graph.output) != 1:  # named: which output (or input) is to go was left to guess
        raise BnnccError(f"{path}: the model has {len(inputs)} inputs{_named(inputs)} and {len(graph.output)} "
                         f"outputs{_named(graph.output)}; expected one of each, the images and the logits")
    tensor_type = inputs[0].type.tensor_type
    dims = tensor_type.shape.dim
    if tensor_type.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4:
        kind = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
        raise BnnccError(f"{path}: input '{inputs[0].name}' ({kind}, rank {len(dims)}) must be a float32 NCHW "
                         "tensor of rank 4 (export the float32 model)")
    readers = [node for node in graph.node if inputs[0].name in node.input]
    # an NHWC input (tf2onnx's) is read through a Transpose to NCHW, which the canonical form drops
    nhwc = readers and all(node.op_type == "Transpose" and [list(a.ints) for a in node.attribute if a.name == "perm"]
                           == [[0, 3, 1, 2]] for node in readers)
    axes = "HWC" if nhwc else "CHW"
    dynamic = {axis: dim.dim_param or "?" for axis, dim in zip(axes, dims[1:]) if not dim.HasField("dim_value")}
    if dynamic:
        kinds = [kind for kind, letters in (("channel count", "C"), ("spatial size", "HW")) if set(letters) & set(dynamic)]
        fixed = {axis: str(dim.dim_value) for axis, dim in zip(axes, dims[1:]) if dim.HasField("dim_value")}
        # an example size for the fix (optimum's exports leave all three open): the first conv's
        # input channels, 224 px
        example = {"C": str(_conv_input_channels(graph, readers) or 3), "H": "224", "W": "224", **fixed}
        shape = ",".join(["1", *(example[axis] for axis in axes)])
        raise BnnccError(
            f"{path}: input '{inputs[0].name}': dynamic {' and '.join(kinds)} "
            f"({', '.join(f'{axis} = {name}' for axis, name in dynamic.items())}); bnncc compiles for one image "
            f"size: fix it first, e.g. python -m onnxruntime.tools.make_dynamic_shape_fixed --input_name "
            f"{inputs[0].name} --input_shape {shape} {path.name} fixed.onnx")


def _named(values) -> str:
    """`` ('a', 'b')``: the names of ``values`` for a message, nothing for none."""
    return f" ({', '.join(repr(value.name) for value in values)})" if values else ""


def _conv_input_channels(graph: onnx.GraphProto, readers: list[onnx.NodeProto]) -> int | None:
    """The input channels of the conv that reads the graph input (through an NHWC Transpose)."""
    weights = {tensor.name: tensor.dims for tensor in graph.initializer}
    outputs = {name for node in readers for name in node.output}
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and (node in readers or node.input[0] in outputs):
            dims = weights.get(node.input[1])
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            return dims[1] * group if dims is not None and len(dims) == 4 else None
    return None


# ---------------------------------------------------------------------------------------------
# recognize


def recognize(model: ir.Model) -> ResNet:
    """Find the stem, the block stages and the head of a canonical bottleneck or basic-block ResNet.

    Raises BnnccError naming the node where the model departs from the canonical form's ops or
    opset (``load`` gives that form) or from a ResNet's structure: bottlenecks (1x1, 3x3, 1x1 convs)
    or basic blocks (3x3, 3x3 convs), one kind throughout.
    """
    _check_canonical(model)
    walker = _Walker(model.graph)
    graph_input = model.graph.inputs[0]
    stem = walker.stem(graph_input)
    stages: list[list[Block]] = []
    current = walker.output_of(stem.pool or stem.relu)
    while (block := walker.block(current, stages)) is not None:
        if stages and type(block) is not type(stages[0][0]):
            raise BnnccError(f"node '{block.convs[0]}' (Conv): a {_KIND[type(block)]} after {_KIND[type(stages[0][0])]}s; "
                             f"a ResNet must use one kind of block throughout")
        if block.shortcut is not None or not stages:
            stages.append([])
        stages[-1].append(block)
        current = walker.output_of(block.out_relu)
    if not stages:
        raise BnnccError(f"node '{stem.pool or stem.relu}': expected a bottleneck or basic block after the stem")
    head = walker.head(current)
    walker.check_all_visited()
    return ResNet(
        input_name=graph_input.name,
        input_shape=static_dims(graph_input),
        output_name=model.graph.outputs[0].name,
        stem=stem,
        stages=tuple(tuple(stage) for stage in stages),
        head=head,
        notes=(*_import_notes(model), *_layout_notes(stages)),
    )


def require_ir_model(model: object) -> None:
    """A TypeError naming the fix when ``model`` is no onnx_ir Model: onnx.load's ModelProto or a
    path failed deep inside the caller, naming an attribute."""
    if not isinstance(model, ir.Model):
        raise TypeError(f"expected an onnx_ir.Model as bnncc.load returns, got {type(model).__name__}: "
                        f"load the file with bnncc.load(path)")


# ops of the activations other than Relu that exports of ResNet variants write (SiLU is x * Sigmoid(x),
# GELU x * (1 + Erf(x / sqrt 2)) / 2 before opset 20)
_ACTIVATIONS = ("Sigmoid", "HardSigmoid", "Erf", "Gelu", "Swish", "Tanh", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu",
                "Celu", "Softplus", "Softsign", "Mish", "HardSwish", "ThresholdedRelu")
_NORMS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "RMSNormalization",
          "MeanVarianceNormalization", "LpNormalization", "LRN")
_QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                  "DynamicQuantizeLinear")
_OTHER_NORM = "bnncc reads ResNets whose batch norms fold into their convs"
_QUANTIZED = "a quantized model; bnncc takes the float ResNet it was quantized from"

# Why an op is refused, where the list of allowed ops would mislead: ops a float ResNet has, left in
# the graph where the canonical form has none (a pre-activation ResNet's first batch norm was
# "unsupported op; ... may use only Conv, BatchNormalization, ..."), the ops of quantized models,
# other norms and other activations.
_WHY_REFUSED = {
    "BatchNormalization": "a batch norm that folds into no conv: it must follow a Conv and run in inference "
                          "mode (pre-activation ResNets, v2, are not supported; export in eval mode)",
    "AveragePool": "an average pool that is not the global pool before the classifier (ResNet-D's pooled "
                   "shortcuts are not supported)",
    "ReduceMean": "a mean that is not the global pool before the classifier",
    # timm's global_pool="max" or "catavgmax" through the dynamo exporter, Keras' pooling="max" through
    # tf2onnx: "unsupported op", with "pooling" among the ops it listed as allowed
    **{op: "a max reduction, as a global max pool writes it: bnncc reads a head that averages over H and W "
           "before the classifier (timm's global_pool='avg', torch's AdaptiveAvgPool2d)"
       for op in ("ReduceMax", "GlobalMaxPool")},
    "Reshape": "a reshape that is not the flatten before the classifier",
    "Squeeze": "a squeeze that is not the flatten before the classifier",
    "Pad": "a padding that folds into no conv or max pool (bnncc folds zero padding of H and W before a Conv, "
           "or before a MaxPool of a Relu's output)",
    "Mul": "an elementwise product, which a plain ResNet has none of (squeeze-excite and pre-activation "
           "ResNets are not supported; a batch norm as Mul and Add folds only into the conv right before it)",
    **{op: f"a normalization other than batch norm: {_OTHER_NORM}" for op in _NORMS},
    "InstanceNormalization": f"a normalization other than batch norm (torch exports GroupNorm as one): {_OTHER_NORM}",
    **{op: "an activation other than Relu (SiLU, GELU, ReLU6) or a squeeze-excite gate: bnncc reads ResNets "
           "whose only activation is Relu" for op in _ACTIVATIONS},
    "Transpose": "a transpose that is not the NHWC input's to NCHW nor the NHWC mean's before the classifier",
    "MatMul": "a matrix product that is not the classifier",
    **{op: "a softmax that is not over the classes of the output logits (bnncc drops only that one, which "
           "leaves each image's best class as it is)" for op in ("Softmax", "LogSoftmax")},
    "Cast": "a type conversion, as a float16 model that keeps float32 inputs and outputs casts them: bnncc reads "
            "float32 models throughout (export the float32 model)",
    "Dropout": "a dropout in training mode, or whose mask is read: export the model in eval mode",
    # its Mul was refused as a squeeze-excite product, which sent the user looking for a gate the model lacks
    "Range": "indices computed from the batch size at run time, as torch's dynamo exporter writes a channels_last "
             "model's flatten (as_strided) for a dynamic batch: export with a fixed batch, or the model in "
             "contiguous memory format",
    **{op: _QUANTIZED for op in _QUANTIZED_OPS},
}

_MOST_TELLING = (*_QUANTIZED_OPS, *_NORMS, "BatchNormalization", *_ACTIVATIONS, "Range", "Mul")
_ELEMENTWISE = ("Sub", "Div", "Mul", "Add")
_ONNXRUNTIME = ("an op of onnxruntime's own, as its offline optimizer writes above the basic level (FusedConv, "
                "NCHWc): save the optimized model at ORT_ENABLE_BASIC, which keeps ONNX's ops, or take the model "
                "before optimization")
_INPUT_NORMALIZATION = ("an input normalization inside the graph: bnncc takes the network from its first conv; "
                        "export it without the normalization and normalize the images before the library")


def _check_canonical(model: ir.Model) -> None:
    """The parts of the canonical form that recognizing relies on: its ops, its opset, every shape."""
    require_ir_model(model)
    rewritten = next((node for node in model.graph if node.domain == DOMAIN), None)
    if rewritten is not None:  # its stem's batch norm was named below, as the one of a pre-activation ResNet
        raise BnnccError(f"node '{rewritten.name}' ({DOMAIN}:{rewritten.op_type}): a PokeBNN graph, where a float "
                         f"ResNet is expected; rewrite the float model it came from")
    refused = [node for node in model.graph if node.domain != "" or node.op_type not in STABLE_OPS]
    if refused:
        # a quantized op, a norm other than batch norm, a batch norm left unfolded (as itself or as
        # Mul + Add) or an activation other than Relu names the kind of network (quantized,
        # group-normalized, pre-activation, SiLU or squeeze-excite) best, wherever it is
        node = next((n for op in _MOST_TELLING for n in refused if n.op_type == op and n.domain == ""), refused[0])
        why = _WHY_REFUSED.get(node.op_type) if node.domain == "" else None
        if node.op_type in _ELEMENTWISE and node.domain == "" and set(node.inputs) & set(model.graph.inputs):
            why = _INPUT_NORMALIZATION
        if node.domain.startswith("com.microsoft"):  # its quantizer's contrib ops, or what its optimizer fused
            why = _QUANTIZED if node.op_type in _QUANTIZED_OPS or node.op_type.startswith("QLinear") else _ONNXRUNTIME
        op = node.op_type if node.domain == "" else f"{node.domain}:{node.op_type}"
        raise BnnccError(f"node '{node.name}' ({op}): " + (why or (
            "unsupported op; a float ResNet may use only Conv, BatchNormalization, Relu, MaxPool, Add, "
            "pooling, Flatten/Reshape, Gemm/MatMul")))
    opset = model.opset_imports.get("")
    if opset != CANONICAL_OPSET:
        raise BnnccError(f"the model is at opset {opset}, not the canonical {CANONICAL_OPSET}: "
                         f"load it with bnncc.load")
    for value in (*model.graph.inputs, *(v for node in model.graph for v in node.outputs)):
        if value.shape is None:
            raise BnnccError(f"value '{value.name}' has no shape: the canonical form has every shape inferred; "
                             f"load it with bnncc.load")


_KIND = {Bottleneck: "bottleneck block", BasicBlock: "basic block"}


def _import_notes(model: ir.Model) -> tuple[str, ...]:
    notes = model.metadata_props.get(IMPORT_NOTES_KEY)
    return tuple(notes.splitlines()) if notes else ()


def _layout_notes(stages: list[list[Block]]) -> tuple[str, ...]:
    if isinstance(stages[0][0], BasicBlock):
        return ("basic blocks (ResNet-18/34 style): two 3x3 convs each",)
    strided = [b for stage in stages for b in stage if b.stride > 1]
    if not strided:
        return ()
    if all(b.stride_on_3x3 for b in strided):
        return ("ResNet v1.5: strides on the 3x3 convs",)
    if not any(b.stride_on_3x3 for b in strided):
        return ("ResNet v1: strides on the first 1x1 convs",)
    return ("mixed stride placement: some on the 3x3, some on the first 1x1 conv",)


class _Walker:
    """Walks a canonical graph as a networkx DiGraph of nodes (edges: producer -> consumer)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.dag = nx.DiGraph()
        for node in graph:
            self.dag.add_node(node.name, node=node)
            for value in node.inputs:
                if value is not None and value.producer() is not None:
                    self.dag.add_edge(value.producer().name, node.name)
        self.visited: set[str] = set()

    def node(self, name: str) -> ir.Node:
        return self.dag.nodes[name]["node"]

    def output_of(self, name: str) -> ir.Value:
        return self.node(name).outputs[0]

    def users(self, value: ir.Value) -> list[ir.Node]:
        producer = value.producer()
        names = self.dag.successors(producer.name) if producer is not None else {u.node.name for u in value.uses()}
        return sorted((self.node(n) for n in names), key=lambda n: n.name)

    def only_user(self, node: ir.Node, op_type: str, what: str) -> ir.Node:
        """The single consumer of ``node``'s output, which must be ``op_type``."""
        users = self.users(node.outputs[0])
        if len(users) != 1 or users[0].op_type != op_type:
            found = ", ".join(f"{u.op_type} '{u.name}'" for u in users) or "nothing"
            raise BnnccError(f"node '{node.name}' ({node.op_type}): expected {what} after it, found {found}")
        return users[0]

    def visit(self, *nodes: ir.Node | None) -> None:
        self.visited.update(n.name for n in nodes if n is not None)

    # -- parts ----------------------------------------------------------------------------------

    def stem(self, graph_input: ir.Value) -> Stem:
        users = self.users(graph_input)
        if (len(users) != 1 or users[0].op_type != "Conv" or _kernel(users[0]) != (7, 7) or _stride(users[0]) != 2
                or set(ints_attr(users[0], "dilations", (1,))) != {1}):
            shift = next((u for u in users if u.op_type in _ELEMENTWISE and u.domain == ""), None)
            if shift is not None:  # (Add passes the op check, which names the others)
                raise BnnccError(f"node '{shift.name}' ({shift.op_type}): {_INPUT_NORMALIZATION}")
            found = ", ".join(f"{u.op_type} '{u.name}'" for u in users) or "nothing"
            raise BnnccError(f"input '{graph_input.name}': expected the stem's 7x7 stride-2 Conv, found {found}")
        conv = users[0]
        relu = self.only_user(conv, "Relu", "the stem's Relu")
        after = self.users(relu.outputs[0])
        pool = after[0] if len(after) == 1 and after[0].op_type == "MaxPool" else None
        self.visit(conv, relu, pool)
        stem_window([conv, relu, *([pool] if pool else [])])  # a stem no PokeBNN stem can stand for is refused
        out = (pool or relu).outputs[0]
        stride = _stride(conv) * (int(ints_attr(pool, "strides", (1, 1))[0]) if pool else 1)
        return Stem(conv.name, relu.name, pool.name if pool else None, _weight(conv).shape[0], _size(out), stride)

    def block(self, x: ir.Value, stages: list[list[Block]]) -> Block | None:
        """The bottleneck or basic block reading ``x``, or None when ``x`` goes to the head's pool."""
        users = self.users(x)
        if len(users) == 1 and users[0].op_type == "GlobalAveragePool":
            return None
        where = f"node '{x.producer().name}' ({x.producer().op_type})"
        main = [u for u in users if u.op_type == "Conv" and self._feeds(u, "Relu")]
        projections = [u for u in users if u.op_type == "Conv" and self._feeds(u, "Add")]
        adds = [u for u in users if u.op_type == "Add"]
        # Exactly two readers: the block's first conv, and the shortcut (projection conv or the Add).
        if len(users) != 2 or len(main) != 1 or len(projections) + len(adds) != 1:
            found = ", ".join(f"{u.op_type} '{u.name}'" for u in users) or "nothing"
            raise BnnccError(f"{where}: expected a block (its first Conv and its shortcut) or the head's global "
                             f"average pool after it, found {found}")
        conv1 = main[0]
        relu1 = self.only_user(conv1, "Relu", "a Relu")
        conv2 = self.only_user(relu1, "Conv", "the block's second Conv")
        shortcut = projections[0] if projections else None
        if self._feeds(conv2, "Add"):  # two convs: a basic block (ResNet-18/34)
            convs, relus, kernels = (conv1, conv2), (relu1,), ((3, 3), (3, 3))
        else:
            relu2 = self.only_user(conv2, "Relu", "a Relu")
            conv3 = self.only_user(relu2, "Conv", "the block's third (1x1) Conv")
            convs, relus, kernels = (conv1, conv2, conv3), (relu1, relu2), ((1, 1), (3, 3), (1, 1))
        add = self.only_user(convs[-1], "Add", "the residual Add")
        expected_inputs = {convs[-1].outputs[0].name, (shortcut.outputs[0] if shortcut else x).name}
        if {v.name for v in add.inputs} != expected_inputs:
            raise BnnccError(f"node '{add.name}' (Add): expected to add the block's {'x'.join(map(str, kernels[-1]))} "
                             f"Conv and its shortcut")
        out_relu = self.only_user(add, "Relu", "the block's output Relu")
        for conv, kernel in (*zip(convs, kernels), (shortcut, (1, 1))):
            if conv is None:
                continue
            group, dilations = int_attr(conv, "group", 1), list(ints_attr(conv, "dilations", (1, 1)))
            if _kernel(conv) != kernel or group != 1 or set(dilations) != {1}:
                # name what the conv is: a ResNeXt's grouped 3x3 conv was refused as "expected a 3x3 Conv"
                found = "x".join(map(str, _kernel(conv)))
                # (and why only where it is grouped or dilated: a 5x5 conv was said to be one)
                why = ("" if group == 1 and set(dilations) == {1}
                       else " (grouped convs, as ResNeXt's, and dilated ones have no binary conv here)")
                raise BnnccError(f"node '{conv.name}' (Conv): a {found} Conv with group {group} and dilations "
                                 f"{dilations}; expected a {kernel[0]}x{kernel[1]} Conv with group 1 and no dilation"
                                 f"{why}")
        for conv in convs:
            _check_centred(conv)
        stride = _stride(conv1) * _stride(conv2)
        if shortcut is not None and _stride(shortcut) != stride:
            raise BnnccError(f"node '{shortcut.name}' (Conv): shortcut stride {_stride(shortcut)}, block stride {stride}")
        self.visit(*convs, *relus, shortcut, add, out_relu)
        new_stage = shortcut is not None or not stages
        w1, w_last = _weight(conv1), _weight(convs[-1])
        common = dict(
            stage=len(stages) - (0 if new_stage else 1),
            index=0 if new_stage else len(stages[-1]),
            convs=tuple(c.name for c in convs),
            shortcut=shortcut.name if shortcut else None,
            add=add.name,
            out_relu=out_relu.name,
            input=x.name,
            in_channels=w1.shape[1],
            mid_channels=w1.shape[0],
            out_channels=w_last.shape[0],
            stride=stride,
            in_size=_size(x),
            out_size=_size(out_relu.outputs[0]),
        )
        if len(convs) == 2:
            return BasicBlock(relu=relu1.name, **common)
        return Bottleneck(relus=tuple(r.name for r in relus), stride_on_3x3=_stride(conv1) == 1, **common)

    def head(self, x: ir.Value) -> Head:
        pool = self.users(x)[0]
        after = self.users(pool.outputs[0])
        flatten = after[0] if len(after) == 1 and after[0].op_type == "Flatten" else None
        # axis 0 (or -4) flattens the whole batch into one row: an exported batch of one gave the same
        # logits, but the canonical model's batch is N, and a batch of two failed in the Gemm
        if flatten is not None and int_attr(flatten, "axis", 1) % 4 != 1:
            raise BnnccError(f"node '{flatten.name}' (Flatten): axis {int_attr(flatten, 'axis', 1)}; the classifier "
                             "takes each image's features (axis 1)")
        fc = self.only_user(flatten or pool, "Gemm", "the classifier Gemm")
        if not fc.outputs[0].is_graph_output():
            found = ", ".join(f"{u.op_type} '{u.name}'" for u in self.users(fc.outputs[0])) or "nothing"
            raise BnnccError(f"node '{fc.name}' (Gemm): expected the classifier to produce the graph output, found "
                             f"{found} after it (bnncc takes a head that ends in its one Linear layer)")
        self.visit(pool, flatten, fc)
        weight = _weight(fc)
        return Head(pool.name, flatten.name if flatten else None, fc.name, weight.shape[1], weight.shape[0])

    def check_all_visited(self) -> None:
        for name in self.dag.nodes:
            if name not in self.visited:
                node = self.node(name)
                raise BnnccError(f"node '{name}' ({node.op_type}): not part of the ResNet's stem, blocks or head")

    def _feeds(self, node: ir.Node, op_type: str) -> bool:
        """Whether ``node``'s output goes to exactly one node, of ``op_type``."""
        users = self.users(node.outputs[0])
        return len(users) == 1 and users[0].op_type == op_type


def _weight(node: ir.Node):
    weight = const_array(node.inputs[1])
    if weight is None:
        raise BnnccError(f"node '{node.name}' ({node.op_type}): expected a constant weight")
    return weight


def _kernel(conv: ir.Node) -> tuple[int, ...]:
    return tuple(_weight(conv).shape[2:])


def _stride(conv: ir.Node) -> int:
    strides = list(ints_attr(conv, "strides", (1, 1)))
    if len(set(strides)) != 1:
        raise BnnccError(f"node '{conv.name}' (Conv): expected equal strides along H and W, got {strides}")
    return strides[0]


def _check_centred(conv: ir.Node) -> None:
    """A block conv pads as torch's (k // 2 each side) or as TF's SAME, the binary conv's that takes
    its place: any other padding puts its window elsewhere (a ZeroPad2d((2, 0, 2, 0)) before a 3x3
    conv was taken, and the PokeBNN student then no longer lined up with its teacher)."""
    kernel, stride, size = _kernel(conv), _stride(conv), _size(conv.inputs[0])
    auto_pad = conv.attributes["auto_pad"].as_string() if "auto_pad" in conv.attributes else "NOTSET"
    same = [same_pads(n, k, stride) for n, k in zip(size, kernel)]
    same = (same[0][0], same[1][0], same[0][1], same[1][1])
    pads = {"NOTSET": tuple(ints_attr(conv, "pads", (0, 0, 0, 0))), "VALID": (0, 0, 0, 0),
            "SAME_UPPER": same}.get(auto_pad)
    if pads not in (tuple(k // 2 for k in kernel) * 2, same):
        found = f"auto_pad {auto_pad}" if pads is None else f"pads {list(pads)}"
        raise BnnccError(f"node '{conv.name}' (Conv): {found}; a block's conv pads {list(kernel)[0] // 2} each side "
                         f"(torch) or as TF's SAME (the binary conv that replaces it): {list(same)}")


def _size(value: ir.Value) -> tuple[int, int]:
    dims = static_dims(value)
    return (dims[2], dims[3])
