"""The binary conv's popcount stage on the 1-bit tensor cores (issue 17, item 1).

A binary conv PrimFunc of ours (``binary_conv2d_func`` or the fused PokeConv of ``lower``) computes
``popcount`` (P, the mismatches of each window, int32 NHWC) and then, per output, the integer result
and its epilogue from P. ``tensor_core_popcount`` keeps everything after P as it is (the same TE
stages, so the same semantics) and replaces the stages that compute P (``pad`` and ``popcount``)
with one kernel that calls ``bnncc_bmma_conv``: an implicit GEMM on ``mma.sync m16n8k256 b1
.and.popc``, CUDA C in ``kernels/bmma_conv.cuh`` (its layout and the AND-to-XOR rebuild are
explained there). ``with_device_code`` puts that file in front of the CUDA C that TVM generates,
before nvcc compiles it (``cuda.export_cuda``).

Why a call of hand-written device code rather than TensorIR with a tensor intrinsic: TVM 0.27 has no
1-bit MMA intrinsic for TensorIR (its PTX tables list the instruction, but the schedulable layer
offers none), and the fragment layout, the per-row and per-column popcounts and the zero-word
padding of K are a few lines of CUDA C that are checked on the host (bench/gpu_bconv.cu --emulate,
tests/targets/test_cuda.py) and on the GPU (bench/gpu.sh).

What is not fused yet: P goes through memory (int32) between the tensor-core kernel and the
epilogue kernel; the epilogue and the next layer's sign-and-pack are TVM kernels bound to threads.
"""

from __future__ import annotations

import math
from pathlib import Path

from bnncc.targets.kernels import binary_conv
from bnncc.targets.tvm_compat import has_block, s_tir, tirx, tvm

__all__ = ["DEVICE_CODE", "EXTERN", "Geometry", "geometry", "tensor_core_popcount", "with_device_code"]

DEVICE_CODE = Path(__file__).with_name("kernels") / "bmma_conv.cuh"
EXTERN = "bnncc_bmma_conv"
_WARPS, _TILES = 4, 4  # BNNCC_BMMA_WARPS, BNNCC_BMMA_TILES of bmma_conv.cuh: 64 rows x 32 columns a block


class Geometry(tuple):
    """(n, h, w, words, cout, k, stride, pad_top, pad_left, ho, wo): ``bnncc_bmma_conv``'s integer arguments."""


def _stride(block) -> int:
    """The stride of the popcount block, from its activation read's row index ``v_y * stride + v_kh``
    (``v_y + v_kh`` at stride 1)."""
    index, y = block.reads[0].region[1].min, block.iter_vars[1].var
    terms = [index.a, index.b] if isinstance(index, tirx.Add) else [index]
    for term in terms:
        if term.same_as(y):
            return 1
        if isinstance(term, tirx.Mul) and term.a.same_as(y) and isinstance(term.b, tirx.IntImm):
            return int(term.b.value)
    raise ValueError(f"popcount block: no stride in its row index {index}")


def geometry(func: tirx.PrimFunc, popcount) -> Geometry:
    """The conv's shape from its buffers (bits, weights: its first two parameters) and its popcount block."""
    n, h, w, words = _shape(func.params[0])
    k, _, _, cout = _shape(func.params[1])
    _, ho, wo, _ = _shape(popcount.writes[0].source)
    stride = _stride(popcount)
    top, left = binary_conv.same_padding(h, k, stride)[0], binary_conv.same_padding(w, k, stride)[0]
    return Geometry((n, h, w, words, cout, k, stride, top, left, ho, wo))


def _shape(buffer) -> tuple[int, ...]:
    return tuple(int(d) for d in buffer.ty.shape)


def _full(buffer, like):
    """The whole of ``buffer``, typed like the region ``like``."""
    return tvm.ir.expr.TensorRegion(buffer, [tvm.ir.Range(0, d) for d in _shape(buffer)], like.ty)


def _launch(tag: str, extent: int, body):
    var = tirx.IterVar(tvm.ir.Range(0, extent), tirx.Var(tag, "int32"), tirx.IterVar.ThreadIndex, tag)
    return tirx.AttrStmt(var, "thread_extent", tirx.IntImm("int32", extent), body)


def _tensor_core_block(func: tirx.PrimFunc, popcount) -> s_tir.SBlockRealize:
    """A block of one kernel: ``bnncc_bmma_conv(bits, weights, popcount, geometry...)``."""
    bits, weights, out = func.params[0], func.params[1], popcount.writes[0].source
    shape = geometry(func, popcount)
    n, _, _, _, cout, _, _, _, _, ho, wo = shape
    call = tirx.call_extern("int32", EXTERN, *(tirx.buffer_data(b) for b in (bits, weights, out)),
                            *(tirx.IntImm("int32", v) for v in shape))
    body = _launch("threadIdx.x", 32 * _WARPS, tirx.Evaluate(call))
    body = _launch("blockIdx.y", math.ceil(cout / (8 * _TILES)), body)
    body = _launch("blockIdx.x", math.ceil(n * ho * wo / (16 * _WARPS)), body)
    like = popcount.writes[0]
    block = s_tir.SBlock([], [_full(bits, like), _full(weights, like)], [_full(out, like)], "tensor_core_popcount",
                         body)
    return s_tir.SBlockRealize([], True, block)


def tensor_core_popcount(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """``func`` (a binary conv of ours) with its pad and popcount stages replaced by the tensor-core
    kernel; None if it has no popcount stage."""
    sch = s_tir.Schedule(func)
    try:
        popcount_ref = sch.get_sblock("popcount")
    except s_tir.ScheduleError:
        return None
    popcount = sch.get(popcount_ref)
    replaced = {sch.get(sch.get_loops(popcount_ref)[0])}
    if has_block(sch, "pad"):
        replaced.add(sch.get(sch.get_loops(sch.get_sblock("pad"))[0]))
    root = func.body.block
    stages = list(root.body.seq) if isinstance(root.body, tirx.SeqStmt) else [root.body]
    kept = [stage for stage in stages if not any(stage.same_as(r) for r in replaced)]
    body = tirx.SeqStmt([_tensor_core_block(func, popcount), *kept])
    allocs = [b for b in root.alloc_buffers if b.name != "pad"]
    new_root = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, body, root.init, allocs,
                            root.match_buffers, root.annotations)
    return func.with_body(s_tir.SBlockRealize(func.body.iter_values, func.body.predicate, new_root))


def with_device_code(source: str) -> str:
    """The CUDA C that TVM generated, with ``bmma_conv.cuh`` in front where a kernel calls it."""
    if EXTERN not in source:
        return source
    return DEVICE_CODE.read_text(encoding="utf-8") + "\n" + source
