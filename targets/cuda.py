"""CUDA target: thread-bound GPU schedules for the binary conv, TVM's GPU schedules (dlight) for
the rest, and a library whose kernels nvcc compiles ahead of time.

Binary conv (plain or the fused PokeConv, ``bnncc.targets.lower``). One thread computes one
output (pixel p, channel c): acc = sum over (kh, kw, word) of popcount(x ^ w) (``__popc`` on
uint32), then the fused epilogue, then writes y. A thread block is ``pixels`` x ``channels``
threads (channels on threadIdx.x, so a warp reads consecutive weight words); it first copies its
channels' weight slice (k*k*words*channels uint32, <= 36 KiB for ResNet-50 0.5x-1x) into shared
memory, cooperatively, and every thread reads weights from there. The SAME zero border is read
in place (the pad stage is inlined). A trailing sign-and-bitpack stage is a second kernel with
one thread per output word.

Every other kernel of ours is returned unscheduled: the CUDA pipeline's dlight rules
(``ApplyDefaultSchedule``: reduction, GEMV, fallback) bind its loops to threads, as they do for
the layout transpose at the entry.

Build. ``tvm.compile`` emits the kernels as CUDA C, and TVM 0.27's exported library keeps that
source (its CUDA runtime compiles it when the library loads, through the Python callback
``tvm_callback_cuda_compile``: NVRTC or nvcc on the deploying machine). ``export_cuda`` therefore
compiles the source with nvcc at build time (fatbin for the target arch) and writes it beside the
library; ``load_vm`` registers a callback that returns that fatbin for that source, so loading
needs the CUDA driver and TVM's CUDA runtime but no compiler.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bnncc.errors import BnnccError
from bnncc.fileio import atomic_path
from bnncc.targets.kernels import KERNEL_ATTR, binary_conv
from bnncc.targets.tvm_compat import Target, has_block, make_target, mark_scheduled, s_tir, tirx

__all__ = [
    "DEFAULT_ARCH", "cuda_target", "export_cuda", "find_nvcc", "has_cuda_device", "inspect_cuda_source", "load_vm",
    "nvcc_fatbin", "schedule", "schedule_binary_conv2d",
]

logger = logging.getLogger(__name__)

DEFAULT_ARCH = "sm_90"  # H100
_MAX_PIXELS = 8  # threadIdx.y extent
_MAX_CHANNELS = 32  # threadIdx.x extent: one warp across output channels


def cuda_target(arch: str = DEFAULT_ARCH) -> Target:
    """CUDA for compute capability ``arch`` (sm_90: H100), host code for this machine's LLVM."""
    return make_target({"kind": "cuda", "arch": arch}).with_host(make_target({"kind": "llvm"}))


def _is_cuda(target: Target) -> bool:
    return target.kind.name == "cuda"


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _bind_spatial(sch: s_tir.Schedule, loops: list, threads: int) -> None:
    """Fuse ``loops`` and spread them over blocks of ``threads`` threads."""
    fused = sch.fuse(*loops)
    extent = int(sch.get(fused).extent)
    bx, tx = sch.split(fused, [None, min(threads, extent)])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def schedule_binary_conv2d(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """One thread per output, weights of the block's channels in shared memory (module docstring)."""
    if not _is_cuda(target) or func.attrs.get(KERNEL_ATTR) != binary_conv.KERNEL_NAME:
        return None
    sch = s_tir.Schedule(func)
    if has_block(sch, "pad"):
        sch.compute_inline(sch.get_sblock("pad"))
    pop = sch.get_sblock("popcount")
    out = sch.get_sblock("binary_conv2d")
    # a fused PokeConv's channel mean and average pool of a residual: computed by the epilogue's thread
    for name in (binary_conv.CHANNEL_MEAN, binary_conv.AVERAGE_POOL):
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(block).name_hint.startswith(name):
                sch.compute_inline(block)
    n, ho, wo, co, kh, kw, j = sch.get_loops(pop)
    pixels_total = int(sch.get(n).extent) * int(sch.get(ho).extent) * int(sch.get(wo).extent)
    channels = _largest_divisor(int(sch.get(co).extent), _MAX_CHANNELS)
    pixels = _largest_divisor(pixels_total, _MAX_PIXELS)
    pix_o, pix_i = sch.split(sch.fuse(n, ho, wo), [None, pixels])
    co_o, co_i = sch.split(co, [None, channels])
    sch.reorder(co_o, pix_o, pix_i, co_i, kh, kw, j)
    sch.bind(co_o, "blockIdx.y")
    sch.bind(pix_o, "blockIdx.x")
    sch.bind(pix_i, "threadIdx.y")
    sch.bind(co_i, "threadIdx.x")
    # The accumulator lives in a register; the epilogue runs in the same thread.
    sch.set_scope(pop, 0, "local")
    sch.reverse_compute_at(out, co_i)
    weights = sch.cache_read(pop, 1, "shared")
    sch.compute_at(weights, pix_o)
    fetch = sch.fuse(*sch.get_loops(weights)[2:])  # the copy's own loops, below (co_o, pix_o)
    _, ty, tx = sch.split(fetch, [None, pixels, channels])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.decompose_reduction(pop, kh)
    if has_block(sch, "bitpack"):
        block = sch.get_sblock("bitpack")
        n, h, w, c, b = sch.get_loops(block)
        _bind_spatial(sch, [n, h, w, c], 128)
        sch.decompose_reduction(block, b)
    return mark_scheduled(sch.mod["main"])


def schedule(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """Our binary conv schedule; any other kernel of ours as it is, for dlight (module docstring)."""
    if not _is_cuda(target):
        return None
    return schedule_binary_conv2d(func, target) or func


# -- building and loading ---------------------------------------------------------------------------
def find_nvcc() -> str | None:
    """nvcc on PATH, else $CUDA_HOME/bin/nvcc or /usr/local/cuda/bin/nvcc; None if absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _modules(module) -> list:
    """``module`` and every module it imports, depth first (VM -> llvm host -> cuda)."""
    return [module, *(m for imported in module.imports for m in _modules(imported))]


def inspect_cuda_source(executable) -> str:
    """The CUDA C that TVM generated for a compiled executable's kernels."""
    sources = [m.inspect_source("cuda") for m in _modules(executable.mod) if m.kind == "cuda"]
    if not sources:
        raise BnnccError("executable holds no CUDA module; was it compiled for a cuda target?")
    return "".join(sources)


def nvcc_fatbin(source: str, arch: str) -> bytes:
    """Compile CUDA C ``source`` with nvcc into a fatbin for ``arch`` (its SASS and PTX)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise BnnccError("nvcc not found; install a CUDA toolkit or put nvcc on PATH (`bnncc targets`)")
    with tempfile.TemporaryDirectory(prefix="bnncc-nvcc-") as tmp:
        cu, fatbin = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        cu.write_text(source, encoding="utf-8")
        start = time.perf_counter()
        done = subprocess.run([nvcc, "--fatbin", "-O3", f"-arch={arch}", "-o", str(fatbin), str(cu)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise BnnccError(f"nvcc failed on the generated kernels ({arch}):\n{done.stderr[-2000:]}")
        logger.info("nvcc compiled %d kernels for %s in %.1f s", source.count("__global__"), arch,
                    time.perf_counter() - start)
        return fatbin.read_bytes()


def export_cuda(executable, path: str | os.PathLike, arch: str = DEFAULT_ARCH) -> Path:
    """Write the library ``path`` (.so: VM bytecode, host code, weights, the kernels' CUDA C) and beside
    it ``<stem>.cu`` (that CUDA C) and ``<stem>.fatbin`` (nvcc's build of it for ``arch``), which
    ``load_vm`` hands to TVM's CUDA runtime instead of compiling the CUDA C when the library loads."""
    path = Path(path)
    source = inspect_cuda_source(executable)
    fatbin = nvcc_fatbin(source, arch)
    for suffix, data in ((".cu", source.encode()), (".fatbin", fatbin)):
        with atomic_path(path.with_suffix(suffix)) as tmp:
            tmp.write_bytes(data)
            tmp.chmod(0o644)  # mkstemp's 0600 would hide them from other users of the library
    with atomic_path(path, suffix=".so") as tmp:
        executable.export_library(str(tmp))
    return path


# CUDA C (by sha256) -> its nvcc fatbin, served to TVM's CUDA runtime by ``_compile_callback``
_PREBUILT: dict[str, bytes] = {}


def _compile_callback(code: str) -> bytes:
    """TVM's ``tvm_callback_cuda_compile``: a prebuilt fatbin for known CUDA C, else TVM's own compiler."""
    prebuilt = _PREBUILT.get(hashlib.sha256(code.encode()).hexdigest())
    if prebuilt is not None:
        return prebuilt
    from tvm.support import nvcc

    return nvcc.tvm_callback_cuda_compile(code)


def has_cuda_device() -> bool:
    """Whether TVM's CUDA runtime sees a device here."""
    from bnncc.targets.tvm_compat import tvm

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 (no CUDA runtime sidecar, no driver: no device)
        return False


def load_vm(path: str | os.PathLike):
    """A caller ``(function, NCHW array) -> array`` over the library at ``path`` on CUDA device 0,
    with the kernels from ``<stem>.fatbin`` (``export_cuda``)."""
    import tvm_ffi

    from bnncc.targets.tvm_compat import tvm

    path = Path(path)
    if not has_cuda_device():
        raise BnnccError(f"{path}: no CUDA device on this machine (`bnncc targets`)")
    source, fatbin = path.with_suffix(".cu"), path.with_suffix(".fatbin")
    if not (source.is_file() and fatbin.is_file()):
        raise BnnccError(f"{path}: no {source.name} / {fatbin.name} beside it; build it with `bnncc compile --target cuda`")
    _PREBUILT[hashlib.sha256(source.read_bytes()).hexdigest()] = fatbin.read_bytes()
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile_callback, override=True)
    from tvm import relax

    device = tvm.cuda(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), device)
    return lambda function, x: vm[function](tvm.runtime.tensor(x, device)).numpy()
