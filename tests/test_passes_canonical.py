"""Each canonicalization pass on a tiny hand-written model: fires, keeps semantics, or must not fire."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

from bnncc.errors import BnnccError
from bnncc.frontend import CANONICAL_PASSES
from bnncc.passes import fold_constants as fold_constants_module
from bnncc.passes._util import const_array
from bnncc.passmanager import PassManager, get_pass, list_passes, register_pass

RNG = np.random.default_rng(0)


def _parse(text: str) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text), strict_mode=True)


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _apply(name: str, text: str, **params) -> tuple[onnx.ModelProto, ir.Model, bool]:
    """Parse ``text``, run pass ``name`` on it; return (original proto, model after, modified)."""
    proto = _parse(text)
    result = get_pass(name, **params)(ir.serde.deserialize_model(proto))
    return proto, result.model, result.modified


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _assert_same(before: onnx.ModelProto, after: ir.Model, **shapes: tuple[int, ...]) -> None:
    feeds = {name: RNG.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    expected = _run(before, feeds)
    got = _run(ir.serde.serialize_model(after), feeds)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def _floats(*shape: int, low: float = -1.0, high: float = 1.0) -> str:
    """An ONNX-text float literal list of the given shape, random in [low, high)."""
    values = RNG.uniform(low, high, size=int(np.prod(shape)))
    return ", ".join(f"{v:.6f}" for v in values)


def _conv_bn(opset: int, extra: str = "") -> str:
    """Conv 3x3 (no bias) -> BatchNormalization with random statistics; ``extra`` BN attributes."""
    return f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) <
        float[4, 3, 3, 3] w = {{{_floats(4, 3, 3, 3)}}},
        float[4] gamma = {{{_floats(4, low=0.5, high=1.5)}}}, float[4] beta = {{{_floats(4)}}},
        float[4] mean = {{{_floats(4)}}}, float[4] var = {{{_floats(4, low=0.5, high=2.0)}}}
    > {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = BatchNormalization <epsilon = 0.001 {extra}> (c, gamma, beta, mean, var)
    }}
    """


@pytest.mark.parametrize("opset, extra", [(7, ", spatial = 1"), (9, ""), (15, ""), (18, "")])
def test_fold_batchnorm_folds_into_the_conv_any_opset(opset, extra):
    before, after, modified = _apply("fold_batchnorm", _conv_bn(opset, extra))
    assert modified and _ops(after) == ["Conv"]
    conv = next(iter(after.graph))
    assert conv.inputs[2].is_initializer() and conv.outputs[0] is after.graph.outputs[0]
    assert after.graph.outputs[0].name == "y"
    _assert_same(before, after, x=(1, 3, 6, 6))


def test_fold_batchnorm_does_not_fire_when_the_conv_output_is_shared():
    text = _conv_bn(18).replace(
        "=> (float[1, 4, 6, 6] y)", "=> (float[1, 4, 6, 6] y, float[1, 4, 6, 6] c)"
    )
    _, after, modified = _apply("fold_batchnorm", text)
    assert not modified and _ops(after) == ["Conv", "BatchNormalization"]


def test_add_conv_bias_adds_zeros_once():
    text = _conv_bn(18)
    before, after, modified = _apply("add_conv_bias", text)
    assert modified
    conv = next(n for n in after.graph if n.op_type == "Conv")
    np.testing.assert_array_equal(conv.inputs[2].const_value.numpy(), np.zeros(4, np.float32))
    _assert_same(before, after, x=(1, 3, 6, 6))
    assert not get_pass("add_conv_bias")(after).modified


def test_fold_constants_folds_a_constant_of_shape():
    text = """
    <ir_version: 8, opset_import: ["" : 9]>
    g (float[2, 3] x) => (float[2, 3] y) <int64[2] s = {2, 3}> {
        c = ConstantOfShape <value = float[1] {0.25}> (s)
        y = Add (x, c)
    }
    """
    before, after, modified = _apply("fold_constants", text)
    assert modified and _ops(after) == ["Add"] and const_array(after.graph.node(0).inputs[1]) is not None
    _assert_same(before, after, x=(2, 3))


def test_fold_constants_folds_the_bias_of_an_unoptimized_dynamo_export():
    """torch.onnx.export(dynamo=True, optimize=False) builds each conv's zero bias in the graph."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) <float[4, 3, 3, 3] w = {{{_floats(4, 3, 3, 3)}}}> {{
        s = Shape <start = 0, end = 1> (w)
        one = Constant <value = int64[1] {{1}}> ()
        shape = Expand (s, one)
        zero = Constant <value = float {{0.0}}> ()
        z = CastLike (zero, x)
        b = Expand (z, shape)
        y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    }}
    """
    before, after, modified = _apply("fold_constants", text)
    get_pass("remove_unused")(after)
    assert modified and _ops(after) in (["Conv"], ["Constant", "Conv"])
    assert const_array(next(n for n in after.graph if n.op_type == "Conv").inputs[2]) is not None
    _assert_same(before, after, x=(2, 3, 6, 6))


def test_fold_constants_leaves_the_shape_of_a_symbolic_batch():
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, 3] x) => (float[N, 3] y) {
        s = Shape (x)
        c = ConstantOfShape <value = float[1] {0.25}> (s)
        y = Add (x, c)
    }
    """
    _, after, modified = _apply("fold_constants", text)
    assert not modified and "ConstantOfShape" in _ops(after)


@pytest.mark.parametrize("op, make", [
    ("ConstantOfShape", "c = ConstantOfShape <value = float[1] {0.25}> (big)"),
    ("Expand", "c = Expand (quarter, big)"),
    ("Tile", "c = Tile (quarter, big)"),
])
def test_fold_constants_leaves_an_output_too_large_to_hold(op, make, caplog):
    """A hostile model: 2**40 elements (4 TiB) from a few bytes of constants, read only by its sum."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1] x) => (float[1] y) <int64[2] big = {{1048576, 1048576}}, float[1, 1] quarter = {{0.25}}> {{
        {make}
        s = ReduceSum <keepdims = 0> (c)
        y = Add (x, s)
    }}
    """
    _, after, modified = _apply("fold_constants", text)
    assert not modified and _ops(after) == [op, "ReduceSum", "Add"]
    assert not caplog.records  # onnxscript's warning that numpy could not allocate 4 TiB
    # not even tried: a size numpy can allocate (8 GiB) would have been computed, then dropped
    assert fold_constants_module._should_fold(after.graph.node(0)) is False


def test_lift_constants_turns_constant_nodes_into_initializers():
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 3] x) => (float[2, 3] y) {
        c = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
        y = Add (x, c)
    }
    """
    before, after, modified = _apply("lift_constants", text)
    assert modified and _ops(after) == ["Add"]
    _assert_same(before, after, x=(2, 3))


AFFINE = f"""
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 3, 6, 6] x, float[1, 4, 6, 6] r) => (float[1, 4, 6, 6] y) <
    float[4, 3, 3, 3] w = {{{_floats(4, 3, 3, 3)}}}, float[4] b = {{{_floats(4)}}},
    float[1, 4, 1, 1] s = {{{_floats(4, low=0.5, high=1.5)}}}, float[1, 4, 1, 1] t = {{{_floats(4)}}},
    float[1, 4, 6, 6] plane = {{{_floats(1, 4, 6, 6)}}}
> {{
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    {{body}}
}}
"""


def test_fold_channel_affine_folds_a_batch_norm_written_as_mul_and_add():
    """tf2onnx's batch norm after a biased conv."""
    body = "m = Mul (c, s)\n    a = Add (t, m)\n    y = Add (a, r)"
    before, after, modified = _apply("fold_channel_affine", AFFINE.replace("{body}", body))
    assert modified and _ops(after) == ["Conv", "Add"]
    _assert_same(before, after, x=(1, 3, 6, 6), r=(1, 4, 6, 6))


@pytest.mark.parametrize("body", [
    "y = Add (c, r)",  # a residual: two activations
    "y = Add (c, plane)",  # a constant that varies over H and W
    "m = Relu (c)\n    y = Mul (m, s)",  # after something else than the conv
])
def test_fold_channel_affine_leaves_other_products_and_sums(body):
    text = AFFINE.replace("{body}", body)
    before, after, modified = _apply("fold_channel_affine", text)
    assert not modified
    _assert_same(before, after, x=(1, 3, 6, 6), r=(1, 4, 6, 6))


def test_sum_becomes_a_chain_of_adds():
    text = """
    <ir_version: 8, opset_import: ["" : 9]>
    g (float[2, 3] a, float[2, 3] b, float[2, 3] c) => (float[2, 3] y) { y = Sum (a, b, c) }
    """
    before, after, modified = _apply("sum_to_add", text)
    assert modified and _ops(after) == ["Add", "Add"]
    assert after.graph.outputs[0].name == "y"
    _assert_same(before, after, a=(2, 3), b=(2, 3), c=(2, 3))


def test_sum_to_add_leaves_other_ops():
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 3] a, float[2, 3] b) => (float[2, 3] y) { y = Add (a, b) }
    """
    assert not _apply("sum_to_add", text)[2]


POOL = """
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[1, 4, 5, 5] x) => (float{out} y) {inits}{{ y = {op} }}
"""


@pytest.mark.parametrize(
    "opset, out, inits, op, expected",
    [
        (13, "[1, 4, 1, 1]", "", "ReduceMean <axes = [2, 3]> (x)", ["GlobalAveragePool"]),
        (18, "[1, 4, 1, 1]", "<int64[2] a = {-1, -2}>", "ReduceMean (x, a)", ["GlobalAveragePool"]),
        (13, "[1, 4]", "", "ReduceMean <axes = [2, 3], keepdims = 0> (x)", ["GlobalAveragePool", "Flatten"]),
        (9, "[1, 4, 1, 1]", "", "AveragePool <kernel_shape = [5, 5]> (x)", ["GlobalAveragePool"]),
    ],
)
def test_global_pool_rewrites_plane_means(opset, out, inits, op, expected):
    before, after, modified = _apply("global_pool", POOL.format(opset=opset, out=out, inits=inits, op=op))
    assert modified and _ops(after) == expected
    _assert_same(before, after, x=(1, 4, 5, 5))


@pytest.mark.parametrize(
    "out, op",
    [("[1, 1, 5, 5]", "ReduceMean <axes = [1]> (x)"), ("[1, 4, 3, 3]", "AveragePool <kernel_shape = [3, 3]> (x)")],
)
def test_global_pool_leaves_partial_means(out, op):
    assert not _apply("global_pool", POOL.format(opset=13, out=out, inits="", op=op))[2]


def test_reshape_with_constant_target_becomes_flatten():
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 4, 1, 1] x) => (float[2, 4] y) <int64[2] s = {-1, 4}> { y = Reshape (x, s) }
    """
    before, after, modified = _apply("reshape_to_flatten", text)
    assert modified and _ops(after) == ["Flatten"]
    _assert_same(before, after, x=(2, 4, 1, 1))


def test_reshape_with_a_shape_chain_and_symbolic_batch_becomes_flatten():
    text = """
    <ir_version: 8, opset_import: ["" : 11]>
    g (float[N, 4, 2, 2] x) => (float[N, 16] y) <int64 zero = {0}, int64[1] minus1 = {-1}> {
        s = Shape (x)
        n = Gather <axis = 0> (s, zero)
        n1 = Unsqueeze <axes = [0]> (n)
        t = Concat <axis = 0> (n1, minus1)
        y = Reshape (x, t)
    }
    """
    before, after, modified = _apply("reshape_to_flatten", text)
    assert modified and _ops(after)[-1] == "Flatten"
    get_pass("remove_unused")(after)
    assert _ops(after) == ["Flatten"]
    _assert_same(before, after, x=(3, 4, 2, 2))



@pytest.mark.parametrize("batch, rest", [
    ("Gather <axis = 0> (s, zero)", "Gather <axis = 0> (s, one)"),  # x.reshape(x.shape[0], x.shape[1])
    ("Gather <axis = 0> (f_shape, zero)", "Gather <axis = 0> (f_shape, one)"),  # ... read before the pool
    ("Gather <axis = 0> (minus1, zero)", "Gather <axis = 0> (f_shape, one)"),  # x.view(-1, c), c = f.shape[1]
])
def test_reshape_to_dimensions_read_from_another_tensor_becomes_flatten(batch, rest):
    """A target of dimensions equal to N and C*H*W, read through Shape, was taken only when it
    read N as the input's own dim 0; torch's legacy exporter with a dynamic batch writes these."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 11]>
    g (float[N, 4, 2, 2] f) => (float[N, 4] y) <int64 zero = {{0}}, int64 one = {{1}}, int64[1] minus1 = {{-1}}> {{
        x = GlobalAveragePool (f)
        s = Shape (x)
        f_shape = Shape (f)
        b = {batch}
        r = {rest}
        b1 = Unsqueeze <axes = [0]> (b)
        r1 = Unsqueeze <axes = [0]> (r)
        t = Concat <axis = 0> (b1, r1)
        y = Reshape (x, t)
    }}
    """
    before, after, modified = _apply("reshape_to_flatten", text)
    assert modified and after.graph.outputs[0].producer().op_type == "Flatten"
    _assert_same(before, after, f=(3, 4, 2, 2))


def test_reshape_to_another_tensors_other_dimensions_is_left():
    """[N, 5] read from a (N, 4, 5, 5) tensor flattens no (N, 3, 1, 1)."""
    text = """
    <ir_version: 8, opset_import: ["" : 11]>
    g (float[N, 3, 1, 1] x, float[N, 4, 5, 5] f) => (float[N, 5] y) <int64[1] zero = {0}, int64[1] two = {2}> {
        f_shape = Shape (f)
        b = Gather <axis = 0> (f_shape, zero)
        h = Gather <axis = 0> (f_shape, two)
        t = Concat <axis = 0> (b, h)
        y = Reshape (x, t)
    }
    """
    assert not _apply("reshape_to_flatten", text)[2]

@pytest.mark.parametrize("opset, slice_", [
    (9, "b = Slice <axes = [0], starts = [0], ends = [1]> (s)"),  # Paddle's flatten at opset 9
    (13, "b = Slice (s, zero, one, zero)"),  # ... and at 13: starts, ends and axes as inputs
])
def test_reshape_with_a_sliced_shape_becomes_flatten(opset, slice_):
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[N, 4, 1, 1] x) => (float[N, 4] y) <int64[1] zero = {{0}}, int64[1] one = {{1}}, int64[1] minus1 = {{-1}}> {{
        s = Shape (x)
        {slice_}
        t = Concat <axis = 0> (b, minus1)
        y = Reshape (x, t)
    }}
    """
    before, after, modified = _apply("reshape_to_flatten", text)
    assert modified and _ops(after)[-1] == "Flatten"
    _assert_same(before, after, x=(3, 4, 1, 1))


def test_reshape_that_does_not_flatten_is_left():
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 4, 2, 2] x) => (float[2, 4, 4] y) <int64[3] s = {2, 4, 4}> { y = Reshape (x, s) }
    """
    assert not _apply("reshape_to_flatten", text)[2]


def test_collapse_reshapes_takes_dynamos_channels_last_flatten():
    """Reshape to [-1], a Gather of every element in order, a Reshape to [N, C]: one Reshape."""
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1, 8, 1, 1] x) => (float[1, 8] y) <int64[1] flat = {-1}, int64[1, 8, 1, 1] order = {0, 1, 2, 3, 4, 5, 6, 7},
                                               int64[2] nc = {1, 8}> {
        v = Reshape (x, flat)
        g = Gather <axis = 0> (v, order)
        y = Reshape <allowzero = 1> (g, nc)
    }
    """
    before, after, modified = _apply("collapse_reshapes", text)
    assert modified and _ops(after) == ["Reshape"]
    _assert_same(before, after, x=(1, 8, 1, 1))
    assert get_pass("reshape_to_flatten")(after).modified and _ops(after) == ["Flatten"]


@pytest.mark.parametrize("body, ops", [
    # a Gather that permutes is no reshape
    ("v = Reshape (x, flat)\n g = Gather <axis = 0> (v, swapped)\n y = Reshape (g, nc)",
     ["Reshape", "Gather", "Reshape"]),
    # a 0 in the outer target copies the inner result's dimension, not x's
    ("v = Reshape (x, nc)\n y = Reshape (v, copy)", ["Reshape", "Reshape"]),
])
def test_collapse_reshapes_leaves_what_is_no_plain_reshape(body, ops):
    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1, 8, 1, 1] x) => (float[1, 8] y) <int64[1] flat = {{-1}}, int64[8] swapped = {{0, 1, 2, 3, 4, 5, 7, 6}},
                                               int64[2] nc = {{1, 8}}, int64[2] copy = {{0, 8}}> {{ {body} }}
    """
    before, after, _ = _apply("collapse_reshapes", text)
    assert _ops(after) == ops
    _assert_same(before, after, x=(1, 8, 1, 1))


def test_symbolic_batch_makes_a_fixed_batch_symbolic_everywhere():
    """A graph exported at batch 4 runs at any batch afterwards, each image as before."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[4, 2, 3, 3] x) => (float[4, 5] y)
      <float[2, 2, 1, 1] w = {{{_floats(2, 2, 1, 1)}}}, float[5, 2] v = {{{_floats(5, 2)}}}> {{
        c = Conv (x, w)
        r = Relu (c)
        p = GlobalAveragePool (r)
        f = Flatten <axis = 1> (p)
        y = Gemm <transB = 1> (f, v)
    }}
    """
    before, after, modified = _apply("symbolic_batch", text)
    assert modified
    values = [after.graph.inputs[0], *(v for n in after.graph for v in n.outputs)]
    assert all(v.shape[0] == ir.SymbolicDim("N") for v in values)
    assert [list(v.shape)[1:] for v in values[1:]] == [[2, 3, 3], [2, 3, 3], [2, 1, 1], [2], [5]]
    x = RNG.standard_normal((3, 2, 3, 3)).astype(np.float32)
    four = np.concatenate([x, x[:1]])
    got = _run(ir.serde.serialize_model(after), {"x": x})[0]
    np.testing.assert_allclose(got, _run(before, {"x": four})[0][:3], rtol=1e-6, atol=1e-6)


def test_symbolic_batch_leaves_a_batch_fixing_reshape():
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 4, 2, 2] x) => (float[2, 16] y) <int64[2] s = {2, 16}> { y = Reshape (x, s) }
    """
    _, after, modified = _apply("symbolic_batch", text)
    assert not modified and after.graph.inputs[0].shape[0] == 2


def test_matmul_add_becomes_gemm():
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 3] x) => (float[2, 4] y) <float[3, 4] w = {{{_floats(3, 4)}}}, float[4] b = {{{_floats(4)}}}> {{
        m = MatMul (x, w)
        y = Add (b, m)
    }}
    """
    before, after, modified = _apply("matmul_add_to_gemm", text)
    assert modified and _ops(after) == ["Gemm"]
    gemm = after.graph.node(0)
    assert gemm.inputs[1].const_value.shape == (4, 3) and gemm.attributes["transB"].as_int() == 1
    _assert_same(before, after, x=(2, 3))


def test_matmul_of_rank_3_is_left():
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 5, 3] x) => (float[2, 5, 4] y) <float[3, 4] w = {{{_floats(3, 4)}}}> {{ y = MatMul (x, w) }}
    """
    assert not _apply("matmul_add_to_gemm", text)[2]


def test_normalize_gemm_folds_alpha_beta_and_transposition():
    text = f"""
    <ir_version: 8, opset_import: ["" : 9]>
    g (float[2, 3] x) => (float[2, 4] y) <float[3, 4] w = {{{_floats(3, 4)}}}, float[1, 4] b = {{{_floats(4)}}}> {{
        y = Gemm <alpha = 0.5, beta = 2.0> (x, w, b)
    }}
    """
    before, after, modified = _apply("normalize_gemm", text)
    gemm = after.graph.node(0)
    assert modified and gemm.inputs[1].const_value.shape == (4, 3) and gemm.inputs[2].const_value.shape == (4,)
    assert set(gemm.attributes) == {"transB"}
    _assert_same(before, after, x=(2, 3))
    assert not get_pass("normalize_gemm")(after).modified




@pytest.mark.parametrize("opset", [11, 13])
def test_an_output_log_softmax_is_stripped(opset):
    """torch's log_softmax head (for NLLLoss) was refused as an unsupported op."""
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[2, 3] x) => (float[2, 3] y) {{
        r = Relu (x)
        y = LogSoftmax <axis = 1> (r)
    }}
    """
    before, after, modified = _apply("strip_softmax", text)
    assert modified and _ops(after) == ["Relu"] and after.graph.outputs[0].name == "y"
    assert after.metadata_props["bnncc.import_notes"] == "the output LogSoftmax is dropped: the graph returns logits"
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    logits = _run(ir.serde.serialize_model(after), {"x": x})[0]
    log_probs = _run(before, {"x": x})[0]
    np.testing.assert_allclose(logits - np.log(np.exp(logits).sum(1, keepdims=True)), log_probs, rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize("opset, axis", [(13, 0), (11, 0), (13, -2)])
def test_an_output_softmax_over_the_batch_is_not_stripped(opset, axis):
    """Dropped, it changed which class each image's output ranks first: over the batch (opset 13)
    or over every element (axis 0 before opset 13), the highest probability is not the highest logit."""
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[2, 3] x) => (float[2, 3] y) {{
        r = Relu (x)
        y = Softmax <axis = {axis}> (r)
    }}
    """
    assert not _apply("strip_softmax", text)[2]

def test_output_softmax_is_stripped_but_an_inner_one_is_not():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 3] x) => (float[2, 3] y) {
        r = Relu (x)
        s = Softmax <axis = 1> (r)
        t = Relu (s)
        y = Softmax <axis = 1> (t)
    }
    """
    before, after, modified = _apply("strip_softmax", text)
    assert modified and _ops(after) == ["Relu", "Softmax", "Relu"]
    assert after.graph.outputs[0].name == "y"
    assert after.metadata_props["bnncc.import_notes"] == "the output Softmax is dropped: the graph returns logits"
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    logits = _run(ir.serde.serialize_model(after), {"x": x})[0]
    probs = _run(before, {"x": x})[0]
    np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), probs, rtol=1e-5)


def test_set_opset_relabels_only_version_stable_graphs():
    stable = """
    <ir_version: 4, opset_import: ["" : 9]>
    g (float[1, 2, 4, 4] x) => (float[1, 2, 2, 2] y) { y = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x) }
    """
    before, after, modified = _apply("set_opset", stable)
    assert modified and after.opset_imports[""] == 18 and after.ir_version == 8
    _assert_same(before, after, x=(1, 2, 4, 4))
    unstable = """
    <ir_version: 4, opset_import: ["" : 9]>
    g (float[1, 2] x) => (float[1, 2] y) { y = Sum (x, x) }
    """
    _, after, modified = _apply("set_opset", unstable)
    assert not modified and after.opset_imports[""] == 9


PAD = """
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[1, 4, 6, 6] x) => (float{out} y) <{inits}> {{
    {body}
}}
"""
CONV_W = f"float[4, 4, 3, 3] w = {{{_floats(4, 4, 3, 3)}}}"


@pytest.mark.parametrize("opset, inits, pad, reader, out", [
    # Keras' conv1_pad: zeros before a conv without padding of its own
    (18, f"int64[8] p = {{0, 0, 1, 2, 0, 0, 2, 1}}, {CONV_W}", "Pad (x, p)", "Conv (z, w)", "[1, 4, 7, 7]"),
    # before opset 11 the pads are an attribute; the reader's own pads add up
    (9, CONV_W, "Pad <pads = [0, 0, 1, 1, 0, 0, 1, 1]> (x)", "Conv <pads = [1, 0, 0, 1]> (z, w)", "[1, 4, 7, 7]"),
    # opset 18's axes input names the axes the pads are for; a zero value given
    (18, f"int64[4] p = {{1, 1, 1, 1}}, int64[2] a = {{2, 3}}, float v = {{0.0}}, {CONV_W}", "Pad (x, p, v, a)",
     "Conv (z, w)", "[1, 4, 6, 6]"),
    # Keras' pool1_pad: zeros before a max pool of non-negative values
    (13, "int64[8] p = {0, 0, 1, 1, 0, 0, 1, 1}", "Pad (r, p)", "MaxPool <kernel_shape = [3, 3], strides = [2, 2]> (z)",
     "[1, 4, 3, 3]"),
])
def test_fold_pad_moves_zero_padding_into_the_reader(opset, inits, pad, reader, out):
    relu = "r = Relu (x)\n    " if "(r" in pad else ""
    body = f"{relu}z = {pad}\n    y = {reader}"
    before, after, modified = _apply("fold_pad", PAD.format(opset=opset, inits=inits, body=body, out=out))
    assert modified and "Pad" not in _ops(after)
    _assert_same(before, after, x=(1, 4, 6, 6))


@pytest.mark.parametrize("inits, pad, reader, out", [
    # a max pool of values that may be negative: its own padding would not match the zeros
    ("int64[8] p = {0, 0, 1, 1, 0, 0, 1, 1}", "Pad (x, p)", "MaxPool <kernel_shape = [3, 3], strides = [2, 2]> (z)",
     "[1, 4, 3, 3]"),
    ("int64[8] p = {0, 0, 1, 1, 0, 0, 1, 1}", "Pad <mode = \"reflect\"> (x, p)", "Conv (z, w)", "[1, 4, 6, 6]"),
    ("int64[8] p = {0, 0, 1, 1, 0, 0, 1, 1}, float v = {1.0}", "Pad (x, p, v)", "Conv (z, w)", "[1, 4, 6, 6]"),
    ("int64[8] p = {0, 0, 1, 1, 0, 0, -1, -1}", "Pad (x, p)", "Conv (z, w)", "[1, 4, 4, 4]"),
    ("int64[8] p = {0, 1, 0, 0, 0, 0, 0, 0}", "Pad (x, p)", "Relu (z)", "[1, 5, 6, 6]"),  # channels padded
])
def test_fold_pad_leaves_padding_its_reader_cannot_take(inits, pad, reader, out):
    if "Conv" in reader:
        inits = f"{inits}, {CONV_W}"
    body = f"z = {pad}\n    y = {reader}"
    assert not _apply("fold_pad", PAD.format(opset=18, inits=inits, body=body, out=out))[2]


@pytest.mark.parametrize("opset, inits, squeeze", [
    (13, "<int64[2] a = {2, -1}>", "Squeeze (x, a)"),
    (11, "", "Squeeze <axes = [2, 3]> (x)"),
])
def test_squeeze_of_a_pooled_tensor_becomes_flatten(opset, inits, squeeze):
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[N, 4, 1, 1] x) => (float[N, 4] y) {inits}{{ y = {squeeze} }}
    """
    before, after, modified = _apply("squeeze_to_flatten", text)
    assert modified and _ops(after) == ["Flatten"]
    _assert_same(before, after, x=(3, 4, 1, 1))



@pytest.mark.parametrize("opset, inits, squeezes", [
    (13, "<int64[1] a = {-1}>", ("Squeeze (x, a)", "Squeeze (h, a)")),  # torch's x.squeeze(-1).squeeze(-1)
    (13, "<int64[1] a = {2}>", ("Squeeze (x, a)", "Squeeze (h, a)")),
    (11, "", ("Squeeze <axes = [3]> (x)", "Squeeze <axes = [-1]> (h)")),
])
def test_two_squeezes_of_a_pooled_tensor_become_flatten(opset, inits, squeezes):
    """GlobalAveragePool + squeeze(-1).squeeze(-1) before the classifier was refused at the second Squeeze."""
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[N, 4, 1, 1] x) => (float[N, 4] y) {inits}{{ h = {squeezes[0]}
    y = {squeezes[1]} }}
    """
    before, after, modified = _apply("squeeze_to_flatten", text)
    flatten = after.graph.outputs[0].producer()
    assert modified and flatten.op_type == "Flatten" and flatten.inputs[0] is after.graph.inputs[0]
    _assert_same(before, after, x=(3, 4, 1, 1))


def test_a_squeeze_of_a_squeeze_read_elsewhere_is_left():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4, 1, 1] x) => (float[N, 4] y, float[N, 4, 1] h) <int64[1] a = {-1}> {
    h = Squeeze (x, a)
    y = Squeeze (h, a) }
    """
    assert not _apply("squeeze_to_flatten", text)[2]

def test_squeeze_of_every_unit_axis_is_left():
    """Without axes a batch of one would lose its batch axis too."""
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 4, 1, 1] x) => (float[4] y) { y = Squeeze (x) }
    """
    assert not _apply("squeeze_to_flatten", text)[2]


def test_global_pool_rewrites_a_mean_over_an_nhwc_transpose():
    """tf2onnx's Keras head: the last NCHW tensor transposed to NHWC, then its mean over H and W."""
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 4, 5, 5] x) => (float[2, 4] y) <int64[2] a = {1, 2}> {
        t = Transpose <perm = [0, 2, 3, 1]> (x)
        y = ReduceMean <keepdims = 0> (t, a)
    }
    """
    before, after, modified = _apply("global_pool", text)
    get_pass("remove_unused")(after)
    assert modified and _ops(after) == ["GlobalAveragePool", "Flatten"]
    _assert_same(before, after, x=(2, 4, 5, 5))


def test_nchw_input_drops_the_transpose_of_an_nhwc_input():
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 6, 6, 4] x) => (float[N, 4, 6, 6] y) <{CONV_W}> {{
        t = Transpose <perm = [0, 3, 1, 2]> (x)
        y = Conv <pads = [1, 1, 1, 1]> (t, w)
    }}
    """
    before, after, modified = _apply("nchw_input", text)
    assert modified and _ops(after) == ["Conv"]
    assert [d if isinstance(d, int) else "N" for d in after.graph.inputs[0].shape] == ["N", 4, 6, 6]
    x = RNG.standard_normal((2, 6, 6, 4)).astype(np.float32)
    expected = _run(before, {"x": x})[0]
    got = _run(ir.serde.serialize_model(after), {"x": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("outputs, body", [
    ("float[1, 4, 6, 6] y, float[1, 6, 6, 4] z", "y = Transpose <perm = [0, 3, 1, 2]> (x)\n z = Relu (x)"),
    ("float[1, 6, 4, 6] y", "t = Transpose <perm = [0, 1, 3, 2]> (x)\n y = Relu (t)"),
])
def test_nchw_input_leaves_an_input_read_otherwise(outputs, body):
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 6, 6, 4] x) => ({outputs}) {{ {body} }}
    """
    assert not _apply("nchw_input", text)[2]



@pytest.mark.parametrize("outputs, body", [
    ("float[2, 4] y, bool[2, 4] m", "y, m = Dropout <ratio = 0.5> (x)"),  # its mask read
    ("float[2, 4] y", "y, m = Dropout (x, ratio, train)"),  # in training mode
])
def test_eliminate_dropout_leaves_a_dropout_that_is_no_identity(outputs, body):
    text = f"""
    <ir_version: 8, opset_import: ["" : {11 if "ratio =" in body else 13}]>
    g (float[2, 4] x) => ({outputs}) <float ratio = {{0.5}}, bool train = {{1}}> {{ {body} }}
    """
    assert not _apply("eliminate_dropout", text)[2]

@pytest.mark.parametrize("opset, clip", [
    (10, "Clip <min = 0.0> (x)"),  # torch's clamp(min=0) before opset 11: max defaults to float32's largest
    (10, "Clip <min = 0.0, max = inf> (x)"),  # torch's hardtanh(x, 0, inf) and clamp(x, 0, inf) before opset 11
    (13, "Clip (x, zero)"),  # from opset 11: max omitted
    (13, "Clip (x, zero, inf)"),
])
def test_clip_to_relu_rewrites_a_clip_of_min_0_and_no_max(opset, clip):
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[2, 4] x) => (float[2, 4] y) <float zero = {{0.0}}, float inf = {{inf}}> {{ y = {clip} }}
    """
    before, after, modified = _apply("clip_to_relu", text)
    assert modified and _ops(after) == ["Relu"]
    _assert_same(before, after, x=(2, 4))


@pytest.mark.parametrize("opset, clip", [
    (10, "Clip <min = 0.0, max = 6.0> (x)"),  # ReLU6
    (10, "Clip (x)"),  # float32's extremes: an identity
    (13, "Clip (x, zero, six)"),
    (13, "Clip (x, low)"),
    (13, "Clip (x)"),
])
def test_clip_to_relu_leaves_a_clip_that_is_no_relu(opset, clip):
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[2, 4] x) => (float[2, 4] y) <float zero = {{0.0}}, float six = {{6.0}}, float low = {{-1.0}}> {{
        y = {clip}
    }}
    """
    assert not _apply("clip_to_relu", text)[2]


def test_registry_rejects_duplicates_and_lists_the_canonical_passes():
    assert set(CANONICAL_PASSES) <= set(list_passes())
    with pytest.raises(ValueError, match="already registered"):
        register_pass("fold_batchnorm")(object)


def test_pass_manager_records_every_pass_and_the_measure():
    model = ir.serde.deserialize_model(_parse(_conv_bn(18)))
    manager = PassManager(["add_conv_bias", "fold_batchnorm", "fold_batchnorm"], measure=lambda m: len(m.graph) * 10)
    manager.run(model)
    rows = [(r.name, r.modified, r.nodes, r.measure) for r in manager.records]
    assert rows == [
        ("add_conv_bias", True, 2, 20),
        ("fold_batchnorm", True, 1, 10),
        ("fold_batchnorm", False, 1, 10),
    ]


def test_pass_manager_refuses_a_string_for_its_list():
    with pytest.raises(TypeError, match=r"a list of passes, not the string 'int8_head'; write \['int8_head'\]"):
        PassManager("int8_head")


@pytest.mark.parametrize("name, params, message", [
    ("int8_head", {"w_bits": 7.5}, "int8_head: w_bits = 7.5: expected an integer"),
    ("int8_head", {"w_bits": True}, "int8_head: w_bits = True: expected an integer"),
    ("poke_conv", {"clip_bound": "3.0"}, "poke_conv: clip_bound = '3.0': expected a number"),
    ("poke_conv", {"se_gate": "false"}, "poke_conv: se_gate = 'false': expected true or false"),
    ("poke_stem", {"mid_channels": 16.0}, "poke_stem: mid_channels = 16.0: expected an integer"),
    ("width_multiplier", {"multiplier": "2"}, "width_multiplier: multiplier = '2': expected a number"),
    ("int8_head", {"bits": 4}, "int8_head: bits: unknown parameter; expected w_bits, a_bits"),
    # float() of it was an 'unexpected' OverflowError
    # a dict 2000 deep: "unexpected RecursionError" while the message's repr of it was built
    ("poke_conv", {"clip_bound": functools.reduce(lambda inner, _: {"a": inner}, range(2000), 1)},
     "poke_conv: clip_bound = {'a': {'a': {'a': {...}}}}: expected a number"),
    # (its 401 digits shown as 60, as any long value in an error line)
    ("poke_conv", {"clip_bound": 10**400}, f"poke_conv: clip_bound = 1{'0' * 27}...{'0' * 29}: expected a number "
                                           f"within a float's range"),
])
def test_get_pass_checks_parameter_types(name, params, message):
    """A recipe's parameters were type-checked, a caller's of get_pass (or PassManager) not: w_bits=7.5
    was taken and the pass then failed in shape inference; clip_bound='3.0' likewise."""
    with pytest.raises(BnnccError) as info:
        get_pass(name, **params)
    assert str(info.value) == message
    with pytest.raises(BnnccError):
        PassManager([(name, params)])


def test_get_pass_takes_numpy_scalars_as_python_numbers():
    """np.int64(4) (a sweep over np.arange) became an attribute onnx_ir cannot write: a TypeError."""
    proto = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(RNG.standard_normal((3, 4)).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(np.zeros(3, np.float32), "b")]), opset_imports=[onnx.helper.make_opsetid("", 18)])
    model = get_pass("int8_head", w_bits=np.int64(4), a_bits=np.int32(8))(ir.serde.deserialize_model(proto)).model
    head = model.graph.node("fc")
    assert (head.op_type, head.attributes["w_bits"].value, head.attributes["a_bits"].value) == ("QuantGemm", 4, 8)
    assert type(get_pass("width_multiplier", multiplier=np.float32(0.5)).multiplier) is float
