"""CUDA target: thread-bound GPU schedules for the binary conv, TVM's GPU schedules (dlight) for
the rest, and a library whose kernels nvcc compiles ahead of time.

Binary conv (plain or the fused PokeConv, ``bnncc.targets.lower``). One thread computes one
output (pixel p, channel c): acc = sum over (kh, kw, word) of popcount(x ^ w) (``__popc`` on
uint32), then the fused epilogue, then writes y. A thread block is ``pixels`` x ``channels``
threads (channels on threadIdx.x, so a warp reads consecutive weight words); it first copies its
channels' weight slice (k*k*words*channels uint32, <= 36 KiB for ResNet-50 0.5x-1x) into shared
memory, cooperatively, and every thread reads weights from there. The SAME zero border is read
in place (the pad stage is inlined). A trailing sign-and-bitpack stage is a second kernel with
one thread per output word, and so is its row sums' (the next SE gate's pooling, one thread per
row and channel).

With ``BNNCC_CUDA_MMA=1`` the binary conv's popcount stage runs on the 1-bit tensor cores instead
(``cuda_mma``, ``schedule_tensor_core_conv``), and the integer result and epilogue one thread per
output. Off by default until a GPU run of ``bench/gpu.sh`` has shown it exact.

Every other kernel of ours is returned unscheduled: the CUDA pipeline's dlight rules
(``ApplyDefaultSchedule``: reduction, GEMV, fallback) bind its loops to threads, as they do for
the layout transpose at the entry. Each Relax function's kernels are captured into a CUDA graph on
its first call and replayed after (``pass_config``; ``BNNCC_CUDA_GRAPHS=0`` leaves that out).

Build: one library. ``tvm.compile`` emits the kernels as CUDA C, and TVM 0.27's exported library
would keep that source and compile it when the library loads (a Python callback running NVRTC or
nvcc on the deploying machine). ``export_cuda`` instead compiles it with nvcc at build time and
puts the fatbin (SASS for the target arch, and its PTX) in the library in place of the source
(``cuda_blob.embed_fatbins``), so model.so alone holds everything and loads with TVM's runtime and
the CUDA driver (``cuda_runtime``: no TVM compiler, no NVRTC, no Python callback).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bnncc.errors import BnnccError, tool_said
from bnncc.fileio import atomic_path
from bnncc.targets.cuda_blob import embed_fatbins, imports_blob, write_imports_asm
from bnncc.targets.kernels import KERNEL_ATTR, binary_conv, bitpack
from bnncc.targets.tvm_compat import Target, has_block, link, make_target, mark_scheduled, s_tir, tirx

__all__ = [
    "ARCH_ENV", "DEFAULT_ARCH", "GRAPHS_ENV", "MMA_ENV", "cuda_arch", "cuda_graphs", "cuda_target", "export_cuda",
    "find_cuobjdump", "find_nvcc", "has_cuda_device", "inspect_cuda_source", "load_vm", "nvcc_fatbin", "pass_config",
    "report", "require_nvcc", "sass", "schedule", "schedule_binary_conv2d", "schedule_tensor_core_conv", "tensor_cores",
]

logger = logging.getLogger(__name__)

DEFAULT_ARCH = "sm_90"  # H100, H200
ARCH_ENV = "BNNCC_CUDA_ARCH"  # another arch for `bnncc compile --target cuda`, e.g. sm_80 (A100)
GRAPHS_ENV = "BNNCC_CUDA_GRAPHS"  # 0: no CUDA graphs (``pass_config``)
MMA_ENV = "BNNCC_CUDA_MMA"  # 1: binary convs on the tensor cores (``tensor_cores``)
# the largest batch a cuda library is built for: TVM fuses the groups of a batch's logits (lower.CONCAT_FAN_IN)
# back into one concat kernel, whose argument checks nest as deep as the batch in the CUDA host code; batch 1024
# builds, 1536 was still building after 6 minutes and 2048 ended in a segmentation fault (a library takes any
# batch, in calls of its compiled sizes)
MAX_BATCH = 1024
_MAX_PIXELS = 8  # threadIdx.y extent
_MAX_CHANNELS = 32  # threadIdx.x extent: one warp across output channels


def cuda_arch() -> str:
    """The arch to build for: $BNNCC_CUDA_ARCH, else DEFAULT_ARCH. Checked before any work: TVM
    failed on "90" in an unexpected ValueError, after the lowering."""
    arch = os.environ.get(ARCH_ENV) or DEFAULT_ARCH
    if not re.fullmatch(r"sm_[0-9]+[af]?", arch):
        raise BnnccError(f"{ARCH_ENV}={arch!r}: expected sm_ and a compute capability, e.g. sm_90 (H100) or "
                         f"sm_80 (A100)")
    return arch


def tensor_cores() -> bool:
    """Whether binary convs run on the 1-bit tensor cores (``cuda_mma``): only where $BNNCC_CUDA_MMA
    is 1, until a GPU run of bench/gpu.sh has shown the library exact with them (issue 17)."""
    return os.environ.get(MMA_ENV, "0") == "1"


def cuda_graphs() -> bool:
    """Whether libraries replay each function's kernels from a CUDA graph: yes unless $BNNCC_CUDA_GRAPHS is 0."""
    return os.environ.get(GRAPHS_ENV, "1") != "0"


def pass_config() -> dict:
    """TVM pass options of a CUDA build: Relax's RewriteCUDAGraph captures the kernels of each
    function into a CUDA graph on its first call and replays it after (issue 17: at batch 1 the
    network's ~260 kernel launches would otherwise cost more than the kernels)."""
    return {"relax.backend.use_cuda_graph": cuda_graphs()}


def report() -> dict:
    """What model.json records about a CUDA build."""
    return {"cuda": {"arch": cuda_arch(), "cuda_graphs": cuda_graphs(), "tensor_cores": tensor_cores(),
                     "device_code": "fatbin in model.so"}}


def cuda_target() -> Target:
    """CUDA for compute capability ``cuda_arch()``, host code for this machine's LLVM."""
    return make_target({"kind": "cuda", "arch": cuda_arch()}).with_host(make_target({"kind": "llvm"}))


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
    # a fused PokeConv's channel mean and average pool of a residual, and its gated parameters:
    # computed by the epilogue's thread
    for name in (binary_conv.CHANNEL_MEAN, binary_conv.AVERAGE_POOL, binary_conv.GATED_PARAMS):
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
    _schedule_trailing(sch)
    return mark_scheduled(sch.mod["main"])


def _schedule_trailing(sch: s_tir.Schedule) -> None:
    """The stages after a fused PokeConv's output: its sign-and-bitpack, one thread per output
    word, and its row sums (binary_conv.row_sums), one thread per row and channel."""
    for name in (bitpack.BITPACK_STAGE, binary_conv.ROW_SUM):
        if has_block(sch, name):
            block = sch.get_sblock(name)
            *spatial, reduction = sch.get_loops(block)
            _bind_spatial(sch, spatial, 128)
            sch.decompose_reduction(block, reduction)


def schedule_tensor_core_conv(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """The binary conv with its popcount stage on the tensor cores (``cuda_mma``), the rest (integer
    result, epilogue, residual pooling, sign-and-pack) one thread per output."""
    if not _is_cuda(target) or func.attrs.get(KERNEL_ATTR) != binary_conv.KERNEL_NAME:
        return None
    from bnncc.targets.cuda_mma import tensor_core_popcount

    rewritten = tensor_core_popcount(func)
    if rewritten is None:  # no popcount stage of binary_conv2d's to replace
        return None
    sch = s_tir.Schedule(rewritten)
    for name in (binary_conv.CHANNEL_MEAN, binary_conv.AVERAGE_POOL, binary_conv.GATED_PARAMS):
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(block).name_hint.startswith(name):
                sch.compute_inline(block)
    _bind_spatial(sch, sch.get_loops(sch.get_sblock("binary_conv2d")), 128)
    _schedule_trailing(sch)
    return mark_scheduled(sch.mod["main"])


def schedule(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """Our binary conv schedule (on the tensor cores where ``tensor_cores()``); any other kernel of
    ours as it is, for dlight (module docstring)."""
    if not _is_cuda(target):
        return None
    conv = schedule_tensor_core_conv if tensor_cores() else schedule_binary_conv2d
    return conv(func, target) or func


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


def _find_tool(name: str) -> str | None:
    """A CUDA tool from PATH, beside nvcc, or from its pip package (nvidia-cuda-<name>); None if absent."""
    found = shutil.which(name)
    nvcc = find_nvcc()
    if found is None and nvcc is not None and (Path(nvcc).parent / name).is_file():
        found = str(Path(nvcc).parent / name)
    if found is None:
        try:
            from cuda.pathfinder import find_nvidia_binary_utility
        except ImportError:
            return None
        found = find_nvidia_binary_utility(name)
    return found


def find_cuobjdump() -> tuple[str, str] | None:
    """(cuobjdump, nvdisasm), which ``cuobjdump -sass`` runs; None unless both are found (the test
    extras install them: nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm)."""
    tools = (_find_tool("cuobjdump"), _find_tool("nvdisasm"))
    return tools if all(tools) else None


def sass(code: bytes) -> str:
    """``cuobjdump -sass`` of a cubin or fatbin: the machine code of every kernel in it."""
    tools = find_cuobjdump()
    if tools is None:
        raise BnnccError("cuobjdump/nvdisasm not found; pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    cuobjdump, nvdisasm = tools
    with tempfile.TemporaryDirectory(prefix="bnncc-sass-") as tmp:
        path = Path(tmp) / "code.fatbin"
        path.write_bytes(code)
        env = {**os.environ, "PATH": os.pathsep.join([str(Path(nvdisasm).parent), os.environ.get("PATH", "")])}
        done = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise BnnccError(f"cuobjdump -sass failed: {tool_said(done.stderr, 500)}")
    return done.stdout


def _modules(module) -> list:
    """``module`` and every module it imports, depth first (VM -> llvm host -> cuda)."""
    return [module, *(m for imported in module.imports for m in _modules(imported))]


def inspect_cuda_source(executable) -> str:
    """The CUDA C that TVM generated for a compiled executable's kernels."""
    sources = [m.inspect_source("cuda") for m in _modules(executable.mod) if m.kind == "cuda"]
    if not sources:
        raise BnnccError("executable holds no CUDA module; was it compiled for a cuda target?")
    return "".join(sources)


def require_nvcc() -> str:
    """nvcc's path (``find_nvcc``); a BnnccError where there is none, or where it cannot build for
    ``cuda_arch()``: nvcc said so only at the end of the build (CUDA 13 has no sm_70, CUDA 11.7 no
    sm_90), after the minutes of lowering, and in convert after the fine-tune."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise BnnccError("nvcc not found; install a CUDA toolkit or put nvcc on PATH (`bnncc targets`)")
    arch = cuda_arch()
    listed = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True)
    codes = listed.stdout.split()
    # it lists the base archs (sm_90) and builds their variants too (sm_90a); a toolkit without the
    # option (before CUDA 11) is left to say it at the build
    if listed.returncode == 0 and arch.rstrip("af") not in codes:
        raise BnnccError(f"{nvcc} cannot build for {arch} ({ARCH_ENV}); it builds for {', '.join(codes)}: set "
                         f"{ARCH_ENV} to one of those, or use a CUDA toolkit that has {arch}")
    return nvcc


def nvcc_fatbin(source: str, arch: str) -> bytes:
    """Compile CUDA C ``source`` with nvcc into a fatbin for ``arch`` (its SASS and PTX)."""
    nvcc = require_nvcc()
    with tempfile.TemporaryDirectory(prefix="bnncc-nvcc-") as tmp:
        cu, fatbin = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        cu.write_text(source, encoding="utf-8")
        start = time.perf_counter()
        done = subprocess.run([nvcc, "--fatbin", "-O3", f"-arch={arch}", "-o", str(fatbin), str(cu)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise BnnccError(f"nvcc failed on the generated kernels ({arch}): {tool_said(done.stderr)}")
        logger.info("nvcc compiled %d kernels for %s in %.1f s", source.count("__global__"), arch,
                    time.perf_counter() - start)
        return fatbin.read_bytes()


def export_cuda(executable, path: str | os.PathLike) -> Path:
    """Write the library ``path``: VM bytecode, host code, weights and nvcc's fatbin of the kernels
    for ``cuda_arch()``, as ``cuda_target`` compiled them, all inside the one .so (module docstring)."""
    arch = cuda_arch()

    def pack_imports(module, is_system_lib, prefix, workspace):
        if is_system_lib:
            raise BnnccError("a CUDA library cannot be a system library")
        def compile_source(source: str) -> bytes:
            from bnncc.targets.cuda_mma import with_device_code

            return nvcc_fatbin(with_device_code(source), arch)

        return str(write_imports_asm(embed_fatbins(imports_blob(module), compile_source), Path(workspace)))

    path = Path(path)
    with atomic_path(path, suffix=".so") as tmp:
        link(executable, tmp, fpack_imports=pack_imports)
    return path


# -- loading ----------------------------------------------------------------------------------------
def has_cuda_device() -> bool:
    """Whether a CUDA device is visible to TVM's runtime here."""
    from bnncc.targets.cuda_runtime import cuda_device_exists

    return cuda_device_exists()


def load_vm(path: str | os.PathLike, sha256: str | None = None):
    """A caller ``(function, NCHW array) -> array`` over the library at ``path`` (SHA-256 ``sha256``
    where given) on CUDA device 0, with TVM's runtime alone (``cuda_runtime``)."""
    from bnncc.targets.cuda_runtime import CudaVM

    return CudaVM(path, sha256=sha256)
