"""The blob of imported modules inside an exported TVM library, and putting compiled device code in it.

An exported library carries its imported modules (the VM executable with the weights, the CUDA
module) as one blob under the symbol BLOB_SYMBOL: u64 size, the import tree (two u64 vectors),
then per module its kind (string) and, except for "_lib" (the .so itself), its bytes (string);
strings and vectors are u64-length-prefixed, little-endian. A CUDA module's bytes are its
format (string), its function table and its code (string). TVM 0.27 writes format "cuda" and
CUDA C, which its runtime can only load through a compiler callback; ``embed_fatbins`` puts
nvcc's fatbin there instead, with format "fatbin", which the runtime hands to the driver.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import NamedTuple

from bnncc.errors import BnnccError

__all__ = ["BLOB_SYMBOL", "CudaModule", "blob_modules", "cuda_module_parts", "embed_fatbins", "imports_blob",
           "library_modules", "write_imports_asm"]

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
        raise BnnccError(f"CUDA module of {len(data)} bytes: {len(data) - pos} left after its code; not TVM 0.27's "
                         f"format")
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
