"""width_multiplier: f' = int(f * multiplier) per bottleneck, outputs 4 f', stem kept, head follows."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest
from _support import CLASSES, SIZE, ace_total, random_input, run_ort

from bnncc.errors import BnnccError
from bnncc.frontend import recognize
from bnncc.passes.poke_conv import PokeConvPass
from bnncc.passes.remove_projection_shortcuts import RemoveProjectionShortcutsPass
from bnncc.passes.width_multiplier import WidthMultiplierPass

STEM = 16
WIDTHS = (16, 32, 64, 128)  # the fixture's bottleneck widths


def float_resnet50_macs(stem: int, widths: tuple[int, ...], size: int, classes: int) -> int:
    """MACs of a float ResNet-50 v1.5 (3, 4, 6, 3 blocks, expansion 4), counted from the architecture."""
    h = size // 2
    macs = h * h * stem * 3 * 49  # 7x7/2 stem conv, then the 3x3/2 max-pool
    h //= 2
    c_in = stem
    for stage, (f, blocks) in enumerate(zip(widths, (3, 4, 6, 3))):
        h_out = h if stage == 0 else h // 2
        macs += h * h * c_in * f + h_out * h_out * (9 * f * f + f * 4 * f + c_in * 4 * f)  # block 0 + projection
        macs += (blocks - 1) * h_out * h_out * (4 * f * f + 9 * f * f + f * 4 * f)
        c_in, h = 4 * f, h_out
    return macs + c_in * classes


def test_reference_formula_matches_the_unchanged_model(small_model):
    assert ace_total(small_model) == 256 * float_resnet50_macs(STEM, WIDTHS, SIZE, CLASSES)


@pytest.mark.parametrize("multiplier", [0.5, 0.75, 1.4])
def test_widths_and_ace(small_model, multiplier):
    assert WidthMultiplierPass(multiplier)(small_model).modified
    new_widths = tuple(int(f * multiplier) for f in WIDTHS)
    resnet = recognize(small_model)
    assert resnet.stem.out_channels == STEM
    assert [s[0].mid_channels for s in resnet.stages] == list(new_widths)
    assert [s[-1].out_channels for s in resnet.stages] == [4 * f for f in new_widths]
    assert resnet.head.in_features == 4 * new_widths[-1]
    assert ace_total(small_model) == 256 * float_resnet50_macs(STEM, new_widths, SIZE, CLASSES)
    assert run_ort(small_model, random_input()).shape == (2, CLASSES)


def test_narrowing_keeps_the_first_channels(small_model):
    conv = recognize(small_model).stages[1][1].convs[1]  # a 3x3 conv, 32 -> 32
    old = small_model.graph.node(conv).inputs[1].const_value.numpy().copy()
    WidthMultiplierPass(0.5)(small_model)
    new = small_model.graph.node(conv).inputs[1].const_value.numpy()
    np.testing.assert_array_equal(new, old[:16, :16])


def test_widening_reinitialises_lecun_normal(small_model):
    conv = recognize(small_model).stages[3][1].convs[1]  # 3x3, 128 -> 128
    WidthMultiplierPass(2.0)(small_model)
    weight = small_model.graph.node(conv).inputs[1].const_value.numpy()
    assert weight.shape == (256, 256, 3, 3)
    std = np.sqrt(1 / (256 * 9))  # LeCun: variance 1 / fan_in
    assert abs(weight.std() / std - 1) < 0.02
    assert np.abs(weight).max() <= 2 * std / 0.87962566103423978  # truncated at 2 sigma of the draw
    bias = small_model.graph.node(conv).inputs[2].const_value.numpy()
    np.testing.assert_array_equal(bias, np.zeros(256, np.float32))


def test_does_not_fire_at_one(small_model):
    assert not WidthMultiplierPass(1.0)(small_model).modified


def test_after_poke_conv_it_warns_that_the_widths_stay(small_model, caplog):
    """A recipe with width_multiplier after poke_conv (no float block left) kept the widths and said nothing."""
    RemoveProjectionShortcutsPass()(small_model)
    PokeConvPass()(small_model)
    before = ace_total(small_model)
    with caplog.at_level(logging.WARNING, logger="bnncc.passes.width_multiplier"):
        assert not WidthMultiplierPass(1.0)(small_model).modified
        assert not caplog.records  # multiplier 1 asks for no change
        assert not WidthMultiplierPass(0.5)(small_model).modified
    assert ace_total(small_model) == before
    assert [record.getMessage() for record in caplog.records] == [
        "no float block left to scale by 0.5: the widths stay as they are (in a recipe, width_multiplier goes "
        "before poke_conv)"]


def test_rejects_a_width_with_no_channel(small_model):
    with pytest.raises(BnnccError, match="leaves no channel"):
        WidthMultiplierPass(0.01)(small_model)
    with pytest.raises(BnnccError, match="multiplier must be above 0 and at most 4, got -1"):
        WidthMultiplierPass(-1)


@pytest.mark.parametrize("multiplier", [0.5, 2.0])
def test_after_int8_head_the_head_bounds_follow_the_width(small_model, small_resnet_path, multiplier):
    """A recipe may quantize the head first: QuantGemm's per-input act_bound kept the old width, and
    onnxruntime refused the rewritten graph (256 bounds for 512 features). The bounds now start
    uncalibrated at the new width, so the order of the two passes gives the same network."""
    from bnncc.frontend import load
    from bnncc.passes.int8_head import Int8HeadPass

    Int8HeadPass()(small_model)
    WidthMultiplierPass(multiplier)(small_model)
    reference = load(small_resnet_path)
    WidthMultiplierPass(multiplier)(reference)
    Int8HeadPass()(reference)
    head = next(n for n in small_model.graph if n.op_type == "QuantGemm")
    np.testing.assert_array_equal(head.inputs[2].const_value.numpy(),
                                  np.full(int(128 * multiplier) * 4, -1, np.float32))
    x = random_input()
    np.testing.assert_array_equal(run_ort(small_model, x), run_ort(reference, x))


def _block_weights(stem: int, widths: tuple[int, ...], layers: tuple[int, ...] = (3, 4, 6, 3)) -> int:
    """Conv weights of a bottleneck ResNet's blocks (ResNet-50's 3, 4, 6, 3; projections included), by hand."""
    total, c_in = 0, stem
    for f, blocks in zip(widths, layers):
        total += c_in * f + 9 * f * f + 4 * f * f + c_in * 4 * f  # block 0 and its projection
        total += (blocks - 1) * (4 * f * f + 9 * f * f + 4 * f * f)
        c_in = 4 * f
    return total


def test_a_network_too_large_to_hold_is_refused_before_anything_changes(small_model, monkeypatch):
    """The multiplier's cap let 4x twice (16x) through, which ran a rewrite out of memory: the widened
    blocks' weights are counted first, and a network over the limit is refused untouched."""
    import bnncc.passes.width_multiplier as pass_module

    doubled = _block_weights(STEM, tuple(2 * f for f in WIDTHS))
    before = {name: v.const_value.numpy().copy() for name, v in small_model.graph.initializers.items()}
    monkeypatch.setattr(pass_module, "MAX_WEIGHTS", doubled - 1)
    with pytest.raises(BnnccError, match=f"would hold {doubled:,} weights, more than the {doubled - 1:,}"):
        WidthMultiplierPass(2.0)(small_model)
    after = small_model.graph.initializers.items()
    assert all(np.array_equal(v.const_value.numpy(), before[name]) for name, v in after)
    monkeypatch.setattr(pass_module, "MAX_WEIGHTS", doubled)
    assert WidthMultiplierPass(2.0)(small_model).modified


def test_the_widest_network_it_takes_fits_one_onnx_file_once_binarized():
    """The cap was 2^30 weights (4 GiB of float32): 4x a ResNet-101 passed it, and its rewrite failed at the end,
    as no ONNX file holds more than 2 GiB. The cap with the SE gates poke_conv adds at se_ratio 8 (per bottleneck
    of width f: 17 f^2 conv weights, 3.375 f^2 in SE convs) and a 4x head (8192 x 1000) fits; 4x a ResNet-50
    (projections included) is taken, 4x a ResNet-101 and 3x a ResNet-152 are not."""
    import onnx

    from bnncc.passes.width_multiplier import MAX_WEIGHTS

    assert 4 * (MAX_WEIGHTS * (17 + 3.375) / 17 + 8192 * 1000) < onnx.checker.MAXIMUM_PROTOBUF
    resnet = (64, 128, 256, 512)
    assert _block_weights(64, tuple(4 * f for f in resnet)) <= MAX_WEIGHTS
    assert _block_weights(64, tuple(4 * f for f in resnet), (3, 4, 23, 3)) > MAX_WEIGHTS
    assert _block_weights(64, tuple(3 * f for f in resnet), (3, 8, 36, 3)) > MAX_WEIGHTS


def test_a_head_it_cannot_follow_is_refused_before_anything_changes(small_model):
    """A Reshape to the feature count, as exporters write the flatten (the front end turns it into a
    Flatten), kept the old width: the pass went through it, resized the Gemm, and onnxruntime could not
    run the result. Such a head is refused, the model left as it was."""
    flatten = next(node for node in small_model.graph if node.op_type == "Flatten")
    features = flatten.outputs[0].shape[1]
    shape = ir.Value(name="flat_shape", const_value=ir.tensor(np.array([-1, features], np.int64)))
    small_model.graph.register_initializer(shape)
    reshape = ir.node("Reshape", [flatten.inputs[0], shape], name="flat")
    small_model.graph.insert_before(flatten, reshape)
    flatten.outputs[0].replace_all_uses_with(reshape.outputs[0])
    small_model.graph.remove(flatten, safe=True)
    x = random_input()
    before = run_ort(small_model, x)
    with pytest.raises(BnnccError, match=r"^width_multiplier: the last block's output '.*' reaches no Gemm through "
                                         r"GlobalAveragePool and Flatten; load the model with bnncc.load$"):
        WidthMultiplierPass(0.5)(small_model)
    np.testing.assert_array_equal(run_ort(small_model, x), before)
