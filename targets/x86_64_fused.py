"""x86-64 schedules for the kernels the whole-network lowering adds (``bnncc.targets.lower``).

- the fused PokeConv: ``x86_64.schedule_binary_conv2d`` for the conv and its epilogue, then the
  trailing sign-and-bitpack stage (block ``bitpack``) over pixels in parallel;
- ``quant_conv2d`` (the stem): output pixels rows in parallel, the reduction outside a vector of
  output channels, so each weight row is one vector load;
- ``se_gate`` and ``quant_head``: the spatial mean with the channel vector innermost; the dense
  layers input by input, each adding its weight row times the input to the output vectors.

Rules return None when the function is not theirs; ``schedule`` tries them, then the rules of
``x86_64``.
"""

from __future__ import annotations

from bnncc.targets import x86_64
from bnncc.targets.kernels import KERNEL_ATTR, quant
from bnncc.targets.tvm_compat import Target, has_block, mark_scheduled, s_tir, tirx

__all__ = ["bitpack_stage", "schedule", "schedule_poke_conv", "schedule_quant_conv2d", "schedule_pool_dense",
           "vector_pool_dense", "vector_quant_conv2d"]


def _lanes(target: Target) -> int | None:
    """float32 lanes of one vector: 16 with AVX-512, 8 with AVX2 (x86_64.vector_lanes counts uint32 alike)."""
    return x86_64.vector_lanes(target)


def _vector_split(sch: s_tir.Schedule, loop, lanes: int):
    """Split ``loop`` into (outer, inner) with inner = the largest power-of-two divisor of its extent
    <= lanes: whole vector registers (the head's 1000 classes: 8 lanes; 10 were a vector and a rest)."""
    extent = int(sch.get(loop).extent)
    inner = max(d for d in (1, 2, 4, 8, 16) if d <= lanes and extent % d == 0)
    return sch.split(loop, [None, inner])


def schedule_poke_conv(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """A binary conv whose fused epilogue is followed by the next layer's sign-and-bitpack."""
    if func.attrs.get(KERNEL_ATTR) != "binary_conv2d" or _lanes(target) is None:
        return None
    return bitpack_stage(x86_64.schedule_binary_conv2d(func, target))


def bitpack_stage(conv: tirx.PrimFunc) -> tirx.PrimFunc:
    """A fused PokeConv whose conv and epilogue are scheduled: its trailing bitpack (if any) as
    ``x86_64.schedule_bitpack_block`` (any CPU; also used by arm64)."""
    sch = s_tir.Schedule(conv)
    if not has_block(sch, "bitpack"):
        return conv
    x86_64.schedule_bitpack_block(sch)
    return mark_scheduled(sch.mod["main"])


def schedule_quant_conv2d(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """Quantize rows in parallel; conv: rows in parallel, (ri, rj, rc) outside a vector of channels."""
    lanes = _lanes(target)
    if func.attrs.get(KERNEL_ATTR) != "quant_conv2d" or lanes is None:
        return None
    return vector_quant_conv2d(func, lanes)


def vector_quant_conv2d(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc:
    """``schedule_quant_conv2d`` for any CPU with ``lanes`` float32 lanes per vector (also used by arm64)."""
    sch = s_tir.Schedule(func)
    quantize = sch.get_sblock("quantize")
    if func.attrs.get(quant.INPUT_LAYOUT_ATTR) == "NCHW":
        # rows of one channel: the scale is one value, the row a vector loop
        n, c, y, z = sch.get_loops(quantize)
        sch.parallel(sch.fuse(n, c, y))
        sch.vectorize(_vector_split(sch, z, lanes)[1])
    else:
        n, y, _, _ = sch.get_loops(quantize)
        sch.parallel(sch.fuse(n, y))
    conv = sch.get_sblock("conv")
    n, y, z, o, ri, rj, rc = sch.get_loops(conv)
    o_out, o_vec = _vector_split(sch, o, lanes)
    sch.reorder(n, y, z, o_out, ri, rj, rc, o_vec)
    if has_block(sch, "epilogue"):
        # one pixel's sums, read by the epilogue right after: a stack array in the default scope
        # ("local" would be a heap workspace per pixel, x86_64.tile_binary_conv2d)
        epilogue = sch.get_sblock("epilogue")
        sch.reverse_compute_at(epilogue, z)
        sch.vectorize(_vector_split(sch, sch.get_loops(epilogue)[-1], lanes)[1])
    sch.parallel(sch.fuse(n, y))
    sch.vectorize(o_vec)
    sch.decompose_reduction(conv, ri)
    return mark_scheduled(sch.mod["main"])


def schedule_pool_dense(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """SE gate and head: the pooling sum with channels vectorized, a share of them per thread; the
    dense layers on one thread, a weight row at a time (``vector_pool_dense``)."""
    lanes = _lanes(target)
    if func.attrs.get(KERNEL_ATTR) not in ("se_gate", "quant_head") or lanes is None:
        return None
    return vector_pool_dense(func, lanes, int(target.attrs["num-cores"]))


def vector_pool_dense(func: tirx.PrimFunc, lanes: int, threads: int) -> tirx.PrimFunc:
    """``schedule_pool_dense`` for any CPU with ``lanes`` float32 lanes per vector (also used by arm64)."""
    sch = s_tir.Schedule(func)
    pool = sch.get_sblock("pool_sum")
    n, c, rh, rw = sch.get_loops(pool)
    c_out, c_vec = _vector_split(sch, c, lanes)
    # Each thread sums its share of the channel vectors, pixel after pixel, so it reads a contiguous
    # run of every pixel. One vector per parallel task read one 64-byte line per pixel and swept the
    # whole input once per vector: the SE gates took 1.8 ms of a 1-thread inference, now 1.2. The
    # sums keep their order (over rows, then columns) per channel.
    vectors = int(sch.get(c_out).extent)
    shares = max(d for d in range(1, threads + 1) if vectors % d == 0)
    share, c_in = sch.split(c_out, [shares, None])
    sch.reorder(n, share, rh, rw, c_in, c_vec)
    sch.parallel(sch.fuse(n, share))
    sch.vectorize(c_vec)
    sch.decompose_reduction(pool, rh)
    # Dense layers: the input loop outside the output vectors, so the (C, O) weights are read row
    # after row, sequentially, and summed in the same order as before. Output tiles in parallel
    # read each tile's column strip, row by row: the 2048x1000 head took 0.25 ms, now 0.09 on one
    # thread; the SE layers (at most 2048x256) gain nothing from a second thread.
    for name in ("se1_dot", "se2_dot", "fc_dot"):
        if not has_block(sch, name):
            continue
        dot = sch.get_sblock(name)
        n, o, rc = sch.get_loops(dot)
        o_out, o_vec = _vector_split(sch, o, lanes)
        sch.reorder(n, rc, o_out, o_vec)
        sch.vectorize(o_vec)
        sch.decompose_reduction(dot, rc)
    return mark_scheduled(sch.mod["main"])


RULES = (schedule_poke_conv, schedule_quant_conv2d, schedule_pool_dense)


def schedule(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """The first rule of this module or of ``x86_64`` that applies to ``func`` on ``target``, or None."""
    for rule in RULES:
        scheduled = rule(func, target)
        if scheduled is not None:
            return scheduled
    return x86_64.schedule(func, target)
