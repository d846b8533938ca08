"""int8_head: Gemm -> QuantGemm with the float fc weights, checked against a numpy quantizer."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _support import ace_total, op_counts, run_ort
from onnx import TensorProto, helper, numpy_helper

from bnncc.errors import BnnccError
from bnncc.passes.int8_head import Int8HeadPass

RNG = np.random.default_rng(0)
W = RNG.standard_normal((5, 12)).astype(np.float32)
B = RNG.standard_normal(5).astype(np.float32)


def _dense(**gemm_attrs) -> ir.Model:
    """x (N, 12) -> Gemm -> y (N, 5)."""
    weight = W if gemm_attrs.get("transB", 0) else W.T
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", **gemm_attrs)], "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(B, "b")])
    return ir.from_proto(onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 18)])))


def _quantize_rows(w: np.ndarray, bits: int) -> np.ndarray:
    """Per-output-row symmetric quantizer: round half up, clip to +-(2^(b-1)-1)."""
    levels = 2 ** (bits - 1) - 1
    scale = levels / np.abs(w).max(axis=1, keepdims=True)
    return np.clip(np.floor(w * scale + 0.5), -levels, levels) / scale


def test_gemm_becomes_quant_gemm_with_the_float_weights():
    model = _dense(transB=1)
    ace_before = ace_total(model)
    assert Int8HeadPass()(model).modified
    assert op_counts(model) == {"QuantGemm": 1}
    node = next(iter(model.graph))
    assert (node.domain, node.attributes.get_int("w_bits"), node.attributes.get_int("a_bits"),
            node.attributes.get_int("a_signed")) == ("ai.bnncc", 8, 8, 1)
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), W)
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), -np.ones(12, np.float32))  # uncalibrated
    assert model.graph.outputs[0].name == "y"
    assert ace_total(model) == ace_before // 256 * 64 == 12 * 5 * 64


def test_outputs_match_numpy_quantized_weights():
    model = _dense(transB=1)
    Int8HeadPass(w_bits=4)(model)
    x = RNG.standard_normal((3, 12)).astype(np.float32)
    expected = x @ _quantize_rows(W, 4).T + B  # activations stay float until calibrated
    np.testing.assert_allclose(run_ort(model, x), expected, rtol=1e-5, atol=1e-5)


def test_does_not_fire_twice():
    model = _dense(transB=1)
    Int8HeadPass()(model)
    assert not Int8HeadPass()(model).modified


def test_non_canonical_gemm_is_refused():
    with pytest.raises(BnnccError, match="node 'fc' \\(Gemm\\) is not canonical"):
        Int8HeadPass()(_dense(transB=0))
