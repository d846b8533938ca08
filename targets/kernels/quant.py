"""Fake-quant int-k kernels (TE): the PokeBNN stem convs, the SE gate and the dense head.

The ``ai.bnncc`` quantizers (bnncc/ops/spec.md), with m = 2^(b-1) - 1:

- weights, per output channel o: s_o = m / max|W[o]|, q = clip(floor(W s_o + 0.5), -m, m),
  Wq = q / s_o. Quantized in numpy at compile time (``quantize_weights``); the kernels read
  the integers q (``pack_dense``: int8 in column tiles, eight to an int32 word when b <= 4) and
  s_o, or the float Wq where the tensor is tiny (the stem).
- activations, per input channel c with bound B_c: signed s_c = m / B_c,
  xq = clip(floor(x s_c + 0.5), -m, m) / s_c; unsigned s_c = 2^a / B_c,
  xq = clip(floor(x s_c), 0, 2^a - 1) / s_c. B_c <= 0 means "not calibrated": xq = x. The
  kernels take s_c (``act_scales``), 0 for an uncalibrated channel.

The quantizers repeat the reference's float32 operations in its order (``quantize_act``), so
they agree bit for bit on equal inputs; ``product`` (``rounded_product(target.kind)``) keeps the
compiler from fusing x * s into a multiply-add. Arithmetic is float32 on the quantized values,
as in the reference. Dot products with integer weights are taken as (sum_c xq_c q_oc) / s_o
instead of sum_c xq_c (q_oc / s_o): equal in exact arithmetic, a float32 rounding apart.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bnncc.targets.kernels import KERNEL_ATTR
from bnncc.targets.tvm_compat import te, tirx

__all__ = [
    "act_scales", "int4", "pack_int4", "quantize_weights", "quantize_act", "quant_conv2d_func", "se_gate_func", "head_func",
]

# the kernels' names (KERNEL_ATTR): the stem conv, the SE gate, the head
CONV_KERNEL_NAME = "quant_conv2d"
SE_GATE_KERNEL_NAME = "se_gate"
HEAD_KERNEL_NAME = "quant_head"
# weights of at most this many bits are stored as nibbles, this many to an int32 word (pack_int4)
NIBBLE_BITS = 4
NIBBLES = 8
# the widest column tile of int8 dense weights (tile_columns): four AVX-512 vectors of outputs
DENSE_TILE = 64
# the stage of quant_conv2d that repeats each quantized input channel for the output channels of
# its group (one input channel per group)
SPREAD = "spread"
# PrimFunc attribute of quant_conv2d: the layout of its input x, "NHWC" or "NCHW"
INPUT_LAYOUT_ATTR = "bnncc.input_layout"




def quantize_weights(weights: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 with W's shape, s float32 (O,)) for W (O, ...): Wq = q / s per output channel.

    A channel with max|W| = 0 gets s = 1 (q = 0 either way).
    """
    m = np.float32(2 ** (bits - 1) - 1)
    peak = np.abs(weights).reshape(weights.shape[0], -1).max(axis=1).astype(np.float32)
    scale = np.where(peak > 0, m / np.where(peak > 0, peak, 1), 1).astype(np.float32)
    shaped = scale.reshape((-1,) + (1,) * (weights.ndim - 1))
    q = np.clip(np.floor(weights.astype(np.float32) * shaped + np.float32(0.5)), -m, m)
    return q.astype(np.int8), scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Eight signed 4-bit integers to an int32 word along axis 0: q (C, O) in [-8, 7] -> int32
    (ceil(C/8), O), row c in bits 4t .. 4t+3, t = c % 8, of word row c // 8 (rows past C: zeros).

    Words rather than bytes: a vector of words is one nibble of each lane away from a 32-bit
    value (a shift), where a vector of bytes first had to be widened to words (a cross-lane
    shuffle per nibble, the SE gates' bound on AVX-512)."""
    rows = q.shape[0]
    words = -(-rows // NIBBLES)
    padded = np.zeros((words * NIBBLES, *q.shape[1:]), np.uint32)
    padded[:rows] = q.astype(np.int8).view(np.uint8) & 0xF
    shifts = (4 * np.arange(NIBBLES, dtype=np.uint32)).reshape(1, NIBBLES, *([1] * (q.ndim - 1)))
    # the nibbles' bits are disjoint: the sum is their OR
    return (padded.reshape(words, NIBBLES, *q.shape[1:]) << shifts).sum(axis=1, dtype=np.uint32).view(np.int32)


def tile_width(outputs: int) -> int:
    """The width of an int8 dense layer's column tiles (``tile_columns``): whole 16-lane vectors,
    at most DENSE_TILE."""
    return min(DENSE_TILE, -(-outputs // 16) * 16)


def tile_columns(q: np.ndarray) -> np.ndarray:
    """int8 q (C, O) -> (tiles, C, width), tile t holding columns t*width .. (t+1)*width - 1 of
    every row (columns past O: zeros), width = ``tile_width(O)``.

    A kernel then reads one tile's weights front to back while its outputs stay in registers;
    with (C, O) rows, each input's row of O weights was a load and a store of every output."""
    rows, outputs = q.shape
    width = tile_width(outputs)
    tiles = -(-outputs // width)
    padded = np.zeros((rows, tiles * width), np.int8)
    padded[:, :outputs] = q
    return np.ascontiguousarray(padded.reshape(rows, tiles, width).transpose(1, 0, 2))


def pack_dense(q: np.ndarray, w_bits: int) -> np.ndarray:
    """The integer weights q (O, C) of ``quantize_weights`` in a dense kernel's layout: int32
    words of nibbles (``pack_int4`` of (C, O)) at w_bits <= NIBBLE_BITS, else column tiles."""
    columns = np.ascontiguousarray(q.T)
    return pack_int4(columns) if w_bits <= NIBBLE_BITS else tile_columns(columns)


def int4(word: tirx.PrimExpr, nibble: tirx.PrimExpr) -> tirx.PrimExpr:
    """The signed integer that ``pack_int4`` packed as ``nibble`` (0..7) of an int32 ``word``:
    (word << (28 - 4 nibble)) >> 28, the right shift arithmetic, sign-extends it."""
    return (word << (28 - nibble * 4)) >> tirx.const(28, "int32")


def act_scales(bounds: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Per-channel activation scales s_c (float32), 0 where the bound is <= 0 (no quantization)."""
    levels = np.float32(2 ** (bits - 1) - 1 if signed else 2 ** bits)
    bounds = bounds.astype(np.float32)
    return np.where(bounds > 0, levels / np.where(bounds > 0, bounds, 1), 0).astype(np.float32)


Product = Callable[..., object]  # (x, scale) -> x * scale, both float32 PrimExprs


def _fenced_product(x: tirx.PrimExpr, scale: tirx.PrimExpr) -> tirx.PrimExpr:
    """x * scale behind an LLVM arithmetic fence: LLVM may not fuse it with what follows."""
    return tirx.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", x * scale)


def _rn_product(x: tirx.PrimExpr, scale: tirx.PrimExpr) -> tirx.PrimExpr:
    """CUDA's __fmul_rn: a float32 product nvcc never contracts into a multiply-add."""
    return tirx.call_pure_extern("float32", "__fmul_rn", x, scale)


def rounded_product(target_kind: str) -> Product:
    """How a kernel for ``target_kind`` (a TVM target kind name) computes the quantizer's x * s so that
    it is rounded to float32 on its own, as onnxruntime's Mul is. Both compilers otherwise contract
    x * s + 0.5 into one fused multiply-add (TVM's LLVM backend allows FP fusion; nvcc's --fmad
    default), which rounds once where the reference rounds twice, so a value at a decision point
    could land one level apart."""
    if target_kind == "cuda":
        return _rn_product
    if target_kind == "llvm":
        return _fenced_product
    return lambda x, scale: x * scale


def quantize_act(x: tirx.PrimExpr, scale: tirx.PrimExpr, bits: int, signed: bool,
                 product: Product = _fenced_product) -> tirx.PrimExpr:
    """The activation quantizer of one value with scale ``scale`` (0: pass x through).

    The same float32 operations in the same order as ``QuantizeActs`` (bnncc/ops/quant.py), run by
    onnxruntime: p = x * s rounded to float32 (``product``, see ``rounded_product``), then
    p + 0.5 rounded (signed), floor, clip, and a division by s (not a multiplication by 1 / s),
    with s = levels / bound computed in float32 as the reference does (``act_scales``). So an input
    that both sides hold bit for bit is quantized identically, even at a decision point.

    The pass-through is a ``Select``, which computes both sides (a zero scale's quotient is
    discarded): TVM vectorizes a Select as one blend, an ``if_then_else`` of lane-varying scales
    lane by lane."""
    if signed:
        m = float(2 ** (bits - 1) - 1)
        q = tirx.min(tirx.max(te.floor(product(x, scale) + tirx.const(0.5, "float32")), -m), m)
    else:
        q = tirx.min(tirx.max(te.floor(product(x, scale)), 0.0), float(2 ** bits - 1))
    return tirx.Select(scale > tirx.const(0, "float32"), q / scale, x)


def quant_conv2d_func(
    x_shape: tuple[int, int, int, int],
    weight_shape: tuple[int, int, int, int],
    *,
    stride: int,
    pads: tuple[int, int, int, int],
    group: int,
    a_bits: int,
    epilogue_inputs: tuple[te.Tensor, ...] = (),
    epilogue: Callable[[tirx.PrimExpr, tuple], tirx.PrimExpr] | None = None,
    product: Product = _fenced_product,
    input_layout: str = "NHWC",
) -> tirx.PrimFunc:
    """``f(x, w, act_scale, *epilogue_inputs, out)``: NHWC conv of signed-quantized x with float Wq.

    x (N, H, W, Cin) float32, or with ``input_layout="NCHW"`` ``f(x, image, w, ...)``: ``x_shape``
    (1, Cin, H, W) is one image, number ``image`` (an int64 parameter) of the NCHW batch x of any
    size, which the kernel reads in place (the network's input: lower's per-image function takes
    the whole batch). w (kh, kw, Cin/group, Cout) float32 (already Wq); act_scale (Cin,); ``pads``
    in ONNX order (top, left, bottom, right), padded cells 0. The output is NHWC:

        out[n, y, z, o] = epilogue(sum_{i, j, c} xq[n, y s + i - top, z s + j - left, g(o) Cg + c] w[i, j, c, o])

    with g(o) = o // (Cout / group), Cg = Cin / group. An NCHW input (the network's, which then
    needs no transpose) is quantized in its own layout, where a row has one channel and so one
    scale: vector code, while the 3-channel NHWC rows of an image needed a gather of the scales.
    """
    nchw = input_layout == "NCHW"
    if nchw:
        n, cin, h, w = x_shape
    else:
        n, h, w, cin = x_shape
    kh, kw, cin_g, cout = weight_shape
    top, left, bottom, right = pads
    cout_g = cout // group
    ho, wo = (h + top + bottom - kh) // stride + 1, (w + left + right - kw) // stride + 1
    if nchw:
        if n != 1:
            raise ValueError(f"quant_conv2d_func: an NCHW input is one image of a batch, not {n}")
        image = tirx.Var("image", "int64")
        x = te.placeholder((tirx.Var("images", "int64"), cin, h, w), "float32", name="x")
    else:
        x = te.placeholder(x_shape, "float32", name="x")
    weights = te.placeholder(weight_shape, "float32", name="w")
    scale = te.placeholder((cin,), "float32", name="act_scale")

    def padded(i, y, z, c):
        inside = tirx.all(y >= top, y < top + h, z >= left, z < left + w)
        y, z = tirx.min(tirx.max(y - top, 0), h - 1), tirx.min(tirx.max(z - left, 0), w - 1)
        value = quantize_act(x[image, c, y, z] if nchw else x[i, y, z, c], scale[c], a_bits, signed=True,
                             product=product)
        return tirx.if_then_else(inside, value, tirx.const(0, "float32"))

    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")
    rc = te.reduce_axis((0, cin_g), name="rc")
    # one input channel per group: quantized once per input channel, then repeated once per output
    # channel of its group (stage SPREAD), so that the conv reads its input at its own channel (a
    # vector load, not a gather of channel o // cout_g)
    per_output = cin_g == 1
    if nchw and per_output:
        raise ValueError("quant_conv2d_func: an NCHW input needs more than one input channel per group")
    hp, wp = h + top + bottom, w + left + right
    if nchw:
        xq = te.compute((n, cin, hp, wp), lambda i, c, y, z: padded(i, y, z, c), name="quantize")
    else:
        xq = te.compute((n, hp, wp, cin), padded, name="quantize")
        if per_output:
            xq = te.compute((n, hp, wp, cout), lambda i, y, z, o: xq[i, y, z, o // cout_g], name=SPREAD)

    def tap(i, y, z, o):
        c = o if per_output else (o // cout_g) * cin_g + rc
        return xq[i, c, y, z] if nchw else xq[i, y, z, c]

    acc = te.compute(
        (n, ho, wo, cout),
        lambda i, y, z, o: te.sum(tap(i, y * stride + ri, z * stride + rj, o) * weights[ri, rj, rc, o],
                                  axis=[ri, rj, rc]),
        name="conv",
    )
    out = acc if epilogue is None else te.compute(acc.shape, lambda *idx: epilogue(acc(*idx), idx), name="epilogue")
    func = te.create_prim_func([x, *([image] if nchw else []), weights, scale, *epilogue_inputs, out])
    return func.with_attr(KERNEL_ATTR, CONV_KERNEL_NAME).with_attr(INPUT_LAYOUT_ATTR, input_layout)


def _mean_hw(x: te.Tensor, name: str) -> te.Tensor:
    """(N, C) mean over H, W of NHWC x: the sum, then a division by H*W."""
    n, h, w, c = (int(d) for d in x.shape)
    rh = te.reduce_axis((0, h), name="rh")
    rw = te.reduce_axis((0, w), name="rw")
    total = te.compute((n, c), lambda i, j: te.sum(x[i, rh, rw, j], axis=[rh, rw]), name=f"{name}_sum")
    return te.compute((n, c), lambda i, j: total[i, j] / float(h * w), name=name)


def _mean_of_rows(rows: te.Tensor, width: int, name: str) -> te.Tensor:
    """(N, C) mean of an image from its (N, H, C) row sums over ``width`` pixels each."""
    n, h, c = (int(d) for d in rows.shape)
    rh = te.reduce_axis((0, h), name="rh")
    total = te.compute((n, c), lambda i, j: te.sum(rows[i, rh, j], axis=rh), name=f"{name}_sum")
    return te.compute((n, c), lambda i, j: total[i, j] / float(h * width), name=name)


def _dense(x: te.Tensor, q: te.Tensor, w_scale: te.Tensor, bias: te.Tensor, name: str,
           quant: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr],
           act_scale: te.Tensor) -> te.Tensor:
    """y[n, o] = (sum_c quant(x[n, c]) q[c, o]) / w_scale[o] + bias[o] (``pack_dense``'s layouts):
    q int8 column tiles (tiles, C, width), the dot computed per tile (N, tiles, width); or
    (ceil(C/8), O) int32 words of nibbles (``pack_int4``)."""
    n, c = (int(d) for d in x.shape)
    o = int(w_scale.shape[0])
    if q.dtype == "int8":
        tiles, _, width = (int(d) for d in q.shape)
        xq = te.compute((n, c), lambda i, j: quant(x[i, j], act_scale[j]), name=f"{name}_quantize")
        rc = te.reduce_axis((0, c), name="rc")
        dot = te.compute((n, tiles, width), lambda i, t, k: te.sum(xq[i, rc] * q[t, rc, k].astype("float32"),
                                                                  axis=rc), name=f"{name}_dot")
        return te.compute((n, o), lambda i, j: dot[i, j // width, j % width] / w_scale[j] + bias[j], name=name)
    rows = int(q.shape[0])
    # nibbles: input c = 8 row + nibble, summed in input order; the nibbles past C in the last
    # word are zero weights, their inputs zeros
    def quantized(i, j):
        if NIBBLES * rows == c:
            return quant(x[i, j], act_scale[j])
        inside = tirx.min(j, c - 1)
        return tirx.if_then_else(j < c, quant(x[i, inside], act_scale[inside]), tirx.const(0, "float32"))

    xq = te.compute((n, NIBBLES * rows), quantized, name=f"{name}_quantize")
    row = te.reduce_axis((0, rows), name="row")
    nibble = te.reduce_axis((0, NIBBLES), name="nibble")
    dot = te.compute((n, o), lambda i, j: te.sum(
        xq[i, row * NIBBLES + nibble] * int4(q[row, j], nibble).astype("float32"), axis=[row, nibble]),
        name=f"{name}_dot")
    return te.compute((n, o), lambda i, j: dot[i, j] / w_scale[j] + bias[j], name=name)


def _dense_inputs(c: int, o: int, name: str, w_bits: int = 8) -> tuple[te.Tensor, ...]:
    """Placeholders (act_scale (C,), q, w_scale (O,), bias (O,)) of one quantized dense layer, q
    in ``pack_dense``'s layout: int32 (ceil(C/8), O) words of nibbles when w_bits <= NIBBLE_BITS,
    else int8 column tiles (tiles, C, width)."""
    if w_bits <= NIBBLE_BITS:
        shape, dtype = (-(-c // NIBBLES), o), "int32"
    else:
        width = tile_width(o)
        shape, dtype = (-(-o // width), c, width), "int8"
    return (
        te.placeholder((c,), "float32", name=f"{name}_act_scale"),
        te.placeholder(shape, dtype, name=f"{name}_q"),
        te.placeholder((o,), "float32", name=f"{name}_w_scale"),
        te.placeholder((o,), "float32", name=f"{name}_bias"),
    )


def se_gate_func(x_shape: tuple[int, int, int, int], hidden: int, out_channels: int,
                 w_bits: int, a_bits: int, product: Product = _fenced_product,
                 from_row_sums: bool = False) -> tirx.PrimFunc:
    """``f(x, act_scale1, q1, w_scale1, b1, act_scale2, q2, w_scale2, b2, gate)``: the SEGate, gate (N, Cout).

        p = mean_HW(x);  h = relu(dense1(quant_signed(p)));  g = dense2(quant_unsigned(h))
        gate = min(max(g + 3, 0), 6) / 6

    q1 (Cin, hidden) and q2 (hidden, Cout) are ``pack_int4``-packed when w_bits <= NIBBLE_BITS.
    ``from_row_sums``: the kernel's first input is x's (N, H, C) row sums (``binary_conv.row_sums``)
    rather than x, and the mean sums those.
    """
    n, h, w, cin = x_shape
    if from_row_sums:
        x = te.placeholder((n, h, cin), "float32", name="row_sums")
        pooled = _mean_of_rows(x, w, "pool")
    else:
        x = te.placeholder(x_shape, "float32", name="x")
        pooled = _mean_hw(x, "pool")
    first = _dense_inputs(cin, hidden, "se1", w_bits)
    second = _dense_inputs(hidden, out_channels, "se2", w_bits)

    def signed(v, s):
        return quantize_act(v, s, a_bits, signed=True, product=product)

    def unsigned(v, s):
        return quantize_act(v, s, a_bits, signed=False, product=product)

    h = _dense(pooled, first[1], first[2], first[3], "se1", signed, first[0])
    relu = te.compute(h.shape, lambda i, j: tirx.max(h[i, j], tirx.const(0, "float32")), name="relu")
    g = _dense(relu, second[1], second[2], second[3], "se2", unsigned, second[0])
    gate = te.compute(g.shape, lambda i, j: tirx.min(tirx.max(g[i, j] + 3.0, 0.0), 6.0) / 6.0, name="gate")
    func = te.create_prim_func([x, *first, *second, gate])
    return func.with_attr(KERNEL_ATTR, SE_GATE_KERNEL_NAME)


def head_func(x_shape: tuple[int, int, int, int], classes: int, a_bits: int,
              product: Product = _fenced_product) -> tirx.PrimFunc:
    """``f(x, act_scale, q, w_scale, bias, logits)``: GlobalAveragePool + Flatten + QuantGemm (signed)."""
    _, _, _, c = x_shape
    x = te.placeholder(x_shape, "float32", name="x")
    params = _dense_inputs(c, classes, "fc")
    pooled = _mean_hw(x, "pool")
    logits = _dense(pooled, params[1], params[2], params[3], "fc",
                    lambda v, s: quantize_act(v, s, a_bits, signed=True, product=product), params[0])
    func = te.create_prim_func([x, *params, logits])
    return func.with_attr(KERNEL_ATTR, HEAD_KERNEL_NAME)
