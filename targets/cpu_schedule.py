"""Schedules of the bitserial kernels on a CPU with fixed-width vector registers (s_tir).

A CPU target (``x86_64``, ``arm64``) supplies only its ``VectorUnit``: how many 32-bit lanes a
vector holds (uint32 words for the popcounts, float32 values for the rest alike), how many
accumulator vectors the binary conv's register tile may keep, and whether it counts in byte
lanes. ``schedule`` then picks the rule of the function's kernel (``KERNEL_ATTR``):

- ``binary_conv2d`` (plain or a fused PokeConv): register tiles of output columns x channels,
  vectorized over channels; a parallel task is one output row of one channel tile
  (``_tile_binary_conv2d``); popcounts in 32-bit lanes, or in byte lanes widened once per chunk
  of steps where the unit says so (``_byte_counts``: AVX2, AVX-512BW, NEON; on the x86 units with a
  nibble lookup a kernel built with ``nibbles`` splits its input once, rows in parallel, before its
  tasks). A fused PokeConv's
  output tile goes through a stack array kept in registers, from which the tile's sign bits and
  row sums are taken (``_tile_output``; the row sums added up per group of tiles where a task's
  tile sums would not fit the stack, and per task, ``_row_sum_stages``; the
  bits in a pass of their own when a tile is not whole words), and the zero padding of the input
  is done on the calling thread: one parallel region per kernel (plus the nibble split with
  ``nibbles``, and the sign bits' pass where tiles are not whole words), where each costs a
  fork-join of the thread pool;
- ``sign_bitpack``: pixels in parallel, one vector compare per word where it can;
- ``quant_conv2d`` (the stem): output rows in parallel, register tiles of output columns x
  channels as in the binary conv, the reduction outside the tile;
- ``se_gate`` and ``quant_head``: the spatial mean with the channel vector innermost; the dense
  layers input by input, each adding its weight row times the input to the output vectors: int4
  weights (the SE gates) a whole row at a time (a large layer's output vectors split between the
  threads; on AVX-512 they become floats by a table lookup, ``_int4_dot_intrin``), int8 weights
  (the head) a column tile at a time, its outputs in registers, the tiles shared out between the
  threads (``_column_tile_dot``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

from bnncc.targets.kernels import KERNEL_ATTR, binary_conv, bitpack, quant
from bnncc.targets.tvm_compat import NUM_THREADS, Target, has_block, mark_scheduled, s_tir, tirx
from tvm.script import tirx as T  # noqa: E402  (TVMScript for the tensor intrinsics)

__all__ = ["VectorUnit", "counts_nibbles", "schedule", "split_convs"]

logger = logging.getLogger(__name__)

_MAX_TILE_WIDTH = 8
# TVM puts a buffer on the stack, where LLVM keeps it in registers, only when it is smaller than
# 1024 bytes (runtime::kMaxStackAlloca); a larger one becomes a heap workspace allocated, zeroed
# and freed once per tile (_tile_binary_conv2d).
_MAX_TILE_BYTES = 1023
# the loops above a binary conv's register tile: the parallel task (a row of a channel tile) and
# the tile's columns (_tile_binary_conv2d)
_TILE_DEPTH = 2


@dataclass(frozen=True)
class VectorUnit:
    """What the schedules need to know of a CPU's vectors."""

    lanes: int  # 32-bit lanes per vector register
    accumulators: int  # vector registers the binary conv's register tile may hold its sums in
    # most vectors of output channels in the register tile: each step broadcasts one activation
    # word per column and xors it with every channel vector, so more channels spread the broadcast
    # over more counts (on NEON the broadcast, ld1r, takes a vector pipe slot like an eor)
    channel_vectors: int = 2
    # count mismatches in byte lanes, widened once per chunk of steps (_byte_counts): for CPUs
    # without a 32-bit vector popcount, where LLVM widens the bytes to words after every step
    byte_counts: bool = False
    # a byte-count chunk's kernel columns and words as one loop of steps: LLVM unrolls a loop of 2
    # or 4 words whole, and where the tile's accumulators and one step's weight vectors take all the
    # registers (NEON: 16 + 16) the unrolled steps spilled in the hot loop; one loop stays rolled,
    # a word a pass (bench/RESULTS.md, ARM64 estimates)
    one_step_loop: bool = False
    # the LLVM intrinsic of the CPU's widening pairwise add (NEON "llvm.aarch64.neon.uaddlp"):
    # a chunk's byte counts become words in two of them (_byte_sum_intrin); None: shifts and masks
    pairwise_add: str | None = None
    # the LLVM intrinsic of the CPU's 16-entry byte table lookup (x86 "llvm.x86.avx2.pshuf.b", 256-bit):
    # binary convs with whole vectors of output channels then take their activations as nibbles
    # (binary_conv2d's ``nibbles``, decided by ``counts_nibbles``) and count a step in two lookups
    # that need no masks of their own (_nibble_popcount_intrin)
    nibble_lookup: str | None = None
    # the LLVM intrinsics of x86's multiply-adds of adjacent pairs, unsigned bytes x signed bytes ->
    # int16 and int16 x int16 -> int32 ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"), for
    # vectors of ``lanes``: times ones, they make a chunk's byte counts words in two instructions
    # (_byte_sum_intrin); None: shifts and masks
    pair_multiply_adds: tuple[str, str] | None = None
    # the LLVM intrinsic of a lookup in a vector of ``lanes`` floats by the low bits of each 32-bit
    # lane (x86 "llvm.x86.avx512.permvar.sf.512", 16 lanes): int4 dense weights then become floats
    # in one lookup each (_int4_dot_intrin); None: shifts and an integer conversion
    float_lookup: str | None = None


def counts_nibbles(unit: VectorUnit | None, out_channels: int) -> bool:
    """Whether a binary conv of ``out_channels`` outputs is built with ``nibbles`` for ``unit``: it
    has a table lookup of whole vectors, and every register tile holds whole vectors of channels
    (_register_tile picks whole vectors of channels when Cout is a multiple of the unit's lanes)."""
    return unit is not None and unit.nibble_lookup is not None and out_channels % unit.lanes == 0


# Weights split into nibbles ahead take twice their packed bytes: the split copies of a network's
# convs may add at most this fraction of all its convs' packed weights. PokeBNN-1x: 0.17 of its 2.46
# MiB; PokeBNN-0.5x, whose kernel code weighs most against its weights, stays under the bound
# of 1.2x all its packed weights (bench/RESULTS.md, AVX2 weights blocked and split ahead).
_SPLIT_BUDGET = 0.10


def split_convs(unit: VectorUnit | None, convs: dict) -> set:
    """Of a network's binary convs ``{key: (in_channels, out_channels, kernel)}``, the keys of those
    whose kernels count nibbles (``counts_nibbles``) with their weights split ahead (binary_conv's
    split ``weight_shape``): no step then splits its weight vectors (3 instructions each), 7-15%
    faster on Zen 4. The convs of one shape (one kernel) all or none, smallest weights first (in a
    ResNet the convs with the most output positions per weight byte), while the copies stay within
    ``_SPLIT_BUDGET``."""
    def size(shape):
        cin, cout, kernel = shape
        return kernel * kernel * bitpack.words(cin) * cout * 4

    budget = _SPLIT_BUDGET * sum(size(shape) for shape in convs.values())
    groups: dict[tuple, list] = {}
    for key, shape in convs.items():
        if counts_nibbles(unit, shape[1]):
            groups.setdefault(shape, []).append(key)
    chosen = set()
    for shape in sorted(groups, key=lambda shape: (size(shape), shape)):
        total = size(shape) * len(groups[shape])
        if total > budget:
            break
        budget -= total
        chosen.update(groups[shape])
    return chosen


def schedule(func: tirx.PrimFunc, target: Target, unit: VectorUnit | None) -> tirx.PrimFunc | None:
    """``func`` scheduled for ``unit`` (the vectors of ``target``), or None when ``unit`` is None
    (``target`` is not the caller's CPU) or ``func`` is no kernel of ours."""
    kernel = func.attrs.get(KERNEL_ATTR)
    rule = _RULES.get(kernel)
    if unit is None or rule is None:
        return None
    logger.debug("scheduled %s", kernel)
    return rule(func, unit, int(target.attrs.get("num-cores", NUM_THREADS)))


# -- binary conv ------------------------------------------------------------------------------------
def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _register_tile(wout: int, cout: int, unit: VectorUnit) -> tuple[int, int]:
    """(output columns, output channels) of the register tile: the most outputs that fit the
    accumulator budget and stay on the stack (_MAX_TILE_BYTES), with both sizes dividing the
    output so no tile is partial; of those, the most channels (fewest broadcasts per count).

    The channels are whole vectors, fewer than one, or all of them: a tile of 24 channels in 16
    lanes took two vectors, whose second half its copy to y (``_tile_output``) wrote too, from
    stack memory the tile never set, over the next task's channels (PokeBNN-0.75x's 48 channels on
    AVX-512: wrong logits, different from call to call). A tile of all channels has no neighbour."""
    lanes, accumulators = unit.lanes, unit.accumulators
    options = []
    for channels in (d for d in range(1, unit.channel_vectors * lanes + 1)
                     if cout % d == 0 and (d <= lanes or d % lanes == 0 or d == cout)):
        vectors = -(-channels // lanes)
        limit = min(_MAX_TILE_WIDTH, accumulators // vectors, _MAX_TILE_BYTES // (4 * channels))
        width = _largest_divisor(wout, limit)
        options.append((width * channels, channels, width))
    _, channels, width = max(options)
    return width, channels


def _binary_conv2d(func: tirx.PrimFunc, unit: VectorUnit, threads: int) -> tirx.PrimFunc:
    """The binary conv (``_tile_binary_conv2d``), then a fused PokeConv's gated parameters, row sums
    and trailing bitpack, if any."""
    sch = s_tir.Schedule(func)
    task, tile, channels = _tile_binary_conv2d(sch, unit)
    if has_block(sch, binary_conv.GATED_PARAMS):
        # in each task, for its channels: computed once per call on the calling thread, the fold
        # was a serial section the other threads waited through, and each of them then read all
        # of it from the caller's cache (512 -> 2048 at 7x7 alone: 1.30x faster on 2 threads than
        # on one, 1.67-1.9x in the task; bench/RESULTS.md); on the stack, where no output can alias it
        params = sch.get_sblock(binary_conv.GATED_PARAMS)
        sch.compute_at(params, task)
        sch.vectorize(_vector_split(sch, sch.get_loops(params)[-1], unit.lanes)[1])
    if not func.attrs.get("tirx.noalias", True):
        _task_param_copies(sch, task, unit.lanes)
    # y's row sums and sign bits, each register tile's where they can be: from its outputs
    # still in registers (_tile_output), where reading them back from y waited on their stores
    tile_readers, depth = [], _TILE_DEPTH
    rows = _row_sum_stages(sch, tile, channels) if has_block(sch, binary_conv.ROW_SUM) else None
    if rows is not None:
        tile_readers.append(rows.tiles)
        if rows.groups is not None:
            group, tile = sch.split(tile, [rows.parts, None])
            depth += 1
    # the sign bits of the tile's whole words of channels; else a pass over the output after the
    # conv, a parallel region of its own
    tile_bits = has_block(sch, bitpack.BITPACK_STAGE) and channels % bitpack.WORD_BITS == 0
    if tile_bits:
        tile_readers.append(sch.get_sblock(bitpack.BITPACK_STAGE))
    if tile_readers:
        _tile_output(sch, tile, tile_readers, channels, unit.lanes, depth)
    if rows is not None:
        if rows.groups is not None:
            _group_sums(sch, rows.groups, group, int(sch.get(tile).extent), channels, unit.lanes)
        _row_sum_block(sch, task, rows.parts, channels, unit.lanes)
    if has_block(sch, bitpack.BITPACK_STAGE) and not tile_bits:
        _bitpack_block(sch)
    return mark_scheduled(sch.mod["main"])


def _tile_output(sch: s_tir.Schedule, tile, readers: list, channels: int, lanes: int, depth: int) -> None:
    """The register tile's outputs written to a tile-sized stack array, which LLVM keeps in
    registers, and copied from there to y; ``readers`` (row sums, sign bits) read the array under
    the tile loop. Reading y back instead waited on the tile's 64-byte stores: Zen 4 forwards no
    512-bit store to a load, and a third of the 256 -> 1024 PokeConv kernel at 14x14 went to the
    loads of its row sums and sign bits (perf, bench/RESULTS.md). ``depth``: the loops above the
    tile's blocks (the task's, the tile loop's, and a group loop where its tiles are grouped)."""
    out = sch.get_sblock(binary_conv.KERNEL_NAME)
    copy = sch.cache_write(out, 0, "global", consumer_blocks=readers)
    sch.reverse_compute_at(copy, tile)
    if channels > 1:  # (a tile of one channel, PokeBNN-1.4x's 179 at 1x1: TVM refuses a vector of one)
        sch.vectorize(_vector_split(sch, sch.get_loops(copy)[-1], lanes)[1])
    # every access to the array at a constant offset, which is what lets LLVM keep it in registers
    _unroll_under(sch, out, tile)
    _unroll_under(sch, copy, tile)
    for block in readers:
        sch.reverse_compute_at(block, tile)
        if sch.get(block).name_hint == bitpack.BITPACK_STAGE:
            _unroll_under(sch, block, tile, but_last=True)  # the word's bits: the intrinsic's loop
            sch.decompose_reduction(block, sch.get_loops(block)[-1])
            sch.tensorize(sch.get_loops(sch.get_sblock(f"{bitpack.BITPACK_STAGE}_update"))[-1], _PACK32)
        else:
            # a tile's row sums: its columns, one after another, each a vector of channels
            width = int(sch.get(block).iter_vars[-1].dom.extent)
            loops = _loops_under(sch, block, depth, ("c", "z"), (channels, width))
            if len(loops) == 2:
                sch.reorder(loops["z"], loops["c"])
            if "c" in loops:
                sch.vectorize(_vector_split(sch, loops["c"], lanes)[1])
            _unroll_under(sch, block, tile)
            if loops:
                sch.decompose_reduction(block, sch.get_loops(block)[depth])


def _unroll_under(sch: s_tir.Schedule, block, loop, but_last: bool = False) -> None:
    """Unroll the loops of ``block`` below ``loop``, but vectorized ones (and the innermost)."""
    loops = sch.get_loops(block)
    below = next(i for i, candidate in enumerate(loops) if sch.get(candidate).same_as(sch.get(loop))) + 1
    for inner in loops[below:len(loops) - but_last]:
        if sch.get(inner).kind != tirx.ForKind.VECTORIZED:
            sch.unroll(inner)


def _task_param_copies(sch: s_tir.Schedule, task, lanes: int) -> None:
    """Copies of the epilogue's per-channel parameters for a task's channels, on the stack.

    An in-place kernel writes its output over an input, so its parameters may alias (``tirx.noalias``
    is off) and LLVM reloads every parameter vector after each output vector it stores; a stack copy
    is memory no parameter can point to, which LLVM keeps in registers along the task. (A gated
    kernel's folded parameters are computed in the task already, on the stack.)"""
    block = sch.get_sblock(binary_conv.KERNEL_NAME)
    for index, region in reversed(list(enumerate(sch.get(block).reads))):
        if region.source.name == binary_conv.PARAMS:
            copy = sch.cache_read(block, index, "global", consumer_blocks=[block])
            sch.compute_at(copy, task)
            sch.vectorize(_vector_split(sch, sch.get_loops(copy)[-1], lanes)[1])


class _RowSums(NamedTuple):
    """A fused kernel's row sums in stages (``_row_sum_stages``)."""

    tiles: object  # the sums of each register tile's columns, tiles[n, h, tile, c]
    groups: object | None  # those added up per group of tiles, groups[n, h, group, c]; None: no groups
    parts: int  # what each task adds up into its row sums: its groups, else its tiles


def _row_sum_stages(sch: s_tir.Schedule, tile, channels: int) -> _RowSums:
    """The output's row sums (``binary_conv.row_sums``) in stages: each register tile's, computed
    under the tile loop from its outputs in registers (``_tile_output``); where a task's tile sums
    would not fit the stack together (_MAX_TILE_BYTES: 56x56 with 32-channel tiles, 8 x 128 bytes),
    those of each group of its tiles added up after the group (``_group_sums``), so that one group's
    are kept at a time; then a task's parts added up (``_row_sum_block``). Sums by column from y
    after the task's tiles instead cost the 64 -> 256 PokeConv at 56x56 9-11% (bench/RESULTS.md)."""
    block = sch.get_sblock(binary_conv.ROW_SUM)
    *_, columns = sch.get_loops(block)
    tiles = int(sch.get(tile).extent)
    tile_sums = sch.rfactor(sch.split(columns, [tiles, None])[0], 2)
    groups = next(g for g in range(1, tiles + 1) if tiles % g == 0 and tiles // g * channels * 4 <= _MAX_TILE_BYTES)
    if groups == 1:
        return _RowSums(tile_sums, None, tiles)
    *_, by_tile = sch.get_loops(block)
    return _RowSums(tile_sums, sch.rfactor(sch.split(by_tile, [groups, None])[0], 2), groups)


def _group_sums(sch: s_tir.Schedule, block, group, tiles: int, channels: int, lanes: int) -> None:
    """A group's ``tiles`` tile sums (``_row_sum_stages``) added up after its tiles, tile by tile per
    channel."""
    sch.reverse_compute_at(block, group)
    loops = _loops_under(sch, block, _TILE_DEPTH, ("t", "c"), (tiles, channels))  # under the task and group
    if "c" in loops:
        sch.vectorize(_vector_split(sch, loops["c"], lanes)[1])
    if "t" in loops:
        sch.decompose_reduction(block, loops["t"])


def _row_sum_block(sch: s_tir.Schedule, task, parts: int, channels: int, lanes: int) -> None:
    """Each task's row sums from its ``parts`` (``_row_sum_stages``), per channel in part order,
    stored once (an in-place kernel's output may alias them)."""
    block = sch.get_sblock(binary_conv.ROW_SUM)
    store = sch.cache_write(block, 0, "global")
    stages = [(block, ("part", "c"), (parts, channels)), (store, ("c",), (channels,))]
    for stage, _, _ in stages:
        sch.reverse_compute_at(stage, task)
    for stage, names, extents in stages:
        # loops under the task in the order of the stage's iterators, but those of extent 1
        loops = _loops_under(sch, stage, 1, names, extents)
        if "c" in loops:
            sch.vectorize(_vector_split(sch, loops["c"], lanes)[1])
        if stage != store and set(loops) - {"c"}:
            sch.decompose_reduction(stage, sch.get_loops(stage)[1])


def _tile_binary_conv2d(sch: s_tir.Schedule, unit: VectorUnit) -> tuple:
    """Register-tiled, vectorized, multithreaded binary conv, for a CPU with ``unit.lanes`` uint32
    lanes per vector and room for ``unit.accumulators`` accumulator vectors. Returns the parallel
    task loop, the loop over its register tiles and the channels of a task.

    Tile: ``width`` output columns x ``channels`` output channels held in width*channels/lanes
    accumulator vectors while the reduction (kh, kw, word) runs; each step broadcasts one
    activation word against ``channels`` weight words (Cout is the innermost weight axis).
    Threads share the tasks of the fused (n, ho, co tile) loop; a task computes its row's tiles
    column after column. Rows are outermost, so the epilogue reads its residuals and writes its
    output once through memory, a row at a time (with channel tiles outermost it would sweep the
    whole float tensors once per tile, touching 128 of every 1024 bytes; bench/RESULTS.md), and a
    task keeps its channel tile's weights in L1 along the row. A task's row strip is still in
    cache when its row sums are added up (``_row_sum_block``).

    With ``unit.byte_counts`` (and whole vectors of channels) the steps count in byte lanes, chunk
    by chunk of the reduction (``_byte_counts``).
    """
    lanes = unit.lanes
    pop = sch.get_sblock("popcount")
    out = sch.get_sblock("binary_conv2d")
    n, ho, wo, co = sch.get_loops(out)
    wout, cout = int(sch.get(wo).extent), int(sch.get(co).extent)

    width, channels = _register_tile(wout, cout, unit)
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
    sch.reorder(n, ho, co_o, wo_o, wo_i, co_i)
    task, tile = sch.fuse(n, ho, co_o), wo_o
    # The popcount buffer shrinks to one tile: a stack array that LLVM keeps in registers. It stays
    # in the default "global" scope: TVM's CPU lowering puts only "global" buffers under 1024 bytes
    # on the stack and makes a "local" one a heap workspace, allocated, zeroed and freed per tile
    # (_MAX_TILE_BYTES).
    reductions = [int(v.dom.extent) for v in sch.get(pop).iter_vars[4:]]  # kh, kw, word (, nibble half)
    nibbles = has_block(sch, binary_conv.NIBBLES)
    bytewise = unit.byte_counts and vec > 1 and channels % vec == 0
    chunks = _byte_chunks(sch, pop, reductions[:3]) if bytewise else None
    sch.compute_at(pop, tile)
    for block in means:
        sch.compute_at(block, tile)
    # Vectorize/parallel must come before decompose_reduction (shared/reference/tvm.md §6).
    sch.parallel(task)
    sch.vectorize(sch.split(co_i, [None, vec])[1])
    if chunks is None:
        loops = _loops_under(sch, pop, _TILE_DEPTH, ("wo", "co", "kh", "kw", "j", "half"),
                             (width, channels, *reductions))
        _register_steps(sch, pop, loops, ("kh", "kw", "j", "half"), vec)
    else:
        _byte_counts(sch, pop, chunks, (width, channels), vec, unit, nibbles)
    for block in means:
        _vector_mean(sch, block, vec)
    _schedule_pad(sch)
    return task, tile, channels


def _loops_under(sch: s_tir.Schedule, block, depth: int, names: tuple[str, ...], extents: tuple[int, ...]) -> dict:
    """The loops of ``block`` below its first ``depth`` loops, by name: compute_at leaves out loops
    of extent 1, so they are those of ``names`` (in that order) whose ``extents`` exceed 1."""
    kept = [name for name, extent in zip(names, extents) if extent > 1]
    return dict(zip(kept, sch.get_loops(block)[depth:]))


def _register_steps(sch: s_tir.Schedule, block, loops: dict, reductions: tuple[str, ...], vec: int,
                    vectorize: bool = True, innermost: tuple[str, ...] = ()) -> None:
    """The ``reductions`` loops outermost, then the tile's columns (unrolled) and channel vectors
    (unrolled, their lanes vectorized unless the caller tensorizes them), then the ``innermost``
    loops (for the caller's tensor intrinsic): each step of the reduction updates the whole
    register tile. The init is split off before the first of these loops; ``block`` is then the
    update."""
    inner = []
    if "wo" in loops:
        sch.unroll(loops["wo"])
        inner.append(loops["wo"])
    if "co" in loops:
        vectors, lanes_loop = sch.split(loops["co"], [None, vec])
        sch.unroll(vectors)
        if vectorize:
            sch.vectorize(lanes_loop)
        inner += [vectors, lanes_loop]
    inner += [loops[name] for name in innermost if name in loops]
    outer = [loops[name] for name in reductions if name in loops]
    sch.reorder(*outer, *inner)
    sch.decompose_reduction(block, (outer + inner)[0])


# A byte lane counts at most 8 mismatches a step: 31 steps stay below 256. (In the nibble form a
# byte moves by at most 4 a step: 31 steps stay within int8.)
_BYTE_STEPS = 31


def _byte_chunks(sch: s_tir.Schedule, pop, reductions: list[int]):
    """Cut the reduction (kh, kw, word) of the unscheduled popcount block into chunks of at most
    _BYTE_STEPS steps: rfactor over the fused outer parts gives block ``popcount_rf`` (each
    chunk's sums; the chunk index comes before the channels, which stay the innermost axis, as
    the intrinsics' vectors need) and leaves ``pop`` adding them up.
    Returns (rf block, chunk count, steps of a chunk in kh, kw, word)."""
    k, _, cw = reductions
    # the word loop's largest divisor <= _BYTE_STEPS, then whole kernel columns (then rows) under
    # it while the chunk stays that short
    j_in = _largest_divisor(cw, _BYTE_STEPS)
    kw_in = _largest_divisor(k, _BYTE_STEPS // cw) if j_in == cw else 1
    kh_in = _largest_divisor(k, _BYTE_STEPS // (k * cw)) if j_in == cw and kw_in == k else 1
    kh, kw, j = sch.get_loops(pop)[4:7]  # a nibble half's loop, if any, stays innermost
    outer, inner = zip(*(sch.split(loop, [None, size]) for loop, size in ((kh, kh_in), (kw, kw_in), (j, j_in))))
    sch.reorder(*outer, *inner)
    rf = sch.rfactor(sch.fuse(*outer), 3)
    return rf, (k // kh_in) * (k // kw_in) * (cw // j_in), (kh_in, kw_in, j_in)


def _byte_counts(sch: s_tir.Schedule, pop, chunks, tile_shape: tuple[int, int], vec: int,
                 unit: VectorUnit, nibbles: bool) -> None:
    """The tile's popcounts in byte lanes, for CPUs without a 32-bit vector popcount.

    ``pop`` (under the tile) runs over the chunks of ``_byte_chunks``; each chunk's counts are
    computed right before it adds them, in a register tile of its own: each step adds per-byte
    counts of xor'ed words (``popcount`` of uint8 lanes: AVX2 vpshufb nibble lookups, NEON
    cnt.16b) into the four byte lanes of each uint32 lane, which cannot carry into each other
    within a chunk (_byte_popcount_intrin; with ``nibbles``, two table lookups of nibbles that
    add signed halves of agreements instead, _nibble_popcount_intrin); after the chunk ``pop``
    adds the sums of the four bytes (doubled for agreements) to the output's int32
    (_byte_sum_intrin). Integer sums in another order: the same result bit for bit."""
    rf, count, steps = chunks
    # the chunk index is the first iterator of ``pop`` (rfactor's), so its loop comes first
    loops = _loops_under(sch, pop, _TILE_DEPTH, ("chunk", "wo", "co"), (count, *tile_shape))
    _register_steps(sch, pop, loops, ("chunk",), vec, vectorize=False)
    depth = _TILE_DEPTH + 1 if "chunk" in loops else _TILE_DEPTH
    sch.compute_at(rf, sch.get_loops(pop)[depth - 1])
    counts = _loops_under(sch, rf, depth, ("wo", "co", "kh", "kw", "j", "half"), (*tile_shape, *steps, 2))
    if unit.one_step_loop and "kw" in counts and "j" in counts:
        counts["kw"] = sch.fuse(counts.pop("kw"), counts.pop("j"))  # (kw, j): adjacent words of pad and weights
    _register_steps(sch, rf, counts, ("kh", "kw", "j"), vec, vectorize=False, innermost=("half",))
    if nibbles:
        # the lanes and, under them, the two halves
        sch.tensorize(sch.get_loops(rf)[-2], _nibble_popcount_intrin(vec, unit.nibble_lookup, _split_weights(sch)))
    else:
        sch.tensorize(sch.get_loops(rf)[-1], _byte_popcount_intrin(vec))
    multiply_adds = unit.pair_multiply_adds if vec == unit.lanes else None  # whole vectors only
    sch.tensorize(sch.get_loops(pop)[-1], _byte_sum_intrin(vec, unit.pairwise_add, multiply_adds, nibbles))


def _split_weights(sch: s_tir.Schedule) -> bool:
    """Whether the binary conv's weights come split into nibbles ahead (binary_conv.weight_shape)."""
    weights = next(p for p in sch.mod["main"].params if p.name == "weights")
    return binary_conv.split_ahead(weights.shape)


def _byte_popcount_intrin(lanes: int) -> str:
    """``lanes`` int32 sums += popcount(x ^ w[0:lanes]) in byte lanes (``_byte_counts``): each
    uint32 lane gets the counts of its four bytes in its four bytes, which only
    ``_byte_sum_intrin`` makes into a count again. Registered on first use."""
    name = f"bnncc_byte_popcount_{lanes}"
    if s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name

    @T.prim_func(s_tir=True)
    def desc(x: T.Buffer((1,), "uint32", offset_factor=1), w: T.Buffer((lanes,), "uint32", offset_factor=1),
             acc: T.Buffer((lanes,), "int32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(acc[0:lanes], x[0], w[0:lanes])
            T.writes(acc[0:lanes])
            for c in range(lanes):
                with T.sblock("update"):
                    vc = T.axis.spatial(lanes, c)
                    acc[vc] = acc[vc] + T.Cast("int32", T.popcount(x[0] ^ w[vc]))

    def plus_counts(acc, x, w):
        # added as uint32: a byte of 128 or more makes the int32 negative, and TVM's int32 add is
        # "nsw" (no signed wrap), from which LLVM would conclude that the sign bit is never set
        counts = T.popcount(T.reinterpret(f"uint8x{4 * lanes}", T.Broadcast(x, lanes) ^ w))
        total = T.reinterpret(f"uint32x{lanes}", acc) + T.reinterpret(f"uint32x{lanes}", counts)
        return T.reinterpret(f"int32x{lanes}", total)

    @T.prim_func(s_tir=True)
    def impl(x: T.Buffer((1,), "uint32", offset_factor=1), w: T.Buffer((lanes,), "uint32", offset_factor=1),
             acc: T.Buffer((lanes,), "int32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(acc[0:lanes], x[0], w[0:lanes])
            T.writes(acc[0:lanes])
            acc[T.Ramp(0, 1, lanes)] = plus_counts(acc[T.Ramp(0, 1, lanes)], x[0], w[T.Ramp(0, 1, lanes)])

    s_tir.TensorIntrin.register(name, desc, impl)
    return name


# 2 - popcount(v) of v = 0..15 as signed bytes, 0..7 and 8..15, each eight an int64 (little-endian):
# the table of a nibble lookup, half a nibble's agreements minus mismatches
_NIBBLE_AGREEMENTS = tuple(int.from_bytes(bytes((2 - bin(v).count("1")) & 0xFF for v in range(first, first + 8)),
                                          "little", signed=True) for first in (0, 8))


def _nibble_popcount_intrin(lanes: int, lookup: str, split: bool) -> str:
    """``lanes`` int32 sums += binary_conv.agreement(x[h], nibble h of w[0:lanes]) for both nibble
    halves h (binary_conv's ``nibbles``), in byte lanes: each uint32 lane keeps in its four bytes
    half of their agreements minus mismatches (signed), which only ``_byte_sum_intrin``
    (``agreements``) doubles and adds up. Each half is one ``lookup`` (a table lookup of 16 one-byte
    entries, indexed by the low 4 bits of each byte, zero for a byte whose top bit is set) of the
    xor itself: both operands are nibbles, so the xor needs no mask, where a lookup of a whole byte
    masks, shifts and masks again. A byte moves by at most 2 + 2 a step. The weight nibbles are
    computed here, once per step for all the tile's columns (LLVM merges the same split of the same
    weight vector), or, ``split``, loaded as they are (w[h, 0:lanes], ``bitpack.blocked_weights``
    with ``split``).
    Registered on first use."""
    name = f"bnncc_nibble_agreement_{lanes}" + ("_split" if split else "")
    if s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    nbytes = 4 * lanes
    mask = T.Broadcast(T.uint32(bitpack.NIBBLE_MASK), lanes)

    def agreements(index):
        # ``lookup`` of the table (the two uint64 halves of _NIBBLE_AGREEMENTS, alternating) at index
        words = lanes // 2
        table = T.Shuffle([T.Broadcast(T.int64(half), words) for half in _NIBBLE_AGREEMENTS],
                          [i // 2 + (i % 2) * words for i in range(words)])
        return T.call_llvm_pure_intrin(f"int8x{nbytes}", lookup, T.reinterpret(f"int8x{nbytes}", table),
                                       T.reinterpret(f"int8x{nbytes}", index))

    def plus_agreements(acc, x0, x1, w_low, w_high):
        # byte by byte: the bytes are signed, and a word add would carry from one into the next
        low = agreements(T.Broadcast(x0, lanes) ^ w_low)
        high = agreements(T.Broadcast(x1, lanes) ^ w_high)
        return T.reinterpret(f"int32x{lanes}", T.reinterpret(f"int8x{nbytes}", acc) + low + high)

    # the weights of a step: w[0:lanes] words, or split ahead w[h, 0:lanes] (both halves of a vector
    # of channels side by side in bitpack.blocked_weights(..., split=True))
    shape = (2, lanes) if split else (lanes,)

    def weight_half(w, h, c):
        return w[h, c] if split else binary_conv.nibble(w[c], h)

    def weight_region(w):
        return w[0:2, 0:lanes] if split else w[0:lanes]

    def weight_halves(w):
        if split:
            return w[0, T.Ramp(0, 1, lanes)], w[1, T.Ramp(0, 1, lanes)]
        words = w[T.Ramp(0, 1, lanes)]
        return words & mask, T.shift_right(words, T.Broadcast(T.uint32(4), lanes)) & mask

    @T.prim_func(s_tir=True)
    def desc(x: T.Buffer((2,), "uint32", offset_factor=1), w: T.Buffer(shape, "uint32", offset_factor=1),
             acc: T.Buffer((lanes,), "int32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(acc[0:lanes], x[0:2], weight_region(w))
            T.writes(acc[0:lanes])
            for c, h in T.grid(lanes, 2):
                with T.sblock("update"):
                    vc, vh = T.axis.remap("SR", [c, h])
                    acc[vc] = acc[vc] + binary_conv.agreement(x[vh], weight_half(w, vh, vc))

    @T.prim_func(s_tir=True)
    def impl(x: T.Buffer((2,), "uint32", offset_factor=1), w: T.Buffer(shape, "uint32", offset_factor=1),
             acc: T.Buffer((lanes,), "int32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(acc[0:lanes], x[0:2], weight_region(w))
            T.writes(acc[0:lanes])
            acc[T.Ramp(0, 1, lanes)] = plus_agreements(acc[T.Ramp(0, 1, lanes)], x[0], x[1], *weight_halves(w))

    s_tir.TensorIntrin.register(name, desc, impl)
    return name


def _byte_sum_intrin(lanes: int, pairwise_add: str | None, multiply_adds: tuple[str, str] | None,
                     agreements: bool = False) -> str:
    """``lanes`` int32 sums += the sum of the four bytes of each lane of a chunk's byte counts
    (``_byte_popcount_intrin``; at most 248 a byte): two widening pairwise adds where the unit
    has them (``pairwise_add``), or two multiply-adds of pairs with ones (``multiply_adds``),
    else shifts and masks. ``agreements``: the chunk's bytes are signed halves of agreements
    (``_nibble_popcount_intrin``, at most 31 * 4 in size), added up by the multiply-adds, the
    second with twos. Registered on first use."""
    if agreements and not multiply_adds:
        raise ValueError("agreement counts are summed by multiply-adds only")
    name = (f"bnncc_byte_sum_{lanes}" + ("_pairwise" if pairwise_add else "") + ("_madd" if multiply_adds else "")
            + ("_agreements" if agreements else ""))
    if s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name

    @T.prim_func(s_tir=True)
    def desc(part: T.Buffer((lanes,), "int32", offset_factor=1), acc: T.Buffer((lanes,), "int32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(acc[0:lanes], part[0:lanes])
            T.writes(acc[0:lanes])
            for c in range(lanes):
                with T.sblock("update"):
                    vc = T.axis.spatial(lanes, c)
                    acc[vc] = acc[vc] + part[vc]

    def total(part):
        # in uint32 (see _byte_popcount_intrin): bytes 0+1 and 2+3 into the two 16-bit halves, then
        # the halves; at most 4 * 248, so the int32 it becomes is the count
        u = T.reinterpret(f"uint32x{lanes}", part)
        if pairwise_add:
            # NEON: uaddlp bytes -> halves, then halves -> words, which LLVM folds with the add into uadalp
            halves = T.call_llvm_pure_intrin(f"uint16x{2 * lanes}", pairwise_add,
                                             T.reinterpret(f"uint8x{4 * lanes}", u))
            return T.reinterpret(f"int32x{lanes}", T.call_llvm_pure_intrin(f"uint32x{lanes}", pairwise_add, halves))
        if multiply_adds:
            # x86: unsigned bytes times signed bytes, pairs added into int16 (no saturation: counts
            # <= 248 times ones, or ones times agreements within +-124), then int16 pairs times
            # ones (counts) or twos (agreements) into int32
            to_halves, to_words = multiply_adds
            ones, data = T.Broadcast(T.int8(1), 4 * lanes), T.reinterpret(f"int8x{4 * lanes}", u)
            halves = T.call_llvm_pure_intrin(f"int16x{2 * lanes}", to_halves, *((ones, data) if agreements else (data, ones)))
            return T.call_llvm_pure_intrin(f"int32x{lanes}", to_words, halves,
                                           T.Broadcast(T.int16(2 if agreements else 1), 2 * lanes))
        mask = T.Broadcast(T.uint32(0x00FF00FF), lanes)
        halves = (u & mask) + (T.shift_right(u, T.Broadcast(T.uint32(8), lanes)) & mask)
        return T.reinterpret(f"int32x{lanes}", (halves & T.Broadcast(T.uint32(0xFFFF), lanes))
                             + T.shift_right(halves, T.Broadcast(T.uint32(16), lanes)))

    @T.prim_func(s_tir=True)
    def impl(part: T.Buffer((lanes,), "int32", offset_factor=1), acc: T.Buffer((lanes,), "int32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(acc[0:lanes], part[0:lanes])
            T.writes(acc[0:lanes])
            acc[T.Ramp(0, 1, lanes)] = acc[T.Ramp(0, 1, lanes)] + total(part[T.Ramp(0, 1, lanes)])

    s_tir.TensorIntrin.register(name, desc, impl)
    return name


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
    vector loads, shuffles that pick every k-th lane (``_mean_term``), the sum in the stage's
    order. Vectorized as it is, each k-strided read would become one scalar load per lane
    (bench/RESULTS.md)."""
    channels = sch.get_loops(block)[-1]
    k = int(sch.get(block).reads[0].source.shape[-1]) // int(sch.get(block).writes[0].source.shape[-1])
    _, inner = sch.split(channels, [None, lanes])
    sch.tensorize(inner, _mean_intrin(k, lanes))


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
            out[T.Ramp(0, 1, lanes)] = binary_conv.mean_value(lambda t: _mean_term(x, k, lanes, t), k)

    s_tir.TensorIntrin.register(name, desc, impl)
    return name


def _mean_term(x: tirx.Buffer, k: int, lanes: int, t: int) -> tirx.PrimExpr:
    """The t-th channel of each of ``lanes`` groups of k in x (lanes * k values): every k-th lane
    of x's k vectors. For k = 4 in two rounds of two-vector shuffles: the t-th and its neighbour's
    channels of the first half of the groups from x's first two vectors, of the second half from
    its last two, then the halves of the t-th joined. LLVM lowers a shuffle of all four vectors at
    once to three permutes a term, 12 for a mean of 4 on AVX-512, and these to 8: the 1x1 convs
    reducing 4x took 4% less on AVX-512 and 11% less on AVX2 (bench/RESULTS.md)."""
    vectors = [x[tirx.Ramp(i * lanes, 1, lanes)] for i in range(k)]
    if k != 4 or lanes % 2:
        return tirx.Shuffle(vectors, [c * k + t for c in range(lanes)])
    half, first = lanes // 2, t - t % 2
    # each: the groups' channels first and first + 1, half a vector each
    pairs = [tirx.Shuffle(vectors[i:i + 2], [g * k + first + j for j in range(2) for g in range(half)])
             for i in (0, 2)]
    which = t % 2
    return tirx.Shuffle(pairs, [part * lanes + which * half + g for part in range(2) for g in range(half)])


def _schedule_pad(sch: s_tir.Schedule) -> None:
    """The zero-padding copy (absent when the conv has no padding): on the calling thread, a
    copy of packed words (27 KB at most in ResNet-50 1x) being cheaper than a parallel region.
    A nibble split of the input (binary_conv's ``nibbles``) reads the input through the padding, in
    a parallel region of its own: on the calling thread it took over a third of a 1x1 conv's time
    at 56x56 on two threads (bench/RESULTS.md, AVX2 kernels counting nibbles)."""
    if has_block(sch, binary_conv.NIBBLES):
        if has_block(sch, "pad"):
            sch.compute_inline(sch.get_sblock("pad"))
        n, y, *_ = sch.get_loops(sch.get_sblock(binary_conv.NIBBLES))
        sch.parallel(sch.fuse(n, y))
    elif has_block(sch, "pad"):
        n, y, _, _ = sch.get_loops(sch.get_sblock("pad"))
        sch.fuse(n, y)


# -- sign and bitpack -------------------------------------------------------------------------------
def _sign_bitpack(func: tirx.PrimFunc, unit: VectorUnit, threads: int) -> tirx.PrimFunc:
    """Sign-and-bitpack (``_bitpack_block``); the same on every CPU."""
    sch = s_tir.Schedule(func)
    _bitpack_block(sch)
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
    # one 32-lane compare whose 32 one-bit lanes are the word (lane b is bit b, as LLVM lays out a
    # vector of i1): plain LLVM IR that any CPU target takes. AVX-512: two vcmpps, kunpckwd and a
    # kmovd store, where an OR-reduction of the lanes' shifted bits took a 14-instruction tree
    # (bench/RESULTS.md, CPU schedule choices)
    with T.sblock("root"):
        T.reads(out[0], x[0:32])
        T.writes(out[0])
        out[0] = out[0] | T.reinterpret("uint32", T.Cast("uint1x32", x[T.Ramp(0, 1, 32)] >= T.Broadcast(T.float32(0), 32)))


_PACK32 = "bnncc_sign_pack32"
s_tir.TensorIntrin.register(_PACK32, _pack32_desc, _pack32_impl, override=True)


def _bitpack_block(sch: s_tir.Schedule) -> None:
    """A sign_bitpack stage: pixels in parallel; each word one vector compare when the channel
    count is a multiple of 32 (far faster than the scalar form, bench/RESULTS.md), else the 32
    bits of a word unrolled (the last word masks channels past C)."""
    block = sch.get_sblock(bitpack.BITPACK_STAGE)
    n, h, w, _, b = sch.get_loops(block)
    sch.parallel(sch.fuse(n, h, w))
    channels = next(int(r.source.shape[-1]) for r in sch.get(block).reads if str(r.source.dtype) == "float32")
    if channels % bitpack.WORD_BITS:
        sch.unroll(b)
        sch.decompose_reduction(block, b)
        return
    sch.decompose_reduction(block, b)
    sch.tensorize(sch.get_loops(sch.get_sblock(f"{bitpack.BITPACK_STAGE}_update"))[-1], _PACK32)


# -- quantized stem conv, SE gate, head -------------------------------------------------------------
def _vector_width(extent: int, lanes: int) -> int:
    """The largest power-of-two divisor of ``extent`` <= lanes: whole vector registers (the head's
    1000 classes: 8 lanes, not a vector and a rest)."""
    return max(d for d in (1, 2, 4, 8, 16) if d <= lanes and extent % d == 0)


def _vector_split(sch: s_tir.Schedule, loop, lanes: int):
    """Split ``loop`` into (outer, inner) with inner ``_vector_width`` of its extent."""
    return sch.split(loop, [None, _vector_width(int(sch.get(loop).extent), lanes)])


def _quant_conv2d(func: tirx.PrimFunc, unit: VectorUnit, threads: int) -> tirx.PrimFunc:
    """Conv: rows in parallel, each a register tile of output columns and channels
    (``_register_tile``, as the binary conv's) at a time, (ri, rj, rc) outside the tile: its sums
    are independent chains of multiply-adds, where one vector of one pixel at a time waited on each
    add before the next. The input quantizer: inside each output row's task, the input rows that
    row reads, when an NCHW input's windows of different rows share no row (stride >= kernel, as
    the PokeInit stem's 4x4/4): one parallel region, and the rows still in cache for the conv
    (bench/RESULTS.md); otherwise a row at a time, in parallel of its own (shared rows would be
    quantized once per window)."""
    lanes = unit.lanes
    sch = s_tir.Schedule(func)
    quantize = sch.get_sblock("quantize")
    conv = sch.get_sblock("conv")
    n, y, z, o, ri, rj, rc = sch.get_loops(conv)
    nchw = func.attrs.get(quant.INPUT_LAYOUT_ATTR) == "NCHW"
    if nchw:
        # the windows of different output rows share no input row: the rows they read fit the input's
        input_rows = int(sch.get(sch.get_loops(quantize)[2]).extent)
        per_task = int(sch.get(y).extent) * int(sch.get(ri).extent) <= input_rows
    else:
        per_task = False
    if nchw and not per_task:
        # rows of one channel: the scale is one value, the row a vector loop
        qn, qc, qy, qz = sch.get_loops(quantize)
        sch.parallel(sch.fuse(qn, qc, qy))
        sch.vectorize(_vector_split(sch, qz, lanes)[1])
    elif not nchw:
        # a padded row of pixels at a time, channels vectorized; then, with one input channel per
        # group, the row's channels repeated for their group's output channels
        qn, qy, _, qc = sch.get_loops(quantize)
        row = sch.fuse(qn, qy)
        sch.parallel(row)
        sch.vectorize(_vector_split(sch, qc, lanes)[1])
        if has_block(sch, quant.SPREAD):
            _spread_row(sch, row, lanes)
    width, channels = _register_tile(int(sch.get(z).extent), int(sch.get(o).extent), unit)
    z_out, z_in = sch.split(z, [None, width])
    o_out, o_in = sch.split(o, [None, channels])
    sch.reorder(z_out, o_out, z_in)
    if has_block(sch, "epilogue"):
        # the tile's sums, read by the epilogue right after: a stack array in the default scope
        # ("local" would be a heap workspace per tile, _tile_binary_conv2d)
        epilogue = sch.get_sblock("epilogue")
        sch.reverse_compute_at(epilogue, o_out)
        sch.vectorize(_vector_split(sch, sch.get_loops(epilogue)[-1], lanes)[1])
    row = sch.fuse(n, y)
    sch.parallel(row)
    if per_task:
        sch.compute_at(quantize, row)
        sch.vectorize(_vector_split(sch, sch.get_loops(quantize)[-1], lanes)[1])
    _register_steps(sch, conv, {"wo": z_in, "co": o_in, "ri": ri, "rj": rj, "rc": rc}, ("ri", "rj", "rc"),
                    _vector_width(channels, lanes))
    # a window row's taps unrolled: neighbouring columns of the tile read the same input pixels at
    # successive taps, and LLVM loads each once (the grouped 3x3 conv of the stem, which loads an
    # input vector for each multiply-add: 41 -> 38 us on Zen 4, 2 threads)
    sch.unroll(rj)
    return mark_scheduled(sch.mod["main"])


def _spread_row(sch: s_tir.Schedule, row, lanes: int) -> None:
    """The quant_conv2d stage that repeats each input channel k times (quant.SPREAD) under the
    quantizer's ``row`` loop: a vector of outputs is one load of lanes / k inputs and a shuffle
    (``_spread_intrin``), where the vectorized index o // k made a scalar load per lane."""
    spread = sch.get_sblock(quant.SPREAD)
    sch.reverse_compute_at(spread, row)
    o = sch.get_loops(spread)[-1]
    out_channels = int(sch.get(o).extent)
    in_channels = int(sch.get(spread).reads[0].source.shape[-1])
    k = out_channels // in_channels
    # (k == lanes, a 1-channel image into 16 channels: one input a vector, no vector load to spread)
    if lanes % k or out_channels % lanes or lanes // k < 2:
        return
    sch.tensorize(sch.split(o, [None, lanes])[1], _spread_intrin(k, lanes))


def _spread_intrin(k: int, lanes: int) -> str:
    """out[o] = x[o // k] for ``lanes`` outputs: one vector load of lanes / k inputs and a shuffle.
    Registered on first use."""
    name = f"bnncc_spread_{k}x{lanes}"
    if s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name

    @T.prim_func(s_tir=True)
    def desc(x: T.Buffer((lanes // k,), "float32", offset_factor=1),
             out: T.Buffer((lanes,), "float32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(x[0:lanes // k])
            T.writes(out[0:lanes])
            for o in range(lanes):
                with T.sblock("spread"):
                    vo = T.axis.spatial(lanes, o)
                    out[vo] = x[vo // k]

    @T.prim_func(s_tir=True)
    def impl(x: T.Buffer((lanes // k,), "float32", offset_factor=1),
             out: T.Buffer((lanes,), "float32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(x[0:lanes // k])
            T.writes(out[0:lanes])
            out[T.Ramp(0, 1, lanes)] = T.Shuffle([x[T.Ramp(0, 1, lanes // k)]] * k, [o // k for o in range(lanes)])

    s_tir.TensorIntrin.register(name, desc, impl)
    return name


# a dense layer of at least this many weight rows x output vectors is shared out between the threads
# by output vectors (about 5 us of work on one Zen 4 core; the smaller ones cost less than a
# parallel region's start)
_PARALLEL_DENSE = 8192


def _shares(vectors: int, threads: int) -> int:
    """How many equal shares of ``vectors`` to give out: the most, at most one per thread."""
    return max(d for d in range(1, threads + 1) if vectors % d == 0)


def _pool_dense(func: tirx.PrimFunc, unit: VectorUnit, threads: int) -> tirx.PrimFunc:
    """SE gate and head: the pooling sum with channels vectorized, a share of them per thread; the
    dense layers a weight row at a time, a large one's output vectors shared out between the
    threads, or with int8 weights a column tile at a time (``_column_tile_dot``)."""
    lanes = unit.lanes
    sch = s_tir.Schedule(func)
    pool = sch.get_sblock("pool_sum")
    n, c, *spatial = sch.get_loops(pool)
    c_out, c_vec = _vector_split(sch, c, lanes)
    if len(spatial) == 1:
        # an SE gate reading row sums (quant.se_gate_func): H*C values, too few to share out
        sch.reorder(n, *spatial, c_out, c_vec)
    else:
        # Each thread sums its share of the channel vectors, pixel after pixel, so it reads a
        # contiguous run of every pixel; one vector per parallel task would read one 64-byte line
        # per pixel and sweep the whole input once per vector (bench/RESULTS.md). The sums keep
        # their order (over rows, then columns) per channel.
        share, c_in = sch.split(c_out, [_shares(int(sch.get(c_out).extent), threads), None])
        sch.reorder(n, share, *spatial, c_in, c_vec)
        sch.parallel(sch.fuse(n, share))
    sch.vectorize(c_vec)
    sch.decompose_reduction(pool, spatial[0])
    # Dense layers: the input loop outside the output vectors, so the (C, O) weights are read row
    # after row, sequentially, and each output sums in input order. A large layer's output vectors
    # are split in one share per thread, each thread reading its part of every row (small output
    # tiles in parallel, each a column strip, were slower: bench/RESULTS.md).
    for name in ("se1_dot", "se2_dot", "fc_dot"):
        if not has_block(sch, name):
            continue
        # the layer's input quantizer, one vector op a step (quant.quantize_act's Select)
        quantize = sch.get_sblock(name.replace("_dot", "_quantize"))
        sch.vectorize(_vector_split(sch, sch.get_loops(quantize)[-1], lanes)[1])
        dot = sch.get_sblock(name)
        if any(read.source.dtype == "int8" for read in sch.get(dot).reads):
            _column_tile_dot(sch, dot, sch.get_sblock(name[:-len("_dot")]), lanes, threads)
            continue
        # int4 weights: word rows and the nibble of each (quant._dense)
        n, o, rows, *nibble = sch.get_loops(dot)
        o_out, o_vec = _vector_split(sch, o, lanes)
        vectors = int(sch.get(o_out).extent)
        shares = _shares(vectors, threads)
        inputs = int(sch.get(rows).extent) * (int(sch.get(nibble[0]).extent) if nibble else 1)
        if inputs * vectors >= _PARALLEL_DENSE and shares > 1:
            share, o_in = sch.split(o_out, [shares, None])
            sch.reorder(n, share, rows, o_in, *nibble, o_vec)
            sch.parallel(share)
        else:
            sch.reorder(n, rows, o_out, *nibble, o_vec)
        lookup = nibble and unit.float_lookup and int(sch.get(o_vec).extent) == lanes
        if not lookup:
            sch.vectorize(o_vec)
            if nibble:
                sch.unroll(nibble[0])
        sch.decompose_reduction(dot, rows)
        if lookup:
            sch.tensorize(nibble[0], _int4_dot_intrin(lanes, unit.float_lookup))
    return mark_scheduled(sch.mod["main"])


def _column_tile_dot(sch: s_tir.Schedule, dot, layer, lanes: int, threads: int) -> None:
    """An int8 dense layer's dot in column tiles (quant.tile_columns): per tile, the input loop
    outside the tile's output vectors, which stay in registers while the tile's weights are read
    front to back; the layer's scale and bias (``layer``) applied per tile; the tiles shared out
    between the threads when the layer is large."""
    n, tile, width, inputs = sch.get_loops(dot)
    tiles, size = int(sch.get(tile).extent), int(sch.get(width).extent) * int(sch.get(inputs).extent)
    sch.reverse_compute_at(layer, tile)
    vectors, lane = _vector_split(sch, width, lanes)
    sch.reorder(inputs, vectors, lane)
    sch.unroll(vectors)
    sch.vectorize(lane)
    task = sch.fuse(n, tile)
    if tiles > 1 and tiles * size >= _PARALLEL_DENSE:
        sch.parallel(task)
    sch.decompose_reduction(dot, inputs)


def _int4_dot_intrin(lanes: int, lookup: str) -> str:
    """``lanes`` float32 sums += x[t] * float(nibble t of the weight words), t = 0 .. 7 in order: the
    inputs of one row of ``pack_int4`` words. The weights become floats by ``lookup`` (a table of 16
    floats indexed by the low 4 bits of each 32-bit lane) of the words shifted right by 4t: a
    shift and a lookup a nibble, where nibbles of bytes took a widening shuffle each before their
    lookup. Its description decodes by quant.int4, as the dense stage does, so it matches that
    stage; the same products and sums. Registered on first use."""
    name = f"bnncc_int4_dot_{lanes}"
    if s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    nibbles = quant.NIBBLES

    @T.prim_func(s_tir=True)
    def desc(x: T.Buffer((nibbles,), "float32", offset_factor=1), q: T.Buffer((lanes,), "int32", offset_factor=1),
             acc: T.Buffer((lanes,), "float32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(acc[0:lanes], x[0:nibbles], q[0:lanes])
            T.writes(acc[0:lanes])
            for t, o in T.grid(nibbles, lanes):
                with T.sblock("update"):
                    vo, vt = T.axis.remap("SR", [o, t])
                    acc[vo] = acc[vo] + x[vt] * T.Cast("float32", quant.int4(q[vo], vt))

    # the signed value of each nibble 0..15: 0..7, then -8..-1
    values = T.bitwise_and(T.Ramp(8, 1, lanes), T.Broadcast(15, lanes)) - T.Broadcast(8, lanes)
    table = T.Cast(f"float32x{lanes}", values)

    @T.prim_func(s_tir=True)
    def impl(x: T.Buffer((nibbles,), "float32", offset_factor=1), q: T.Buffer((lanes,), "int32", offset_factor=1),
             acc: T.Buffer((lanes,), "float32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(acc[0:lanes], x[0:nibbles], q[0:lanes])
            T.writes(acc[0:lanes])
            for t in T.unroll(nibbles):
                acc[T.Ramp(0, 1, lanes)] = acc[T.Ramp(0, 1, lanes)] + T.Broadcast(x[t], lanes) * T.call_llvm_pure_intrin(
                    f"float32x{lanes}", lookup, table, T.shift_right(q[T.Ramp(0, 1, lanes)], T.Broadcast(t * 4, lanes)))

    s_tir.TensorIntrin.register(name, desc, impl)
    return name


# kernel name (KERNEL_ATTR) -> rule(func, unit, threads)
_RULES = {
    binary_conv.KERNEL_NAME: _binary_conv2d,
    bitpack.KERNEL_NAME: _sign_bitpack,
    quant.CONV_KERNEL_NAME: _quant_conv2d,
    quant.SE_GATE_KERNEL_NAME: _pool_dense,
    quant.HEAD_KERNEL_NAME: _pool_dense,
}
