"""poke_stem: the 7x7/2 conv, ReLU and max-pool become PokeInit (QuantConv 4x4/4 -> BN -> DPReLU -> grouped 3x3)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from _support import CLASSES, SIZE, ace_total, conv_macs, op_counts, random_input, run_ort

from bnncc import zoo
from bnncc.errors import BnnccError
from bnncc.frontend import load, recognize
from bnncc.passes.poke_stem import PokeStemPass


def _init(model, name):
    return model.graph.initializers[name].const_value.numpy()


def test_stem_structure_and_ace(small_model):
    stem = recognize(small_model).stem
    stem_macs = conv_macs(small_model, stem.conv)
    first_conv = recognize(small_model).blocks[0].convs[0]
    before, ace_before = op_counts(small_model), ace_total(small_model)

    assert PokeStemPass(mid_channels=8)(small_model).modified

    after = op_counts(small_model)
    assert (after["Conv"], after["Relu"], after["MaxPool"]) == (before["Conv"] - 1, before["Relu"] - 1, 0)
    assert (after["QuantConv"], after["BatchNormalization"], after["DPReLU"]) == (2, 2, 2)
    conv1, conv2 = (small_model.graph.node(n) for n in ("stem/conv1", "stem/conv2"))
    assert conv1.inputs[0] is small_model.graph.inputs[0]
    # onnx_ir gives INTS attributes as tuples: compare every sequence as a list
    attrs = {k: list(a.value) if isinstance(a.value, (list, tuple)) else a.value for k, a in conv1.attributes.items()}
    assert attrs == {"w_bits": 8, "a_bits": 8, "a_signed": 1, "kernel_shape": [4, 4], "strides": [4, 4],
                     "pads": [0, 0, 0, 0], "group": 1}
    assert conv2.attributes.get_int("group") == 8 and list(conv2.attributes.get_ints("pads")) == [1, 1, 1, 1]
    assert tuple(conv1.inputs[1].const_value.shape) == (8, 3, 4, 4)
    assert tuple(conv2.inputs[1].const_value.shape) == (16, 1, 3, 3)
    # the first bottleneck now reads the second DPReLU, at the size the max-pool gave (read it anew:
    # the pass gives the max-pool's output name to a new value, the old one is detached)
    first_block_input = small_model.graph.node(first_conv).inputs[0]
    assert first_block_input.producer().op_type == "DPReLU"
    assert tuple(first_block_input.shape)[1:] == (16, SIZE // 4, SIZE // 4)
    # new parameters as the spec initialises them
    np.testing.assert_array_equal(_init(small_model, "stem/conv1.act_bound"), -np.ones(3, np.float32))
    np.testing.assert_array_equal(_init(small_model, "stem/bn2.gamma"), np.ones(16, np.float32))
    np.testing.assert_array_equal(_init(small_model, "stem/dprelu1.neg_slope"), np.full(8, 0.25, np.float32))
    # ACE: float 7x7 stem out, 8x8-bit PokeInit in
    h = SIZE // 4
    poke_macs = h * h * 8 * 3 * 16 + h * h * 16 * 9
    assert ace_total(small_model) == ace_before - 256 * stem_macs + 64 * poke_macs
    assert run_ort(small_model, random_input()).shape == (2, 10)


def test_does_not_fire_twice(small_model):
    PokeStemPass(mid_channels=8)(small_model)
    assert not PokeStemPass(mid_channels=8)(small_model).modified


def test_a_model_without_inferred_shapes_is_refused_in_one_line(small_resnet_path):
    """A model read with onnx_ir.load has no shapes to take the window from: a TypeError came out."""
    model = ir.load(small_resnet_path)
    nodes = [node.op_type for node in model.graph]
    with pytest.raises(BnnccError, match=r"^poke_stem: the stem \(/conv1/Conv, /relu/Relu, /maxpool/MaxPool\) has no "
                                         r"inferred image size; load the model with bnncc.load$"):
        PokeStemPass(mid_channels=8)(model)
    assert [node.op_type for node in model.graph] == nodes  # refused before any change
    assert PokeStemPass(mid_channels=8)(load(small_resnet_path)).modified


def test_stem_width_must_be_a_multiple_of_mid_channels(small_model):
    with pytest.raises(BnnccError, match="16 output channels .* not a multiple of mid_channels=32; set one that "
                                         "divides them, e.g. --set passes.poke_stem.mid_channels=16"):
        PokeStemPass()(small_model)
    # the hint looked for a divisor among 1..mid_channels: minutes for a value of 10^9
    with pytest.raises(BnnccError, match="mid_channels=16$"):
        PokeStemPass(mid_channels=10**20 + 1)(small_model)


def _stem_variant(tmp_path, size: int, maxpool) -> str:
    """The narrow ResNet-50 at ``size`` px with ``maxpool`` as its stem's pool."""
    module = zoo.resnet50(0.125, num_classes=CLASSES)
    module.maxpool = maxpool
    return str(zoo.export_onnx(module, tmp_path / f"stem_{size}.onnx", input_size=size, batch="symbolic"))


@pytest.mark.parametrize("size, maxpool, window, pads, blocks_at", [
    (32, torch.nn.Identity(), 2, [0, 0, 0, 0], 16),  # no max-pool: the float stem halves the image
    (66, torch.nn.MaxPool2d(3, 2, 1), 4, [1, 1, 1, 1], 17),  # 4 does not divide 66: the pool gives 17
    (3, torch.nn.MaxPool2d(3, 2, 1), 4, [0, 0, 1, 1], 1),  # an input smaller than the window, padded to it
])
def test_the_stem_keeps_the_size_the_float_stem_gives(tmp_path, size, maxpool, window, pads, blocks_at):
    """A fixed 4x4/4 window put the blocks of a stem without a max-pool at a quarter of their pixels
    (112 -> 56 at 224 px), and those of a 225 px input one pixel short, without a word."""
    model = load(_stem_variant(tmp_path, size, maxpool))
    first_conv = recognize(model).blocks[0].convs[0]
    float_out = run_ort(model, np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32))
    assert PokeStemPass(mid_channels=8)(model).modified
    conv1 = model.graph.node("stem/conv1")
    assert list(conv1.attributes.get_ints("kernel_shape")) == list(conv1.attributes.get_ints("strides")) == [window] * 2
    assert list(conv1.attributes.get_ints("pads")) == pads
    assert tuple(model.graph.node(first_conv).inputs[0].shape)[2:] == (blocks_at, blocks_at)
    x = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    assert run_ort(model, x).shape == float_out.shape


def test_a_stem_size_no_window_gives_is_refused_by_the_front_end(tmp_path):
    """A pool without padding takes 64 px to 15: no 4x4/4 window with pads gives it. The front end
    refuses it, so that inspect and ace do not take a model every recipe then refuses."""
    with pytest.raises(BnnccError, match=r"stem_64.onnx: the stem \(.*\) takes 64x64 pixels to 15x15; a PokeInit "
                                         r"stem of 4x4 windows, stride 4, cannot give that size"):
        load(_stem_variant(tmp_path, 64, torch.nn.MaxPool2d(3, 2, 0)))


def test_a_stem_stride_beyond_its_window_is_refused_by_the_front_end(tmp_path):
    """A pool stride of 2^62 made a PokeInit window of 2^63: inspect took the model and rewrite then
    failed allocating its weights ('unexpected ValueError')."""
    with pytest.raises(BnnccError, match=r"stem_64.onnx: the stem's MaxPool '.*' has strides \[4, 4\] beyond its 3x3 "
                                         r"window; a PokeInit stem takes none that skip pixels"):
        load(_stem_variant(tmp_path, 64, torch.nn.MaxPool2d(3, 4, 1)))
