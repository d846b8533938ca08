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
    from bnncc.ops.poke_conv import BLOCK, BN, INPUTS, SE

    model, blocks = shortcut_free
    float_weights = {c: model.graph.node(c).inputs[1] for b in blocks for c in b.convs}
    float_biases = {model.graph.node(c).inputs[2].name for b in blocks for c in b.convs}
    third = {b.convs[2]: b.convs[0] for b in blocks}  # third conv -> first conv of its block
    before = op_counts(model)

    assert PokeConvPass(clip_bound=2.5)(model).modified

    after = op_counts(model)
    assert after["Conv"] == before["Conv"] - 48 == 1 and after["Relu"] == 1  # the stem's
    assert after["Add"] == 0
    assert after["PokeConv"] == 48
    for op in ("BinaryConv", "SEGate", "DPReLU", "Mul", "BatchNormalization", "ReshapeAdd"):
        assert after[op] == 0, op  # all inside the PokeConvs, the block shortcuts too
    assert not float_biases & set(model.graph.initializers)  # the folded float biases are dropped
    for conv_name, weight in float_weights.items():
        poke = model.graph.node(conv_name)
        assert poke.op_type == "PokeConv" and poke.domain == "ai.bnncc"
        assert poke.inputs[1] is weight  # the float weights carry over as they are
        assert poke.attributes.get_float("clip_bound") == 2.5
        assert list(poke.attributes.get_ints("kernel_shape")) == list(weight.const_value.shape[2:])
        assert (poke.attributes.get_int("se_w_bits"), poke.attributes.get_int("se_a_bits")) == (4, 4)
        bn_scale = poke.inputs[BN][0]
        assert bn_scale.name == f"{conv_name}/bn.gamma"
        gamma = 0.0 if conv_name in third else 1.0
        np.testing.assert_array_equal(_init(model, bn_scale), np.full(weight.const_value.shape[0], gamma))
        se_w1, se_bound1, _, se_w2 = (poke.inputs[i] for i in SE[1:5])
        cout, cin = weight.const_value.shape[:2]
        assert tuple(se_w1.const_value.shape) == (cin // 8, cin, 1, 1)
        assert tuple(se_w2.const_value.shape) == (cout, cin // 8, 1, 1)
        np.testing.assert_array_equal(_init(model, se_bound1), -np.ones(cin, np.float32))
        assert all(v is not None and v.const_value is not None for v in poke.inputs[1:BLOCK])
        if conv_name in third:  # the block shortcut reads what the block's first binary conv reads
            assert len(poke.inputs) == len(INPUTS) and poke.overload == "block"
            assert poke.inputs[BLOCK] is model.graph.node(third[conv_name]).inputs[0]
        else:
            assert len(poke.inputs) == len(INPUTS) - 1 and poke.overload == ""
    # v1.5: the stride sits on the 3x3 binary convs
    strided = [n for n in model.graph if n.op_type == "PokeConv" and list(n.attributes.get_ints("strides")) != [1, 1]]
    assert [tuple(n.attributes.get_ints("kernel_shape")) for n in strided] == [(3, 3)] * 3


def test_poke_conv_runs_as_its_expanded_chain(shortcut_free):
    """onnxruntime gives the same logits on the PokeConv nodes and on their inlined chains."""
    import onnx_ir as ir
    import onnxruntime as ort

    from bnncc.ops import inline_functions

    model, _ = shortcut_free
    PokeConvPass()(model)
    expanded = inline_functions(ir.to_proto(model))
    assert not [n for n in expanded.graph.node if n.op_type == "PokeConv"]
    assert sum(n.op_type == "BinaryConv" for n in expanded.graph.node) == 48
    x = random_input(1)
    session = ort.InferenceSession(expanded.SerializeToString())
    np.testing.assert_array_equal(session.run(None, {session.get_inputs()[0].name: x})[0], run_ort(model, x))


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


def test_without_se_gate_every_poke_conv_omits_it(shortcut_free):
    """se_gate=False: the SE inputs are omitted (the "ungated" overloads) and ACE counts the binary convs alone."""
    from bnncc.ops.poke_conv import BLOCK, SE

    model, blocks = shortcut_free
    float_macs = 0
    for name in (c for b in blocks for c in b.convs):
        node = model.graph.node(name)
        cout, cin, kh, kw = node.inputs[1].const_value.shape
        ho, wo = node.outputs[0].shape[2:]
        float_macs += ho * wo * cout * cin * kh * kw
    ace_before = ace_total(model)
    assert PokeConvPass(se_gate=False)(model).modified
    pokes = [n for n in model.graph if n.op_type == "PokeConv"]
    assert len(pokes) == 48 and not [name for name in model.graph.initializers if "/se." in name]
    for poke in pokes:
        assert all(poke.inputs[i] is None for i in SE[1:])
        assert poke.overload == ("block_ungated" if len(poke.inputs) > BLOCK else "ungated")
    assert ace_total(model) == ace_before - 256 * float_macs + float_macs  # the 1 x 1 bit binary convs alone
    out = run_ort(model, random_input(2))
    assert out.shape == (2, 10) and np.isfinite(out).all()


def test_result_runs_with_a_free_batch(shortcut_free):
    model, _ = shortcut_free
    PokeConvPass()(model)
    for batch in (1, 2):
        out = run_ort(model, random_input(batch))
        assert out.shape == (batch, 10) and np.isfinite(out).all()


def test_projection_shortcut_is_an_error(small_model):
    with pytest.raises(BnnccError, match="projection shortcut .*; run remove_projection_shortcuts first"):
        PokeConvPass()(small_model)


def test_se_gates_past_one_onnx_file_are_refused_before_any_is_made(shortcut_free, monkeypatch):
    """3x a ResNet-101 at se_ratio 1 made 3.3 GiB of SE gates, in minutes, for the checker to refuse at the end.
    Here protobuf's limit is lowered to the narrow model's size with its SE gates at se_ratio 1 (counted by hand:
    Cin // r * (Cin + Cout) float32 weights per conv), as onnx's checker reads it."""
    import onnx

    from bnncc.passes._blocks import float_blocks

    model, _ = shortcut_free
    shapes = [conv.inputs[1].const_value.shape[:2] for block in float_blocks(model.graph) for conv in block.convs]
    se_weights = sum(cin * (cin + cout) for cout, cin in shapes)
    size = sum(value.const_value.nbytes for value in model.graph.initializers.values()) + 4 * se_weights
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", size - 1)
    nodes = len(model.graph)
    with pytest.raises(BnnccError, match=f"^poke_conv: with SE gates of {se_weights:,} float32 weights at "
                                         f"se_ratio=1, the graph would take .* GiB, more than the 2 GiB"):
        PokeConvPass(se_ratio=1)(model)
    assert len(model.graph) == nodes and not any(n.op_type == "PokeConv" for n in model.graph)
    assert PokeConvPass(se_ratio=2)(model).modified  # half of them fit


def test_does_not_fire_twice(shortcut_free):
    model, _ = shortcut_free
    PokeConvPass()(model)
    nodes = len(model.graph)
    assert not PokeConvPass()(model).modified and len(model.graph) == nodes
