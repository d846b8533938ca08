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

Build: one library. ``tvm.compile`` emits the kernels as CUDA C, and TVM 0.27's exported library
would keep that source and compile it when the library loads (a Python callback running NVRTC or
nvcc on the deploying machine). ``export_cuda`` instead compiles it with nvcc at build time and
puts the fatbin (SASS for the target arch, and its PTX) in the library in place of the source
(``embed_fatbins``), so model.so alone holds everything and loads with TVM's runtime and the CUDA
driver (``cuda_runtime``: no TVM compiler, no NVRTC, no Python callback).
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from bnncc.errors import BnnccError
from bnncc.fileio import atomic_path
from bnncc.targets.kernels import KERNEL_ATTR, binary_conv
from bnncc.targets.tvm_compat import Target, has_block, make_target, mark_scheduled, s_tir, tirx

__all__ = [
    "ARCH_ENV", "BLOB_SYMBOL", "CudaModule", "DEFAULT_ARCH", "GRAPHS_ENV", "MMA_ENV", "blob_modules", "cuda_arch", "cuda_graphs",
    "cuda_module_parts", "cuda_target", "embed_fatbins", "export_cuda", "find_cuobjdump", "find_nvcc", "has_cuda_device",
    "imports_blob", "inspect_cuda_source", "library_modules", "load_vm", "nvcc_fatbin", "pass_config", "report", "sass",
    "schedule", "schedule_binary_conv2d", "write_imports_asm",
]

logger = logging.getLogger(__name__)

DEFAULT_ARCH = "sm_90"  # H100, H200
ARCH_ENV = "BNNCC_CUDA_ARCH"  # another arch for `bnncc compile --target cuda`, e.g. sm_80 (A100)
GRAPHS_ENV = "BNNCC_CUDA_GRAPHS"  # 0: no CUDA graphs (``pass_config``)
MMA_ENV = "BNNCC_CUDA_MMA"  # 1: binary convs on the tensor cores (``tensor_cores``)
_MAX_PIXELS = 8  # threadIdx.y extent
_MAX_CHANNELS = 32  # threadIdx.x extent: one warp across output channels


def cuda_arch() -> str:
    """The arch to build for: $BNNCC_CUDA_ARCH, else DEFAULT_ARCH."""
    return os.environ.get(ARCH_ENV) or DEFAULT_ARCH


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


def cuda_target(arch: str | None = None) -> Target:
    """CUDA for compute capability ``arch`` (default ``cuda_arch()``), host code for this machine's LLVM."""
    return make_target({"kind": "cuda", "arch": arch or cuda_arch()}).with_host(make_target({"kind": "llvm"}))


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
    _schedule_bitpack(sch)
    return mark_scheduled(sch.mod["main"])


def _schedule_bitpack(sch: s_tir.Schedule) -> None:
    """A trailing sign-and-bitpack stage: one thread per output word."""
    if has_block(sch, "bitpack"):
        block = sch.get_sblock("bitpack")
        n, h, w, c, b = sch.get_loops(block)
        _bind_spatial(sch, [n, h, w, c], 128)
        sch.decompose_reduction(block, b)


def schedule_tensor_core_conv(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """The binary conv with its popcount stage on the tensor cores (``cuda_mma``), the rest (integer
    result, epilogue, residual pooling, sign-and-pack) one thread per output."""
    if not _is_cuda(target) or func.attrs.get(KERNEL_ATTR) != binary_conv.KERNEL_NAME:
        return None
    from bnncc.targets.cuda_mma import tensor_core_popcount

    sch = s_tir.Schedule(tensor_core_popcount(func))
    for name in (binary_conv.CHANNEL_MEAN, binary_conv.AVERAGE_POOL):
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(block).name_hint.startswith(name):
                sch.compute_inline(block)
    _bind_spatial(sch, sch.get_loops(sch.get_sblock("binary_conv2d")), 128)
    _schedule_bitpack(sch)
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
        raise BnnccError(f"cuobjdump -sass failed: {done.stderr.strip()[-500:]}")
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


def export_cuda(executable, path: str | os.PathLike, arch: str | None = None) -> Path:
    """Write the library ``path``: VM bytecode, host code, weights and nvcc's fatbin of the kernels
    for ``arch`` (default ``cuda_arch()``), all inside the one .so (module docstring)."""
    arch = arch or cuda_arch()

    def pack_imports(module, is_system_lib, prefix, workspace):
        if is_system_lib:
            raise BnnccError("a CUDA library cannot be a system library")
        def compile_source(source: str) -> bytes:
            from bnncc.targets.cuda_mma import with_device_code

            return nvcc_fatbin(with_device_code(source), arch)

        return str(write_imports_asm(embed_fatbins(imports_blob(module), compile_source), Path(workspace)))

    path = Path(path)
    with atomic_path(path, suffix=".so") as tmp:
        executable.export_library(str(tmp), fpack_imports=pack_imports)
    return path


# -- the imports blob -------------------------------------------------------------------------------
# An exported library carries its imported modules (the VM executable with the weights, the CUDA
# module) as one blob under the symbol BLOB_SYMBOL: u64 size, the import tree (two u64 vectors),
# then per module its kind (string) and, except for "_lib" (the .so itself), its bytes (string);
# strings and vectors are u64-length-prefixed, little-endian. A CUDA module's bytes are its
# format (string), its function table and its code (string). TVM 0.27 writes format "cuda" and
# CUDA C, which its runtime can only load through a compiler callback; ``embed_fatbins`` puts
# nvcc's fatbin there instead, with format "fatbin", which the runtime hands to the driver.
BLOB_SYMBOL = "__tvm_ffi__library_bin"


def imports_blob(module) -> bytes:
    """The imports blob that ``export_library`` would link into the library of ``module``."""
    import tvm_ffi

    return tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy().tobytes()


def _u64(buf: bytes, pos: int) -> tuple[int, int]:
    return struct.unpack_from("<Q", buf, pos)[0], pos + 8


def _string(buf: bytes, pos: int) -> tuple[bytes, int]:
    size, pos = _u64(buf, pos)
    return buf[pos:pos + size], pos + size


def _pack(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def blob_modules(blob: bytes) -> list[tuple[str, bytes]]:
    """(kind, bytes) of every module in an imports blob, in order ("_lib" entries with no bytes)."""
    size, _ = _u64(blob, 0)
    if size != len(blob) - 8:
        raise BnnccError(f"imports blob of {len(blob)} bytes says {size} + 8: not TVM 0.27's format")
    pos = _tree_end(blob)
    modules = []
    while pos < len(blob):
        kind, pos = _string(blob, pos)
        data = b""
        if kind != b"_lib":
            data, pos = _string(blob, pos)
        modules.append((kind.decode(), data))
    return modules


def _tree_end(blob: bytes) -> int:
    """Where the module entries start: after the size and the import tree's two u64 vectors."""
    pos = 8
    for _ in range(2):
        count, pos = _u64(blob, pos)
        pos += 8 * count
    return pos


class CudaModule(NamedTuple):
    """A CUDA module as stored in the blob."""

    fmt: str  # "cuda" (CUDA C) or "fatbin"
    table: bytes  # the function table, as stored
    kernels: list[str]  # the kernel names in the table
    code: bytes


def cuda_module_parts(data: bytes) -> CudaModule:
    """A CUDA module's format, function table (and its kernel names) and code."""
    fmt, pos = _string(data, 0)
    table_start, kernels = pos, []
    functions, pos = _u64(data, pos)
    for _ in range(functions):
        _, pos = _string(data, pos)  # key
        name, pos = _string(data, pos)
        kernels.append(name.decode())
        count, pos = _u64(data, pos)  # argument types, 4 bytes each
        pos += 4 * count
        count, pos = _u64(data, pos)  # launch parameter tags
        for _ in range(count):
            _, pos = _string(data, pos)
        count, pos = _u64(data, pos)  # argument extra tags, int32 each
        pos += 4 * count
    table = data[table_start:pos]
    code, pos = _string(data, pos)
    if pos != len(data):
        raise BnnccError(f"CUDA module of {len(data)} bytes: {len(data) - pos} left after its code; not TVM 0.27's format")
    return CudaModule(fmt.decode(), table, kernels, code)


def embed_fatbins(blob: bytes, compile_source) -> bytes:
    """``blob`` with each CUDA module's CUDA C replaced by ``compile_source(source)``, a fatbin."""
    out = bytearray(blob[8:_tree_end(blob)])
    for kind, data in blob_modules(blob):
        out += _pack(kind.encode())
        if kind == "_lib":
            continue
        if kind == "cuda":
            module = cuda_module_parts(data)
            if module.fmt == "cuda":
                data = _pack(b"fatbin") + module.table + _pack(compile_source(module.code.decode()))
        out += _pack(data)
    return _pack(bytes(out))


def write_imports_asm(blob: bytes, folder: Path) -> Path:
    """An assembler file defining BLOB_SYMBOL as ``blob`` (``.incbin``: a C array of a 10-100 MB
    blob takes the C compiler minutes)."""
    data, asm = folder / "bnncc_imports.bin", folder / "bnncc_imports.S"
    data.write_bytes(blob)
    asm.write_text(f""".section .rodata
.globl {BLOB_SYMBOL}
.type {BLOB_SYMBOL}, @object
.balign 16
{BLOB_SYMBOL}:
.incbin "{data}"
.size {BLOB_SYMBOL}, {len(blob)}
.section .note.GNU-stack,"",@progbits
""", encoding="utf-8")
    return asm


def library_modules(path: str | os.PathLike) -> list[tuple[str, bytes]]:
    """(kind, bytes) of the modules packed in the library ``path`` (read from the file, nothing loaded)."""
    import ctypes

    import tvm_ffi  # noqa: F401  (libtvm_ffi.so, which the library links against)

    library = ctypes.CDLL(str(path))
    start = ctypes.addressof(ctypes.c_char.in_dll(library, BLOB_SYMBOL))
    size = struct.unpack("<Q", ctypes.string_at(start, 8))[0]
    return blob_modules(ctypes.string_at(start, size + 8))


# -- loading ----------------------------------------------------------------------------------------
def has_cuda_device() -> bool:
    """Whether a CUDA device is visible to TVM's runtime here."""
    from bnncc.targets.cuda_runtime import cuda_device_exists

    return cuda_device_exists()


def load_vm(path: str | os.PathLike):
    """A caller ``(function, NCHW array) -> array`` over the library at ``path`` on CUDA device 0,
    with TVM's runtime alone (``cuda_runtime``)."""
    from bnncc.targets.cuda_runtime import CudaVM

    return CudaVM(path)
