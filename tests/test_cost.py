"""The cost model against the PokeBNN paper's anchors, a float ResNet-50 counted by hand, and its CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from pokebnn_layers import pokebnn_model

from bnncc.cost import ace, read_model
from bnncc.errors import BnnccError
from bnncc.ops import attach_functions

# google/aqt pokebnn_test.py: size_stats of PokeBNN-1.0x (the spec rounds these to 0.1M).
AQT_SOPS_1X = {
    "batch_norm": 17_912_832, "dprelu": 9_106_944, "shortcut_shrink": 5_419_008, "shortcut_shrink_mul": 1_705_984,
    "shortcut_pool": 7_902_720, "block_residual_add": 5_519_360, "local_residual_add": 8_805_888,
    "se_pool": 8_906_240, "se_pool_mul": 20_672, "se_relu": 2_584, "se_hardsigmoid": 22_656, "se_mul": 8_805_888,
    "global_pool": 100_352,
}

# pokebnn.md section 3, to the precision it states: ACE total, binary MACs, CPU64, weight bits, params.
SPEC = {
    0.5: (1.41e9, 0.906e9, 0.23e8, 17.0e6, 7.2e6),
    0.75: (2.59e9, 2.03e9, 0.42e8, 32.1e6, 15.4e6),
    1.0: (4.22e9, 3.61e9, 0.69e8, 51.6e6, 26.6e6),
    1.4: (7.76e9, 7.04e9, 1.27e8, 91.7e6, 50.7e6),
    2.0: (15.3e9, 14.4e9, 2.50e8, 173.6e6, 101.7e6),
}


def _rounds_to(value: float, stated: float) -> bool:
    """``value`` written with as many significant digits as ``stated`` gives ``stated``."""
    digits = len(f"{stated:e}".split("e")[0].replace(".", "").rstrip("0"))
    return float(f"{value:.{max(digits, 2) - 1}e}") == pytest.approx(stated)


@pytest.fixture(scope="module")
def poke_1x():
    return ace(pokebnn_model(1.0))


def test_pokebnn_1x_reproduces_the_aqt_regression_exactly(poke_1x):
    assert poke_1x.conv == 4_091_469_824
    assert poke_1x.dense == 131_072_000
    assert poke_1x.total == 4_222_541_824


def test_pokebnn_1x_breakdown(poke_1x):
    parts = poke_1x.by_op_type()
    # binary 3.61e9, stem 0.42e9, SE 0.058e9, dense 0.131e9 ACE
    assert [round(parts[op]["ace"] / 1e9, digits) for op, digits in
            (("BinaryConv", 2), ("QuantConv", 2), ("SEGate", 3), ("QuantGemm", 3))] == [3.61, 0.42, 0.058, 0.131]
    # the stem by hand: 4x4/4 VALID 3->32 and 3x3 group 32 32->64, both on 56x56 outputs at 8 x 8 bits
    assert parts["QuantConv"]["macs"] == 56 * 56 * (4 * 4 * 3) * 32 + 56 * 56 * (3 * 3 * 1) * 64
    assert parts["QuantGemm"]["ace"] == 2048 * 1000 * 8 * 8
    # weight bits 51.6 Mbit: 20.7 binary, 14.5 SE, 16.4 dense
    assert round(poke_1x.weight_bits / 1e6, 1) == 51.6
    assert [round(parts[op]["weight_bits"] / 1e6, 1) for op in ("BinaryConv", "SEGate", "QuantGemm")] == [20.7, 14.5,
                                                                                                          16.4]
    assert poke_1x.extra_params == 208_160  # "about 208k" float parameters: BN gamma/beta, DPReLU, biases


def test_pokebnn_1x_scalar_ops_match_aqt(poke_1x):
    sops = poke_1x.sops
    assert sops.pop("global_pool_mul") == 2048  # the head pool's 1/49 multiplies, which aqt leaves out
    assert sops == AQT_SOPS_1X


@pytest.mark.parametrize("multiplier", sorted(SPEC))
def test_every_width_matches_the_spec(multiplier):
    report = ace(pokebnn_model(multiplier))
    total, binary_macs, cpu64, weight_bits, params = SPEC[multiplier]
    assert _rounds_to(report.total, total)
    assert _rounds_to(report.binary_macs, binary_macs)
    assert _rounds_to(report.cpu64, cpu64)
    assert _rounds_to(report.weight_bits, weight_bits)
    assert _rounds_to(report.trainable_params, params)
    assert report.cpu64 == report.binary_macs / 64 + (report.macs - report.binary_macs)


# --------------------------------------------------------------------------- float ResNet-50


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    """torchvision ResNet-50 (random weights), legacy export, batch 1 at 224, and its torch module.

    BN gets random statistics: the exporter folds BN into the convs and would share the identical
    all-zero biases of a freshly initialised network as one initializer."""
    torch.manual_seed(0)
    module = torchvision.models.resnet50(weights=None).eval()
    for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        for tensor in (bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var):
            tensor.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("cost") / "resnet50.onnx"
    torch.onnx.export(module, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return path, module


def test_float_resnet50_macs_and_ace(resnet50):
    path, module = resnet50
    report = ace(path)
    assert report.macs == pytest.approx(4.089e9, rel=0.01)
    assert report.total == report.macs * 256 and report.cpu64 == report.macs  # no binary layer
    assert ace(path, float_bits=8).total == report.macs * 64
    stem = next(layer for layer in report.layers if layer.op_type == "Conv")
    assert stem.macs == 112 * 112 * (7 * 7 * 3) * 64
    assert report.dense == 2048 * 1000 * 256
    weights = sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert report.weight_params == weights and report.weight_bits == 32 * weights
    # the export folds every BN into its conv: gamma and beta (2 per channel) become one bias
    bn_channels = sum(m.num_features for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert report.params == sum(p.numel() for p in module.parameters()) - bn_channels
    assert report.extra_params == bn_channels + 1000 and report.state_params == 0
    assert report.sops["pool"] == 56 * 56 * 64 * 9 and report.sops["global_pool"] == 7 * 7 * 2048


def test_model_kinds_agree(resnet50):
    path, _ = resnet50
    from_path = ace(path).to_dict()
    assert ace(onnx.load(path)).to_dict() == from_path
    assert ace(read_model(path)).to_dict() == from_path
    assert float(ace(path)) == from_path["ace"]


def test_a_float_file_is_measured_in_the_canonical_form(resnet50_onnx):
    """light_resnet50 (opset 9) lists its weights as graph inputs and keeps its batch norms: by its
    path it is measured as ``load`` gives it, as every command reads a float model (read as it was,
    it counted 2193 parameters)."""
    from bnncc.frontend import load

    report = ace(resnet50_onnx["light"])
    assert report.to_dict() == ace(load(resnet50_onnx["light"])).to_dict()
    assert report.weight_params == 25_502_912 and report.macs == 4_089_184_256


# --------------------------------------------------------------------------- shapes from the graph


def _tiny(height: int | str = 8, value_info: bool = False) -> onnx.ModelProto:
    """x (N,2,H,8) -> Conv 3x3 pad 1, 2->4 -> Relu -> GlobalAveragePool -> Flatten -> Gemm 4->3."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w", (4, 2, 3, 3)), ("b", (4,)), ("fw", (3, 4)), ("fb", (3,)))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    infos = [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 4, height, 8])] if value_info else []
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, height, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits, value_info=infos)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_missing_shapes_come_from_shape_inference():
    report = ace(_tiny())
    assert [(layer.name, layer.macs) for layer in report.layers] == [("conv", 8 * 8 * 4 * 18), ("fc", 12)]
    assert report.sops == {"activation": 4 * 64, "global_pool": 4 * 64, "global_pool_mul": 4}
    assert report.params == 72 + 4 + 12 + 3 and report.weight_params == 84


def test_a_pokebnn_file_without_its_functions_is_measured_as_compile_takes_it(tmp_path):
    """A PokeBNN graph stored without the ai.bnncc functions and without value_info (compile and export
    take it, onnxruntime runs it with them attached) was refused by ace: "the shape of 's0' is unknown"."""
    from tiny_poke import tiny_poke_model

    ir.save(tiny_poke_model(), tmp_path / "bare.onnx")
    assert not onnx.load(tmp_path / "bare.onnx").functions
    report = ace(tmp_path / "bare.onnx")
    macs = {layer.name: layer.macs for layer in report.layers}
    # the stem: 16 channels of 4x4 outputs, each 3 x 4 x 4 MACs; the binary conv: 32 of 2x2, each 16 x 3 x 3
    assert macs["stem"] == 16 * 4 * 4 * 3 * 4 * 4 and macs["poke/binary"] == 32 * 2 * 2 * 16 * 3 * 3
    assert report == ace(attach_functions(tiny_poke_model()))


def test_a_poke_convs_se_layer_takes_weight_and_activation_bits_each_from_its_own_attribute():
    """se_w_bits 4 and se_a_bits 8: swapped, the SE layer's ACE (their product) would stay and its weight bits
    would not. By hand: the gate 16 -> 2 -> 32 has 16*2 + 2*32 = 96 weights, its MACs at 1x1."""
    from tiny_poke import tiny_poke_model

    model = tiny_poke_model()
    poke = next(node for node in model.graph if node.name == "poke")
    poke.attributes["se_w_bits"] = ir.Attr("se_w_bits", ir.AttributeType.INT, 4)
    poke.attributes["se_a_bits"] = ir.Attr("se_a_bits", ir.AttributeType.INT, 8)
    (se,) = [layer for layer in ace(model).layers if layer.name == "poke/se"]
    assert (se.w_bits, se.a_bits, se.macs, se.weight_bits, se.ace) == (4, 8, 96, 96 * 4, 96 * 4 * 8)


def test_ace_of_a_layer_is_its_macs_times_weight_bits_times_activation_bits():
    """A QuantGemm 10 -> 3 of 2-bit weights and 8-bit activations: 30 MACs, ACE 30 * 2 * 8 = 480 (not 30 * 2 * 2
    nor 30 * 8 * 8: every other test's layers have w_bits = a_bits), weight bits 30 * 2; by hand."""
    init = {"w": np.ones((3, 10), np.float32), "bound": -np.ones(10, np.float32), "b": np.zeros(3, np.float32)}
    node = helper.make_node("QuantGemm", ["x", *init], ["y"], name="fc", domain="ai.bnncc", w_bits=2, a_bits=8,
                            a_signed=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in init.items()])
    report = ace(attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])))
    assert [(layer.macs, layer.ace, layer.weight_bits) for layer in report.layers] == [(30, 480, 60)]
    assert report.total == 480


def test_se_gate_scalar_ops_of_a_non_square_input():
    """An SEGate on a 3x5 input (8 -> 1 -> 8): its pool adds H*W*C = 3*5*8 (not 3*3*8 nor 5*5*8) and
    multiplies C, its ReLU the hidden 1, its hard sigmoid 8; its MACs the two 1x1 convs' 8 + 8."""
    init = {"w1": np.ones((1, 8, 1, 1), np.float32), "bound1": -np.ones(8, np.float32), "b1": np.zeros(1, np.float32),
            "w2": np.ones((8, 1, 1, 1), np.float32), "bound2": -np.ones(1, np.float32), "b2": np.zeros(8, np.float32)}
    node = helper.make_node("SEGate", ["r", *init], ["g"], name="se", domain="ai.bnncc", w_bits=4, a_bits=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 8, 3, 5])],
                              [helper.make_tensor_value_info("g", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in init.items()])
    report = ace(attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])))
    assert report.sops == {"se_pool": 120, "se_pool_mul": 8, "se_relu": 1, "se_hardsigmoid": 8}
    assert [(layer.name, layer.macs) for layer in report.layers] == [("se", 16)]


def test_a_dynamic_shape_inside_a_pokebnn_file_names_the_file(cli, tmp_path):
    """`bnncc ace` said "error: node 'stem' (QuantConv): 's0' has the dynamic shape ..." and not which file."""
    from tiny_poke import tiny_poke_model

    model = tiny_poke_model()
    stem = model.graph.node(0).outputs[0]  # (N, 16, 4, 4)
    stem.shape, stem.type = ir.Shape(["N", 16, "H", 4]), ir.TensorType(ir.DataType.FLOAT)
    ir.save(model, tmp_path / "dynamic.onnx")
    message = f"{tmp_path / 'dynamic.onnx'}: node 'stem' (QuantConv): 's0' has the dynamic shape (16, 'H', 4)"
    with pytest.raises(BnnccError) as refused:
        ace(tmp_path / "dynamic.onnx")
    assert str(refused.value) == message
    code, stdout, stderr = cli("ace", tmp_path / "dynamic.onnx")
    assert (code, stdout, stderr) == (2, "", f"error: {message}\n")


def test_unused_initializers_are_not_parameters():
    model = _tiny()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((5, 5), np.float32), "left_behind"))
    assert ace(model).params == 91


def test_dynamic_spatial_size_names_the_node():
    with pytest.raises(BnnccError, match=r"node 'conv' \(Conv\): 'c' has the dynamic shape \(4, 'H', 8\)"):
        ace(_tiny(height="H", value_info=True))


@pytest.mark.parametrize("bits", [0, 65, 99999999999])
def test_float_bits_must_be_a_floats_width(bits):
    with pytest.raises(BnnccError, match=f"float_bits must be 1 to 64 \\(a float's width\\), got {bits}"):
        ace(_tiny(), float_bits=bits)


@pytest.mark.parametrize("bits", [16.0, True, "16"])
def test_float_bits_not_an_integer_is_a_type_error(bits):
    """16.0 passed the range check and made every float layer's bits and ACE floats (total 1451491328.0);
    True counted float layers at 1 bit; "16" was refused as "must be 1 to 64 ..., got 16"."""
    with pytest.raises(TypeError, match=rf"^float_bits is an integer number of bits, not {type(bits).__name__} "):
        ace(_tiny(), float_bits=bits)
    assert ace(_tiny(), float_bits=np.int64(16)).total == ace(_tiny()).total  # numpy's integers are integers


@pytest.mark.parametrize("bits", ["0", "65", "99999999999"])
def test_cli_float_bits_out_of_range_is_one_line(cli, tmp_path, bits):
    code, stdout, stderr = cli("ace", tmp_path / "not-read.onnx", "--float-bits", bits)
    assert (code, stdout) == (2, "")
    assert stderr.count("\n") == 1 and "--float-bits" in stderr


def test_a_model_of_another_type_is_a_type_error_naming_what_ace_takes():
    """ace(None), ace(b"...") failed deep inside with "'NoneType' object has no attribute 'graph'"."""
    for model in (None, b"model.onnx", {"graph": None}):
        message = f"ace takes an onnx_ir Model, a ModelProto or a path, not {type(model).__name__}"
        with pytest.raises(TypeError, match=message):
            ace(model)


# --------------------------------------------------------------------------- reading files


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "empty file, not an ONNX model"),
    (b"\xff\xff\xff\xff", "not an ONNX model"),
])
def test_bad_files_are_one_clean_error(tmp_path, content, message):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BnnccError, match=f"^{path}: {message}"):
        read_model(path)


def test_truncated_file_is_refused(tmp_path):
    data = _tiny().SerializeToString()
    path = tmp_path / "model.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BnnccError, match=f"^{path}: not an ONNX model"):
        read_model(path)


def test_external_data_outside_the_folder_is_refused(tmp_path):
    inside = tmp_path / "inside"
    inside.mkdir()
    onnx.save(_tiny(), inside / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    (inside / "weights.bin").rename(tmp_path / "weights.bin")
    proto = onnx.load(inside / "model.onnx", load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    (inside / "model.onnx").write_bytes(proto.SerializeToString())  # onnx.save itself refuses '..'
    with pytest.raises(BnnccError, match="keeps its data at '../weights.bin', outside the model's folder"):
        read_model(inside / "model.onnx")


def test_external_data_inside_the_folder_is_read(tmp_path):
    """On the fuzzing base (a path is read as bnncc reads float models: a ResNet the front end takes)."""
    from test_fuzz import base_model

    onnx.save(base_model(), tmp_path / "model.onnx", save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    onnx.save(base_model(), tmp_path / "inline.onnx")
    report = ace(tmp_path / "model.onnx")
    assert report.params > 0 and report.to_dict() == ace(tmp_path / "inline.onnx").to_dict()


# --------------------------------------------------------------------------- CLI


def test_cli_json(cli, resnet50):
    path, _ = resnet50
    code, stdout, stderr = cli("ace", path, "--json", "--float-bits", "8", "--no-per-layer")
    assert code == 0, stderr
    data = json.loads(stdout)
    assert data["float_bits"] == 8 and data["ace"] == ace(path, float_bits=8).total
    assert "layers" not in data
    code, stdout, _ = cli("ace", path, "--json")
    assert len(json.loads(stdout)["layers"]) == 54  # 53 convs and the fc


def test_cli_table(cli, tmp_path):
    """The table of the fuzzing base (tests/test_fuzz.py): the smallest ResNet the front end takes."""
    from test_fuzz import base_model

    path = tmp_path / "small.onnx"
    onnx.save(base_model(), path)
    code, stdout, stderr = cli("ace", path)
    assert code == 0, stderr
    # 16x16 input; stem 7x7/2 3->8 (8x8 out); pool to 4x4; bottleneck 8->16->16->64 and projection 8->64; fc 64->5
    stem_macs = 8 * 8 * 8 * (7 * 7 * 3)
    conv_macs = stem_macs + 4 * 4 * (8 * 16 + 9 * 16 * 16 + 16 * 64 + 8 * 64)
    conv_ace, dense_ace = conv_macs * 256, 64 * 5 * 256
    words = " ".join(stdout.split())  # (in a terminal the caption wraps at its width)
    assert f"{stem_macs / 1e6:,.3f}" in stdout and f"{(conv_ace + dense_ace) / 1e9:.6f}" in stdout
    assert f"ACE {conv_ace + dense_ace:,} (conv {conv_ace:,}, dense {dense_ace:,}); MACs {conv_macs + 64 * 5:,}" in words
    assert "float MACs at 16 x 16 bits" in words
    # in a file or a pipe the caption is one line: it was wrapped to the table's width, "MACs" apart from its figure
    caption = [line for line in stdout.splitlines() if line.startswith(f"ACE {conv_ace + dense_ace:,} ")]
    assert len(caption) == 1 and f"; MACs {conv_macs + 64 * 5:,}; " in caption[0]
    assert f"; scalar ops {ace(path).sops_total:,} (" in caption[0]
    # the op rows fill every column (their CPU64 was blank): float MACs are CPU64 MACs, weights 32 bits each
    conv_weights = 8 * 3 * 7 * 7 + 16 * 8 + 16 * 16 * 3 * 3 + 64 * 16 + 64 * 8
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in stdout.splitlines()}
    assert rows["all", "Conv"] == [f"{conv_macs / 1e6:,.3f}", f"{conv_ace / 1e9:,.6f}", f"{conv_macs / 1e6:,.3f}",
                                   f"{conv_weights * 32 / 1e6:,.3f}"]


def test_cli_table_keeps_its_numbers_in_a_narrow_terminal(cli, tmp_path, terminal):
    """At 40 columns (COLUMNS=40, a split pane) rich dropped the layer column and cut every number
    to "0.0015…": the table is drawn 80 columns wide, and the terminal wraps it."""
    from test_fuzz import base_model

    path = tmp_path / "small.onnx"
    onnx.save(base_model(), path)
    terminal(40)
    code, stdout, stderr = cli("ace", path)
    assert code == 0, stderr
    # the projection shortcut's conv, unnamed in the file: named after its output
    assert "…" not in stdout and " sc " in stdout and f"{8 * 8 * 8 * (7 * 7 * 3) / 1e6:,.3f}" in stdout


def test_cli_table_of_a_full_resnet50_fits_80_columns(cli, resnet50_onnx, terminal):
    """No number is cut: the totals of a float ResNet-50 (4,089,184,256 MACs) are all there."""
    terminal(80)
    code, stdout, stderr = cli("ace", resnet50_onnx["legacy"])
    assert code == 0, stderr
    assert max(len(line) for line in stdout.splitlines()[1:]) <= 80  # (the first line: the path, whole)
    total = next(line for line in stdout.splitlines() if line.split()[:1] == ["total"])
    assert total.split()[1:] == ["4,089.184", "1,046.831170", "4,089.184", "816.093"]  # grouped as the others


def test_cli_refuses_what_the_front_end_refuses(cli, tmp_path):
    """`ace` takes the float models `inspect` takes: one conv and a classifier are no ResNet."""
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny(), path)
    code, _, stderr = cli("ace", path)
    assert code == 2
    assert stderr == f"error: {path}: input 'x': expected the stem's 7x7 stride-2 Conv, found Conv 'conv'\n"


def test_cli_on_a_pokebnn_file(cli, tmp_path, terminal):
    """An ai.bnncc graph with its function bodies, as the rewrite writes it: read, checked, measured."""
    model = pokebnn_model(0.5)
    attach_functions(model)
    path = tmp_path / "pokebnn_0.5x.onnx"
    ir.save(model, path)
    terminal(80)
    code, stdout, stderr = cli("ace", path)
    assert code == 0, stderr
    # an 80-column terminal: nothing cut (the first line is the path, whole: the terminal wraps it)
    assert stdout.splitlines()[0] == str(path) and max(len(line) for line in stdout.splitlines()[1:]) <= 80
    total = next(line.split() for line in stdout.splitlines() if line.split()[:1] == ["total"])
    report = ace(pokebnn_model(0.5))
    assert total == ["total", f"{report.macs / 1e6:,.3f}", f"{report.total / 1e9:.6f}", f"{report.cpu64 / 1e6:,.3f}",
                     f"{report.weight_bits / 1e6:,.3f}"]
    words = " ".join(stdout.split())
    assert "stem1 QuantConv 8x8 4.817 0.308281" in words  # 56*56*48*32 = 4,816,896 MACs, * 64
    assert f"MACs {report.macs:,}; weight bits {report.weight_bits:,}" in words  # exact, in the caption


def test_cli_missing_file_is_one_line(cli, tmp_path):
    code, _, stderr = cli("ace", tmp_path / "nope.onnx")
    assert code == 2 and "nope.onnx: no such file" in stderr and "Traceback" not in stderr
