"""x86-64 schedules for the bitserial kernels (s_tir), and the host target.

Each rule takes (PrimFunc, Target) and returns the scheduled PrimFunc, or None when the
function is not its kernel or the target is not an x86-64 CPU with AVX2. Vector width follows
the target: 16 uint32 lanes (zmm, one VPOPCNTD per 16 words) when it has AVX-512 VPOPCNTDQ,
else 8 lanes (ymm; LLVM then lowers popcount with a nibble table lookup).
"""

from __future__ import annotations

import logging

from bnncc.targets.kernels import KERNEL_ATTR
from bnncc.targets.kernels import binary_conv, bitpack
from bnncc.targets.tvm_compat import (
    NUM_THREADS, Target, first_rule, has_cpu_features, make_target, mark_scheduled, s_tir, tirx,
)
from tvm.script import tirx as T  # noqa: E402  (TVMScript for the tensor intrinsics)

__all__ = ["cpu_flags", "host_target", "schedule", "schedule_binary_conv2d", "schedule_sign_bitpack", "target_for_flags",
           "parallel_bitpack", "schedule_bitpack_block", "tile_binary_conv2d", "vector_lanes"]

logger = logging.getLogger(__name__)

# Register tile of the conv: at most this many accumulator vectors (x86-64 has 32 zmm / 16 ymm;
# the rest hold weights and the broadcast activation word).
_ACCUMULATORS = {16: 16, 8: 8}
_MAX_TILE_WIDTH = 8
# TVM puts a buffer on the stack, where LLVM keeps it in registers, only when it is smaller than
# 1024 bytes (runtime::kMaxStackAlloca); a larger one becomes a heap workspace allocated, zeroed
# and freed once per tile (tile_binary_conv2d).
_MAX_TILE_BYTES = 1023

_AVX512 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
_AVX2 = {"avx2", "bmi2", "fma", "movbe"}


def target_for_flags(flags: set[str], cores: int) -> Target:
    """The LLVM target for a CPU with these /proc/cpuinfo flags: x86-64-v4 with AVX-512, else v3 (AVX2) or v2,
    plus VPOPCNTDQ when present (it is outside every x86-64-vN level)."""
    if _AVX512 <= flags:
        mcpu = "x86-64-v4"
    elif _AVX2 <= flags:
        mcpu = "x86-64-v3"
    else:
        mcpu = "x86-64-v2"
    spec = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": cores}
    if mcpu == "x86-64-v4" and "avx512_vpopcntdq" in flags:
        spec["mattr"] = ["+avx512vpopcntdq"]
    return make_target(spec)


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags, as /proc/cpuinfo spells them (``avx512_vpopcntdq``)."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        line = next(line for line in f if line.startswith("flags"))
    return set(line.split(":", 1)[1].split())


def host_target() -> Target:
    """The target of this machine; num-cores = the threads TVM will use."""
    return target_for_flags(cpu_flags(), NUM_THREADS)


def vector_lanes(target: Target) -> int | None:
    """uint32 lanes per popcount vector on ``target``; None if it is not an x86-64 AVX2 CPU."""
    if target.kind.name != "llvm" or not str(target.attrs.get("mtriple", "x86_64")).startswith("x86_64"):
        return None
    if has_cpu_features(target, ["avx512f", "avx512vpopcntdq"]):
        return 16
    if has_cpu_features(target, ["avx2"]):
        return 8
    return None


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _register_tile(wout: int, cout: int, lanes: int, accumulators: int) -> tuple[int, int]:
    """(output columns, output channels) of the register tile: the most outputs that fit the
    accumulator budget and stay on the stack (_MAX_TILE_BYTES), with both sizes dividing the
    output so no tile is partial."""
    options = []
    for channels in (d for d in range(1, 2 * lanes + 1) if cout % d == 0):
        vectors = -(-channels // lanes)
        limit = min(_MAX_TILE_WIDTH, accumulators // vectors, _MAX_TILE_BYTES // (4 * channels))
        width = _largest_divisor(wout, limit)
        options.append((width * channels, channels, width))
    _, channels, width = max(options)
    return width, channels


def schedule_binary_conv2d(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """The binary conv on an x86-64 AVX2/AVX-512 target (``tile_binary_conv2d``)."""
    lanes = vector_lanes(target)
    if func.attrs.get(KERNEL_ATTR) != binary_conv.KERNEL_NAME or lanes is None:
        return None
    return tile_binary_conv2d(func, lanes, _ACCUMULATORS[lanes])


def tile_binary_conv2d(func: tirx.PrimFunc, lanes: int, accumulators: int) -> tirx.PrimFunc:
    """Register-tiled, vectorized, multithreaded binary conv, for any CPU with ``lanes`` uint32
    lanes per vector and room for ``accumulators`` accumulator vectors (also used by arm64).

    Tile: ``width`` output columns x ``channels`` output channels held in width*channels/lanes
    accumulator vectors while the reduction (kh, kw, word) runs; each step broadcasts one
    activation word against ``channels`` weight words (Cout is the innermost weight axis).
    Threads share the fused (n, ho, wo tile, co tile) loop. Pixels are outermost, so the epilogue
    reads its residuals and writes its output once through memory, each pixel's channels
    together; with channel tiles outermost it swept the whole float tensors once per tile,
    touching 128 of every 1024 bytes (56x56x256), and the network ran 5% slower. Each tile then
    reads all of the layer's weights, which stay in L2 (at most 295 KB: 3x3, 512 -> 512).
    """
    sch = s_tir.Schedule(func)
    pop = sch.get_sblock("popcount")
    out = sch.get_sblock("binary_conv2d")
    n, ho, wo, co = sch.get_loops(out)
    wout, cout = int(sch.get(wo).extent), int(sch.get(co).extent)

    width, channels = _register_tile(wout, cout, lanes, accumulators)
    vec = min(lanes, channels)
    for pool in _stages(sch, out, binary_conv.AVERAGE_POOL):
        _vector_pool(sch, pool, lanes)
    means = _stages(sch, out, binary_conv.CHANNEL_MEAN)
    # a tile of partial vectors, or of one channel (odd widths: PokeBNN-1.4x has 179 channels), has no
    # vector to shuffle: no _vector_mean; the mean becomes part of the epilogue
    if channels % vec or vec == 1:
        for block in means:
            sch.compute_inline(block)
        means = []

    # The epilogue's loops are the tiles; the popcount sums (and a fused PokeConv's channel means of
    # a residual, _vector_mean) are computed per tile under them. (Moving the epilogue under the
    # popcount's loops instead would need every producer of the epilogue there first.)
    wo_o, wo_i = sch.split(wo, [None, width])
    co_o, co_i = sch.split(co, [None, channels])
    sch.reorder(n, ho, wo_o, co_o, wo_i, co_i)
    tile = sch.fuse(n, ho, wo_o, co_o)
    # The popcount buffer shrinks to one tile: a stack array that LLVM keeps in registers. It stays
    # in the default "global" scope: TVM's CPU lowering puts only "global" buffers under 1024 bytes
    # on the stack and makes a "local" one a heap workspace, allocated, zeroed and freed per tile
    # (_MAX_TILE_BYTES).
    reductions = [int(v.dom.extent) for v in sch.get(pop).iter_vars[4:]]  # kh, kw, word
    sch.compute_at(pop, tile)
    for block in means:
        sch.compute_at(block, tile)
    # compute_at leaves out loops of extent 1: under the tile come columns, channels, kh, kw, word,
    # those longer than 1, in that order
    names = [name for name, extent in zip(("wo", "co", "kh", "kw", "j"), (width, channels, *reductions))
             if extent > 1]
    loops = dict(zip(names, sch.get_loops(pop)[1:]))
    inner = []
    if "wo" in loops:
        sch.unroll(loops["wo"])
        inner.append(loops["wo"])
    if "co" in loops:
        vectors, lanes_loop = sch.split(loops["co"], [None, vec])
        sch.unroll(vectors)
        sch.vectorize(lanes_loop)
        inner += [vectors, lanes_loop]
    outer = [loops[name] for name in ("kh", "kw", "j") if name in loops]
    sch.reorder(*outer, *inner)
    sch.parallel(tile)
    sch.vectorize(sch.split(co_i, [None, vec])[1])
    # Vectorize/parallel must come before decompose_reduction (shared/reference/tvm.md §6).
    sch.decompose_reduction(pop, (outer + inner)[0])
    for block in means:
        _vector_mean(sch, block, vec)
    _schedule_pad(sch)
    return mark_scheduled(sch.mod["main"])


def _stages(sch: s_tir.Schedule, block, name: str) -> list:
    """The producers of ``block`` that are stages called ``name`` (TE numbers repeated names)."""
    return [b for b in sch.get_producers(block) if sch.get(b).name_hint.startswith(name)]


def _vector_pool(sch: s_tir.Schedule, pool, lanes: int) -> None:
    """An average-pool stage of a fused PokeConv (binary_conv.average_pool), before the conv: rows
    in parallel, channels vectorized; a channel mean it pools is computed inline, tap by tap."""
    for block in _stages(sch, pool, binary_conv.CHANNEL_MEAN):
        sch.compute_inline(block)
    n, y, _, c = sch.get_loops(pool)
    sch.parallel(sch.fuse(n, y))
    if int(sch.get(c).extent) % lanes == 0:
        sch.vectorize(sch.split(c, [None, lanes])[1])


def _vector_mean(sch: s_tir.Schedule, block, lanes: int) -> None:
    """A channel-mean stage (binary_conv.channel_mean), ``lanes`` outputs per step: k contiguous
    vector loads, k shuffles that pick every k-th lane, the sum in the stage's order. Vectorized
    as it is, each k-strided read became one scalar load per lane (the 56x56 256->64 PokeConv
    took 0.28 ms on one thread, against 0.13-0.17 in this form)."""
    channels = sch.get_loops(block)[-1]
    k = int(sch.get(block).reads[0].source.shape[-1]) // int(sch.get(block).writes[0].source.shape[-1])
    _, inner = sch.split(channels, [None, lanes])
    sch.tensorize(inner, _mean_intrin(k, lanes))


def _schedule_pad(sch: s_tir.Schedule) -> None:
    """The zero-padding copy (absent when the conv has no padding): parallel over rows."""
    try:
        pad = sch.get_sblock("pad")
    except s_tir.ScheduleError:
        return
    n, y, _, _ = sch.get_loops(pad)
    sch.parallel(sch.fuse(n, y))


def schedule_sign_bitpack(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """Sign-and-bitpack on an x86-64 AVX2/AVX-512 target (``parallel_bitpack``)."""
    if func.attrs.get(KERNEL_ATTR) != bitpack.KERNEL_NAME or vector_lanes(target) is None:
        return None
    return parallel_bitpack(func)


def parallel_bitpack(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Sign-and-bitpack on any CPU (``schedule_bitpack_block``)."""
    sch = s_tir.Schedule(func)
    schedule_bitpack_block(sch)
    return mark_scheduled(sch.mod["main"])


@T.prim_func(s_tir=True)
def _pack32_desc(x: T.Buffer((32,), "float32", offset_factor=1), out: T.Buffer((1,), "uint32", offset_factor=1)):
    # the update of bitpack.sign_bitpack for one word whose 32 channels all exist
    with T.sblock("root"):
        T.reads(out[0], x[0:32])
        T.writes(out[0])
        for b in range(32):
            with T.sblock("update"):
                vb = T.axis.reduce(32, b)
                out[0] = out[0] + (T.Cast("uint32", T.float32(0) <= x[vb]) << T.Cast("uint32", vb))


@T.prim_func(s_tir=True)
def _pack32_impl(x: T.Buffer((32,), "float32", offset_factor=1), out: T.Buffer((1,), "uint32", offset_factor=1)):
    # one 32-lane compare, bit b of lane b, OR-reduced: plain LLVM IR, so any CPU target takes it
    # (AVX-512: two vcmpps into k-masks and a masked OR tree)
    with T.sblock("root"):
        T.reads(out[0], x[0:32])
        T.writes(out[0])
        out[0] = out[0] | T.call_llvm_pure_intrin(
            "uint32", "llvm.vector.reduce.or",
            T.Select(x[T.Ramp(0, 1, 32)] >= T.Broadcast(T.float32(0), 32),
                     T.Broadcast(T.uint32(1), 32) << T.Ramp(T.uint32(0), T.uint32(1), 32),
                     T.Broadcast(T.uint32(0), 32)))


_PACK32 = "bnncc_sign_pack32"
s_tir.TensorIntrin.register(_PACK32, _pack32_desc, _pack32_impl, override=True)


def schedule_bitpack_block(sch: s_tir.Schedule, name: str = "bitpack") -> None:
    """A sign_bitpack stage on any CPU: pixels in parallel; each word one vector compare when
    the channel count is a multiple of 32 (6x faster than the scalar form, 4 instructions a bit,
    on 56x56x256), else the 32 bits of a word unrolled (the last word masks channels past C)."""
    block = sch.get_sblock(name)
    n, h, w, _, b = sch.get_loops(block)
    sch.parallel(sch.fuse(n, h, w))
    channels = next(int(r.source.shape[-1]) for r in sch.get(block).reads if str(r.source.dtype) == "float32")
    if channels % bitpack.WORD_BITS:
        sch.unroll(b)
        sch.decompose_reduction(block, b)
        return
    sch.decompose_reduction(block, b)
    sch.tensorize(sch.get_loops(sch.get_sblock(f"{name}_update"))[-1], _PACK32)


def _mean_intrin(k: int, lanes: int) -> str:
    """The tensor intrinsic of ``lanes`` channel means of k channels each (``_vector_mean``),
    registered on first use; its description is binary_conv.mean_value, so it matches the stage."""
    name = f"bnncc_channel_mean_{k}x{lanes}"
    if s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name

    @T.prim_func(s_tir=True)
    def desc(x: T.Buffer((lanes * k,), "float32", offset_factor=1),
             out: T.Buffer((lanes,), "float32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(x[0:lanes * k])
            T.writes(out[0:lanes])
            for c in range(lanes):
                with T.sblock("mean"):
                    vc = T.axis.spatial(lanes, c)
                    out[vc] = binary_conv.mean_value(lambda t: x[vc * k + t], k)

    @T.prim_func(s_tir=True)
    def impl(x: T.Buffer((lanes * k,), "float32", offset_factor=1),
             out: T.Buffer((lanes,), "float32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(x[0:lanes * k])
            T.writes(out[0:lanes])
            out[T.Ramp(0, 1, lanes)] = binary_conv.mean_value(
                lambda t: T.Shuffle([x[T.Ramp(i * lanes, 1, lanes)] for i in range(k)],
                                    [c * k + t for c in range(lanes)]), k)

    s_tir.TensorIntrin.register(name, desc, impl)
    return name


RULES = (schedule_binary_conv2d, schedule_sign_bitpack)


def schedule(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """The first rule that applies to ``func`` on ``target``, or None."""
    scheduled = first_rule(RULES, func, target)
    if scheduled is not None:
        logger.debug("scheduled %s", func.attrs.get(KERNEL_ATTR))
    return scheduled
