"""Basic-block ResNets (ResNet-18/34): recognition, the PokeBNN rewrite, ACE and compilation."""

from __future__ import annotations

import json
import shutil
from importlib import resources

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from bnncc import zoo
from bnncc.cost import ace
from bnncc.errors import BnnccError
from bnncc.frontend import load, recognize
from bnncc.ops.poke_conv import SE
from bnncc.passes.stride_to_3x3 import StrideTo3x3Pass
from bnncc.passes.width_multiplier import WidthMultiplierPass
from bnncc.recipe import load_recipe
from bnncc.resnet import BasicBlock
from bnncc.rewriting import rewrite
from bnncc.targets import arm64, vmrunner
from bnncc.torchview import to_torch

needs_cross = pytest.mark.skipif(
    shutil.which(arm64.CROSS_CXX) is None or shutil.which(vmrunner.QEMU) is None,
    reason="needs g++-aarch64-linux-gnu and qemu-user (apt)")

# torchvision ResNet-18 by hand: (in, out, stride, projection) of the 8 basic blocks.
RESNET18_BLOCKS = [(64, 64, 1, False)] * 2 + [(64, 128, 2, True), (128, 128, 1, False),
                                              (128, 256, 2, True), (256, 256, 1, False),
                                              (256, 512, 2, True), (512, 512, 1, False)]


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory):
    return zoo.export_onnx(zoo.resnet18(num_classes=10), tmp_path_factory.mktemp("r18") / "r18.onnx", input_size=32)


def test_resnet18_is_recognised_as_basic_blocks(cli, resnet18_onnx):
    resnet = recognize(load(resnet18_onnx))
    assert all(isinstance(b, BasicBlock) for b in resnet.blocks)
    assert [len(s) for s in resnet.stages] == [2, 2, 2, 2]
    assert [(b.in_channels, b.out_channels, b.stride, b.shortcut is not None) for b in resnet.blocks] == RESNET18_BLOCKS
    assert [b.out_size for b in resnet.blocks][-1] == (1, 1) and resnet.head.in_features == 512
    code, out, err = cli("inspect", resnet18_onnx, "--json")
    assert code == 0, err
    structure = json.loads(out)
    assert [len(b["convs"]) for stage in structure["stages"] for b in stage] == [2] * 8
    assert structure["notes"] == ["basic blocks (ResNet-18/34 style): two 3x3 convs each"]


def test_resnet34_has_3_4_6_3_basic_blocks(tmp_path):
    path = zoo.export_onnx(zoo.resnet34(width=0.25, num_classes=10), tmp_path / "r34.onnx", input_size=32)
    resnet = recognize(load(path))
    assert [len(s) for s in resnet.stages] == [3, 4, 6, 3]
    assert all(isinstance(b, BasicBlock) for b in resnet.blocks)


# ---------------------------------------------------------------------------------------------
# The rewrite: two PokeConvs per block, wired as the Bi-Real arrangement plus the block shortcut.


@pytest.fixture(scope="module")
def poke18(resnet18_onnx):
    model, rows = rewrite(load(resnet18_onnx), "resnet18_pokebnn")
    return model, rows


@pytest.fixture(scope="module")
def bireal18(resnet18_onnx):
    """resnet18_bireal: the same rewrite without SE gates."""
    model, _ = rewrite(load(resnet18_onnx), "resnet18_bireal")
    return model


def test_every_basic_block_becomes_two_poke_convs(resnet18_onnx, poke18):
    float_blocks = recognize(load(resnet18_onnx)).blocks
    model, rows = poke18
    assert [r.name for r in rows] == ["input", "remove_projection_shortcuts", "poke_stem", "poke_conv", "int8_head"]
    assert all(r.modified for r in rows[1:])
    graph = model.graph
    assert not {n.op_type for n in graph} & {"Conv", "Relu", "Add", "MaxPool", "Gemm"}
    assert sum(n.op_type == "PokeConv" for n in graph) == 16
    for block in float_blocks:
        first, second = (graph.node(name) for name in block.convs)
        x = first.inputs[0]  # the block input: the previous block's last PokeConv, or the stem
        assert x.producer().op_type in ("PokeConv", "DPReLU")
        assert first.overload == "" and len(first.inputs) == 20
        assert second.inputs[0] is first.outputs[0]  # local shortcut of conv 2 reads conv 1's output
        assert second.overload == "block" and second.inputs[20] is x  # block shortcut: the block input
        assert list(first.attributes["strides"].as_ints()) == [block.stride] * 2
        gammas = [node.inputs[2].const_value.numpy() for node in (first, second)]
        assert (gammas[0] == 1).all() and (gammas[1] == 0).all()  # the block's last BN starts at 0
    # projection shortcuts are gone with their weights
    assert not any("downsample" in name for name in graph.initializers)


def test_resnet18_bireal_is_resnet18_pokebnn_without_se_gates(poke18, bireal18):
    """Every PokeConv the same but for its SE gate: inputs 10-15 omitted, the "ungated" overloads,
    no SE initializer left; the other initializers identical, node for node."""
    gated = {n.name: n for n in poke18[0].graph if n.op_type == "PokeConv"}
    ungated = {n.name: n for n in bireal18.graph if n.op_type == "PokeConv"}
    assert list(ungated) == list(gated) and len(ungated) == 16
    for name, node in ungated.items():
        other = gated[name]
        assert node.overload == {"": "ungated", "block": "block_ungated"}[other.overload]
        assert all(node.inputs[i] is None for i in SE[1:]) and len(node.inputs) == len(other.inputs)
        assert "se_w_bits" not in node.attributes and "se_a_bits" not in node.attributes
        for i in (j for j in range(len(node.inputs)) if j not in SE[1:]):
            a, b = node.inputs[i], other.inputs[i]
            assert a.name == b.name
            if a.const_value is not None:
                np.testing.assert_array_equal(a.const_value.numpy(), b.const_value.numpy())
    assert not [name for name in bireal18.graph.initializers if "/se." in name]


def _assert_torch_view_matches_onnxruntime(model: ir.Model, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        ours = to_torch(model).eval()(torch.from_numpy(x)).numpy()
    assert reference.shape == (1, 10) and (ours.argmax(1) == reference.argmax(1)).all()
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.ptp(reference))


def test_rewritten_resnet18_bireal_torch_view_matches_onnxruntime(bireal18):
    _assert_torch_view_matches_onnxruntime(bireal18, seed=4)


def test_resnet50_blocks_and_basic_blocks_share_the_passes(tmp_path):
    """stride_to_3x3 leaves basic blocks alone; width_multiplier refuses a ResNet-18 whose first
    identity shortcut would join the stem's 64 channels to a narrower block."""
    model = load(zoo.export_onnx(zoo.resnet18(num_classes=10), tmp_path / "r18.onnx", input_size=32))
    assert not StrideTo3x3Pass()(model).modified
    with pytest.raises(BnnccError, match="adds its 64-channel input to its 32-channel output"):
        WidthMultiplierPass(0.5)(model)


def test_a_recipe_for_the_other_kind_of_block_is_refused_before_any_pass(cli, resnet18_onnx, tmp_path):
    """The passes take both kinds of block, but pokebnn_1x's name and ACE are a ResNet-50's (and
    resnet18_pokebnn on a ResNet-50 left out the v1.5 stride fix); --set blocks= applies it anyway."""
    out = tmp_path / "poke.onnx"
    code, _, err = cli("rewrite", resnet18_onnx, "--recipe", "pokebnn_1x", "-o", out)
    assert code == 2 and not out.exists()
    assert err.strip().splitlines() == [
        "error: recipe pokebnn_1x is for bottleneck ResNets, but this model has basic blocks (node "
        f"{recognize(load(resnet18_onnx)).blocks[0].convs[0]!r}); use one of resnet18_bireal, resnet18_pokebnn, "
        "resnet34_bireal, resnet34_pokebnn, or --set blocks=basic to apply it anyway"]
    code, _, err = cli("rewrite", resnet18_onnx, "--recipe", "pokebnn_1x", "--set", "blocks=basic", "-o", out)
    assert code == 0 and out.exists(), err
    narrow50 = load(zoo.export_onnx(zoo.resnet50(0.25, num_classes=10), tmp_path / "r50.onnx", input_size=32))
    with pytest.raises(BnnccError, match="recipe resnet18_pokebnn is for basic ResNets, but this model has "
                                         "bottleneck blocks .*use one of pokebnn_0.5x, pokebnn_0.75x"):
        rewrite(narrow50, "resnet18_pokebnn")


def test_rewritten_resnet18_torch_view_matches_onnxruntime(poke18):
    _assert_torch_view_matches_onnxruntime(poke18[0], seed=3)


# ---------------------------------------------------------------------------------------------
# ACE of ResNet-18 at 224 px, counted by hand from the layer shapes (not through bnncc.cost).


def _resnet18_layers(se_gate: bool = True) -> dict[str, int]:
    """ACE of every counted layer of resnet18_pokebnn (``se_gate=False``: resnet18_bireal) at
    224x224: MACs x w_bits x a_bits."""
    layers = {"stem/conv1": 56 * 56 * (4 * 4 * 3) * 32 * 8 * 8,  # 4x4/4 conv, 224 -> 56
              "stem/conv2": 56 * 56 * (3 * 3 * 1) * 64 * 8 * 8}  # 3x3 conv, group 32, 32 -> 64
    size, cin = 56, 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for index in range(2):
            stride = 2 if stage > 1 and index == 0 else 1
            size //= stride
            for conv, (ci, co) in enumerate(((cin, cout), (cout, cout)), start=1):
                name = f"/layer{stage}/layer{stage}.{index}/conv{conv}/Conv"
                layers[f"{name}/binary"] = size * size * 3 * 3 * ci * co  # 1 x 1 bits
                if se_gate:
                    layers[f"{name}/se"] = (ci * (ci // 8) + (ci // 8) * co) * 4 * 4  # two 1x1 convs at 1x1
            cin = cout
    layers["/fc/Gemm"] = 512 * 1000 * 8 * 8
    return layers


@pytest.fixture(scope="module")
def resnet18_224(tmp_path_factory):
    return zoo.export_onnx(zoo.resnet18(), tmp_path_factory.mktemp("r18_224") / "r18.onnx")


def test_resnet18_ace_at_224_matches_a_count_by_hand_and_the_recipe(resnet18_224):
    model, _ = rewrite(load(resnet18_224), "resnet18_pokebnn")
    expected = _resnet18_layers()
    assert {layer.name: layer.ace for layer in ace(model).layers} == expected
    total = sum(expected.values())
    assert total == 2_137_645_056
    comments = (resources.files("bnncc.recipes") / "resnet18_pokebnn.toml").read_text()
    stated = {"308,281,344", "115,605,504", "57,802,752", "16,384", "24,576", "98,304", "393,216", "65,536",
              "262,144", "1,048,576", "32,768,000", f"{total:,}", "ACE 2.14e9"}
    assert {s for s in stated if s in comments} == stated
    binary = sum(v for k, v in expected.items() if k.endswith("/binary"))
    se = sum(v for k, v in expected.items() if k.endswith("/se"))
    assert f"= {binary:,}" in comments and f"= {se:,}" in comments


def test_resnet18_bireal_ace_at_224_is_the_count_by_hand_without_se_gates(resnet18_224):
    model, _ = rewrite(load(resnet18_224), "resnet18_bireal")
    expected = _resnet18_layers(se_gate=False)
    assert {layer.name: layer.ace for layer in ace(model).layers} == expected
    total = sum(expected.values())
    with_se = _resnet18_layers()
    se = sum(v for k, v in with_se.items() if k.endswith("/se"))
    assert (total, se) == (2_132_934_656, 4_710_400) and total == sum(with_se.values()) - se
    comments = (resources.files("bnncc.recipes") / "resnet18_bireal.toml").read_text()
    binary = sum(v for k, v in expected.items() if k.endswith("/binary"))
    stated = {"308,281,344", "115,605,504", "57,802,752", "32,768,000", f"= {binary:,}", f"= {total:,}",
              f"{sum(with_se.values()):,}", f"{se:,}", "ACE 2.13e9"}
    assert {s for s in stated if s in comments} == stated


# ---------------------------------------------------------------------------------------------
# End to end: convert, compile and verify against onnxruntime.


@pytest.mark.parametrize("target", ["x86-64", pytest.param("arm64", marks=[needs_cross, pytest.mark.slow])])
@pytest.mark.parametrize("recipe", ["resnet18_pokebnn", "resnet18_bireal"])
def test_resnet18_converts_and_verifies(cli, resnet18_onnx, tmp_path, recipe, target):
    """x86-64 natively; arm64 under qemu (slow)."""
    out = tmp_path / f"r18_{target}"
    code, _, err = cli("convert", resnet18_onnx, "--recipe", recipe, "--target", target, "-o", out)
    assert code == 0, err
    code, stdout, err = cli("verify", out, "--n", "4" if target == "x86-64" else "2")
    assert code == 0, stdout + err


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["resnet34_pokebnn", "resnet34_bireal"])
def test_resnet34_converts_for_x86_64_and_verifies(cli, tmp_path, recipe):
    path = zoo.export_onnx(zoo.resnet34(num_classes=10), tmp_path / "r34.onnx", input_size=32)
    out = tmp_path / "r34_x86"
    code, _, err = cli("convert", path, "--recipe", recipe, "--target", "x86-64", "-o", out)
    assert code == 0, err
    code, stdout, err = cli("verify", out, "--n", "4")
    assert code == 0, stdout + err


_POKE_CONV = {"clip_bound": 3.0, "se_ratio": 8, "se_w_bits": 4, "se_a_bits": 4, "seed": 0}


@pytest.mark.parametrize("name, poke_conv", [("resnet18_pokebnn", _POKE_CONV), ("resnet34_pokebnn", _POKE_CONV),
                                             ("resnet18_bireal", {"clip_bound": 3.0, "se_gate": False, "seed": 0}),
                                             ("resnet34_bireal", {"clip_bound": 3.0, "se_gate": False, "seed": 0})])
def test_basic_block_recipes(name, poke_conv):
    recipe = load_recipe(name)
    assert recipe.blocks == "basic"
    assert [n for n, _ in recipe.passes] == ["remove_projection_shortcuts", "poke_stem", "poke_conv", "int8_head"]
    assert recipe.params("poke_stem") == {"mid_channels": 32, "w_bits": 8, "a_bits": 8, "seed": 0}
    assert recipe.params("poke_conv") == poke_conv
    assert recipe.params("int8_head") == {"w_bits": 8, "a_bits": 8}
    assert recipe.train == load_recipe("pokebnn_1x").train
