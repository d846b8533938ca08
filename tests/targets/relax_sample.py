"""A small Relax module of the kind the targets build: an ONNX float graph (imported with
``from_onnx``) followed by our sign-and-bitpack and a 1x1 binary conv (xor + popcount), and its
numpy reference. Shared by the arm64 and cuda tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

ROWS, FEATURES, COUT = 4, 40, 12
FUNCTION = "bnn"


def float_model(rng) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """y = Relu(x @ W + b) - 0.5 over x (ROWS, 16) as an opset-18 ONNX model; also W and b."""
    w = rng.standard_normal((16, FEATURES)).astype(np.float32)
    b = rng.standard_normal(FEATURES).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
         helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Sub", ["r", "half"], ["y"])],
        "sample", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, FEATURES])],
        [onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(b, "b"),
         onnx.numpy_helper.from_array(np.array(0.5, np.float32), "half")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), w, b


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_c sign(y[r, c]) * sign(weights[o, c]) with sign(0) = +1, y = relu(x W + b) - 0.5: int (ROWS, COUT)."""
    y = np.maximum(x @ w + b, 0) - 0.5
    return np.where(y >= 0, 1, -1) @ np.where(weights >= 0, 1, -1).T


def build(target, schedule, seed: int = 0):
    """(Relax module with function FUNCTION: x (ROWS, 16) float32 -> (1, 1, ROWS, COUT) int32,
    a function computing the expected output of an x)."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from bnncc.targets.kernels import binary_conv, bitpack

    rng = np.random.default_rng(seed)
    model, w, b = float_model(rng)
    weights = rng.standard_normal((COUT, FEATURES)).astype(np.float32)
    packed = bitpack.pack_weights(weights.reshape(COUT, FEATURES, 1, 1))
    mod = from_onnx(model)
    bb = relax.BlockBuilder(mod)
    x = relax.Var("x", relax.TensorType((ROWS, 16), "float32"))
    pack = schedule(bitpack.sign_bitpack_func(1, 1, ROWS, FEATURES), target)
    conv = schedule(binary_conv.binary_conv2d_func(1, 1, ROWS, FEATURES, COUT, 1, 1), target)
    with bb.function(FUNCTION, [x]):
        with bb.dataflow():
            pack_gv = bb.add_func(pack.with_attr("global_symbol", "sign_pack"), "sign_pack")
            conv_gv = bb.add_func(conv.with_attr("global_symbol", "binary_conv2d"), "binary_conv2d")
            y = bb.emit(relax.Call(mod.get_global_var("main"), [x]))
            nhwc = bb.emit(relax.op.reshape(y, (1, 1, ROWS, FEATURES)))
            bits = bb.emit(relax.call_tir(pack_gv, [nhwc], relax.TensorType((1, 1, ROWS, bitpack.words(FEATURES)), "uint32")))
            out = bb.emit(relax.call_tir(conv_gv, [bits, relax.const(packed.bits), relax.const(packed.border)],
                                         relax.TensorType((1, 1, ROWS, COUT), "int32")))
            result = bb.emit_output(out)
        bb.emit_func_output(result)
    return bb.get(), lambda xs: reference(xs, w, b, weights).reshape(1, 1, ROWS, COUT)
