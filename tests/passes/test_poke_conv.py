"""poke_conv: every float bottleneck conv -> PokeConv, as bnncc/ops/spec.md draws it."""

from __future__ import annotations

import numpy as np
import pytest
from _support import ace_total, op_counts, random_input, run_ort

from bnncc.errors import BnnccError
from bnncc.frontend import recognize
from bnncc.passes.poke_conv import PokeConvPass
from bnncc.passes.remove_projection_shortcuts import RemoveProjectionShortcutsPass


@pytest.fixture
def shortcut_free(small_model):
    """The narrow ResNet-50 with its projections removed (poke_conv's precondition), and its blocks."""
    blocks = recognize(small_model).blocks
    RemoveProjectionShortcutsPass()(small_model)
    return small_model, blocks


def _init(model, value):
    return model.graph.initializers[value.name].const_value.numpy()


def test_every_bottleneck_conv_becomes_a_poke_conv(shortcut_free):
    model, blocks = shortcut_free
    float_weights = {c: model.graph.node(c).inputs[1] for b in blocks for c in b.convs}
    float_biases = {model.graph.node(c).inputs[2].name for b in blocks for c in b.convs}
    third = {b.convs[2]: b.convs[0] for b in blocks}  # third conv -> first conv of its block
    before = op_counts(model)

    assert PokeConvPass(clip_bound=2.5)(model).modified

    after = op_counts(model)
    assert after["Conv"] == before["Conv"] - 48 == 1 and after["Relu"] == 1  # the stem's
    assert after["Add"] == 0
    for op in ("BinaryConv", "SEGate", "DPReLU", "Mul"):
        assert after[op] == 48, op
    assert after["BatchNormalization"] == 96 and after["ReshapeAdd"] == 48 + 16
    assert not float_biases & set(model.graph.initializers)  # the folded float biases are dropped
    for conv_name, weight in float_weights.items():
        binary = model.graph.node(f"{conv_name}/binary")
        assert binary.inputs[1] is weight  # the float weights carry over as they are
        assert binary.attributes.get_float("clip_bound") == 2.5
        assert list(binary.attributes.get_ints("kernel_shape")) == list(weight.const_value.shape[2:])
        x = binary.inputs[0]
        bn = model.graph.node(f"{conv_name}/bn")
        gamma = 0.0 if conv_name in third else 1.0
        np.testing.assert_array_equal(_init(model, bn.inputs[1]), np.full(weight.const_value.shape[0], gamma))
        local = model.graph.node(f"{conv_name}/local")
        assert local.inputs[1] is x and local.attributes.get_string("method") == "zeropad"
        se = model.graph.node(f"{conv_name}/se")
        assert se.inputs[0] is x  # the SE gate reads the conv's input
        cout, cin = weight.const_value.shape[:2]
        assert tuple(se.inputs[1].const_value.shape) == (cin // 8, cin, 1, 1)
        assert tuple(se.inputs[4].const_value.shape) == (cout, cin // 8, 1, 1)
        np.testing.assert_array_equal(_init(model, se.inputs[2]), -np.ones(cin, np.float32))
        if conv_name in third:  # the block shortcut reads what the block's first binary conv reads
            block = model.graph.node(f"{conv_name}/block")
            block_input = model.graph.node(f"{third[conv_name]}/binary").inputs[0]
            assert block.inputs[1] is block_input and block.attributes.get_string("method") == "tile"
    # v1.5: the stride sits on the 3x3 binary convs
    strided = [n for n in model.graph if n.op_type == "BinaryConv" and list(n.attributes.get_ints("strides")) != [1, 1]]
    assert [tuple(n.attributes.get_ints("kernel_shape")) for n in strided] == [(3, 3)] * 3


def test_ace_of_the_binary_and_se_convs(shortcut_free):
    model, blocks = shortcut_free
    conv_shapes = []  # (Ho*Wo, Cout, Cin, k*k) of each bottleneck conv, read before the rewrite
    for b in blocks:
        for name in b.convs:
            node = model.graph.node(name)
            cout, cin, kh, kw = node.inputs[1].const_value.shape
            ho, wo = node.outputs[0].shape[2:]
            conv_shapes.append((ho * wo, cout, cin, kh * kw))
    float_macs = sum(p * o * i * k for p, o, i, k in conv_shapes)
    binary_macs = float_macs  # 1 x 1 bit
    se_macs = sum(i * (i // 8) + (i // 8) * o for _, o, i, _ in conv_shapes)  # at 1x1 spatial, 4 x 4 bits
    ace_before = ace_total(model)
    PokeConvPass()(model)
    assert ace_total(model) == ace_before - 256 * float_macs + binary_macs + 16 * se_macs


def test_result_runs_with_a_free_batch(shortcut_free):
    model, _ = shortcut_free
    PokeConvPass()(model)
    for batch in (1, 2):
        out = run_ort(model, random_input(batch))
        assert out.shape == (batch, 10) and np.isfinite(out).all()


def test_projection_shortcut_is_an_error(small_model):
    with pytest.raises(BnnccError, match="projection shortcut .*; run remove_projection_shortcuts first"):
        PokeConvPass()(small_model)


def test_does_not_fire_twice(shortcut_free):
    model, _ = shortcut_free
    PokeConvPass()(model)
    nodes = len(model.graph)
    assert not PokeConvPass()(model).modified and len(model.graph) == nodes
