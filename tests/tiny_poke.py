"""A one-PokeConv network written with onnx.helper, as spec.md draws it, for tests that need a small real graph."""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper


def bnncc_model(nodes, inputs, outputs, init) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [onnx.numpy_helper.from_array(v, k) for k, v in init.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("ai.bnncc", 1)])
    return ir.from_proto(proto)


def tiny_poke_model(se_gate: bool = True) -> ir.Model:
    """QuantConv stem -> BN -> DPReLU -> one PokeConv -> GAP -> Flatten -> QuantGemm (spec.md).

    x (N,3,16,16) -> stem 4x4/4 VALID 3->16 -> (N,16,4,4); PokeConv ("block" overload): BinaryConv
    3x3/2 16->32 with the local (zeropad) and block (tile) shortcuts both from the PokeConv input,
    SE gate (16 -> 2 -> 32) from the same input. Bounds start at -1 (uncalibrated); BN statistics and gammas are random so
    no channel is trivial; the SE hidden biases are positive so its ReLU passes gradient.
    ``se_gate=False``: the PokeConv has no SE gate (its inputs 10-15 omitted, overload "block_ungated").
    """
    rng = np.random.default_rng(11)

    def normal(*shape, scale=1.0):
        return (scale * rng.normal(size=shape)).astype(np.float32)

    def bn(prefix, c):
        return {f"{prefix}.gamma": rng.uniform(0.5, 1.5, c).astype(np.float32), f"{prefix}.beta": normal(c),
                f"{prefix}.mean": normal(c, scale=0.1), f"{prefix}.var": rng.uniform(0.5, 2, c).astype(np.float32)}

    def dprelu(prefix, c):
        return {f"{prefix}.bx": normal(c, scale=0.1), f"{prefix}.by": normal(c, scale=0.1),
                f"{prefix}.pos": rng.uniform(0.8, 1.2, c).astype(np.float32),
                f"{prefix}.neg": rng.uniform(0.1, 0.4, c).astype(np.float32)}

    init = {
        "stem.w": normal(16, 3, 4, 4, scale=0.3), "stem.bound": -np.ones(3, np.float32), "stem.b": normal(16),
        **bn("stem.bn", 16), **dprelu("stem.act", 16),
        "poke.w": normal(32, 16, 3, 3), **bn("poke.bn", 32), **dprelu("poke.act", 32),
        "se.w1": normal(2, 16, 1, 1, scale=0.3), "se.bound1": -np.ones(16, np.float32),
        "se.b1": rng.uniform(0.5, 1.0, 2).astype(np.float32),
        "se.w2": normal(32, 2, 1, 1), "se.bound2": -np.ones(2, np.float32), "se.b2": normal(32),
        **bn("poke.bn_split", 32),
        "fc.w": normal(10, 32), "fc.bound": -np.ones(32, np.float32), "fc.b": normal(10),
    }

    def bn_node(x, prefix, y):
        return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in ("gamma", "beta", "mean", "var")],
                                [y], name=prefix, epsilon=1e-5)

    def params(prefix, names):
        return [f"{prefix}.{k}" for k in names]

    def dprelu_node(x, prefix, y):
        return helper.make_node("DPReLU", [x] + [f"{prefix}.{k}" for k in ("bx", "by", "pos", "neg")], [y],
                                name=prefix, domain="ai.bnncc")

    nodes = [
        helper.make_node("QuantConv", ["x", "stem.w", "stem.bound", "stem.b"], ["s0"], name="stem",
                         domain="ai.bnncc", w_bits=8, a_bits=8, a_signed=1, kernel_shape=[4, 4],
                         strides=[4, 4], pads=[0, 0, 0, 0], group=1),
        bn_node("s0", "stem.bn", "s1"),
        dprelu_node("s1", "stem.act", "p_in"),
        helper.make_node(
            "PokeConv", ["p_in", "poke.w", *params("poke.bn", ("gamma", "beta", "mean", "var")),
                         *params("poke.act", ("bx", "by", "pos", "neg")),
                         *(params("se", ("w1", "bound1", "b1", "w2", "bound2", "b2")) if se_gate else [""] * 6),
                         *params("poke.bn_split", ("gamma", "beta", "mean", "var")), "p_in"],
            ["o"], name="poke", domain="ai.bnncc", overload="block" if se_gate else "block_ungated",
            kernel_shape=[3, 3], strides=[2, 2], clip_bound=3.0, se_w_bits=4, se_a_bits=4, epsilon=1e-5),
        helper.make_node("GlobalAveragePool", ["o"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("QuantGemm", ["flat", "fc.w", "fc.bound", "fc.b"], ["logits"], name="fc",
                         domain="ai.bnncc", w_bits=8, a_bits=8, a_signed=1),
    ]
    if not se_gate:
        init = {k: v for k, v in init.items() if not k.startswith("se.")}
    return bnncc_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], init)
