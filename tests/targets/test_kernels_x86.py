"""Bitpack and binary conv kernels, unscheduled and with the x86-64 schedules, against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from bnncc.targets import tvm_compat as tc
from bnncc.targets import x86_64
from bnncc.targets.kernels import KERNEL_ATTR
from bnncc.targets.kernels import binary_conv as bc
from bnncc.targets.kernels import bitpack as bp

AVX2_FLAGS = {"avx2", "bmi2", "fma", "movbe"}
AVX512BW_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}  # Skylake-SP, Cascade Lake
AVX512_FLAGS = AVX512BW_FLAGS | {"avx512_vpopcntdq"}
FLAGS = {"avx2": AVX2_FLAGS, "avx512bw": AVX512BW_FLAGS, "avx512": AVX512_FLAGS}

# How each kernel is built (see ``build``); AVX-512 code runs only where the host has it.
VARIANTS = ["unscheduled"] + [name for name, flags in FLAGS.items() if flags <= x86_64.cpu_flags()]
# binary convs: also the unscheduled kernel of the nibble form (binary_conv2d's ``nibbles``), and of
# the plain form with its weights blocked by channel vectors, as every x86 schedule takes them
CONV_VARIANTS = VARIANTS + ["unscheduled-nibbles", "unscheduled-blocked"]
# the builds whose kernels count nibbles (where the channels fill their vectors)
NIBBLE_VARIANTS = ["unscheduled-nibbles"] + [v for v in ("avx2", "avx512bw") if v in VARIANTS]


def target_of(variant):
    return x86_64.target_for_flags(FLAGS[variant], cores=2)


def nibbles(variant, out_channels):
    """binary_conv2d's ``nibbles`` as the lowering picks it for the variant's target (the
    unscheduled nibble form where the channels fill AVX2's vectors)."""
    if variant.startswith("unscheduled"):
        return variant == "unscheduled-nibbles" and out_channels % 8 == 0
    return x86_64.counts_nibbles(target_of(variant), out_channels)


def lanes_of(variant, out_channels):
    """The channel vector by which the variant's kernel takes its weights blocked (the lowering's
    choice, x86_64.weight_lanes; the unscheduled blocked and nibble forms take AVX2's where the
    channels fill them), else None."""
    if variant.startswith("unscheduled"):
        return 8 if variant != "unscheduled" and out_channels % 8 == 0 else None
    return x86_64.weight_lanes(target_of(variant), out_channels)


def layout(variant, out_channels, split=False):
    """binary_conv2d_func's (and _poke_conv_func's) arguments for the variant's weight layout."""
    return {"nibbles": nibbles(variant, out_channels), "lanes": lanes_of(variant, out_channels), "split": split}


def weights_of(variant, bits, split=False):
    """Packed weights (k, k, words, Cout) as the variant's kernel takes them (bitpack.blocked_weights)."""
    lanes = lanes_of(variant, bits.shape[-1])
    return bits if lanes is None else bp.blocked_weights(bits, lanes, split)


def build(func, variant):
    """Compile ``func`` as it is (generic llvm) or through the x86 schedule for an AVX2 / AVX-512 target."""
    if variant.startswith("unscheduled"):
        return tc.compile_func(func, tc.make_target({"kind": "llvm"}))
    target = target_of(variant)
    scheduled = x86_64.schedule(func, target)
    assert scheduled is not None and scheduled.attrs["tirx.is_scheduled"]
    return tc.compile_func(scheduled, target)


def run(module, *arrays, out_shape, out_dtype):
    out = tc.to_tensor(np.zeros(out_shape, out_dtype))
    module(*(tc.to_tensor(a) for a in arrays), out)
    return out.numpy()


def reference_pack(signs: np.ndarray) -> np.ndarray:
    """Little-endian bit order, 32 channels a word, padding bits 0: numpy's packbits then a uint32 view."""
    c = signs.shape[-1]
    padded = np.zeros(signs.shape[:-1] + (-(-c // 32) * 32,), dtype=bool)
    padded[..., :c] = signs
    return np.packbits(padded, axis=-1, bitorder="little").view("<u4")


def reference_conv(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """sum of sign(x)*sign(w) over taps inside the image, sign(0)=+1, TF SAME padding, border = 0."""
    sx = np.where(x >= 0, 1, -1)
    sw = np.where(w >= 0, 1, -1)
    n, h, wd, _ = x.shape
    cout, _, k, _ = w.shape
    ho, wo = -(-h // stride), -(-wd // stride)
    pad_h = max((ho - 1) * stride + k - h, 0)
    pad_w = max((wo - 1) * stride + k - wd, 0)
    xp = np.pad(sx, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    out = np.zeros((n, ho, wo, cout), np.int64)
    for kh in range(k):
        for kw in range(k):
            window = xp[:, kh : kh + stride * ho : stride, kw : kw + stride * wo : stride, :]
            out += window @ sw[:, :, kh, kw].T
    return out


def activations(rng, shape):
    """Gaussian values with exact zeros mixed in (sign(0) = +1)."""
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < 0.1] = 0.0
    return x


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("channels", [40, 72, 100, 64])
def test_sign_bitpack(variant, channels):
    x = activations(np.random.default_rng(channels), (2, 3, 5, channels))
    module = build(bp.sign_bitpack_func(2, 3, 5, channels), variant)
    packed = run(module, x, out_shape=(2, 3, 5, bp.words(channels)), out_dtype="uint32")
    np.testing.assert_array_equal(packed, reference_pack(x >= 0))


def test_pack_weights():
    w = np.random.default_rng(0).standard_normal((3, 40, 3, 3)).astype(np.float32)
    w[1, 7, 2, 0] = 0.0
    packed = bp.pack_weights(w)
    assert packed.bits.shape == (3, 3, 2, 3) and packed.in_channels == 40
    np.testing.assert_array_equal(packed.bits[2, 0, :, 1], reference_pack(w[1, :, 2, 0] >= 0))
    np.testing.assert_array_equal(packed.scale, np.abs(w).max(axis=(1, 2, 3)) / 2)
    # Window with one padded row on top: the three taps kh = 0 are padded.
    tap_sums = np.where(w >= 0, 1, -1).sum(axis=1)
    np.testing.assert_array_equal(packed.border[1 * 3 + 0, 0], tap_sums[:, 0, :].sum(axis=1))


def test_halved_counts():
    """(C*k*k + border) / 2, exactly, for an even C; an odd C, or counts past int16, have none."""
    w = np.random.default_rng(1).standard_normal((5, 40, 3, 3)).astype(np.float32)
    border = bp.pack_weights(w).border
    half = bp.halved_counts(border, 40)
    assert half.dtype == border.dtype and half.shape == border.shape
    np.testing.assert_array_equal(2 * half.astype(np.int64), 360 + border.astype(np.int64))
    assert half[0, 0, 0] == 180
    with pytest.raises(ValueError, match="no halved counts"):
        bp.halved_counts(bp.pack_weights(w[:, :39]).border, 39)
    assert bp.can_halve(3640, 3) and not bp.can_halve(3642, 3) and bp.can_halve(32766, 1)
    # a kernel counting nibbles sums the whole dot product: asking it for half is an error
    x, weights = tc.te.placeholder((1, 4, 4, 2), "uint32"), tc.te.placeholder((3, 3, 2, 8), "uint32")
    border = tc.te.placeholder((9, 9, 8), "int16")
    with pytest.raises(ValueError, match="no nibbles"):
        bc.binary_conv2d(x, weights, border, in_channels=40, stride=1, nibbles=True, halved=True)


def test_same_padding():
    assert bc.same_padding(56, 3, 2) == (0, 1)
    assert bc.same_padding(7, 3, 2) == (1, 1)
    assert bc.same_padding(8, 3, 1) == (1, 1)
    assert bc.same_padding(7, 1, 2) == (0, 0)


# (batch, height, width, in channels, out channels, kernel, stride): odd and even sizes,
# channel counts that are not multiples of 32 or 64.
CONV_CASES = [
    (1, 7, 7, 40, 16, 3, 1),
    (2, 8, 6, 72, 32, 3, 2),
    (1, 7, 9, 100, 48, 3, 2),
    (1, 5, 6, 100, 24, 1, 1),
    (2, 7, 8, 72, 32, 1, 2),
    (1, 14, 14, 64, 64, 3, 1),
    # more than 31 words: the AVX2 schedule's byte counts run in several chunks of words
    # (cpu_schedule._byte_chunks), here 3 chunks of 11 words a tap and 9 taps
    (1, 4, 5, 1056, 16, 1, 1),
    (1, 5, 4, 1056, 8, 3, 2),
]


@pytest.mark.parametrize("variant", CONV_VARIANTS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "n{}h{}w{}c{}o{}k{}s{}".format(*c))
def test_binary_conv_matches_numpy(variant, case):
    n, h, w, cin, cout, k, s = case
    rng = np.random.default_rng(sum(case))
    x = activations(rng, (n, h, w, cin))
    weights = activations(rng, (cout, cin, k, k))
    packed = bp.pack_weights(weights)
    module = build(bc.binary_conv2d_func(n, h, w, cin, cout, k, s, **layout(variant, cout)), variant)
    expected = reference_conv(x, weights, s)
    got = run(module, reference_pack(x >= 0), weights_of(variant, packed.bits), packed.border, out_shape=expected.shape,
              out_dtype="int32")
    np.testing.assert_array_equal(got, expected)


def test_blocked_weights_by_hand():
    """Blocked by vectors of output channels; split: the low 4 bits of every byte (half 0), then the
    high 4, moved down."""
    bits = np.arange(2 * 4, dtype=np.uint32).reshape(1, 1, 2, 4) * np.uint32(0x01010101)  # (k, k, words, Cout)
    bits[0, 0, 1, 3] = 0xABCD1234
    blocked = bp.blocked_weights(bits, 2)
    assert blocked.shape == (2, 1, 1, 2, 2)
    np.testing.assert_array_equal(blocked[1, 0, 0, 1], bits[0, 0, 1, 2:4])
    split = bp.blocked_weights(bits, 2, split=True)
    assert split.shape == (2, 1, 1, 2, 2, 2) and split.dtype == np.uint32
    np.testing.assert_array_equal(split[1, 0, 0, 1, :, 1], [0x0B0D0204, 0x0A0C0103])
    with pytest.raises(ValueError, match="no whole vectors"):
        bp.blocked_weights(bits, 3)


@pytest.mark.parametrize("variant, case", [(v, c) for v in NIBBLE_VARIANTS for c in CONV_CASES if nibbles(v, c[4])],
                         ids=lambda p: p if isinstance(p, str) else "n{}h{}w{}c{}o{}k{}s{}".format(*p))
def test_binary_conv_split_nibbles_matches_numpy(variant, case):
    """The nibble form with its weights split ahead (bitpack.blocked_weights, the kernels' choice for
    the smaller weights where they count nibbles): the same dot products."""
    n, h, w, cin, cout, k, s = case
    rng = np.random.default_rng(sum(case) + 1)
    x = activations(rng, (n, h, w, cin))
    weights = activations(rng, (cout, cin, k, k))
    packed = bp.pack_weights(weights)
    module = build(bc.binary_conv2d_func(n, h, w, cin, cout, k, s, **layout(variant, cout, split=True)), variant)
    expected = reference_conv(x, weights, s)
    got = run(module, reference_pack(x >= 0), weights_of(variant, packed.bits, split=True), packed.border,
              out_shape=expected.shape, out_dtype="int32")
    np.testing.assert_array_equal(got, expected)


def test_avx2_splits_the_smallest_weights_within_the_budget():
    """Kernels counting nibbles take split weights, smallest first and all convs of a shape or none,
    while the copies stay within 10% of all the convs' packed weights; AVX-512 VPOPCNTDQ kernels count
    no nibbles."""
    avx2, avx512 = target_of("avx2"), target_of("avx512")
    # packed bytes: 2, 8, 32 and 128 KiB (and 0.5 KiB with no whole vectors): 10% of all is 17 KiB
    convs = {"a": (64, 256, 1), "b": (128, 512, 1), "c": (256, 1024, 1), "d": (512, 2048, 1), "odd": (64, 60, 1)}
    assert x86_64.split_convs(avx2, convs) == {"a", "b"}
    assert x86_64.split_convs(avx2, {"d": convs["d"]}) == set()  # 128 KiB over 12.8 KiB of budget
    # 10% of 146 KiB leaves 12.6 KiB after "a": room for one 8 KiB conv, not for both of its shape
    pair = {"b1": convs["b"], "b2": convs["b"], "a": convs["a"], "d": convs["d"]}
    assert x86_64.split_convs(avx2, pair) == {"a"}
    assert x86_64.split_convs(avx512, convs) == set()
    assert x86_64.split_convs(target_of("avx512bw"), convs) == {"a", "b"}  # 16 lanes: 60 channels fill none


@pytest.mark.parametrize("variant", CONV_VARIANTS)
def test_binary_conv_every_bit_mismatching(variant):
    """x all +1, weights all -1: each step of the AVX2 byte counts adds 8 to every byte lane (-2 - 2
    in the nibble form, which counts agreements), and a chunk of 31 words (992 channels, 1x1) fills
    them to 248 (-124), just short of where they would wrap; the multiply-adds that widen them
    (pairs of 248 -> 496) stay unsaturated."""
    cin, cout = 992, 16
    x = np.ones((1, 3, 4, cin), np.float32)
    packed = bp.pack_weights(-np.ones((cout, cin, 1, 1), np.float32))
    module = build(bc.binary_conv2d_func(1, 3, 4, cin, cout, 1, 1, **layout(variant, cout)), variant)
    got = run(module, reference_pack(x >= 0), weights_of(variant, packed.bits), packed.border, out_shape=(1, 3, 4, cout), out_dtype="int32")
    assert (got == -cin).all()


@pytest.mark.parametrize("variant", CONV_VARIANTS)
@pytest.mark.parametrize(
    ("size", "stride", "corners"),
    [
        # 3x3/1 on 6x6: every corner window has 2x2 taps inside the image.
        # Weights are +1 except tap (2, 2) which is -1, activations all +1 (x = 0):
        # top-left sees taps (1..2, 1..2) -> 3C - C; top-right (1..2, 0..1) -> 4C;
        # bottom-left (0..1, 1..2) -> 4C; bottom-right (0..1, 0..1) -> 4C.
        (6, 1, (2, 4, 4, 4)),
        # 3x3/2 on 6x6 pads 0 before, 1 after: top-left is all inside -> 8C - C;
        # top-right loses column 2 -> 6C; bottom-left loses row 2 -> 6C; bottom-right -> 4C.
        (6, 2, (7, 6, 6, 4)),
    ],
)
def test_binary_conv_corners_by_hand(variant, size, stride, corners):
    cin = 40
    weights = np.ones((8, cin, 3, 3), np.float32)
    weights[:, :, 2, 2] = -1.0
    x = np.zeros((1, size, size, cin), np.float32)
    packed = bp.pack_weights(weights)
    module = build(bc.binary_conv2d_func(1, size, size, cin, 8, 3, stride, **layout(variant, 8)), variant)
    ho = -(-size // stride)
    got = run(module, reference_pack(x >= 0), weights_of(variant, packed.bits), packed.border, out_shape=(1, ho, ho, 8),
              out_dtype="int32")
    top_left, top_right, bottom_left, bottom_right = (c * cin for c in corners)
    assert (got[0, 0, 0] == top_left).all()
    assert (got[0, 0, -1] == top_right).all()
    assert (got[0, -1, 0] == bottom_left).all()
    assert (got[0, -1, -1] == bottom_right).all()
    assert (got[0, 1:-1, 1:-1] == 7 * cin).all()  # interior: all 9 taps, 8C - C


@pytest.mark.parametrize("variant", CONV_VARIANTS)
def test_binary_conv_scale_bias_epilogue(variant):
    n, h, w, cin, cout, k, s = 1, 7, 7, 72, 32, 3, 2
    rng = np.random.default_rng(1)
    x = activations(rng, (n, h, w, cin))
    weights = activations(rng, (cout, cin, k, k))
    packed = bp.pack_weights(weights)
    bias = rng.standard_normal(cout).astype(np.float32)
    module = build(bc.binary_conv2d_func(n, h, w, cin, cout, k, s, bc.scale_bias_epilogue(cout),
                                         **layout(variant, cout)), variant)
    expected = reference_conv(x, weights, s).astype(np.float32) * packed.scale + bias
    got = run(
        module, reference_pack(x >= 0), weights_of(variant, packed.bits), packed.border, packed.scale, bias,
        out_shape=expected.shape, out_dtype="float32",
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)


def test_target_for_flags():
    classes = {name: x86_64.popcount_class(x86_64.target_for_flags(flags, cores=2)) for name, flags in FLAGS.items()}
    assert classes == {"avx2": x86_64.AVX2, "avx512bw": x86_64.AVX512BW, "avx512": x86_64.AVX512_VPOPCNTDQ}
    assert [x86_64.vector_lanes(target_of(name)) for name in ("avx512", "avx512bw", "avx2")] == [16, 16, 8]
    assert x86_64.vector_lanes(x86_64.target_for_flags({"sse4_2"}, cores=2)) is None
    assert x86_64.host_target().attrs["num-cores"] == tc.NUM_THREADS


def test_weights_blocked_by_the_targets_vector_where_channels_fill_it():
    """Every x86 class takes blocked weights (x86_64.weight_lanes); those without VPOPCNTDQ count nibbles
    where the channels fill their vectors."""
    avx512, avx512bw, avx2 = (target_of(name) for name in ("avx512", "avx512bw", "avx2"))
    for target in (avx512, avx512bw):
        assert [x86_64.weight_lanes(target, c) for c in (64, 2048, 24, 179)] == [16, 16, None, None]
    assert [x86_64.weight_lanes(avx2, c) for c in (64, 24, 179)] == [8, 8, None]
    assert not x86_64.counts_nibbles(avx512, 64) and x86_64.counts_nibbles(avx2, 64)
    assert [x86_64.counts_nibbles(avx512bw, c) for c in (64, 24)] == [True, False]
    assert x86_64.weight_lanes(x86_64.target_for_flags({"sse4_2"}, cores=2), 64) is None


def test_split_weights_need_the_nibble_form():
    """Weights split into nibbles ahead are only for a kernel counting nibbles, which takes blocked ones."""
    with pytest.raises(ValueError, match="only it takes them split"):
        bc.binary_conv2d_func(1, 4, 4, 32, 16, 1, 1, lanes=8, split=True)
    with pytest.raises(ValueError, match="blocked by channel vectors"):
        bc.binary_conv2d_func(1, 4, 4, 32, 16, 1, 1, nibbles=True)


def test_rules_decline_other_targets_and_kernels():
    conv = bc.binary_conv2d_func(1, 4, 4, 32, 16, 3, 1)
    arm = tc.make_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert x86_64.schedule(conv, arm) is None
    assert x86_64.schedule(conv, x86_64.target_for_flags({"sse4_2"}, cores=2)) is None
    target = x86_64.target_for_flags(AVX2_FLAGS, cores=2)
    assert x86_64.schedule(conv.with_attr(KERNEL_ATTR, "other"), target) is None
    assert x86_64.schedule(conv.without_attr(KERNEL_ATTR), target) is None


def poke_params(rng, cout):
    """A fused PokeConv's (6, cout) float32 parameter rows (lower._poke_conv_func): a1, b1, pos,
    neg, by, b2, with positive scales and slopes."""
    return np.stack([rng.uniform(0.5, 1.5, cout), rng.uniform(-1, 1, cout), rng.uniform(0.5, 1.5, cout),
                     rng.uniform(0, 0.5, cout), rng.uniform(-0.2, 0.2, cout), rng.uniform(-1, 1, cout)]).astype(np.float32)


@pytest.mark.parametrize("variant", CONV_VARIANTS)
@pytest.mark.parametrize("cout, w", [(64, 10), (40, 10), (37, 10), (64, 56)])
def test_poke_conv_row_sums_and_bits_of_its_own_output(variant, cout, w):
    """A fused PokeConv kernel whose output feeds a gated PokeConv also writes the output's sign
    bits and its row sums (the next SE gate's pooling): checked against numpy on the kernel's own
    output. With 32-channel tiles (AVX-512, 64 channels) every stage runs in the conv's tasks:
    the kernel is one parallel region. A prime channel count (37, as PokeBNN-1.4x's 89) makes
    one-channel tiles. 56 columns of 32-channel tiles (AVX-512) are 8 tiles whose sums would not
    fit the stack together: they are added up in groups."""
    from bnncc.targets.lower import _poke_conv_func

    rng = np.random.default_rng(cout)
    n, h, cin = 1, 6, 48
    func = _poke_conv_func((n, h, w, cin), cout, 3, 1, ((n, h, w, cin),), ("zeropad",), gated=True,
                           want_bits=True, want_rows=True, **layout(variant, cout))
    x = activations(rng, (n, h, w, cin))
    packed = bp.pack_weights(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32))
    inputs = [reference_pack(x >= 0), weights_of(variant, packed.bits), packed.border, x,
              rng.uniform(0, 1, (n, cout)).astype(np.float32), poke_params(rng, cout)]
    outputs = [np.zeros((n, h, w, cout), np.float32), np.zeros((n, h, w, bp.words(cout)), np.uint32),
               np.zeros((n, h, cout), np.float32)]
    tensors = [tc.to_tensor(a) for a in (*inputs, *outputs)]
    build(func, variant)(*tensors)
    y, bits, rows = (t.numpy() for t in tensors[len(inputs):])
    assert np.abs(y).max() > 0
    np.testing.assert_array_equal(bits, reference_pack(y >= 0))
    np.testing.assert_allclose(rows, y.sum(axis=2, dtype=np.float64), rtol=1e-5, atol=1e-5)
    if variant == "avx512" and cout == 64:
        target = x86_64.target_for_flags(AVX512_FLAGS, cores=2)
        assert x86_64.schedule(func, target).script().count("T.parallel(") == 1


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "unscheduled"])
@pytest.mark.parametrize("k", [4, 2])
def test_vector_channel_mean_sums_in_the_stage_order(variant, k):
    """The shuffle form of a channel-mean stage (cpu_schedule._vector_mean; for k = 4 two rounds of
    two-vector shuffles) gives numpy's float32 ((x0 + x1) + x2) + x3, divided by k, bit for bit."""
    from bnncc.targets import cpu_schedule
    from bnncc.targets.tvm_compat import s_tir, te

    target = target_of(variant)
    lanes = x86_64.vector_lanes(target)
    channels = 2 * lanes
    r = te.placeholder((1, 2, 7, k * channels), "float32", name="r")
    sch = s_tir.Schedule(te.create_prim_func([r, bc.channel_mean(r, channels)]))
    cpu_schedule._vector_mean(sch, sch.get_sblock(bc.CHANNEL_MEAN), lanes)
    assert "T.Shuffle" in sch.mod["main"].script()
    x = np.random.default_rng(k).standard_normal((1, 2, 7, k * channels)).astype(np.float32)
    out = tc.to_tensor(np.zeros((1, 2, 7, channels), np.float32))
    tc.compile_func(sch.mod["main"], target)(tc.to_tensor(x), out)
    terms = x.reshape(1, 2, 7, channels, k)
    expected = terms[..., 0]
    for t in range(1, k):
        expected = expected + terms[..., t]
    np.testing.assert_array_equal(out.numpy(), expected / np.float32(k))


# the builds whose 64-channel PokeConv kernels take half the dot product (a kernel counting nibbles
# sums the dot product itself and has no halved form)
HALVED_VARIANTS = [v for v in CONV_VARIANTS if not nibbles(v, 64)]


def poke_case(seed, kernel, cin, cout=64):
    """Inputs of a gated fused PokeConv kernel (zero-padded local shortcut) on a 5x9 image."""
    rng = np.random.default_rng(seed)
    x = activations(rng, (1, 5, 9, cin))
    weights = rng.standard_normal((cout, cin, kernel, kernel)).astype(np.float32)
    return {"x": x, "weights": weights, "packed": bp.pack_weights(weights), "kernel": kernel,
            "gate": rng.uniform(0, 1, (1, cout)).astype(np.float32), "params": poke_params(rng, cout)}


def poke_outputs(variant, case, weights, border, params, **form):
    """The output and bits of the fused PokeConv kernel built in ``form`` (_poke_conv_func's
    arguments) on ``case`` with these weights, border table and parameters."""
    from bnncc.targets.lower import _poke_conv_func

    x, kernel, cout = case["x"], case["kernel"], case["weights"].shape[0]
    n, h, w, cin = x.shape
    func = _poke_conv_func(x.shape, cout, kernel, 1, (x.shape,), ("zeropad",), gated=True, want_bits=True,
                           want_rows=False, **form)
    tensors = [tc.to_tensor(a) for a in (reference_pack(x >= 0), weights, border, x, case["gate"], params,
                                         np.zeros((n, h, w, cout), np.float32),
                                         np.zeros((n, h, w, bp.words(cout)), np.uint32))]
    build(func, variant)(*tensors)
    return [t.numpy() for t in tensors[-2:]]


def poke_reference(case):
    """numpy's PokeConv arithmetic (float64) on the reference conv of ``case``."""
    x = case["x"]
    a1, b1, pos, neg, by, b2 = (row.astype(np.float64) for row in case["params"])
    u = a1 * reference_conv(x, case["weights"], 1) + b1
    u[..., :x.shape[3]] += x
    g = case["gate"][:, None, None, :].astype(np.float64)
    return (np.where(u >= 0, pos * u, neg * u) - by) * g + b2


@pytest.mark.parametrize("variant", HALVED_VARIANTS)
@pytest.mark.parametrize("kernel", [3, 1])
def test_poke_conv_halved_count_gives_the_same_outputs(variant, kernel):
    """A fused PokeConv kernel fed half the dot product (binary_conv2d's ``halved``: the halved-count
    table as border, a1 doubled) writes the output and bits of the kernel fed the whole, bit for
    bit; both agree with numpy's PokeConv arithmetic on the reference conv."""
    case = poke_case(kernel, kernel, cin=48)
    packed, params = case["packed"], case["params"]
    doubled = params.copy()
    doubled[0] *= 2
    bits = weights_of(variant, packed.bits)
    whole = poke_outputs(variant, case, bits, packed.border, params, **layout(variant, 64))
    half = poke_outputs(variant, case, bits, bp.halved_counts(packed.border, 48), doubled,
                        **layout(variant, 64), halved=True)
    for a, b in zip(whole, half):
        np.testing.assert_array_equal(b, a)
    np.testing.assert_allclose(half[0], poke_reference(case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", NIBBLE_VARIANTS)
@pytest.mark.parametrize("kernel", [3, 1])
def test_poke_conv_split_weights_give_the_same_outputs(variant, kernel):
    """A fused PokeConv kernel counting nibbles with its weights split ahead (bitpack.blocked_weights,
    the AVX2 lowering's choice for the smaller weights) writes the output and bits of the kernel
    that splits them in its loop, bit for bit; both agree with numpy's PokeConv arithmetic."""
    case = poke_case(10 + kernel, kernel, cin=40)
    packed, params = case["packed"], case["params"]
    in_loop, ahead = (poke_outputs(variant, case, weights_of(variant, packed.bits, split), packed.border, params,
                                   **layout(variant, 64, split)) for split in (False, True))
    for a, b in zip(in_loop, ahead):
        np.testing.assert_array_equal(b, a)
    np.testing.assert_allclose(ahead[0], poke_reference(case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_poke_conv_in_place_equals_a_separate_output(variant):
    """A fused PokeConv kernel whose output overwrites its block residual (the lowering's in-place
    call: the same memory passed as both) writes the same output, bits and row sums, bit for bit,
    as the kernel with its own output buffer; its schedule copies the per-channel parameters per
    task (the parameters may alias there), and the copies change no value."""
    from bnncc.targets.lower import _poke_conv_func

    rng = np.random.default_rng(7)
    n, h, w, cin, cout = 1, 6, 14, 64, 128
    shapes = ((n, h, w, cin), (n, h, w, cout))
    x = activations(rng, shapes[0])
    residual = rng.standard_normal(shapes[1]).astype(np.float32)
    packed = bp.pack_weights(rng.standard_normal((cout, cin, 1, 1)).astype(np.float32))
    inputs = [reference_pack(x >= 0), weights_of(variant, packed.bits), packed.border, x, residual,
              rng.uniform(0, 1, (n, cout)).astype(np.float32), poke_params(rng, cout)]
    results = []
    for in_place in (False, True):
        func = _poke_conv_func(shapes[0], cout, 1, 1, shapes, ("zeropad", "tile"), gated=True, want_bits=True,
                               want_rows=True, in_place=in_place, **layout(variant, cout))
        tensors = [tc.to_tensor(a) for a in inputs]
        outputs = [tc.to_tensor(np.zeros(shape, dtype)) for shape, dtype in
                   (((n, h, w, bp.words(cout)), np.uint32), ((n, h, cout), np.float32))]
        y = tensors[4] if in_place else tc.to_tensor(np.zeros(shapes[1], np.float32))
        build(func, variant)(*tensors, y, *outputs)
        results.append([t.numpy() for t in (y, *outputs)])
    assert np.abs(results[0][0]).max() > 0
    for separate, shared in zip(*results):
        np.testing.assert_array_equal(shared, separate)


@pytest.mark.parametrize("variant, register", [("avx2", "ymm"), ("avx512bw", "zmm")])
def test_nibble_inner_loop_form(variant, register):
    """A binary conv counting nibbles (3x3, 256 -> 256): each column of the register tile costs two
    broadcasts of its activation nibbles, and each of its channel vectors two xors, two vpshufb and
    two adds; the weight split (a shift + 2 ands a channel vector) comes once per step for all
    columns, and the chunk's byte counts are widened by vpmaddubsw + vpmaddwd, not shifts and masks;
    in the registers of the class (ymm on AVX2, zmm on AVX-512BW). Compiled only (it runs in the
    kernel tests where the CPU has the class)."""
    import re

    import tvm

    from bnncc.targets.cpu_schedule import _register_tile

    target = x86_64.target_for_flags(FLAGS[variant], cores=2)
    lanes = x86_64.vector_lanes(target)
    width, channels = _register_tile(14, 256, x86_64.vector_unit(target))
    vectors = channels // lanes
    func = x86_64.schedule(bc.binary_conv2d_func(1, 14, 14, 256, 256, 3, 1, nibbles=True, lanes=lanes), target)
    asm = tc.compile_module(tvm.IRModule({"main": func}), target).mod.inspect_source("asm")
    # EVEX forms of the logic ops name their lane size (vpxord): the same instruction here
    asm = re.sub(r"\b(vpxor|vpand)[dq]\b", r"\1", asm)
    lines = [line.split()[0] for line in asm.splitlines() if line.startswith("\t") and not line.startswith("\t.")]
    labels = re.findall(r"^(\.LBB\d+_\d+):", asm, re.M)
    loops = [body for label in labels
             for body in [re.search(rf"^{re.escape(label)}:\n(.*?)\n\s+j\w+\s+{re.escape(label)}\n", asm, re.M | re.S)]
             if body and "vpshufb" in body.group(1) and ".LBB" not in body.group(1)]  # innermost loops
    assert loops, "no loop of vpshufb lookups"
    for body in loops:
        ops = [line.split()[0] for line in body.group(1).splitlines() if line.startswith("\t") and not line.startswith("\t.")]
        assert ops.count("vpbroadcastd") == 2 * width == 14
        assert ops.count("vpshufb") == ops.count("vpxor") == 2 * width * vectors
        assert ops.count("vpand") + ops.count("vpsrld") + ops.count("vpsrlw") == 3 * vectors  # the weight split only
        assert f"%{register}" in body.group(1)
    assert lines.count("vpmaddubsw") > 0 and lines.count("vpmaddwd") == lines.count("vpmaddubsw")


@pytest.mark.parametrize("variant", ["avx2", "avx512bw"])
def test_nibble_kernel_hot_loop_estimate(variant, tmp_path):
    """bnncc.targets.estimate finds the hot loop of a kernel counting nibbles (vpshufb lookups, half a
    register's bits each) and runs it the kernel's bits over its bits an iteration times, on an
    Intel core model (the class's CPUs) as on any other."""
    from bnncc.targets import estimate

    if not estimate.available():
        pytest.skip("needs llvm-19 (apt)")
    target = target_of(variant)  # compiled only: any host
    func = bc.binary_conv2d_func(1, 14, 14, 256, 256, 3, 1, **layout(variant, 256))
    library = tc.export_library(x86_64.schedule(func, target), target, tmp_path / "conv.so")
    bits = 14 * 14 * 256 * 9 * 8 * 32
    loop = estimate.estimate_binary(estimate.kernel_code(estimate.disassemble(library), "main"), bits, "x86_64",
                                    "skylake-avx512")
    lanes = x86_64.vector_lanes(target)
    assert loop.work_per_iteration % (lanes * 32) == 0  # whole lookups of both nibbles of a vector
    assert loop.iterations * loop.work_per_iteration == bits
    assert bits / loop.hot_cycles < 2 * lanes * 32  # below two 512-bit (or 256-bit) vectors' worth a cycle


def test_pack_int4_puts_row_c_in_nibble_c_mod_8_of_word_row_c_div_8():
    from bnncc.targets.kernels import quant

    q = np.random.default_rng(3).integers(-8, 8, size=(11, 5)).astype(np.int8)
    words = quant.pack_int4(q)
    assert words.dtype == np.int32 and words.shape == (2, 5)
    bits = words.view(np.uint32)
    for c in range(16):
        nibble = ((bits[c // 8] >> np.uint32(4 * (c % 8))) & np.uint32(15)).astype(np.int64)
        np.testing.assert_array_equal(np.where(nibble > 7, nibble - 16, nibble), q[c] if c < 11 else 0)


def _se_gate_reference(x, q1, s1, b1, scale1, q2, s2, b2, scale2, bits=4):
    """The SE gate in float64 numpy: mean, signed int-k quantizer, dense, relu, unsigned quantizer,
    dense, hard sigmoid (quant.se_gate_func); scales as quant.act_scales makes them."""
    def quantize(v, scale, signed):
        m = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        q = np.clip(np.floor(v * scale + (0.5 if signed else 0)), -m if signed else 0, m)
        return np.where(scale > 0, q / np.where(scale > 0, scale, 1), v)

    pooled = x.astype(np.float64).mean(axis=(1, 2))
    h = np.maximum(quantize(pooled, scale1, True) @ q1 / s1 + b1, 0)
    g = quantize(h, scale2, False) @ q2 / s2 + b2
    return np.clip(g + 3, 0, 6) / 6


@pytest.mark.parametrize("cin, bits", [(64, 4), (37, 4), (37, 8)])
def test_se_gate_kernel_matches_numpy(cin, bits):
    """The SE gate kernel with int4 weights eight to a word (an input count that is no multiple of
    8 leaves zero nibbles: 37, and the hidden 12), or int8 weights in column tiles, against numpy,
    in every build; on AVX-512 int4 weights become floats by a table lookup and the gate equals
    the AVX2 build's (shifts and a conversion) bit for bit."""
    from bnncc.targets.kernels import quant

    rng = np.random.default_rng(cin + bits)
    hidden, cout = 12, 48
    x = rng.standard_normal((1, 5, 5, cin)).astype(np.float32)
    q1, s1 = quant.quantize_weights(rng.standard_normal((hidden, cin)).astype(np.float32), bits)
    q2, s2 = quant.quantize_weights(rng.standard_normal((cout, hidden)).astype(np.float32), bits)
    scale1 = quant.act_scales(rng.uniform(0.1, 0.6, cin).astype(np.float32), bits, signed=True)
    scale1[0] = 0  # an uncalibrated channel passes through
    scale2 = quant.act_scales(np.full(hidden, 4.0, np.float32), bits, signed=False)
    b1, b2 = rng.standard_normal(hidden).astype(np.float32), rng.standard_normal(cout).astype(np.float32)
    args = [x, scale1, quant.pack_dense(q1, bits), s1, b1, scale2, quant.pack_dense(q2, bits), s2, b2]
    expected = _se_gate_reference(x, q1.T.astype(np.float64), s1, b1, scale1, q2.T.astype(np.float64), s2, b2, scale2,
                                  bits)
    func = quant.se_gate_func(x.shape, hidden, cout, bits, bits)
    gates = {}
    for variant in VARIANTS:
        gates[variant] = run(build(func, variant), *args, out_shape=(1, cout), out_dtype=np.float32)
        np.testing.assert_allclose(gates[variant], expected, rtol=1e-5, atol=1e-5)
    assert ((gates["avx2"] > 0) & (gates["avx2"] < 1)).sum() > cout // 4  # not all saturated
    for variant in VARIANTS[1:]:  # the scheduled builds
        np.testing.assert_array_equal(gates[variant], gates["avx2"])


def test_tile_columns_puts_column_t_width_plus_k_at_tile_t_column_k():
    from bnncc.targets.kernels import quant

    q = np.arange(3 * 70).reshape(3, 70).astype(np.int8)
    tiles = quant.tile_columns(q)
    assert tiles.shape == (2, 3, 64) and quant.tile_width(70) == 64 and quant.tile_width(10) == 16
    np.testing.assert_array_equal(tiles[0], q[:, :64])
    np.testing.assert_array_equal(tiles[1, :, :6], q[:, 64:])
    assert not tiles[1, :, 6:].any()  # columns past O are zero weights


@pytest.mark.parametrize("classes", [1000, 10])
def test_head_kernel_matches_numpy(classes):
    """The head (global mean, signed int-8 quantizer, int8 dense in column tiles, scale, bias)
    against numpy in every build: 1000 classes make 16 tiles of 64, the last 40 wide (the large
    layer's tiles shared out between threads); 10 classes one tile of 16."""
    from bnncc.targets.kernels import quant

    rng = np.random.default_rng(classes)
    cin = 256
    x = rng.standard_normal((1, 7, 7, cin)).astype(np.float32)
    q, s = quant.quantize_weights(rng.standard_normal((classes, cin)).astype(np.float32), 8)
    scale = quant.act_scales(rng.uniform(0.1, 0.6, cin).astype(np.float32), 8, signed=True)
    bias = rng.standard_normal(classes).astype(np.float32)
    pooled = x.astype(np.float64).mean(axis=(1, 2))
    xq = np.clip(np.floor(pooled * scale + 0.5), -127, 127) / scale
    expected = xq @ q.T.astype(np.float64) / s + bias
    func = quant.head_func(x.shape, classes, 8)
    for variant in VARIANTS:
        logits = run(build(func, variant), x, scale, quant.tile_columns(np.ascontiguousarray(q.T)), s, bias,
                     out_shape=(1, classes), out_dtype=np.float32)
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_act_scales_are_the_specs_levels_over_the_bound():
    """spec.md: signed s = (2^(a-1) - 1) / B, unsigned s = 2^a / B (not 2^a - 1), 0 where B <= 0; by hand."""
    from bnncc.targets.kernels import quant

    bounds = np.array([4.0, 0.5, 0.0, -1.0], np.float32)
    np.testing.assert_array_equal(quant.act_scales(bounds, 4, signed=False), [4.0, 32.0, 0.0, 0.0])
    np.testing.assert_array_equal(quant.act_scales(bounds, 4, signed=True), [1.75, 14.0, 0.0, 0.0])
    np.testing.assert_array_equal(quant.act_scales(bounds, 8, signed=True), [31.75, 254.0, 0.0, 0.0])


def _head_logits(x, scale, variant):
    """The head kernel on NHWC ``x`` with identity int8 weights (w_scale 1, bias 0): its quantized mean."""
    from bnncc.targets.kernels import quant

    c = x.shape[3]
    q = np.eye(c, dtype=np.int8)
    return run(build(quant.head_func(x.shape, c, 8), variant), x, scale, quant.tile_columns(q), np.ones(c, np.float32),
               np.zeros(c, np.float32), out_shape=(1, c), out_dtype=np.float32)


def test_head_kernel_rounds_a_level_half_up_as_floor_of_x_s_plus_half():
    """At x * s = k + 1/2 exactly the spec's floor(x s + 0.5) goes up (-0.5 -> 0, 0.5 -> 1, 2.5 -> 3),
    where round-half-even (or half away from zero) goes elsewhere; values set by hand."""
    ties = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 126.5, -126.5], np.float32)
    x = np.broadcast_to(ties, (1, 3, 3, ties.size)).copy()  # the mean of equal halves is exact
    scale = np.ones(ties.size, np.float32)  # s = 1: the levels are the values
    for variant in VARIANTS:
        np.testing.assert_array_equal(_head_logits(x, scale, variant), [[-2, -1, 0, 1, 2, 3, 127, -126]])


def test_head_kernel_means_a_non_square_input_over_its_height_times_width():
    """A 2x6 input: the mean divides by 12 (not 4 nor 36); values chosen so that each channel's mean
    is an integer level, computed by hand."""
    x = np.zeros((1, 2, 6, 16), np.float32)
    x[0, 0, 0, :] = np.arange(16) * 12  # one cell of 12 holds the sum: mean = arange(16)
    x[0, 1, 5, :] = -6.0  # the opposite corner: mean - 0.5, rounded back up
    for variant in VARIANTS:
        np.testing.assert_array_equal(_head_logits(x, np.ones(16, np.float32), variant), [np.arange(16)])


@pytest.mark.parametrize("kernel, stride, pad", [(4, 4, 0), (3, 1, 1), (3, 2, 1)])
def test_nchw_stem_conv_kernel_matches_numpy(kernel, stride, pad):
    """The int-8 stem conv kernel reading one image of the network's NCHW input batch in place,
    against numpy in every build: windows that share no input row (4x4/4, the PokeInit stem: each
    row task quantizes its own input rows) and windows that do (3x3/1, 3x3/2: the input quantized
    first, on its own)."""
    from bnncc.targets.kernels import quant

    rng = np.random.default_rng(kernel * 10 + stride)
    n, cin, h, w, cout = 1, 3, 12, 16, 32
    batch = rng.standard_normal((3, cin, h, w)).astype(np.float32)
    x = batch[2:3]
    weights = (rng.standard_normal((kernel, kernel, cin, cout)) / 4).astype(np.float32)
    scale = quant.act_scales(rng.uniform(1, 3, cin).astype(np.float32), 8, signed=True)
    s = scale[None, :, None, None]
    xq = np.pad(np.clip(np.floor(x.astype(np.float64) * s + 0.5), -127, 127) / s,
                ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
    expected = np.zeros((n, ho, wo, cout))
    for i in range(kernel):
        for j in range(kernel):
            window = xq[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
            expected += np.einsum("nchw,co->nhwo", window, weights[i, j])
    func = quant.quant_conv2d_func(x.shape, weights.shape, stride=stride, pads=(pad,) * 4, group=1, a_bits=8,
                                   input_layout="NCHW")
    for variant in VARIANTS:
        out = tc.to_tensor(np.zeros(expected.shape, np.float32))
        build(func, variant)(tc.to_tensor(batch), 2, tc.to_tensor(weights), tc.to_tensor(scale), out)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group", [1, 16])
def test_stem_conv_kernel_matches_numpy(group):
    """The int-8 stem conv kernel (NHWC, 3x3, SAME zeros) against numpy, in every build: plain, and
    with one input channel per group and two output channels each, where each input channel is
    quantized once and repeated for its group's outputs (quant.SPREAD; a shuffle on AVX2 and
    AVX-512). An uncalibrated channel (scale 0) passes through unquantized."""
    from bnncc.targets.kernels import quant

    rng = np.random.default_rng(group)
    n, h, w, cin, cout = 1, 6, 7, 16, 32
    x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
    weights = (rng.standard_normal((3, 3, cin // group, cout)) / 4).astype(np.float32)
    scale = quant.act_scales(rng.uniform(1, 3, cin).astype(np.float32), 8, signed=True)
    scale[3] = 0
    q = np.clip(np.floor(x.astype(np.float64) * scale + 0.5), -127, 127) / np.where(scale > 0, scale, 1)
    xq = np.pad(np.where(scale > 0, q, x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros((n, h, w, cout))
    for o in range(cout):
        inputs = range(cin) if group == 1 else [o // (cout // group)]
        for i in range(3):
            for j in range(3):
                for k, c in enumerate(inputs):
                    expected[..., o] += xq[:, i:i + h, j:j + w, c] * weights[i, j, k, o]
    func = quant.quant_conv2d_func(x.shape, weights.shape, stride=1, pads=(1, 1, 1, 1), group=group, a_bits=8)
    assert (quant.SPREAD in func.script()) == (group > 1)
    for variant in VARIANTS:
        got = run(build(func, variant), x, weights, scale, out_shape=expected.shape, out_dtype=np.float32)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
