"""AArch64 (NEON) target: the target, its vectors for the CPU schedules, cross-linking, and
instruction counts read from the generated assembly.

NEON has 32 128-bit vector registers: 4 uint32 (or float32) lanes per vector. The kernels are
scheduled by ``cpu_schedule`` with 4 lanes (``NEON``); the binary conv's register tile is one
output pixel x 64 channels where the layer allows (16 accumulator vectors; the other 16 registers
hold the weight vectors streamed through each step and the broadcast activation word), counting
in byte lanes. Each step of its inner loop is

    ld1r   v.4s          one activation word, broadcast (a load that also takes a vector pipe)
    ldp    q, q          the weight words of 8 channels, 8 times
    eor    v.16b         16 times: the word xor 4 weight words
    cnt    v.16b         16 times: bit count of each byte
    add    v.4s          16 times: into the byte counters (4 per uint32 lane; no carries within a chunk)

so 3 vector instructions per 128 bits plus one broadcast per 16 of them; with 8 channels (the
tile before, 7 pixels x 8 channels) the broadcast came once per 2 (bench/RESULTS.md). The byte
counters are widened to the int32 sums once per chunk of up to 31 steps
(``cpu_schedule._byte_counts``): ``uaddlp`` bytes -> halfwords and ``uadalp`` halfwords into the
words, two instructions per counter, where LLVM's own lowering of a 32-bit-lane popcount does
the same after every ``cnt`` (still found in kernels whose channel tile is not a whole number of
vectors). ``count_instructions`` counts these in a function's assembly: the per-layer figure
that stands in for timing under qemu.

Libraries are compiled by TVM's LLVM for ``aarch64-linux-gnu`` and linked by Debian's
``aarch64-linux-gnu-g++`` (package g++-aarch64-linux-gnu).
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from pathlib import Path

from bnncc.errors import BnnccError
from bnncc.fileio import atomic_path
from bnncc.targets import cpu_schedule
from bnncc.targets.cpu_schedule import VectorUnit
from bnncc.targets.kernels import binary_conv
from bnncc.targets.lower import POKE_CONV_KERNEL
from bnncc.targets.tvm_compat import NUM_THREADS, Target, cross_compiler, link, make_target, tirx

__all__ = [
    "CROSS_CXX", "CROSS_INSTALL", "NEON", "arm64_target", "assembly", "binary_kernel_counts", "binary_layer_counts",
    "count_instructions", "export_arm64", "is_arm64", "kernel_assembly", "require_cross_compiler", "schedule",
]

CROSS_CXX = "aarch64-linux-gnu-g++"
CROSS_INSTALL = "apt-get install g++-aarch64-linux-gnu"  # the cross compiler and the aarch64 sysroot
# 4 32-bit lanes of a 128-bit NEON register; up to 16 accumulators and 16 vectors of channels (one
# pixel x 64 channels), the rest of the 32 registers for the weights in flight and the broadcast
# word; byte-lane counts widened by uaddlp/uadalp
NEON = VectorUnit(lanes=4, accumulators=16, channel_vectors=16, byte_counts=True, one_step_loop=True,
                  pairwise_add="llvm.aarch64.neon.uaddlp")


def arm64_target(*, dotprod: bool = False, cores: int | None = None) -> Target:
    """LLVM for aarch64 Linux with NEON; ``dotprod`` adds the ARMv8.2 SDOT/UDOT instructions.

    ``cores`` is the thread count the library's parallel loops are split for (default: TVM's).
    """
    mattr = ["+neon", "+dotprod"] if dotprod else ["+neon"]
    return make_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr,
                        "num-cores": cores or NUM_THREADS})


def is_arm64(target: Target) -> bool:
    """Whether ``target`` is an LLVM aarch64 target."""
    return target.kind.name == "llvm" and str(target.attrs.get("mtriple", "")).startswith("aarch64")


def schedule(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """``func`` scheduled for NEON (``cpu_schedule``), or None when ``func`` is no kernel of ours or
    ``target`` not aarch64 (``lower(..., schedule=)``)."""
    return cpu_schedule.schedule(func, target, NEON if is_arm64(target) else None)


# -- libraries ------------------------------------------------------------------------------------
def require_cross_compiler() -> None:
    """A BnnccError unless the cross compiler that links the library is on PATH."""
    if shutil.which(CROSS_CXX) is None:
        raise BnnccError(f"{CROSS_CXX} not found; install it: {CROSS_INSTALL}")


def export_arm64(executable, path: str | os.PathLike) -> Path:
    """Link a compiled executable (Relax or PrimFunc) into an aarch64 shared library at ``path``, atomically."""
    require_cross_compiler()
    compiler = cross_compiler(CROSS_CXX)
    with atomic_path(path, suffix=".so") as tmp:
        link(executable, tmp, fcompile=compiler)
    return Path(path)


def assembly(executable) -> str:
    """The aarch64 assembly LLVM generates for a compiled executable's kernels (a Relax VM
    executable holds them in an imported llvm module, a PrimFunc build is that module)."""
    modules = [executable.mod, *executable.mod.imports]
    return "".join(m.inspect_source("asm") for m in modules if m.kind == "llvm")


# -- instruction counts ---------------------------------------------------------------------------
_POPCOUNT_OPS = ("cnt", "uaddlp", "uadalp", "addp", "eor", "udot", "sdot")
_INSTRUCTION = re.compile(r"^\s+([a-z][a-z0-9.]*)\s", re.MULTILINE)


_FUNCTION = re.compile(r"^\t\.type\t([^,]+),@function\n(.*?)^\t\.size\t\1,", re.MULTILINE | re.DOTALL)
_LAMBDA = ".L__tvm_parallel_lambda"


def kernel_assembly(asm_text: str, name: str) -> str:
    """The assembly of PrimFunc ``name``: its packed wrapper ``__tvm_ffi_<name>``, its body
    ``<name>_compute_`` and the parallel-loop bodies LLVM outlines right after them
    (``.L__tvm_parallel_lambda*``, which hold the loops when the kernel is parallel)."""
    own = {f"__tvm_ffi_{name}", f"{name}_compute_", name}
    parts, owner = [], None
    for symbol, body in _FUNCTION.findall(asm_text):
        if not symbol.startswith(_LAMBDA):
            owner = symbol
        if owner in own:
            parts.append(body)
    if not parts:
        raise BnnccError(f"assembly: no function {name!r}")
    return "".join(parts)


def count_instructions(asm_text: str) -> dict[str, int]:
    """Static counts of the instructions in ``asm_text`` (GNU syntax, one per line; directives,
    labels and comments skipped): ``total`` plus each of cnt, uaddlp, uadalp, addp, eor, udot,
    sdot (the popcount pattern and dot products), 0 when absent."""
    mnemonics = Counter(m.split(".")[0] for m in _INSTRUCTION.findall(asm_text))
    counts = {op: mnemonics.get(op, 0) for op in _POPCOUNT_OPS}
    counts["total"] = sum(mnemonics.values())
    return counts


_BINARY_KERNELS = (POKE_CONV_KERNEL, binary_conv.KERNEL_NAME)  # symbol prefixes of binary conv kernels


def binary_kernel_counts(executable) -> dict[str, dict[str, int]]:
    """``count_instructions`` of every binary conv kernel in a compiled executable, by symbol."""
    asm = assembly(executable)
    symbols = sorted({s[len("__tvm_ffi_"):] for s, _ in _FUNCTION.findall(asm) if s.startswith("__tvm_ffi_")})
    return {name: count_instructions(kernel_assembly(asm, name))
            for name in symbols if name.startswith(_BINARY_KERNELS)}


def binary_layer_counts(executable, module, function: str, layers: list[str]) -> dict[str, dict]:
    """Instruction counts per binary layer: ``layers`` (the PokeConv node names, in graph order)
    matched in order with the binary conv kernels that Relax function ``function`` of ``module``
    calls (the lowering emits one call per PokeConv, in graph order; layers of one shape share
    a kernel). Each entry: ``{"kernel": symbol, **count_instructions}``."""
    kernels = binary_kernel_counts(executable)
    calls = [binding.value.args[0].name_hint
             for block in module[function].body.blocks for binding in block.bindings
             if getattr(getattr(binding.value, "op", None), "name", "") in ("relax.call_tir", "relax.call_tir_inplace")
             and binding.value.args[0].name_hint in kernels]
    if len(calls) != len(layers):
        raise BnnccError(f"{function}: {len(calls)} binary conv calls for {len(layers)} PokeConv layers")
    return {layer: {"kernel": kernel, **kernels[kernel]} for layer, kernel in zip(layers, calls)}
