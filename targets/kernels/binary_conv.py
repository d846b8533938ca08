"""Binary (1-bit x 1-bit) NHWC convolution as a TE compute: xor + popcount on packed words.

Semantics (the ``ai.bnncc`` BinaryConv, integer part): with sx, sw in {-1, +1},

    acc[n, ho, wo, co] = sum over taps (kh, kw) inside the image and channels c < C of
                         sx[n, ho*s + kh - top_pad, wo*s + kw - left_pad, c] * sw[co, c, kh, kw]

TF SAME padding: total = max((ceil(H/s) - 1)*s + k - H, 0), the smaller half before (a 3x3/2
conv on an even input pads 0 before and 1 after). The padded border contributes 0.

How the kernel computes it. Packed activations are padded with all-zero words (sx = -1 on the
border) so the inner loop has no conditions, and per window

    sum over all k*k taps and c < C of sx*sw = C*k*k - 2*P,   P = sum popcount(xa ^ wb)

(c >= C bits are 0 in both operands and never mismatch; bnncc.targets.kernels.bitpack). The
border taps added sum_c (-1)*sw = -tap_sum each, so the exact result is

    acc = C*k*k - 2*P + border[top*k + bottom, left*k + right, co]

with top = max(top_pad - ho*s, 0) and bottom = max(ho*s - top_pad + k - H, 0) the numbers of
padded rows in the window (left, right likewise for columns) and ``border`` the precomputed
sums of tap_sum over those padded taps (``bitpack.border_table``). Interior windows read
border[0, 0, co] = 0.

The output is ``epilogue(acc, (n, ho, wo, co))`` if an epilogue is given, else acc (int32);
the epilogue is where scale, BN, shortcuts, DPReLU, SE and the next bitpack get fused.

``halved``: with C even, the epilogue gets acc / 2 = half[...] - P, ``border`` being the table
half = (C*k*k + border) / 2 (``bitpack.halved_counts``; interior windows read half[0, 0, co] =
C*k*k / 2, 1x1 convs no table): one integer instruction an output where acc took two to four.
An epilogue that scales acc by a float a then scales acc / 2 by 2a: the same product, exactly.

Weights (k, k, words, Cout), or blocked by vectors of ``lanes`` output channels
(``bitpack.blocked_weights``: (Cout/lanes, k, k, words, lanes)), so that a register tile's weights
for all its steps lie together: in the plain layout the steps of a 512->2048 conv are 8 KiB apart,
all in one set of the L1 cache, and a tile's weights, when they first come from L3 in the whole
network, are a stream of lines thousands of bytes apart rather than a run of adjacent ones (the
x86 kernels take them blocked; bench/RESULTS.md).

``nibbles``: the same sum, counted per 4-bit half of each byte, for CPUs that count bits by
looking 4-bit values up in a table (AVX2's vpshufb). With v_lo = v & 0x0F0F0F0F and
v_hi = (v >> 4) & 0x0F0F0F0F, a word's 32 bits are the 16 of each half; the kernel splits the
padded activations once per call (stage NIBBLES, both halves of a word side by side) and each
step splits its weight words, which the register tile's columns share, or takes them split ahead
(blocked, (Cout/lanes, k, k, words, 2, lanes)). Its weights come blocked, and a lookup then needs
no masking of its own (cpu_schedule._nibble_popcount_intrin). It sums agreements rather than
mismatches: per half, 16 - 2 popcount(xa_half ^ wb_half), the +-1 dot product of its 16 bits, so

    A = sum of those over all taps, words and halves = 32*words*k*k - 2*P
    acc = A - (32*words - C)*k*k + border[top*k + bottom, left*k + right, co]

which is acc itself when C fills its words and the conv has no padding (every 1x1 conv of a
ResNet): no instruction after the sum, where C*k*k - 2*P took two (and ``halved`` one; the nibble
form has no halved variant).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bnncc.targets.kernels import KERNEL_ATTR
from bnncc.targets.kernels.bitpack import BORDER_DTYPE, NIBBLE_MASK, WORD_BITS, WORD_DTYPE, words
from bnncc.targets.tvm_compat import te, tirx

__all__ = [
    "AVERAGE_POOL", "CHANNEL_MEAN", "GATED_PARAMS", "NIBBLES", "PARAMS", "ROW_SUM", "Epilogue", "average_pool", "binary_conv2d", "binary_conv2d_func", "channel_mean",
    "mean_value", "out_size", "row_sums", "same_padding", "scale_bias_epilogue", "split_ahead",
    "weight_shape",
]

KERNEL_NAME = "binary_conv2d"
# names of the stages that ``channel_mean``, ``average_pool`` and ``row_sums`` add (schedules find
# them by these)
CHANNEL_MEAN = "channel_mean"
AVERAGE_POOL = "average_pool"
ROW_SUM = "row_sum"
NIBBLES = "nibbles"
# a fused PokeConv kernel's per-channel parameter table, and the same with its gate folded in
# (bnncc.targets.lower)
PARAMS = "params"
GATED_PARAMS = "gated_params"


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF SAME padding (before, after) of one spatial axis."""
    total = max((out_size(size, stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def out_size(size: int, stride: int) -> int:
    """SAME output size: ceil(size / stride)."""
    return -(-size // stride)


@dataclass(frozen=True)
class Epilogue:
    """An elementwise tail fused into the conv: y[n, ho, wo, co] = fn(acc, (n, ho, wo, co)).

    ``acc`` is the int32 dot product; ``inputs`` are the extra placeholders ``fn`` reads, in the
    order they become kernel arguments (after x, weights, border; before the output).
    """

    inputs: tuple[te.Tensor, ...]
    fn: Callable[[tirx.PrimExpr, tuple], tirx.PrimExpr]


def scale_bias_epilogue(out_channels: int) -> Epilogue:
    """y = float32(acc) * scale[co] + bias[co] (the folded weight/activation scale, then a bias or BN shift)."""
    scale = te.placeholder((out_channels,), "float32", name="scale")
    bias = te.placeholder((out_channels,), "float32", name="bias")
    return Epilogue(
        inputs=(scale, bias),
        fn=lambda acc, idx: acc.astype("float32") * scale[idx[3]] + bias[idx[3]],
    )


def mean_value(load: Callable[[int], tirx.PrimExpr], k: int) -> tirx.PrimExpr:
    """(((load(0) + load(1)) + ...) + load(k - 1)) / k: the order every channel mean of ours sums in."""
    return sum((load(t) for t in range(1, k)), load(0)) / float(k)


def channel_mean(r: te.Tensor, channels: int) -> te.Tensor:
    """NHWC r with k * ``channels`` channels -> ``channels``: out[..., c] = mean of r[..., c*k + t], t < k.

    A stage of its own (block CHANNEL_MEAN) rather than part of an epilogue expression: its reads
    are k-strided, which a vectorized epilogue turns into one scalar load per lane, and a schedule
    can give the stage a vector form (cpu_schedule._vector_mean)."""
    n, h, w, ci = (int(d) for d in r.shape)
    k = ci // channels
    return te.compute((n, h, w, channels), lambda i, y, z, c: mean_value(lambda t: r[i, y, z, c * k + t], k),
                      name=CHANNEL_MEAN)


def average_pool(r: te.Tensor) -> te.Tensor:
    """The 3x3/2 SAME average pool of NHWC r counting padded cells (a sum of 9 taps, padded ones 0,
    divided by 9), as a stage of its own (block AVERAGE_POOL): an epilogue that pooled inline would
    pool once per output channel, twice for a channel-tiled shortcut."""
    n, h, w, c = (int(d) for d in r.shape)
    top, left = same_padding(h, 3, 2)[0], same_padding(w, 3, 2)[0]

    def pooled(i, y, z, ch):
        total = tirx.const(0, "float32")
        for a in range(3):
            for b in range(3):
                yy, zz = y * 2 + a - top, z * 2 + b - left
                inside = tirx.all(yy >= 0, yy < h, zz >= 0, zz < w)
                clamped = r[i, tirx.min(tirx.max(yy, 0), h - 1), tirx.min(tirx.max(zz, 0), w - 1), ch]
                total = total + tirx.if_then_else(inside, clamped, tirx.const(0, "float32"))
        return total / 9.0

    return te.compute((n, out_size(h, 2), out_size(w, 2), c), pooled, name=AVERAGE_POOL)


def row_sums(y: te.Tensor) -> te.Tensor:
    """(N, H, C) sums of NHWC y over each row's pixels, in column order (block ROW_SUM).

    A PokeConv's output is the next PokeConv's input, whose SE gate averages it over the image; the
    producing kernel adds each row up while the row is still in cache (a schedule computes the
    stage per task of whole rows), so the gate reads H*C sums instead of the whole tensor again."""
    n, h, w, c = (int(d) for d in y.shape)
    rw = te.reduce_axis((0, w), name="rw")
    return te.compute((n, h, c), lambda i, r, ch: te.sum(y[i, r, rw, ch], axis=rw), name=ROW_SUM)


def _pad(x: te.Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> te.Tensor:
    """Zero words around the packed image (sx = -1 there; corrected by the border term)."""
    n, h, w, cw = (int(d) for d in x.shape)
    if rows == (0, 0) and cols == (0, 0):
        return x

    def value(i, y, z, j):
        inside = tirx.all(y >= rows[0], y < rows[0] + h, z >= cols[0], z < cols[0] + w)
        return tirx.if_then_else(inside, x[i, y - rows[0], z - cols[0], j], tirx.const(0, x.dtype))

    return te.compute((n, h + sum(rows), w + sum(cols), cw), value, name="pad")


def nibble(word: tirx.PrimExpr, half: tirx.PrimExpr) -> tirx.PrimExpr:
    """The low (half 0) or high (half 1) 4 bits of every byte of a uint32 ``word``, each moved to
    its byte's low bits."""
    return (word >> (half * 4).astype(WORD_DTYPE)) & tirx.const(NIBBLE_MASK, WORD_DTYPE)


def agreement(x_half: tirx.PrimExpr, w_half: tirx.PrimExpr) -> tirx.PrimExpr:
    """The +-1 dot product of the 16 bits of activation half-word ``x_half`` (a NIBBLES value) and
    weight half-word ``w_half`` (a ``nibble`` of the same half): agreeing bits minus mismatching
    ones (int32)."""
    return 16 - 2 * te.popcount(x_half ^ w_half).astype("int32")


def _nibbles(xp: te.Tensor) -> te.Tensor:
    """(N, H, W, words, 2): both nibble halves of every packed word (block NIBBLES)."""
    return te.compute((*xp.shape, 2), lambda i, y, z, j, half: nibble(xp[i, y, z, j], half), name=NIBBLES)


def binary_conv2d(
    x: te.Tensor,
    weights: te.Tensor,
    border: te.Tensor,
    *,
    in_channels: int,
    stride: int,
    epilogue: Epilogue | None = None,
    nibbles: bool = False,
    halved: bool = False,
) -> te.Tensor:
    """Binary conv of packed x (N, H, W, ceil(C/32)) with packed weights (k, k, ceil(C/32), Cout)
    or blocked by channel vectors (``weight_shape``; with ``nibbles``, blocked, and maybe split).

    ``border`` is the int16 (k*k, k*k, Cout) table of ``bitpack.pack_weights`` (of
    ``bitpack.halved_counts`` when ``halved``). Output NHWC (N, ceil(H/s), ceil(W/s), Cout); the
    math, ``nibbles`` and ``halved`` are in the module docstring.
    """
    if halved and (in_channels % 2 or nibbles):
        raise ValueError(f"a halved count needs an even channel count (not {in_channels}) and no nibbles")
    blocked = len(weights.shape) > 4
    if (nibbles and not blocked) or (split_ahead(weights.shape) and not nibbles):
        raise ValueError("a kernel counting nibbles takes weights blocked by channel vectors, and only it takes them "
                         "split into nibbles (bitpack.blocked_weights)")
    n, h, w, cw = (int(d) for d in x.shape)
    if blocked:
        k, lanes = int(weights.shape[1]), int(weights.shape[-1])
        cout = int(weights.shape[0]) * lanes
    else:
        k, cout = int(weights.shape[0]), int(weights.shape[3])
    rows, cols = same_padding(h, k, stride), same_padding(w, k, stride)
    xp = _pad(x, rows, cols)
    kh = te.reduce_axis((0, k), name="kh")
    kw = te.reduce_axis((0, k), name="kw")
    j = te.reduce_axis((0, cw), name="j")
    shape = (n, out_size(h, stride), out_size(w, stride), cout)

    def weight(kh, kw, j, co):
        return weights[co // lanes, kh, kw, j, co % lanes] if blocked else weights[kh, kw, j, co]

    if nibbles:
        xn = _nibbles(xp)
        half = te.reduce_axis((0, 2), name="half")

        def w_half(kh, kw, j, co, half):
            if split_ahead(weights.shape):
                return weights[co // lanes, kh, kw, j, half, co % lanes]
            return nibble(weight(kh, kw, j, co), half)

        counts = te.compute(shape, lambda i, y, z, co: te.sum(
            agreement(xn[i, y * stride + kh, z * stride + kw, j, half], w_half(kh, kw, j, co, half)),
            axis=[kh, kw, j, half]), name="popcount")
    else:
        counts = te.compute(shape, lambda i, y, z, co: te.sum(
            te.popcount(xp[i, y * stride + kh, z * stride + kw, j] ^ weight(kh, kw, j, co)).astype("int32"),
            axis=[kh, kw, j]), name="popcount")
    # the bits past C in every word, which agree in A (module docstring)
    unused_bits = (WORD_BITS * cw - in_channels) * k * k

    def padded(o, before, size):
        """(padded taps before, padded taps after) of the window at output position o."""
        start = o * stride - before
        return tirx.max(-start, 0), tirx.max(start + k - size, 0)

    def inner(count):
        """C*k*k - 2P, the dot product but the border term, from P or (nibbles) from A."""
        # (a subtraction of 0, where C fills its words, is simplified away)
        return count - unused_bits if nibbles else in_channels * k * k - 2 * count

    def result(i, y, z, co):
        count = counts[i, y, z, co]
        if rows == (0, 0) and cols == (0, 0):
            # (without padding, as in every 1x1 conv, no window has a padded tap: no table load)
            acc = in_channels * k * k // 2 - count if halved else inner(count)
        else:
            top, bottom = padded(y, rows[0], h)
            left, right = padded(z, cols[0], w)
            entry = border[top * k + bottom, left * k + right, co].astype("int32")
            acc = entry - count if halved else inner(count) + entry
        return epilogue.fn(acc, (i, y, z, co)) if epilogue else acc

    return te.compute(shape, result, name="binary_conv2d", tag="binary_conv2d")


def weight_shape(kernel: int, in_channels: int, out_channels: int, lanes: int | None = None,
                 split: bool = False) -> tuple[int, ...]:
    """The packed weights' shape: (k, k, words, Cout); blocked by vectors of ``lanes`` channels,
    (Cout/lanes, k, k, words, lanes), and for a kernel counting nibbles maybe split into nibbles
    ahead too, (Cout/lanes, k, k, words, 2, lanes) (``bitpack.blocked_weights``)."""
    cw = words(in_channels)
    if lanes is None:
        return (kernel, kernel, cw, out_channels)
    return (out_channels // lanes, kernel, kernel, cw, *((2,) if split else ()), lanes)


def split_ahead(shape) -> bool:
    """Whether weights of this shape (``weight_shape``) come split into nibbles ahead."""
    return len(shape) == 6


def binary_conv2d_func(
    batch: int,
    height: int,
    width: int,
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int,
    epilogue: Epilogue | None = None,
    nibbles: bool = False,
    lanes: int | None = None,
    split: bool = False,
) -> tirx.PrimFunc:
    """The unscheduled PrimFunc ``f(x, weights, border, *epilogue.inputs, out)`` of ``binary_conv2d``;
    ``lanes``, ``split``: its weights' layout (``weight_shape``; ``split`` with ``nibbles`` only)."""
    cw = words(in_channels)
    x = te.placeholder((batch, height, width, cw), WORD_DTYPE, name="x")
    weights = te.placeholder(weight_shape(kernel, in_channels, out_channels, lanes, split), WORD_DTYPE, name="weights")
    border = te.placeholder((kernel * kernel, kernel * kernel, out_channels), BORDER_DTYPE, name="border")
    out = binary_conv2d(x, weights, border, in_channels=in_channels, stride=stride, epilogue=epilogue,
                        nibbles=nibbles)
    extra = list(epilogue.inputs) if epilogue else []
    func = te.create_prim_func([x, weights, border, *extra, out])
    return func.with_attr(KERNEL_ATTR, KERNEL_NAME)
