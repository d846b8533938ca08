import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from bnncc.cost import ace
from bnncc.ops import OPS, attach_functions, check_graph

from opsref import run_onnx
from test_quant import quant_acts_np, quant_weights_np


# spec.md: w_bits and a_bits default to 4; a node without them is the 4-bit gate in every face
@pytest.mark.parametrize("attrs", [dict(w_bits=4, a_bits=4), {}], ids=["4/4", "defaults"])
def test_se_gate_matches_numpy_and_is_a_hard_sigmoid_gate(attrs):
    rng = np.random.default_rng(5)
    ci, co = 64, 48
    r = rng.standard_normal((2, ci, 5, 5)).astype(np.float32)
    w1 = rng.standard_normal((ci // 8, ci, 1, 1)).astype(np.float32)
    b1 = rng.standard_normal(ci // 8).astype(np.float32)
    w2 = rng.standard_normal((co, ci // 8, 1, 1)).astype(np.float32)
    b2 = rng.standard_normal(co).astype(np.float32)
    bound1 = np.full(ci, 0.6, dtype=np.float32)
    bound2 = np.full(ci // 8, 4.0, dtype=np.float32)
    g = r.mean(axis=(2, 3))
    h = quant_acts_np(g, bound1, 4, 1) @ quant_weights_np(w1[:, :, 0, 0], 4).T + b1
    h = np.maximum(h, 0)
    h = quant_acts_np(h, bound2, 4, 0) @ quant_weights_np(w2[:, :, 0, 0], 4).T + b2
    expected = (np.clip(h + 3, 0, 6) / 6)[:, :, None, None]
    inputs = [r, w1, bound1, b1, w2, bound2, b2]
    got = run_onnx("SEGate", inputs, **attrs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for layout in (torch.contiguous_format, torch.channels_last):  # the trainer's format is channels_last
        tensors = [torch.tensor(a, requires_grad=a.ndim > 1 or a is b1 or a is b2) for a in inputs]
        tensors[0] = tensors[0].contiguous(memory_format=layout)
        got_t = OPS["SEGate"].torch(*tensors, **attrs)
        np.testing.assert_allclose(got_t.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert got.min() >= 0 and got.max() <= 1


def test_an_se_gate_without_bit_widths_is_checked_and_measured_at_4_and_4():
    """check_graph (every command's) took the node without w_bits and a_bits for a broken one; `bnncc ace`
    refused it. By hand: the gate 16 -> 2 -> 8 has 16*2 + 2*8 = 48 MACs at 1x1, ACE 48 * 4 * 4."""
    init = {"w1": np.ones((2, 16, 1, 1), np.float32), "bound1": np.ones(16, np.float32),
            "b1": np.zeros(2, np.float32), "w2": np.ones((8, 2, 1, 1), np.float32),
            "bound2": np.ones(2, np.float32), "b2": np.zeros(8, np.float32)}
    node = helper.make_node("SEGate", ["r", *init], ["g"], name="se", domain="ai.bnncc")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 16, 3, 3])],
                              [helper.make_tensor_value_info("g", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in init.items()])
    model = attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    check_graph(ir.serde.deserialize_model(model))
    assert [(layer.w_bits, layer.a_bits, layer.macs, layer.ace) for layer in ace(model).layers] == [(4, 4, 48, 768)]


def _se_inputs(ci, co, hw, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(3, ci, hw, hw, dtype=dtype, generator=gen)
    w1 = torch.randn(ci // 8, ci, 1, 1, dtype=dtype, generator=gen)
    b1 = torch.randn(ci // 8, dtype=dtype, generator=gen)
    w2 = torch.randn(co, ci // 8, 1, 1, dtype=dtype, generator=gen)
    b2 = torch.randn(co, dtype=dtype, generator=gen)
    return r, w1, b1, w2, b2


def test_se_gate_backward_matches_finite_differences_on_the_float_path():
    # Uncalibrated bounds and float weights leave a smooth function (but for relu and the
    # hard sigmoid's kinks), so finite differences check the hand-written backward.
    r, w1, b1, w2, b2 = (t.requires_grad_() for t in _se_inputs(16, 8, 3, torch.float64, 0))
    bound1, bound2 = -torch.ones(16, dtype=torch.float64), -torch.ones(2, dtype=torch.float64)

    def gate(r, w1, b1, w2, b2):
        return OPS["SEGate"].torch(r, w1, bound1, b1, w2, bound2, b2, w_bits=4, a_bits=4, quantize_weights=False)

    assert torch.autograd.gradcheck(gate, (r, w1, b1, w2, b2))


def test_se_gate_straight_through_gradients_match_autograd_of_the_composed_ops():
    # The reference is autograd through the gate's definition: mean, QuantGemm, relu, QuantGemm, hard sigmoid.
    inputs = _se_inputs(32, 24, 4, torch.float32, 1)
    bound1 = torch.rand(32, generator=torch.Generator().manual_seed(2)) + 0.2
    bound2 = torch.full((4,), 2.0)
    bound1[5] = -1.0  # one uncalibrated channel passes through
    grad = torch.randn(3, 24, 1, 1, generator=torch.Generator().manual_seed(3))
    attrs = dict(w_bits=4, a_bits=4)

    def reference(r, w1, b1, w2, b2):
        h = F.relu(OPS["QuantGemm"].torch(r.mean(dim=(2, 3)), w1.flatten(1), bound1, b1, a_signed=1, **attrs))
        return F.hardsigmoid(OPS["QuantGemm"].torch(h, w2.flatten(1), bound2, b2, a_signed=0, **attrs))[:, :, None, None]

    results = []
    for fn in (reference, lambda r, w1, b1, w2, b2: OPS["SEGate"].torch(r, w1, bound1, b1, w2, bound2, b2, **attrs)):
        tensors = [t.clone().requires_grad_() for t in inputs]
        fn(*tensors).backward(grad)
        results.append([t.grad for t in tensors])
    for got, expected in zip(*results[::-1]):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
