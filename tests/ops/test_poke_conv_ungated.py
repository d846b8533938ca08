"""PokeConv without its SE gate (the "ungated" and "block_ungated" overloads) as one node.

The reference is onnxruntime on the ungated bodies, checked in turn against the gated bodies
with a gate of exactly 1 (the hard sigmoid saturates: min(max(g + 3, 0), 6) / 6 = 1 for g >= 3),
which the gated op's own tests check elsewhere: times 1 is exact, so the two must agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from bnncc.cost import ace
from bnncc.errors import BnnccError
from bnncc.ops import OPS, attach_functions, inline_functions
from bnncc.ops.poke_conv import BLOCK, INPUTS, SE, overload

RNG = np.random.default_rng(21)
CIN, COUT, HIDDEN, SIZE = 8, 16, 2, 6
X = RNG.standard_normal((2, CIN, SIZE, SIZE)).astype(np.float32)
R = RNG.standard_normal((2, 4, SIZE, SIZE)).astype(np.float32)  # tiled 4x and pooled 6 -> 3: both matchings


def _uniform(low, high, *shape):
    return RNG.uniform(low, high, shape).astype(np.float32)


PARAMS = {
    "W": RNG.standard_normal((COUT, CIN, 3, 3)).astype(np.float32),
    "bn_scale": _uniform(0.5, 1.5, COUT), "bn_bias": _uniform(-1, 1, COUT), "bn_mean": _uniform(-0.3, 0.3, COUT),
    "bn_var": _uniform(0.5, 2, COUT),
    "bias_x": _uniform(-0.2, 0.2, COUT), "bias_y": _uniform(-0.2, 0.2, COUT), "pos_slope": _uniform(0.5, 1.5, COUT),
    "neg_slope": _uniform(0, 0.5, COUT),
    # a gate of exactly 1: the second SE conv's output is 10 +- 0.1, far into the hard sigmoid's saturation
    "se_w1": _uniform(-0.3, 0.3, HIDDEN, CIN, 1, 1), "se_bound1": -np.ones(CIN, np.float32),
    "se_b1": _uniform(0, 0.1, HIDDEN), "se_w2": _uniform(-0.01, 0.01, COUT, HIDDEN, 1, 1),
    "se_bound2": -np.ones(HIDDEN, np.float32), "se_b2": np.full(COUT, 10.0, np.float32),
    "split_scale": _uniform(0.5, 1.5, COUT), "split_bias": _uniform(-1, 1, COUT),
    "split_mean": _uniform(-0.3, 0.3, COUT), "split_var": _uniform(0.5, 2, COUT),
}
ATTRS = dict(kernel_shape=[3, 3], strides=[2, 2], clip_bound=3.0, epsilon=1e-5)


def _model(gated: bool, block: bool, node_overload: str | None = None, omit=()) -> onnx.ModelProto:
    """One PokeConv node on graph inputs X (and R); the SE inputs given when ``gated``, ``omit`` others."""
    names = [name if (gated or i not in SE[1:]) and i not in omit else "" for i, name in enumerate(INPUTS[:BLOCK])]
    names += ["R"] if block else []
    node = helper.make_node("PokeConv", names, ["Y"], name="poke", domain="ai.bnncc",
                            overload=overload(gated, block) if node_overload is None else node_overload, **ATTRS)
    inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, a.shape) for n, a in (("X", X), ("R", R))
              if n in names]
    outputs = [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)]
    graph = helper.make_graph([node], "poke", inputs, outputs,
                              [numpy_helper.from_array(PARAMS[n], n) for n in names if n in PARAMS])
    return attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _run(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"X": X, "R": R}
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


@pytest.mark.parametrize("block", [False, True], ids=["ungated", "block_ungated"])
def test_ungated_body_is_the_gated_one_at_gate_one(block):
    ungated = _run(_model(gated=False, block=block))
    assert ungated.shape == (2, COUT, 3, 3)
    np.testing.assert_array_equal(ungated, _run(_model(gated=True, block=block)))
    # the expanded chain (QONNX export's first step) runs the same body
    expanded = inline_functions(_model(gated=False, block=block))
    assert {n.op_type for n in expanded.graph.node} >= {"BinaryConv", "DPReLU", "ReshapeAdd"}
    assert not {"PokeConv", "SEGate", "Mul"} & {n.op_type for n in expanded.graph.node}
    np.testing.assert_array_equal(_run(expanded), ungated)


@pytest.mark.parametrize("block", [False, True], ids=["ungated", "block_ungated"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["composed", "fused"])  # fused CPU kernel or not
def test_torch_face_without_gate_matches_onnxruntime(block, channels_last):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    args = [torch.from_numpy(X).contiguous(memory_format=layout)]
    args += [None if i in SE[1:] else torch.from_numpy(PARAMS[name]) for i, name in enumerate(INPUTS[1:BLOCK], 1)]
    if block:
        args.append(torch.from_numpy(R).contiguous(memory_format=layout))
    with torch.no_grad():
        ours = OPS["PokeConv"].torch(*args, training=False, **ATTRS).numpy()
    reference = _run(_model(gated=False, block=block))
    # the same float32 maths in another order: a 1e-5 of the range, far below a flipped sign's effect
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.ptp(reference))


def test_cost_of_an_ungated_node_has_no_se_layer_or_multiply():
    gated, ungated = (ace(ir.from_proto(_model(gated=g, block=True))) for g in (True, False))
    assert [layer.name for layer in gated.layers] == ["poke/binary", "poke/se"]
    assert [layer.name for layer in ungated.layers] == ["poke/binary"]
    assert ungated.total == gated.total - (CIN * HIDDEN + HIDDEN * COUT) * 4 * 4  # the two int4 SE convs
    (gated_ops,), (ungated_ops,) = gated.elementwise, ungated.elementwise
    assert {k for k in gated_ops.sops if k.startswith("se_")} >= {"se_mul", "se_pool"}
    assert not [k for k in ungated_ops.sops if k.startswith("se_")]
    assert {k: v for k, v in gated_ops.sops.items() if not k.startswith("se_")} == ungated_ops.sops


def test_partly_omitted_se_inputs_or_a_wrong_overload_is_one_line():
    with pytest.raises(BnnccError, match=r"'poke' \(PokeConv\): SE gate inputs 10-15 must be all given or all "
                                         r"omitted, 5 of 6 are"):
        ace(ir.from_proto(_model(gated=True, block=False, omit=(13,))))
    with pytest.raises(BnnccError, match=r"'poke' \(PokeConv\): overload 'block' does not match its inputs "
                                         r"\(without SE gate, with block shortcut\): expected 'block_ungated'"):
        ace(ir.from_proto(_model(gated=False, block=True, node_overload="block")))
