"""Sign-and-bitpack of NHWC activations (TE) and of conv weights (numpy, at compile time).

Binary values s in {-1, +1} are stored as bits b = (s + 1) / 2, 32 channels to a ``uint32``
word, channel c in bit ``c % 32`` of word ``c // 32`` (uint32 beat uint64 on AVX-512:
no 64->32-bit narrowing of the popcount; shared/reference/tvm.md §2). sign(0) = +1, so
b = 1 exactly when x >= 0.

Channels past the last real one (C not a multiple of 32) are packed as bit 0 in both the
activations and the weights, so ``popcount(a ^ w)`` never counts them; the kernels count real
channels (C, not 32 * words) when they turn mismatches into a dot product.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bnncc.errors import BnnccError
from bnncc.targets.kernels import KERNEL_ATTR
from bnncc.targets.tvm_compat import te, tirx

__all__ = ["BORDER_DTYPE", "NIBBLE_MASK", "WORD_BITS", "WORD_DTYPE", "PackedWeights", "can_halve", "halved_counts",
           "blocked_weights", "pack_bits", "pack_weights", "sign_bitpack", "sign_bitpack_func", "words"]

KERNEL_NAME = "sign_bitpack"

WORD_BITS = 32
WORD_DTYPE = "uint32"
# the low 4 bits of every byte of a word (binary_conv's ``nibbles``)
NIBBLE_MASK = 0x0F0F0F0F
# border corrections are sums of at most C*k*k signs (4608 for 512 channels, 3x3): 16 bits hold
# them up to 3640 channels, and halve the table (1.2 MiB of PokeBNN-1x's 3x3 layers at int32)
BORDER_DTYPE = "int16"


def words(channels: int) -> int:
    """Words per pixel: ceil(C / 32)."""
    return -(-channels // WORD_BITS)


BITPACK_STAGE = "bitpack"  # the stage's name, by which the CPU schedule finds it


def sign_bitpack(x: te.Tensor) -> te.Tensor:
    """Pack NHWC float activations x (N, H, W, C) into uint32 words (N, H, W, ceil(C/32)).

    out[n, h, w, j] = sum_{b < 32, 32j + b < C} [x[n, h, w, 32j + b] >= 0] << b.
    The bits are disjoint, so the sum is an OR.
    """
    n, h, w, c = (int(d) for d in x.shape)
    b = te.reduce_axis((0, WORD_BITS), name="b")

    def bit(i, y, z, j, b):
        channel = j * WORD_BITS + b
        positive = x[i, y, z, channel] >= tirx.const(0, x.dtype)
        if c % WORD_BITS:  # only the last word has channels past C; never read them
            positive = tirx.if_then_else(channel < c, positive, tirx.const(False, "bool"))
        return positive.astype(WORD_DTYPE) << b.astype(WORD_DTYPE)

    return te.compute(
        (n, h, w, words(c)),
        lambda i, y, z, j: te.sum(bit(i, y, z, j, b), axis=b),
        name=BITPACK_STAGE,
        tag="sign_bitpack",
    )


def sign_bitpack_func(batch: int, height: int, width: int, channels: int) -> tirx.PrimFunc:
    """The unscheduled PrimFunc ``f(x, out)`` of ``sign_bitpack`` for float32 NHWC x."""
    x = te.placeholder((batch, height, width, channels), "float32", name="x")
    func = te.create_prim_func([x, sign_bitpack(x)])
    return func.with_attr(KERNEL_ATTR, KERNEL_NAME)


def pack_bits(signs: np.ndarray) -> np.ndarray:
    """Numpy packing along the last axis: bool (..., C) -> uint32 (..., ceil(C/32)), as sign_bitpack."""
    c = signs.shape[-1]
    padded = np.zeros(signs.shape[:-1] + (words(c) * WORD_BITS,), dtype=np.uint64)
    padded[..., :c] = signs
    grouped = padded.reshape(signs.shape[:-1] + (words(c), WORD_BITS))
    weights = np.left_shift(np.uint64(1), np.arange(WORD_BITS, dtype=np.uint64))
    return (grouped * weights).sum(axis=-1).astype(np.uint32)


class PackedWeights(NamedTuple):
    """Binary conv weights ready for ``binary_conv2d``.

    bits:   uint32 (k, k, ceil(Cin/32), Cout); bit = [W >= 0]; Cout innermost (the vector lanes).
    scale:  float32 (Cout,) = max|W| over (Cin, kh, kw) / 2, so that W ~ sign(W) * scale
            (the BinaryConv weight quantizer, bnncc/ops/spec.md).
    border: int16 (k*k, k*k, Cout), the padded-border correction (see ``border_table``).
    in_channels: Cin, the real channel count.
    """

    bits: np.ndarray
    scale: np.ndarray
    border: np.ndarray
    in_channels: int


def pack_weights(weights: np.ndarray) -> PackedWeights:
    """Pack ONNX-layout conv weights W (Cout, Cin, k, k) for the binary conv kernels."""
    cout, cin, kh, kw = weights.shape
    signs = weights >= 0
    bits = pack_bits(signs.transpose(2, 3, 0, 1))  # (k, k, Cout, words)
    scale = np.abs(weights).reshape(cout, -1).max(axis=1).astype(np.float32) / 2
    return PackedWeights(
        bits=np.ascontiguousarray(bits.transpose(0, 1, 3, 2)),
        scale=scale,
        border=border_table(np.where(signs, 1, -1).sum(axis=1)),
        in_channels=cin,
    )


def blocked_weights(bits: np.ndarray, lanes: int, split: bool = False) -> np.ndarray:
    """Packed weights (k, k, words, Cout) blocked by vectors of ``lanes`` output channels,
    (Cout/lanes, k, k, words, lanes), so that a register tile's weights for all its steps lie
    together (binary_conv's module docstring); ``split``, for a kernel counting nibbles
    (binary_conv2d's ``nibbles``): each word split into nibbles ahead, (Cout/lanes, k, k, words, 2,
    lanes), the low 4 bits of every byte (half 0), then the high 4 moved down (half 1), so that the
    kernel splits no weight word itself."""
    k, _, words, cout = bits.shape
    if cout % lanes:
        raise ValueError(f"{cout} output channels are no whole vectors of {lanes}")
    blocked = bits.reshape(k, k, words, cout // lanes, lanes).transpose(3, 0, 1, 2, 4)
    if split:
        mask = np.uint32(NIBBLE_MASK)
        blocked = np.stack((blocked & mask, (blocked >> np.uint32(4)) & mask), axis=4)
    return np.ascontiguousarray(blocked)


def border_table(tap_sums: np.ndarray) -> np.ndarray:
    """The dot-product correction for windows that overlap the padded border.

    tap_sums[co, kh, kw] = sum_c sw[co, c, kh, kw]. The kernels read the padded border as
    bit 0, i.e. sx = -1, so a padded tap adds -tap_sums[co, kh, kw] where the spec wants 0.
    A window with ``top`` padded rows above, ``bottom`` below, ``left`` and ``right`` padded
    columns (each < k under SAME padding) is fixed by adding

        border[top*k + bottom, left*k + right, co] = sum over its padded taps of tap_sums[co, kh, kw],

    a tap (kh, kw) being padded when kh < top or kh >= k - bottom or kw < left or kw >= k - right.
    """
    cout, k, _ = tap_sums.shape
    limit = np.iinfo(BORDER_DTYPE).max
    if np.abs(tap_sums).sum(axis=(1, 2)).max(initial=0) > limit:
        raise BnnccError(f"binary conv weights of shape (Cout, k, k) = {tuple(tap_sums.shape)}: border "
                         f"corrections exceed {BORDER_DTYPE} (more than {limit // (k * k)} input channels)")
    table = np.zeros((k * k, k * k, cout), dtype=BORDER_DTYPE)
    taps = np.arange(k)
    for top in range(k):
        for bottom in range(k):
            rows = (taps < top) | (taps >= k - bottom)
            for left in range(k):
                for right in range(k):
                    cols = (taps < left) | (taps >= k - right)
                    padded = rows[:, None] | cols[None, :]
                    table[top * k + bottom, left * k + right] = (tap_sums * padded).sum(axis=(1, 2))
    return table


def can_halve(in_channels: int, kernel: int) -> bool:
    """Whether a binary conv can take its dot product halved (``halved_counts``): C even, and its
    halved counts, up to C*k*k, in BORDER_DTYPE."""
    return in_channels % 2 == 0 and in_channels * kernel * kernel <= np.iinfo(BORDER_DTYPE).max


def halved_counts(border: np.ndarray, in_channels: int) -> np.ndarray:
    """The table (C*k*k + border) / 2 (the dtype and shape of ``border``) of a binary conv that
    ``can_halve``.

    A window's +-1 dot product is C*k*k - 2*P + border[...] (binary_conv2d), so its half is this
    table's entry minus P: one subtraction where the whole took a doubling, a subtraction and the
    border's add (binary_conv2d's ``halved``). Exact: with C even, C*k*k and every border entry
    (a sum of taps' sums of C signs) are even.
    """
    k = int(round(np.sqrt(border.shape[0])))
    if not can_halve(in_channels, k):
        raise ValueError(f"a {k}x{k} binary conv of {in_channels} input channels has no halved counts")
    return ((in_channels * k * k + border.astype(np.int32)) // 2).astype(BORDER_DTYPE)
