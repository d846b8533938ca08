"""The front end on whole models: recognition, semantics of canonicalization, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from onnx import helper

from bnncc import zoo
from bnncc.errors import BnnccError
from bnncc.frontend import load, recognize
from bnncc.passes.set_opset import STABLE_OPS

# torchvision ResNet-50 v1.5, by hand: (in, mid, out, stride) of the 16 bottlenecks.
RESNET50_BLOCKS = (
    [(64, 64, 256, 1)] + [(256, 64, 256, 1)] * 2
    + [(256, 128, 512, 2)] + [(512, 128, 512, 1)] * 3
    + [(512, 256, 1024, 2)] + [(1024, 256, 1024, 1)] * 5
    + [(1024, 512, 2048, 2)] + [(2048, 512, 2048, 1)] * 2
)
KINDS = ("legacy", "dynamo", "light")


def _run(model: onnx.ModelProto | ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_finds_the_16_bottlenecks(cli, resnet50_onnx, kind):
    code, out, err = cli("inspect", resnet50_onnx[kind], "--json")
    assert code == 0, err
    structure = json.loads(out)
    blocks = [b for stage in structure["stages"] for b in stage]
    found = [(b["in_channels"], b["mid_channels"], b["out_channels"], b["stride"]) for b in blocks]
    assert found == RESNET50_BLOCKS
    assert [len(stage) for stage in structure["stages"]] == [3, 4, 6, 3]
    assert [b["shortcut"] is not None for b in blocks] == [i in (0, 3, 7, 13) for i in range(16)]
    assert structure["stem"]["out_channels"] == 64 and structure["stem"]["out_size"] == [56, 56]
    assert structure["stem"]["stride"] == 4
    assert blocks[-1]["out_size"] == [7, 7]
    assert structure["head"]["in_features"] == 2048 and structure["head"]["num_classes"] == 1000
    assert all(b["stride_on_3x3"] for b in blocks)


def test_inspect_table_lists_stem_blocks_and_head(cli, resnet50_onnx):
    code, out, _ = cli("inspect", resnet50_onnx["legacy"])
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 1 + 16 + 1
    assert "stem" in rows[0] and "head" in rows[-1]
    assert sum("projection" in r for r in rows) == 4
    assert [cell.strip() for cell in rows[0].split("│")][7:9] == ["4", "56x56"]  # stride, size


@pytest.mark.parametrize("pool_stride, size, stride, out", [(1, 64, "2", "32x32"), (2, 17, "4", "5x5")])
def test_inspect_gives_the_stems_stride(cli, tmp_path, pool_stride, size, stride, out):
    """A max pool of stride 1 (accepted where a PokeInit window matches) was shown as stride 4, and
    an odd input size's stride taken from the sizes as 3."""
    net = zoo.resnet18(width=0.25, num_classes=10)
    net.maxpool = torch.nn.MaxPool2d(3, stride=pool_stride, padding=1)
    code, text, err = cli("inspect", zoo.export_onnx(net, tmp_path / "r18.onnx", input_size=size))
    assert code == 0, err
    stem = next(line for line in text.splitlines() if "stem" in line)
    assert [cell.strip() for cell in stem.split("│")][7:9] == [stride, out]


@pytest.mark.parametrize("kind", KINDS)
def test_canonical_model_computes_the_same(resnet50_onnx, kind):
    path = resnet50_onnx[kind]
    original = onnx.load(str(path))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    expected = _run(original, x)
    got = _run(load(path), x)
    if kind == "light":  # its output Softmax is stripped: the canonical model returns logits
        got = np.exp(got - got.max(axis=1, keepdims=True))
        got /= got.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("kind", KINDS)
def test_load_gives_the_canonical_form(resnet50_onnx, kind):
    model = load(resnet50_onnx[kind])
    graph = model.graph
    assert model.opset_imports[""] == 18
    assert model.ir_version >= 8  # light_resnet50 comes as IR 3, where every initializer must be an input
    onnx.checker.check_model(ir.to_proto(model))
    assert {n.op_type for n in graph} == STABLE_OPS
    assert all(len(n.inputs) == 3 and n.inputs[2].is_initializer() for n in graph if n.op_type == "Conv")
    names = [n.name for n in graph]
    assert len(set(names)) == len(names) and all(names)
    assert len(graph.inputs) == 1 and len(graph.outputs) == 1
    assert all(v.shape is not None for n in graph for v in n.outputs)
    gemm = next(n for n in graph if n.op_type == "Gemm")
    assert gemm.attributes["transB"].as_int() == 1 and gemm.inputs[1].const_value.shape == (1000, 2048)
    # exported at batch 1 (symbolic for dynamo), the canonical model takes any batch
    assert all(v.shape[0] == ir.SymbolicDim("N") for v in (*graph.inputs, *graph.outputs)) or kind == "dynamo"
    assert not isinstance(graph.inputs[0].shape[0], int)


def test_narrow_resnet101_is_accepted_with_23_blocks_in_stage_3(tmp_path):
    path = zoo.export_onnx(zoo.resnet101(width=0.25, num_classes=10), tmp_path / "r101.onnx", input_size=64)
    resnet = recognize(load(path))
    assert [len(s) for s in resnet.stages] == [3, 4, 23, 3]
    assert [(b.in_channels, b.out_channels) for b in resnet.stages[2][:2]] == [(128, 256), (256, 256)]
    assert resnet.head.num_classes == 10


def test_a_block_conv_padded_off_centre_is_refused(tmp_path, cli):
    """A ZeroPad2d((2, 0, 2, 0)) before a 3x3 conv folded into its pads and the block was taken: the
    binary conv that replaces it pads as TF's SAME, so the student no longer lined up with its teacher."""
    net = zoo.resnet50(width=0.125, num_classes=10)
    conv = net.layer3[1].conv2
    net.layer3[1].conv2 = torch.nn.Sequential(torch.nn.ZeroPad2d((2, 0, 2, 0)),
                                              torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, bias=False))
    path = zoo.export_onnx(net, tmp_path / "off_centre.onnx", input_size=64)
    _expect_refusal(cli, path, "(Conv): pads [2, 2, 0, 0]; a block's conv pads 1 each side (torch) or as TF's SAME "
                               "(the binary conv that replaces it): [1, 1, 1, 1]")


def _keras_form(proto: onnx.ModelProto, head: str) -> onnx.ModelProto:
    """``proto`` (a torch export at opset 18) as tf2onnx writes a Keras ResNet: an NHWC input
    transposed to NCHW, zero Pads before the stem conv and the max pool in place of their own
    padding, and the head's mean as GlobalAveragePool -> Squeeze (``head="squeeze"``) or as a
    Transpose to NHWC -> ReduceMean over H and W (``head="nhwc"``)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    x = graph.input[0]
    n, c, h, w = (d.dim_value or d.dim_param for d in x.type.tensor_type.shape.dim)
    nodes = [helper.make_node("Transpose", ["nhwc"], [x.name], perm=[0, 3, 1, 2])]
    graph.input[0].CopyFrom(helper.make_tensor_value_info("nhwc", onnx.TensorProto.FLOAT, [n, h, w, c]))
    for node in graph.node:
        pads = next((list(a.ints) for a in node.attribute if a.name == "pads"), None)
        if node.op_type in ("Conv", "MaxPool") and pads and not any(n.op_type == "MaxPool" for n in graph.node[
                : list(graph.node).index(node)]):  # the stem's conv and pool
            name = f"{node.name}_pads"
            graph.initializer.append(onnx.numpy_helper.from_array(np.array([0, 0, *pads[:2], 0, 0, *pads[2:]]), name))
            nodes.append(helper.make_node("Pad", [node.input[0], name], [f"{node.name}_padded"]))
            node.input[0] = f"{node.name}_padded"
            next(a for a in node.attribute if a.name == "pads").ints[:] = [0, 0, 0, 0]
        if node.op_type == "GlobalAveragePool" and head == "nhwc":
            graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, 2]), "hw"))
            nodes.append(helper.make_node("Transpose", [node.input[0]], ["to_nhwc"], perm=[0, 2, 3, 1]))
            node = helper.make_node("ReduceMean", ["to_nhwc", "hw"], [node.output[0]], keepdims=0)
        if node.op_type == "Flatten" and head == "nhwc":
            node = helper.make_node("Identity", node.input, node.output)
        if node.op_type == "Flatten" and head == "squeeze":
            graph.initializer.append(onnx.numpy_helper.from_array(np.array([2, 3]), "unit_axes"))
            node = helper.make_node("Squeeze", [node.input[0], "unit_axes"], node.output)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("head", ["squeeze", "nhwc"])
def test_a_keras_resnet_from_tf2onnx_is_accepted_and_computes_the_same(tmp_path, head):
    """tf2onnx's forms of Keras' ResNet50 (ZeroPadding2D, an NHWC input, its mean before the
    classifier) canonicalize to the torch export's structure; the NCHW input takes the same image."""
    torch_path = zoo.export_onnx(zoo.resnet50(width=0.125, num_classes=10), tmp_path / "torch.onnx", input_size=32,
                                 batch="symbolic", opset=18)
    keras = _keras_form(onnx.load(str(torch_path)), head)
    assert [node.op_type for node in keras.graph.node].count("Pad") == 2
    onnx.save(keras, tmp_path / "keras.onnx")
    model = load(tmp_path / "keras.onnx")
    resnet, reference = recognize(model), recognize(load(torch_path))
    assert (resnet.stem, resnet.stages) == (reference.stem, reference.stages)
    assert (resnet.head.in_features, resnet.head.num_classes) == (2048 // 8, 10)
    assert resnet.notes[0] == "input 'nhwc' is NHWC in the file; bnncc takes it as NCHW"
    assert {n.op_type for n in model.graph} == STABLE_OPS
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    expected = _run(keras, x)
    got = _run(model, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("setting", ["channels_last", "unoptimized", "unoptimized_opset_28"])
def test_dynamo_exports_of_other_settings_are_accepted_and_compute_the_same(tmp_path, setting):
    """channels_last: the flatten comes as Reshape -> Gather -> Reshape; optimize=False: each conv's
    zero bias is computed in the graph (Shape, Expand, CastLike); at opset 28 those are their newest
    versions (torch converts to it with onnx's version converter)."""
    module = zoo.resnet50(width=0.125, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    if setting == "channels_last":
        module, x = module.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    opset = 28 if setting.endswith("opset_28") else None
    torch.onnx.export(module, (x,), tmp_path / "m.onnx", dynamo=True, optimize=setting == "channels_last",
                      opset_version=opset)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert ("Gather" if setting == "channels_last" else "CastLike") in {n.op_type for n in proto.graph.node}
    assert opset is None or [o.version for o in proto.opset_import if o.domain == ""] == [opset]
    model = load(tmp_path / "m.onnx")
    assert [len(stage) for stage in recognize(model).stages] == [3, 4, 6, 3]
    x = x.contiguous().numpy()
    np.testing.assert_allclose(_run(model, x), _run(proto, x), rtol=1e-4, atol=1e-5)


def test_a_dynamo_channels_last_flatten_of_a_dynamic_batch_is_named_so(tmp_path):
    """Its indices are computed from Range(0, N); the refusal named the chain's Mul as a squeeze-excite product."""
    module = zoo.resnet50(width=0.125, num_classes=10).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)  # (at 32 px the last map is 1x1: contiguous)
    torch.onnx.export(module, (x,), tmp_path / "m.onnx", dynamo=True,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
    with pytest.raises(BnnccError, match=r"node '[^']*' \(Range\): indices computed from the batch size at run "
                                         r"time, as torch's dynamo exporter writes a channels_last model's flatten"):
        load(tmp_path / "m.onnx")


@pytest.fixture(scope="module")
def opset7_path(tmp_path_factory):
    """A narrow ResNet-50 exported at opset 7, where torch keeps its batch norms (it folds them from 9)."""
    path = tmp_path_factory.mktemp("opset7") / "m7.onnx"
    zoo.export_onnx(zoo.resnet50(width=0.125, num_classes=10), path, input_size=32, opset=7)
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(path)).graph.node}
    return path


@pytest.mark.parametrize("opset, bare", [(7, False), (6, True), (3, True)])
def test_a_model_of_an_opset_before_9_is_converted_and_computes_the_same(tmp_path, opset7_path, opset, bare):
    """The ONNX model zoo's ResNets are opsets 3 to 7 (its MXNet ones opset 7 with batch norms): onnx's
    version converter brings them to opset 9, and an import note says so. They used to be refused.
    ``bare``: a symbolic batch and no value_info (Caffe2's exporter wrote none), with which the
    converter's broadcast adapters (opsets 6 to 7) found no shapes."""
    proto = onnx.load(str(opset7_path))
    older = onnx.version_converter.convert_version(proto, opset)
    if bare:
        older.graph.ClearField("value_info")
        for value in (older.graph.input[0], older.graph.output[0]):
            value.type.tensor_type.shape.dim[0].dim_param = "N"
    path = tmp_path / f"m{opset}.onnx"
    onnx.save(older, path)
    model = load(path)
    assert recognize(model).notes[0] == f"converted from opset {opset} to 9 by onnx's version converter"
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _run(proto, x), rtol=1e-4, atol=1e-5)



def _dropout_before_classifier(path, inputs=(), initializers=(), **attributes) -> onnx.ModelProto:
    """The model at ``path`` with a Dropout named 'drop' (its mask an output nothing reads) before its Gemm."""
    proto = onnx.load(str(path))
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    dropout = helper.make_node("Dropout", [gemm.input[0], *inputs], ["dropped", "mask"], name="drop", **attributes)
    gemm.input[0] = "dropped"
    proto.graph.node.insert(list(proto.graph.node).index(gemm), dropout)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(value, name) for name, value in initializers)
    return proto


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_a_dropout_out_of_training_is_read_as_the_identity_it_is(cli, tmp_path, opset):
    """The model zoo's and older exporters' Dropout before the classifier (opsets 9 to 11, where it
    has a ratio attribute and no training mode) was refused as an unsupported op; from opset 12 its
    training_mode input, absent or false, says it passes its input through."""
    path = zoo.export_onnx(zoo.resnet50(0.125, num_classes=10), tmp_path / "r.onnx", input_size=32, opset=opset)
    if opset < 12:
        proto = _dropout_before_classifier(path, ratio=0.5)
    else:
        proto = _dropout_before_classifier(path, ["ratio", "training_mode"], [
            ("ratio", np.array(0.5, np.float32)), ("training_mode", np.array(False))])
    onnx.save(proto, tmp_path / "dropout.onnx")
    model = load(tmp_path / "dropout.onnx")
    assert "Dropout" not in {n.op_type for n in model.graph} and len(recognize(model).blocks) == 16
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    expected = np.concatenate([_run(proto, x[i:i + 1]) for i in range(2)])  # exported at batch 1
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-5, atol=1e-6)
    assert cli("inspect", tmp_path / "dropout.onnx")[0] == 0


def test_a_clip_of_min_0_is_read_as_the_relu_it_is(tmp_path, tiny_proto):
    """torch's clamp(min=0) in place of each ReLU: it was refused as "an activation other than Relu"."""
    model = onnx.ModelProto()
    model.CopyFrom(tiny_proto)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.float32), "zero"))
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Clip"
            node.input.append("zero")
    onnx.save(model, tmp_path / "clamp.onnx")
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    loaded = load(tmp_path / "clamp.onnx")
    assert "Clip" not in {node.op_type for node in loaded.graph}
    np.testing.assert_allclose(_run(loaded, x), _run(model, x), rtol=1e-4, atol=1e-4)


def test_a_dropout_in_training_mode_is_named_so(cli, tmp_path):
    path = zoo.export_onnx(zoo.resnet50(0.125, num_classes=10), tmp_path / "r.onnx", input_size=32, opset=13)
    proto = _dropout_before_classifier(path, ["ratio", "training_mode"], [
        ("ratio", np.array(0.5, np.float32)), ("training_mode", np.array(True))])
    onnx.save(proto, tmp_path / "dropout.onnx")
    _expect_refusal(cli, tmp_path / "dropout.onnx", "node 'drop' (Dropout): a dropout in training mode")

def _spatial_0(proto, shape=None):
    """The first batch norm marked spatial=0, its parameters reshaped to ``shape``; its name."""
    norm = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    norm.attribute.append(helper.make_attribute("spatial", 0))
    for tensor in proto.graph.initializer:
        if shape is not None and tensor.name in norm.input[1:5]:
            del tensor.dims[:]
            tensor.dims.extend(shape)
    return norm.name


def test_a_per_channel_spatial_0_batch_norm_is_read_as_onnxruntime_reads_it(tmp_path, opset7_path):
    """MXNet's exporter wrote spatial=0 with one parameter a channel until 2020 (the model zoo's
    files before they were regenerated); onnxruntime normalizes per channel."""
    proto = onnx.load(str(opset7_path))
    name = _spatial_0(proto)
    onnx.save(proto, tmp_path / "spatial0.onnx")
    model = load(tmp_path / "spatial0.onnx")
    assert recognize(model).notes[1] == ("1 batch norm(s) of spatial=0 with one parameter a channel read as "
                                         f"spatial=1 (as onnxruntime does), the first '{name}'")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _run(proto, x), rtol=1e-4, atol=1e-5)


def _computed_weights(path, shape=None) -> tuple[onnx.ModelProto, onnx.NodeProto]:
    """ResNet-50 at 0.125x whose fourth conv's weights are reshaped (to ``shape``, default their own)
    by a shape behind an Identity, as timm's BiT export has them, which ONNX's shape inference does
    not read."""
    proto = onnx.load(str(zoo.export_onnx(zoo.resnet50(0.125, num_classes=10), path, input_size=32)))
    conv = [n for n in proto.graph.node if n.op_type == "Conv"][3]
    init = next(t for t in proto.graph.initializer if t.name == conv.input[1])
    weights = onnx.numpy_helper.to_array(init)
    proto.graph.initializer.remove(init)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(weights.reshape(-1), "flat"),
                                    onnx.numpy_helper.from_array(np.array(shape or weights.shape, np.int64), "shape")])
    nodes = [helper.make_node("Identity", ["shape"], ["shape_copy"]),
             helper.make_node("Reshape", ["flat", "shape_copy"], [conv.input[1]]), *proto.graph.node]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto, conv


def test_conv_weights_computed_from_constants_are_read(tmp_path):
    """The shape check multiplied the unknown dims of such weights ('unexpected TypeError')."""
    proto, _ = _computed_weights(tmp_path / "r.onnx")
    onnx.save(proto, tmp_path / "computed.onnx")
    model = load(tmp_path / "computed.onnx")
    assert len(recognize(model).blocks) == 16
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _run(proto, x), rtol=1e-4, atol=1e-5)


def test_conv_weights_computed_for_other_channels_are_refused_once_folded(cli, tmp_path):
    """Left unchecked where their dims were unknown, they went unchecked after folding too."""
    proto, conv = _computed_weights(tmp_path / "r.onnx", shape=(32, 4, 1, 2))  # (32, 8, 1, 1) rearranged
    onnx.save(proto, tmp_path / "computed.onnx")
    _expect_refusal(cli, tmp_path / "computed.onnx",
                    f"'{conv.name}' (Conv): weights of shape [32, 4, 1, 2] in 1 group(s) for a 8-channel input")


def test_a_per_activation_batch_norm_of_an_old_opset_is_named(cli, tmp_path, opset7_path):
    """spatial=0 with parameters of another shape normalizes each activation on its own; the
    converter refuses it without naming the node."""
    proto = onnx.load(str(opset7_path))
    channels = next(t for t in proto.graph.initializer if t.name.endswith("bn1.weight")).dims[0]
    name = _spatial_0(proto, (channels, 1, 1))
    onnx.save(proto, tmp_path / "m7.onnx")
    _expect_refusal(cli, tmp_path / "m7.onnx", f"BatchNormalization '{name}': spatial=0 (statistics per activation")


@pytest.mark.parametrize("opset", [7, 13])
def test_a_batch_norm_naming_its_statistics_outputs_is_in_training_mode(cli, tmp_path, opset7_path, opset):
    """Before opset 14 a batch norm with its running statistics outputs named is in training mode
    (onnxruntime normalizes with the batch's statistics); it was folded with the running ones."""
    proto = onnx.version_converter.convert_version(onnx.load(str(opset7_path)), opset)
    norm = [n for n in proto.graph.node if n.op_type == "BatchNormalization"][2]
    norm.output.extend(["mean", "var", "saved_mean", "saved_var"])
    onnx.save(proto, tmp_path / "training.onnx")
    _expect_refusal(cli, tmp_path / "training.onnx", f"'{norm.name}' (BatchNormalization): a batch norm that folds "
                                                     "into no conv: it must follow a Conv and run in inference mode")


def test_a_type_clash_in_an_old_opset_model_is_one_line(cli, tmp_path, opset7_path):
    """The converter's shape inference raised an InferenceError, not its RuntimeError: 'unexpected'."""
    proto = onnx.load(str(opset7_path))
    weight = proto.graph.node[0].input[1]  # an initializer listed as a graph input (IR version 3)
    next(v for v in proto.graph.input if v.name == weight).type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(proto, tmp_path / "clash.onnx")
    _expect_refusal(cli, tmp_path / "clash.onnx", "cannot convert opset 7 to 9: [TypeInferenceError]")


def test_opsets_the_graph_does_not_use_are_dropped(tmp_path, tiny_proto):
    """onnxruntime's optimized models import ai.onnx.ml 5, which bnncc's own functions import at 3:
    kept, it made the rewritten graph invalid after inspect and ace had taken the model."""
    from bnncc.rewriting import rewrite

    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    proto.opset_import.extend([helper.make_opsetid("ai.onnx.ml", 5), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(proto, tmp_path / "imports.onnx")
    model = load(tmp_path / "imports.onnx")
    assert dict(model.opset_imports) == {"": 18}
    poke, _ = rewrite(model, "pokebnn_1x", ["passes.poke_stem.mid_channels=8"])
    onnx.checker.check_model(ir.to_proto(poke), full_check=True)


@pytest.mark.slow
def test_a_model_over_protobufs_2_gib_is_one_line(cli, tmp_path, tiny_proto):
    """An unused 2.2 GB external tensor: the checker's serialization failed, 'unexpected EncodeError'."""
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    huge = onnx.TensorProto(name="huge", data_type=onnx.TensorProto.FLOAT, dims=[550_000_000])
    huge.data_location = onnx.TensorProto.EXTERNAL
    huge.external_data.add(key="location", value="huge.bin")
    proto.graph.initializer.append(huge)
    onnx.save(proto, tmp_path / "big.onnx")
    with open(tmp_path / "huge.bin", "wb") as f:  # sparse: no disk taken, 2.2 GB in memory once read
        f.truncate(2_200_000_000)
    _expect_refusal(cli, tmp_path / "big.onnx", "2.1 GiB with its external data, over the 2 GiB of a protobuf message")


def test_a_model_file_over_protobufs_2_gib_is_not_read(cli, tmp_path):
    """A sparse model file of 1 TiB was read whole before protobuf could refuse it: 'unexpected MemoryError'."""
    with open(tmp_path / "huge.onnx", "wb") as f:  # no disk taken
        f.truncate(2**40)
    _expect_refusal(cli, tmp_path / "huge.onnx", "1024.0 GiB with its external data, over the 2 GiB of a protobuf")


@pytest.mark.parametrize("where", ["graph", "branch"])
def test_external_data_is_measured_before_it_is_read(cli, tmp_path, tiny_proto, where):
    """A bias whose external data, named without a length, is a sparse file of 1 TiB: onnx reads to the
    end of the file, and the run ended in 'unexpected MemoryError' (or took what memory the host had).
    onnx reads the tensors of an If's branches too, which were not looked at."""
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    tensor = proto.graph.initializer[-1]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="bias.bin")
    if where == "branch":  # the tensor moved into a branch of an If the graph holds
        proto.graph.initializer.remove(tensor)
        branch = helper.make_graph([], "branch", [], [helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                                     tensor.dims)], [tensor])
        empty = helper.make_graph([], "empty", [], [])
        proto.graph.node.append(helper.make_node("If", ["cond"], ["chosen"], then_branch=branch, else_branch=empty))
    onnx.save(proto, tmp_path / "sparse.onnx")
    with open(tmp_path / "bias.bin", "wb") as f:  # no disk taken
        f.truncate(2**40)
    _expect_refusal(cli, tmp_path / "sparse.onnx", "1024.0 GiB with its external data, over the 2 GiB of a protobuf")


def test_the_default_domain_by_its_other_name_is_read(tmp_path, tiny_proto):
    """"ai.onnx" is the default domain too: a model importing only it failed shape inference after the
    canonical passes ("No opset import for domain ''")."""
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    for item in (*proto.opset_import, *proto.graph.node):
        item.domain = "ai.onnx"
    onnx.save(proto, tmp_path / "named.onnx")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(load(tmp_path / "named.onnx"), x), _run(tiny_proto, x), rtol=1e-4, atol=1e-5)


def test_nodes_out_of_topological_order_are_read(tmp_path, tiny_proto):
    """Graph-editing tools and onnxruntime's float16 converter write nodes in other orders, and
    onnxruntime runs them; the onnx checker refused them ("Nodes in a graph must be topologically sorted")."""
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(nodes))
    onnx.save(proto, tmp_path / "reversed.onnx")
    model = load(tmp_path / "reversed.onnx")
    assert len(recognize(model).stages[0]) == 3
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _run(proto, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_run(model, x), _run(tiny_proto, x), rtol=1e-4, atol=1e-5)


def test_a_cycle_is_refused_naming_a_node_on_it(cli, tmp_path, tiny_proto):
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    proto.graph.node[0].input[0] = proto.graph.node[3].output[0]  # the stem conv reads a later node's output
    onnx.save(proto, tmp_path / "cycle.onnx")
    on_cycle = {node.name for node in proto.graph.node[:4]}
    _expect_refusal(cli, tmp_path / "cycle.onnx", "is on a cycle")
    _, _, err = cli("inspect", tmp_path / "cycle.onnx")
    assert any(f"node {name!r}" in err for name in on_cycle)


def test_modules_exported_as_functions_are_inlined(tmp_path):
    """torch's export_modules_as_functions writes each Bottleneck as a function of the model's own."""
    module = zoo.resnet50(width=0.125, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.onnx.export(module, (x,), tmp_path / "functions.onnx", dynamo=False, opset_version=18,
                      export_modules_as_functions={Bottleneck})
    proto = onnx.load(str(tmp_path / "functions.onnx"))
    assert len(proto.functions) > 0 and any(node.op_type == "Bottleneck" for node in proto.graph.node)
    model = load(tmp_path / "functions.onnx")
    assert len(recognize(model).stages[0]) == 3 and not model.functions
    np.testing.assert_allclose(_run(model, x.numpy()), _run(proto, x.numpy()), rtol=1e-4, atol=1e-5)


def test_stored_bytes_count_the_external_data(tmp_path, tiny_proto):
    from bnncc.frontend import stored_bytes

    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)  # saving it as external data changes the proto
    onnx.save(proto, tmp_path / "inline.onnx")
    onnx.save(proto, tmp_path / "split.onnx", save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=0)
    pieces = [p for p in tmp_path.iterdir() if p.name not in ("inline.onnx", "split.onnx")]
    assert len(pieces) > 10
    assert stored_bytes(tmp_path / "split.onnx") == sum(p.stat().st_size for p in [tmp_path / "split.onnx", *pieces])
    assert stored_bytes(tmp_path / "inline.onnx") == (tmp_path / "inline.onnx").stat().st_size


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line naming the problem, no traceback, nothing written.


@pytest.fixture(scope="module")
def tiny_proto(tmp_path_factory) -> onnx.ModelProto:
    """A narrow ResNet-50 at 32x32, legacy export (small enough to corrupt and rewrite)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    zoo.export_onnx(zoo.resnet50(width=0.125, num_classes=10), path, input_size=32)
    return onnx.load(str(path))


def _expect_refusal(cli, path, *fragments: str) -> None:
    before = sorted(os.listdir(os.path.dirname(path)))
    code, out, err = cli("inspect", path)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err
    for fragment in fragments:
        assert fragment in err
    assert sorted(os.listdir(os.path.dirname(path))) == before


def test_missing_file(cli, tmp_path):
    _expect_refusal(cli, tmp_path / "nope.onnx", "no such file")


def test_a_path_is_printed_as_it_is_on_one_line(cli, tmp_path):
    """"[bold]" in a file name was taken for console markup and left out of the message, and a
    newline in one split the error in two."""
    (tmp_path / "bad[bold].onnx").write_bytes(b"junk")
    _expect_refusal(cli, tmp_path / "bad[bold].onnx", "not an ONNX model")
    (tmp_path / "two\nlines.onnx").write_bytes(b"junk")
    code, _, err = cli("inspect", tmp_path / "two\nlines.onnx")
    assert code == 2 and err == f"error: {tmp_path}/two\\nlines.onnx: not an ONNX model (truncated or not protobuf)\n"
    # an ESC (the start of a terminal's escape sequences) and a line separator reached the terminal as they were
    (tmp_path / "esc\x1b[2J\u2028.onnx").write_bytes(b"junk")
    code, _, err = cli("inspect", tmp_path / "esc\x1b[2J\u2028.onnx")
    assert code == 2 and err == (f"error: {tmp_path}/esc\\x1b[2J\\u2028.onnx: not an ONNX model (truncated or "
                                 f"not protobuf)\n")


def test_empty_file(cli, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    _expect_refusal(cli, tmp_path / "empty.onnx", "empty file")


def test_truncated_file(cli, tmp_path, tiny_proto):
    data = tiny_proto.SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    _expect_refusal(cli, tmp_path / "cut.onnx", "not an ONNX model")


def test_a_folder_or_a_fifo_is_not_a_model(cli, tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    _expect_refusal(cli, tmp_path / "dir.onnx", "a folder, not an ONNX model")
    os.mkfifo(tmp_path / "pipe.onnx")
    _expect_refusal(cli, tmp_path / "pipe.onnx", "not a regular file, not an ONNX model")


def test_a_checker_failure_names_its_node_on_the_one_line(cli, tmp_path, tiny_proto):
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    node = proto.graph.node[3]
    node.input[0] = "nowhere"
    onnx.save(proto, tmp_path / "dangling.onnx")
    _expect_refusal(cli, tmp_path / "dangling.onnx", "input 'nowhere'", f"name: {node.name} OpType: {node.op_type}")


@pytest.mark.parametrize("change", ["kernel_shape", "relu6"])
def test_a_node_without_a_name_is_named_by_its_output(cli, tmp_path, tiny_proto, change):
    """A graph of unnamed nodes: refusals named them '' (a conv's attributes, checked as read) or by a
    name made up later ('Clip', an activation found once canonical)."""
    model = onnx.ModelProto()
    model.CopyFrom(tiny_proto)
    for node in model.graph.node:
        node.name = ""
    if change == "kernel_shape":
        node = next(n for n in model.graph.node if n.op_type == "Conv")
        next(a for a in node.attribute if a.name == "kernel_shape").ints[:] = [5, 5]
    else:
        node = [n for n in model.graph.node if n.op_type == "Relu"][2]
        node.op_type = "Clip"
        model.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(v, np.float32), f"clip_{v}")
                                        for v in (0, 6)])
        node.input.extend(["clip_0", "clip_6"])
    onnx.save(model, tmp_path / "unnamed.onnx")
    _expect_refusal(cli, tmp_path / "unnamed.onnx", f"node '{node.output[0]}' ({node.op_type})")


def test_a_pokebnn_graph_is_not_a_float_resnet(cli, tmp_path, tiny_proto):
    from bnncc.rewriting import rewrite

    (tmp_path / "float").mkdir()
    onnx.save(tiny_proto, tmp_path / "float" / "tiny.onnx")
    poke, _ = rewrite(load(tmp_path / "float" / "tiny.onnx"), "pokebnn_1x", ["passes.poke_stem.mid_channels=8"])
    ir.save(poke, tmp_path / "poke.onnx")
    _expect_refusal(cli, tmp_path / "poke.onnx", "a PokeBNN graph (ai.bnncc ops), where a float ResNet is expected")


def test_text_file(cli, tmp_path):
    (tmp_path / "notes.onnx").write_text("this is not a model\n")
    _expect_refusal(cli, tmp_path / "notes.onnx", "not an ONNX model")


@pytest.mark.parametrize("location", ["../stolen.data", "/etc/passwd"])
def test_external_data_outside_the_folder(cli, tmp_path, tiny_proto, location):
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "ext.onnx"
    path.write_bytes(proto.SerializeToString())
    _expect_refusal(cli, path, location, "outside the model's folder")


def _graph_model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _conv_weight(name, cout, cin, k):
    data = np.random.default_rng(1).standard_normal((cout, cin, k, k)).astype(np.float32)
    return onnx.numpy_helper.from_array(data, name)


def _input(name="x", dims=(1, 3, 32, 32)):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(dims))


def _output(dims, name="y"):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(dims))


def test_unsupported_op(cli, tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="stem", kernel_shape=[7, 7], strides=[2, 2], pads=[3] * 4),
        helper.make_node("Floor", ["c"], ["y"], name="round_down"),
    ]
    model = _graph_model(nodes, [_input()], [_output((1, 8, 16, 16))], [_conv_weight("w", 8, 3, 7)])
    onnx.save(model, tmp_path / "floor.onnx")
    _expect_refusal(cli, tmp_path / "floor.onnx", "'round_down'", "Floor", "unsupported op")


def test_a_network_without_its_head_is_named_so(cli, tmp_path):
    """timm's num_classes=0, global_pool='' ends at the last block's Relu: the line ended in
    'found ' and did not say what was missing."""
    features = torch.nn.Sequential(*list(zoo.resnet50(0.125, num_classes=10).children())[:-2])
    path = zoo.export_onnx(features, tmp_path / "features.onnx", input_size=32)
    _expect_refusal(cli, path, "(Relu): expected a block (its first Conv and its shortcut) or the head's global "
                               "average pool after it, found nothing")


def _pre_activation(module):
    module.conv1 = torch.nn.Sequential(torch.nn.BatchNorm2d(3), module.conv1)  # a batch norm before any conv
    return module


def _pooled_shortcut(module):
    projection = module.layer2[0].downsample[0]  # ResNet-D: average pool, then a stride-1 projection
    module.layer2[0].downsample[0] = torch.nn.Sequential(
        torch.nn.AvgPool2d(2), torch.nn.Conv2d(projection.in_channels, projection.out_channels, 1, bias=False))
    return module


def _group_norm(module):
    module.layer1[0].bn2 = torch.nn.GroupNorm(8, module.layer1[0].bn2.num_features)  # timm's resnet50_gn
    return module


def _silu_stem(module):
    module.relu = torch.nn.SiLU()  # x * Sigmoid(x): the Mul was named as an elementwise product
    return module


class _Normalized(torch.nn.Module):
    """The network behind ImageNet's input normalization, as some exports wrap it."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1))

    def forward(self, x):
        return self.module((x - self.mean) / self.std)


class _Shifted(_Normalized):
    """An input shifted by an Add alone (Add is an op a ResNet has, so the op check passes it)."""

    def forward(self, x):
        return self.module(x + self.mean)


@pytest.mark.parametrize("change, op, fragment", [
    (_pre_activation, "BatchNormalization", "a batch norm that folds into no conv: it must follow a Conv"),
    (_pooled_shortcut, "AveragePool", "an average pool that is not the global pool before the classifier"),
    (_Normalized, "Sub", "an input normalization inside the graph: bnncc takes the network from its first conv"),
    (_Shifted, "Add", "an input normalization inside the graph: bnncc takes the network from its first conv"),
    (_group_norm, "InstanceNormalization", "a normalization other than batch norm"),
    (_silu_stem, "Sigmoid", "an activation other than Relu (SiLU, GELU, ReLU6) or a squeeze-excite gate"),
])
def test_an_op_left_where_a_resnet_has_none_is_named_so(cli, tmp_path, change, op, fragment):
    """The list of allowed ops named the refused op among them (timm's resnetv2_50, resnet50d, a
    normalization exported with the network); a group norm was named by its Mul as squeeze-excite."""
    path = zoo.export_onnx(change(zoo.resnet50(0.125, num_classes=10)), tmp_path / "variant.onnx", input_size=32)
    _expect_refusal(cli, path, f"({op}): {fragment}")


def test_a_global_max_pool_exported_by_dynamo_is_named_so(cli, tmp_path):
    """timm's global_pool='max' comes from the dynamo exporter as ReduceMax, which was refused as an
    'unsupported op' with 'pooling' in the list of the ops allowed."""
    module = zoo.resnet50(0.125, num_classes=10)
    module.avgpool = torch.nn.AdaptiveMaxPool2d(1)
    path = zoo.export_onnx(module, tmp_path / "max.onnx", exporter="dynamo", input_size=32)
    _expect_refusal(cli, path, "(ReduceMax): a max reduction, as a global max pool writes it: bnncc reads a head "
                               "that averages over H and W")



class _HeadFlattenedBy(torch.nn.Module):
    """torchvision's ResNet whose head flattens the pooled features f, given the features x before
    the pool, as ``flatten(f, x)``, as hand-written heads do."""

    def __init__(self, module, flatten):
        super().__init__()
        self.module, self.flatten = module, flatten

    def forward(self, x):
        m = self.module
        x = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        return m.fc(self.flatten(m.avgpool(x), x))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_head_squeezing_h_and_w_one_at_a_time_is_read(tmp_path, exporter):
    """Its second Squeeze was refused as 'a squeeze that is not the flatten before the classifier'."""
    module = _HeadFlattenedBy(zoo.resnet50(0.125, num_classes=10), lambda f, x: f.squeeze(-1).squeeze(-1))
    path = zoo.export_onnx(module, tmp_path / "squeezed.onnx", exporter=exporter, input_size=32)
    model = load(path)
    assert recognize(model).head.flatten is not None
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _run(onnx.load(str(path)), x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flatten", [
    lambda f, x: f.view(-1, x.size(1)),
    lambda f, x: f.reshape(f.shape[0], f.shape[1]),
    lambda f, x: f.view(x.size(0), -1),
], ids=["view(-1, x.size(1))", "reshape(f.shape[0], f.shape[1])", "view(x.size(0), -1)"])
def test_a_flatten_to_dimensions_read_at_run_time_is_read(tmp_path, flatten):
    """Exported with a dynamic batch, the sizes are read from the tensors through Shape; they were
    taken only as the flattened tensor's own batch, and the others refused at the Shape."""
    module = _HeadFlattenedBy(zoo.resnet50(0.125, num_classes=10), flatten)
    path = zoo.export_onnx(module, tmp_path / "viewed.onnx", input_size=32, batch="symbolic")
    model = load(path)
    assert recognize(model).head.flatten is not None
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _run(onnx.load(str(path)), x), rtol=1e-4, atol=1e-5)

def _reflected_pool_and_mul_scale(module):
    module.maxpool = torch.nn.Sequential(torch.nn.ReflectionPad2d(1), torch.nn.MaxPool2d(3, 2))  # refused first
    conv = module.layer2[0].conv1
    scale = torch.nn.Parameter(torch.rand(1, conv.in_channels, 1, 1) + 0.5)  # a batch norm as Mul and Add
    module.layer2[0].conv1 = torch.nn.Sequential(_Scale(scale), conv)
    return module


class _Scale(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale + 0.1


def test_an_unfolded_batch_norm_is_named_before_an_earlier_refused_op(cli, tmp_path):
    """A pre-activation network's batch norm (tf2onnx writes Keras' ResNet50V2's as Mul and Add)
    says more than the first op refused in graph order."""
    module = _reflected_pool_and_mul_scale(zoo.resnet50(0.125, num_classes=10))
    path = zoo.export_onnx(module, tmp_path / "variant.onnx", input_size=32)
    _expect_refusal(cli, path, "(Mul): an elementwise product", "pre-activation")
    nodes = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert nodes.index("Pad") < nodes.index("Mul")


def test_a_quantized_model_is_named_so(cli, tmp_path, tiny_proto):
    """A QDQ model (onnxruntime's quantize_static writes them) asks for the float one it came from."""
    model = onnx.ModelProto()
    model.CopyFrom(tiny_proto)
    graph, x = model.graph, model.graph.input[0].name
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array(0.02, np.float32), "scale"),
                              onnx.numpy_helper.from_array(np.array(128, np.uint8), "zero")])
    for node in graph.node:
        node.input[:] = ["dq" if name == x else name for name in node.input]
    graph.node.insert(0, helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"], name="dequantize"))
    graph.node.insert(0, helper.make_node("QuantizeLinear", [x, "scale", "zero"], ["q"], name="quantize"))
    onnx.save(model, tmp_path / "qdq.onnx")
    _expect_refusal(cli, tmp_path / "qdq.onnx", "'quantize' (QuantizeLinear): a quantized model; bnncc takes the "
                                                "float ResNet it was quantized from")



@pytest.mark.parametrize("level, fragment", [
    (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "(com.microsoft:FusedConv): an op of onnxruntime's own"),
    (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "(com.microsoft.nchwc:Conv): an op of onnxruntime's own"),
    (None, "(com.microsoft:DequantizeLinear): a quantized model"),  # its quantizer's contrib QDQ ops
])
def test_a_model_of_onnxruntimes_own_ops_is_named_so(cli, tmp_path, tiny_proto, level, fragment):
    """What onnxruntime's offline optimizer saves above the basic level (SessionOptions.optimized_model_filepath),
    and what its quantizer writes with UseQDQContribOps, were 'unsupported op' at their first node."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    onnx.save(tiny_proto, tmp_path / "float.onnx")
    path = tmp_path / "ort.onnx"
    if level is None:
        images = iter([{"input": np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)}])
        reader = type("Reader", (), {"get_next": lambda self: next(images, None)})()
        quantize_static(tmp_path / "float.onnx", path, reader, quant_format=QuantFormat.QDQ,
                        extra_options={"UseQDQContribOps": True})
    else:
        options = ort.SessionOptions()
        options.graph_optimization_level, options.optimized_model_filepath = level, str(path)
        options.log_severity_level = 3  # its warning that an NCHWc model fits this machine only
        ort.InferenceSession(str(tmp_path / "float.onnx"), options, providers=["CPUExecutionProvider"])
    _expect_refusal(cli, path, fragment, *(("ORT_ENABLE_BASIC",) if level else ()))


@pytest.mark.parametrize("keep_io_types, fragment", [
    (True, "(Cast): a type conversion, as a float16 model that keeps float32 inputs and outputs casts them"),
    (False, "input 'input' (float16, rank 4) must be a float32 NCHW tensor"),
])
def test_a_float16_model_is_named_so(cli, tmp_path, tiny_proto, keep_io_types, fragment):
    """onnxruntime's float16 converter with float32 inputs and outputs casts them to and from float16:
    the first Cast was 'unsupported op'."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = ir.serde.deserialize_model(convert_float_to_float16(tiny_proto, keep_io_types=keep_io_types))
    half.graph.sort()  # the converter appends its Casts after their readers
    ir.save(half, tmp_path / "half.onnx")
    _expect_refusal(cli, tmp_path / "half.onnx", fragment)



@pytest.mark.parametrize("dtype", [onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE],
                         ids=["float16", "bfloat16", "double"])
def test_weights_stored_in_another_float_type_and_cast_are_read(tmp_path, tiny_proto, dtype):
    """Weights kept as float16, bfloat16 or double, each cast to float32 in the graph (a float32 network
    stored at half size): the casts of weights over 8192 elements were left unfolded, and the model refused
    naming a node after them."""
    model = onnx.ModelProto()
    model.CopyFrom(tiny_proto)
    graph, casts = model.graph, []
    for tensor in graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        stored = helper.make_tensor(tensor.name + "_stored", dtype, array.shape, array.astype(np.float64).ravel())
        tensor.CopyFrom(stored)
        casts.append(helper.make_node("Cast", [stored.name], [stored.name[:-len("_stored")]],
                                      name=f"cast_{stored.name}", to=onnx.TensorProto.FLOAT))
    assert max(np.prod(t.dims) for t in graph.initializer) > 8192
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, tmp_path / "cast.onnx")
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(_run(load(tmp_path / "cast.onnx"), x), _run(model, x), rtol=1e-4, atol=1e-4)


def test_an_output_log_softmax_is_dropped(cli, tmp_path):
    """A network trained with NLLLoss ends in log_softmax: it was refused as an unsupported op."""
    module = torch.nn.Sequential(zoo.resnet50(0.125, num_classes=10), torch.nn.LogSoftmax(dim=1))
    path = zoo.export_onnx(module, tmp_path / "log_softmax.onnx", input_size=32)
    model = load(path)
    assert recognize(model).notes[0] == "the output LogSoftmax is dropped: the graph returns logits"
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    logits = _run(model, x)
    log_probs = logits - np.log(np.exp(logits - logits.max()).sum(1, keepdims=True)) - logits.max()
    np.testing.assert_allclose(log_probs, _run(onnx.load(str(path)), x), rtol=1e-4, atol=1e-5)

def test_an_output_softmax_over_the_batch_is_refused(cli, tmp_path, tiny_proto):
    """It was dropped as the classes' softmax is, and the logits then ranked another class first."""
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    gemm.output[0] = "logits_of_the_gemm"
    proto.graph.node.append(helper.make_node("Softmax", ["logits_of_the_gemm"], ["logits"], name="over_batch", axis=0))
    onnx.save(proto, tmp_path / "softmax.onnx")
    _expect_refusal(cli, tmp_path / "softmax.onnx",
                    "node 'over_batch' (Softmax): a softmax that is not over the classes")

def test_plain_cnn_is_not_a_resnet(cli, tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="stem", kernel_shape=[7, 7], strides=[2, 2], pads=[3] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="stem_relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="plain", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"], name="plain_relu"),
        helper.make_node("GlobalAveragePool", ["r2"], ["y"], name="pool"),
    ]
    inits = [_conv_weight("w1", 8, 3, 7), _conv_weight("w2", 8, 8, 3)]
    onnx.save(_graph_model(nodes, [_input()], [_output((1, 8, 1, 1))], inits), tmp_path / "plain.onnx")
    _expect_refusal(cli, tmp_path / "plain.onnx", "'stem_relu'", "expected a block")


def test_dynamic_spatial_size(cli, tmp_path, tiny_proto):
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    onnx.save(proto, tmp_path / "dyn.onnx")
    _expect_refusal(cli, tmp_path / "dyn.onnx", "dynamic spatial size")


def test_dynamic_spatial_size_of_an_nhwc_input(cli, tmp_path, tiny_proto):
    """Keras with a variable image size: (N, H?, W?, 3), transposed to NCHW; H is not a channel count."""
    keras = _keras_form(tiny_proto, "squeeze")
    for axis in (1, 2):
        keras.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = "hw"[axis - 1]
    onnx.save(keras, tmp_path / "dyn.onnx")
    _expect_refusal(cli, tmp_path / "dyn.onnx", "dynamic spatial size (H = h, W = w)",
                    "--input_name nhwc --input_shape 1,224,224,3 dyn.onnx fixed.onnx")


def test_an_inner_tensor_larger_than_the_kernels_take(cli, tmp_path, tiny_proto):
    """A zero padding of 10**5 pixels before the stem folds into its conv: the 32 px input passes
    the input's own size check, the stem's output is 50008x50008 (80 GB of floats a channel set)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    conv = _first_conv(proto)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0, 0, 10**5, 10**5] * 2), "huge"))
    proto.graph.node.insert(0, helper.make_node("Pad", [conv.input[0], "huge"], ["padded"], name="pad"))
    conv.input[0] = "padded"
    onnx.save(proto, tmp_path / "huge.onnx")
    _expect_refusal(cli, tmp_path / "huge.onnx", "node 'pad' (Pad): output 'padded' of shape [1, 3, 200032, 200032]: "
                                                 "at most 33554432 pixels")


def test_two_outputs(cli, tmp_path, tiny_proto):
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    proto.graph.output.append(_output((1, 8, 16, 16), relu.output[0]))
    onnx.save(proto, tmp_path / "two.onnx")
    _expect_refusal(cli, tmp_path / "two.onnx", f"1 inputs ('input') and 2 outputs ('logits', '{relu.output[0]}'); "
                                                "expected one of each")


def _without_weights(proto):
    """torch's export_params=False: every weight a graph input without a value."""
    for tensor in proto.graph.initializer:
        proto.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del proto.graph.initializer[:]
    return "holds the weights of a layer", "have no values: export with the weights (torch: export_params=True)"


def _float16_input(proto):
    proto.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    return "(float16, rank 4) must be a float32 NCHW tensor of rank 4"


def _runtime_op(proto):
    """onnxruntime's ORT_ENABLE_ALL writes NCHWc convs under a domain of its own."""
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    relu.domain = "com.microsoft.nchwc"
    proto.opset_import.append(helper.make_opsetid("com.microsoft.nchwc", 1))
    return f"'{relu.name}' (com.microsoft.nchwc:Relu): an op of onnxruntime's own"


@pytest.mark.parametrize("change", [_without_weights, _float16_input, _runtime_op])
def test_a_model_of_another_export_setting_is_named_so(cli, tmp_path, tiny_proto, change):
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    fragments = change(proto)
    onnx.save(proto, tmp_path / "other.onnx")
    _expect_refusal(cli, tmp_path / "other.onnx", *(fragments if isinstance(fragments, tuple) else (fragments,)))


def test_external_data_that_is_a_folder_is_named_so(cli, tmp_path, tiny_proto):
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="weights")
    (tmp_path / "weights").mkdir()
    onnx.save(proto, tmp_path / "folder.onnx")
    _expect_refusal(cli, tmp_path / "folder.onnx", f"external data file 'weights' of tensor '{tensor.name}' is not a file")


def _first_conv(proto):
    return next(n for n in proto.graph.node if n.op_type == "Conv")


def _set_initializer(proto, name, array):
    index = next(i for i, t in enumerate(proto.graph.initializer) if t.name == name)
    proto.graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(array, name))


def _nan_weight(proto):
    name = _first_conv(proto).input[1]
    weight = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name)).copy()
    weight.flat[7] = np.nan
    _set_initializer(proto, name, weight)
    return f"tensor '{name}' holds NaN or infinite values"


def _weights_of_other_channels(proto):
    conv = _first_conv(proto)
    weight = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == conv.input[1]))
    _set_initializer(proto, conv.input[1], np.ascontiguousarray(weight[:, :2]))
    return f"node '{conv.name}' (Conv): weights of shape [{weight.shape[0]}, 2, 7, 7] in 1 group(s) for a 3-channel input"


def _bias_of_other_length(proto):
    conv = _first_conv(proto)
    weight = next(t for t in proto.graph.initializer if t.name == conv.input[1])
    _set_initializer(proto, conv.input[2], np.zeros(weight.dims[0] - 1, np.float32))
    return f"node '{conv.name}' (Conv): bias of shape [{weight.dims[0] - 1}] for {weight.dims[0]} output channels"


def _kernel_shape_of_other_size(proto):
    conv = next(n for n in proto.graph.node if n.op_type == "Conv" and n.name != _first_conv(proto).name)
    weight = next(t for t in proto.graph.initializer if t.name == conv.input[1])
    next(a for a in conv.attribute if a.name == "kernel_shape").ints[:] = [5, 5]
    return f"node '{conv.name}' (Conv): kernel_shape [5, 5] but weights of shape {list(weight.dims)}"


def _pads_and_auto_pad(proto):
    """onnxruntime refuses a conv with both; bnncc read its auto_pad (at stride 2, other pads than the pads')."""
    conv = _first_conv(proto)
    conv.attribute.append(helper.make_attribute("auto_pad", "SAME_UPPER"))
    return f"node '{conv.name}' (Conv): both pads and auto_pad SAME_UPPER, which ONNX forbids together"


def _flatten_over_the_batch(proto):
    """Axis 0 gives an exported batch of one the same logits; the canonical model's batch of two failed."""
    flatten = next(n for n in proto.graph.node if n.op_type == "Flatten")
    next(a for a in flatten.attribute if a.name == "axis").i = 0
    return f"node '{flatten.name}' (Flatten): axis 0; the classifier takes each image's features (axis 1)"


def _sparse_constant(proto):
    """A bias added to a Constant's sparse_value: onnx_ir reads no sparse tensor, 'unexpected SerdeError'."""
    fc = next(n for n in proto.graph.node if n.op_type == "Gemm")
    sparse = helper.make_sparse_tensor(onnx.numpy_helper.from_array(np.ones(1, np.float32)),
                                       onnx.numpy_helper.from_array(np.zeros(1, np.int64)), [1])
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["sparse"], name="sparse_const", sparse_value=sparse))
    proto.graph.node.insert(1, helper.make_node("Add", [fc.input[2], "sparse"], ["fc_bias"], name="bias_add"))
    fc.input[2] = "fc_bias"
    return "node 'sparse_const' (Constant): attribute 'sparse_value' holds a sparse tensor, which bnncc does not read"


def _unequal_strides(proto):
    conv = _first_conv(proto)  # (in a block, the shortcut's Add would meet a size it cannot broadcast first)
    next(a for a in conv.attribute if a.name == "strides").ints[:] = [2, 1]
    return f"node '{conv.name}' (Conv): expected equal strides along H and W, got [2, 1]"


def _zero_height(proto):
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 0
    return "input 'input' of shape [1, 3, 0, 32]: every dimension must be positive"


def _pool_larger_than_its_input(proto):
    pool = next(n for n in proto.graph.node if n.op_type == "MaxPool")
    next(a for a in pool.attribute if a.name == "kernel_shape").ints[:] = [100, 100]
    return f"node '{pool.name}' (MaxPool): output"


def _huge_input(proto):
    for d in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_value = 100_000
    return "input 'input' of shape [1, 3, 100000, 100000]: at most 33554432 pixels"


@pytest.mark.parametrize("corrupt", [_nan_weight, _weights_of_other_channels, _bias_of_other_length,
                                     _kernel_shape_of_other_size, _pads_and_auto_pad, _flatten_over_the_batch,
                                     _sparse_constant, _unequal_strides, _zero_height, _pool_larger_than_its_input,
                                     _huge_input])
def test_inconsistent_float_model_is_refused(cli, tmp_path, tiny_proto, corrupt):
    """What ONNX's checker and shape inference let through, and no CNN has: refused in one line
    naming the tensor or node, before anything is written."""
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    fragment = corrupt(proto)
    onnx.save(proto, tmp_path / "bad.onnx")
    _expect_refusal(cli, tmp_path / "bad.onnx", fragment)


@pytest.mark.parametrize("shape", [(0,), (10, 1), (1, 1, 10)])
def test_a_classifier_c_onnxruntime_cannot_broadcast_is_refused(cli, tmp_path, tiny_proto, shape):
    """Gemm's C must broadcast one way to its (N, classes) output: onnxruntime, the reference, refuses
    any other C, which shape inference lets through (a C of length 0 was accepted and rewritten, one of
    shape (classes, 1) flattened into a bias)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    _set_initializer(proto, gemm.input[2], np.zeros(shape, np.float32))
    with pytest.raises(Exception, match="Invalid bias shape"):
        _run(proto, np.zeros((1, 3, 32, 32), np.float32))
    onnx.save(proto, tmp_path / "bad.onnx")
    _expect_refusal(cli, tmp_path / "bad.onnx", f"node '{gemm.name}' (Gemm): C of shape {list(shape)} does not "
                                                f"broadcast to its output of shape [1, 10]")


def test_a_batch_norm_whose_fold_overflows_float32_is_refused(cli, tmp_path, tiny_proto):
    """A batch norm of finite statistics whose scale gamma / sqrt(var + eps) (3e38 / 0.03) takes the
    folded conv weights beyond float32: onnxruntime's logits are not finite, and the model was accepted
    with numpy's overflow warnings on stderr, its infinite weights refused only by compile."""
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_proto)
    conv = _first_conv(proto)
    channels = next(t for t in proto.graph.initializer if t.name == conv.input[1]).dims[0]
    names = [f"bn.{key}" for key in ("gamma", "beta", "mean", "var")]
    for name, value in zip(names, (3e38, 0.0, 0.0, 1e-3)):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.full(channels, value, np.float32), name))
    output = conv.output[0]
    conv.output[0] = f"{output}.before_bn"
    index = list(proto.graph.node).index(conv)
    proto.graph.node.insert(index + 1, helper.make_node("BatchNormalization", [conv.output[0], *names], [output],
                                                       name="bn"))
    with np.errstate(all="ignore"):
        assert not np.isfinite(_run(proto, np.ones((1, 3, 32, 32), np.float32))).all()
    onnx.save(proto, tmp_path / "bad.onnx")
    _expect_refusal(cli, tmp_path / "bad.onnx", "folding the batch norms and constants into it gives values beyond "
                                                "float32's range")


# ---------------------------------------------------------------------------------------------
# Acceptance is decided once: every command and function refuses the same float models with the
# same line, before writing anything.


def _mixed_blocks(folder):
    """Bottlenecks in stages 1-3, a basic block in stage 4: one kind of block per network."""
    torch.manual_seed(0)
    module = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10)
    module.inplanes = 1024
    module.layer4 = module._make_layer(BasicBlock, 512, 1, stride=2)
    module.fc = torch.nn.Linear(512, 10)
    return zoo.export_onnx(zoo.randomize_batchnorm(module).eval(), folder / "mixed.onnx", input_size=32), (
        "(Conv): a basic block after bottleneck blocks; a ResNet must use one kind of block throughout")


def _light_at_opset(version):
    def make(folder):
        proto = onnx.load(os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_resnet50.onnx"))
        proto.opset_import[0].version = version
        onnx.save(proto, folder / "light.onnx")
        return folder / "light.onnx", (f"opset {version}; bnncc reads float models of opsets 1 to 28" if version > 8
                                       else f"No Op registered for ConstantOfShape with domain_version of {version}")
    return make


def _long_external_location(folder):
    path = zoo.export_onnx(zoo.resnet50(width=0.125, num_classes=10), folder / "long.onnx", input_size=32)
    proto = onnx.load(str(path))
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="w" * 4000)
    onnx.save(proto, path)
    return path, "its external data location (4000 characters) cannot be opened: File name too long"


def _dilated(folder):
    """The last 3x3 conv dilated by 2 (padded to keep its size), as torchvision's
    replace_stride_with_dilation makes a segmentation backbone: not a PokeBNN conv."""
    path = zoo.export_onnx(zoo.resnet50(width=0.125, num_classes=10), folder / "dilated.onnx", input_size=32)
    proto = onnx.load(str(path))
    conv = [n for n in proto.graph.node if n.op_type == "Conv" and "conv2" in n.name][-1]
    for name, values in (("dilations", [2, 2]), ("pads", [2, 2, 2, 2])):
        conv.attribute.remove(next(a for a in conv.attribute if a.name == name))
        conv.attribute.append(helper.make_attribute(name, values))
    onnx.save(proto, path)
    return path, f"node '{conv.name}' (Conv): a 3x3 Conv with group 1 and dilations [2, 2]; expected a 3x3 Conv"


def _grouped(folder):
    """A ResNeXt-style bottleneck: its 3x3 conv in 4 groups, which a dense binary conv would not compute."""
    module = zoo.resnet50(width=0.125, num_classes=10)
    conv = module.layer1[0].conv2
    module.layer1[0].conv2 = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, groups=4, bias=False)
    path = zoo.export_onnx(module, folder / "grouped.onnx", input_size=32)
    return path, "node '/layer1/layer1.0/conv2/Conv' (Conv): a 3x3 Conv with group 4 and dilations [1, 1]"


def _five_by_five(folder):
    """A 5x5 conv where a bottleneck has its 3x3: neither grouped nor dilated, which the refusal said it was."""
    module = zoo.resnet50(width=0.125, num_classes=10)
    conv = module.layer1[0].conv2
    module.layer1[0].conv2 = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 5, padding=2, bias=False)
    path = zoo.export_onnx(module, folder / "five_by_five.onnx", input_size=32)
    return path, ("node '/layer1/layer1.0/conv2/Conv' (Conv): a 5x5 Conv with group 1 and dilations [1, 1]; "
                  "expected a 3x3 Conv with group 1 and no dilation\n")


def _two_linear(folder):
    """A head of two Linear layers with a Relu between them: the second must not be dropped."""
    module = zoo.resnet50(width=0.125, num_classes=10)
    module.fc = torch.nn.Sequential(torch.nn.Linear(256, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    path = zoo.export_onnx(module, folder / "two_linear.onnx", input_size=32)
    return path, ("node '/fc/fc.0/Gemm' (Gemm): expected the classifier to produce the graph output, found Relu "
                  "'/fc/fc.1/Relu' after it (bnncc takes a head that ends in its one Linear layer)")


REFUSED = {"mixed_blocks": _mixed_blocks, "light_opset8": _light_at_opset(8), "light_opset29": _light_at_opset(29),
           "light_opset999": _light_at_opset(999), "long_location": _long_external_location, "dilated": _dilated,
           "grouped": _grouped, "five_by_five": _five_by_five, "two_linear": _two_linear}


@pytest.mark.parametrize("case", REFUSED)
def test_every_command_refuses_the_same_models_alike(cli, tmp_path, case):
    from bnncc.pipeline import convert

    (tmp_path / "in").mkdir()
    path, fragment = REFUSED[case](tmp_path / "in")
    models = sorted(os.listdir(tmp_path / "in"))
    out = tmp_path / "out"
    messages = []
    for args in (["inspect"], ["ace"], ["rewrite", "-o", out / "poke.onnx"], ["convert", "-o", out]):
        code, _, err = cli(args[0], path, *args[1:])
        assert code == 2, (args, err)
        messages.append(err)
    assert len(set(messages)) == 1, messages
    assert messages[0].startswith(f"error: {path}: ") and messages[0].count("\n") == 1 and fragment in messages[0]
    with pytest.raises(BnnccError) as from_load:
        load(path)
    with pytest.raises(BnnccError) as from_convert:
        convert(path, out)
    assert f"error: {from_load.value}\n" == f"error: {from_convert.value}\n" == messages[0]
    assert not out.exists() and sorted(os.listdir(tmp_path / "in")) == models


def test_rewrite_and_recognize_refuse_a_canonical_mixed_block_resnet(tmp_path):
    """A ResNet mixing bottlenecks and basic blocks, brought to canonical form without ``load``: the
    functions that take a model refuse it with load's message (without the file name), before any pass runs."""
    from bnncc.frontend import CANONICAL_PASSES
    from bnncc.passmanager import PassManager
    from bnncc.rewriting import rewrite

    path, _ = _mixed_blocks(tmp_path)
    with pytest.raises(BnnccError) as from_load:
        load(path)
    model = PassManager(CANONICAL_PASSES).run(ir.load(path))
    ir.passes.common.ShapeInferencePass()(model)
    before = ir.to_proto(model).SerializeToString()
    for refuse in (recognize, lambda m: rewrite(m, "pokebnn_1x")):
        with pytest.raises(BnnccError) as error:
            refuse(model)
        assert f"{path}: {error.value}" == str(from_load.value)
    assert ir.to_proto(model).SerializeToString() == before


def test_rewrite_refuses_a_model_not_in_canonical_form(tmp_path):
    from bnncc.rewriting import rewrite

    path = zoo.export_onnx(zoo.resnet50(width=0.125, num_classes=10), tmp_path / "r50.onnx", input_size=32, opset=17)
    with pytest.raises(BnnccError, match="opset 17, not the canonical 18: load it with bnncc.load"):
        rewrite(ir.load(path), "pokebnn_1x")


@pytest.mark.parametrize("wrong", [None, "resnet50.onnx", onnx.ModelProto()], ids=["None", "path", "ModelProto"])
def test_the_python_api_names_the_model_type_it_takes(wrong):
    """onnx.load's ModelProto or a path failed deep in the graph walk, naming an attribute."""
    import bnncc

    for function in (recognize, lambda m: bnncc.rewrite(m, "pokebnn_1x"), bnncc.to_torch):
        with pytest.raises(TypeError, match=f"expected an onnx_ir.Model as bnncc.load returns, got "
                                            f"{type(wrong).__name__}: load the file with bnncc.load"):
            function(wrong)


def test_a_model_held_in_memory_where_a_path_is_taken_is_a_type_error_saying_what_is(tmp_path):
    """onnx.load's ModelProto handed to load, read, compile, export_qonnx or convert failed inside pathlib:
    "expected str, bytes or os.PathLike object, not ModelProto", which says nothing of what bnncc takes."""
    import bnncc
    from bnncc.pipeline import convert
    from tiny_poke import tiny_poke_model

    proto = ir.to_proto(tiny_poke_model())
    a_path = r"^expected the path of an ONNX file, got ModelProto$"
    a_model_or_path = r"^expected an onnx_ir.Model or the path of an ONNX file, got ModelProto$"
    for call, message in [(lambda: bnncc.load(proto), a_path), (lambda: bnncc.read(proto), a_path),
                          (lambda: convert(proto, tmp_path / "out"), a_path),
                          (lambda: bnncc.compile(proto, tmp_path / "lib"), a_model_or_path),
                          (lambda: bnncc.export_qonnx(proto, tmp_path / "q.onnx"), a_model_or_path)]:
        with pytest.raises(TypeError, match=message):
            call()
    assert not any(tmp_path.iterdir())
