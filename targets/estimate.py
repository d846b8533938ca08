"""Cycle estimates of a built library's kernels without the hardware: each kernel's hot loop,
taken from the library's disassembly, through ``llvm-mca`` for a chosen core model, times the
loop's trip count.

The trip count comes from the layer's shape and the loop's own work, not from the schedule's
tiling, so it holds for whatever kernels the library has:

- a binary conv's hot loop is its innermost loop that popcounts the most bits per iteration
  (``cnt vN.16b``: 128 bits; ``vpopcntd``/``vpopcntq``: the register's width); the kernel
  popcounts N*Ho*Wo*Cout*kh*kw*words*32 bits (words = ceil(Cin/32): the packed, zero-padded
  input), so the loop runs that many bits / bits per iteration times;
- another kernel's hot loop is its innermost loop with the most multiply-accumulate lanes per
  iteration (``fmla``, ``mla``, ``vfmadd``..., dot products at 4 per lane); it runs the layer's
  MACs / MAC lanes per iteration times.

What stays outside the hot loops (a kernel's prologue, the per-tile epilogue, bitpacking,
padding copies, pooling, the VM's calls) is not counted. bench/arm64.py calibrates the method
against whole x86-64 kernels measured on the host (``znver4``) and carries the spread as the
error bar.

The code is read from the library file (``llvm-objdump``), not from TVM's assembly text
(``arm64.kernel_assembly``), so a built library folder is estimated without its TVM executable
(report.md of ``bnncc convert``). Tools: Debian's ``llvm-19`` (``llvm-objdump`` disassembles an
aarch64 or x86-64 library on any host; ``llvm-mca`` has the Cortex-A76, Neoverse-N1, Cortex-A72
and Zen 4 models).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from bnncc.errors import BnnccError
from bnncc.targets.kernels import binary_conv, quant
from bnncc.targets.lower import POKE_CONV_KERNEL

__all__ = [
    "KERNEL_LAYERS", "LLVM_BIN", "Instruction", "LayerEstimate", "LoopEstimate", "available", "binary_bits",
    "cycles_per_iteration", "disassemble", "estimate_binary", "estimate_layers", "estimate_macs", "innermost_loops",
    "kernel_code", "layer_kind", "library_estimate", "mac_lanes", "match_calls", "node_of", "trip_count",
]

LLVM_BIN = Path("/usr/lib/llvm-19/bin")
_ITERATIONS = 200  # llvm-mca's simulated iterations: enough for the steady state of a loop body


def available() -> bool:
    """Whether llvm-objdump and llvm-mca of LLVM 19 are installed (apt-get install llvm-19)."""
    return all(shutil.which(tool, path=str(LLVM_BIN)) for tool in ("llvm-objdump", "llvm-mca"))


@dataclass(frozen=True)
class Instruction:
    address: int
    mnemonic: str
    operands: str

    @property
    def target(self) -> int | None:
        """The address a branch goes to (llvm-objdump prints ``0x... <symbol+off>``), else None."""
        match = _TARGET.search(self.operands)
        return int(match.group(1), 16) if match and _is_branch(self.mnemonic) else None

    def text(self) -> str:
        """The instruction as llvm-mca reads it: branch targets become the label ``.Lloop``."""
        return f"{self.mnemonic}\t{_TARGET.sub('.Lloop', self.operands)}".rstrip()


_TARGET = re.compile(r"0x([0-9a-f]+) <[^>]*>")
_SYMBOL = re.compile(r"^([0-9a-f]+) <(.+)>:$")
_LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")


# comments llvm-objdump appends: aarch64 "// =0x..", x86 "# 0x... <symbol>" (aarch64's "#" is an immediate)
_COMMENT = re.compile(r"\s*//.*$|\s+#\s.*$")


def _is_branch(mnemonic: str) -> bool:
    """aarch64 b, b.cond, cbz/cbnz, tbz/tbnz; x86 jmp, jcc."""
    return mnemonic == "b" or mnemonic.startswith(("b.", "cb", "tb", "j"))


def disassemble(library: str | Path) -> dict[str, list[Instruction]]:
    """The instructions of every symbol of a shared library, by symbol (``llvm-objdump -d``).

    Code that has no symbol of its own (TVM's parallel-loop bodies are local ``.L`` labels)
    belongs to the symbol before it, as in the assembly ``arm64.kernel_assembly`` reads.
    """
    if not available():
        raise BnnccError(f"{LLVM_BIN}/llvm-objdump or llvm-mca not found; install them: apt-get install llvm-19")
    done = subprocess.run([str(LLVM_BIN / "llvm-objdump"), "-d", "--no-show-raw-insn", str(library)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise BnnccError(f"{library}: llvm-objdump failed: {done.stderr.strip().splitlines()[-1:]}")
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] = []
    for line in done.stdout.splitlines():
        if symbol := _SYMBOL.match(line):
            current = functions.setdefault(symbol.group(2), [])
        elif (instruction := _LINE.match(line)) and not instruction.group(2).startswith("<"):
            address, mnemonic, operands = instruction.groups()
            current.append(Instruction(int(address, 16), mnemonic, _COMMENT.sub("", operands).strip()))
    return functions


def kernel_code(functions: dict[str, list[Instruction]], name: str) -> list[Instruction]:
    """Kernel ``name``'s instructions: its packed wrapper ``__tvm_ffi_<name>`` and its body
    ``<name>_compute_`` (each with the parallel-loop bodies that follow it), in address order."""
    parts = [functions[s] for s in (f"__tvm_ffi_{name}", f"{name}_compute_", name) if s in functions]
    if not parts:
        raise BnnccError(f"library: no kernel {name!r}")
    return sorted((i for part in parts for i in part), key=lambda i: i.address)


def innermost_loops(code: list[Instruction]) -> list[list[Instruction]]:
    """The loops that hold no other loop: each runs from a backward branch's target to the branch."""
    index = {instruction.address: k for k, instruction in enumerate(code)}
    loops = [(index[i.target], k) for k, i in enumerate(code)
             if i.target is not None and i.target <= i.address and i.target in index]
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [code[a:b + 1] for a, b in sorted(set(inner))]


# -- work per iteration ------------------------------------------------------------------------------
_X86_BITS = {"zmm": 512, "ymm": 256, "xmm": 128}


def binary_bits(loop: list[Instruction]) -> int:
    """Bits popcounted by one pass through ``loop``: aarch64 ``cnt`` of 16 or 8 bytes, x86
    ``vpopcntd``/``vpopcntq`` of its destination register's width."""
    bits = 0
    for i in loop:
        if i.mnemonic == "cnt":
            bits += 128 if ".16b" in i.operands else 64
        elif i.mnemonic in ("vpopcntd", "vpopcntq"):
            bits += next((b for reg, b in _X86_BITS.items() if reg in i.operands.split(",")[-1]), 0)
    return bits


# multiply-accumulate lanes of one instruction: aarch64 by arrangement, x86 by register width
_ARM_LANES = {".4s": 4, ".2d": 2, ".8h": 8, ".4h": 4, ".2s": 2, ".16b": 16, ".8b": 8}
_ARM_MACS = ("fmla", "mla", "smlal", "smlal2", "umlal", "umlal2", "sdot", "udot")
_X86_MACS = ("vfmadd", "vfnmadd", "vpdpbusd", "vpdpwssd", "vpmaddwd")


def mac_lanes(loop: list[Instruction]) -> int:
    """Multiply-accumulates of one pass through ``loop`` (a dot product: 4 per 32-bit lane,
    ``vpmaddwd``: 2 per 32-bit lane, the destination arrangement or register giving the lanes)."""
    macs = 0
    for i in loop:
        if i.mnemonic in _ARM_MACS:
            lanes = next((n for arr, n in _ARM_LANES.items() if i.operands.split(",")[0].endswith(arr)), 1)
            macs += lanes * (4 if i.mnemonic.endswith("dot") else 1)
        elif i.mnemonic.startswith(_X86_MACS):
            destination = i.operands.split(",")[-1]
            width = next((b for reg, b in _X86_BITS.items() if reg in destination), 0)
            per_lane = {"vpdpbusd": 4, "vpdpwssd": 2, "vpmaddwd": 2}.get(i.mnemonic, 1)
            double = i.mnemonic.endswith("pd") and i.mnemonic.startswith("vf")
            macs += width // (64 if double else 32) * per_lane if width else 1
    return macs


# -- llvm-mca -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _mca(body: str, triple: str, mcpu: str) -> float:
    done = subprocess.run([str(LLVM_BIN / "llvm-mca"), f"-mtriple={triple}", f"-mcpu={mcpu}",
                           f"-iterations={_ITERATIONS}", "-summary-view", "-instruction-info=false"],
                          input=body, capture_output=True, text=True)
    match = re.search(r"^Total Cycles:\s+(\d+)", done.stdout, re.MULTILINE)
    if done.returncode != 0 or not match:
        raise BnnccError(f"llvm-mca -mcpu={mcpu} failed: {(done.stderr.strip().splitlines() or ['?'])[0]}")
    return int(match.group(1)) / _ITERATIONS


def cycles_per_iteration(loop: list[Instruction], triple: str, mcpu: str) -> float:
    """Steady-state cycles of one iteration of ``loop`` on core ``mcpu`` (llvm-mca, ``_ITERATIONS``
    back-to-back iterations; the branch back is one of the loop's instructions)."""
    body = ".Lloop:\n" + "\n".join(i.text() for i in loop) + "\n"
    return _mca(body, triple, mcpu)


@dataclass(frozen=True)
class LoopEstimate:
    """A kernel's hot loop on one core model: work per iteration, trip count and cycles."""

    work_per_iteration: int  # bits popcounted (binary) or MACs (others) per iteration
    iterations: int
    cycles_per_iteration: float
    instructions: int  # in the loop body

    @property
    def cycles(self) -> float:
        return self.iterations * self.cycles_per_iteration


def trip_count(work: int, per_iteration: int) -> int:
    """Iterations of a loop that does ``per_iteration`` of the kernel's ``work`` per pass; the
    work must divide (else the loop is not the kernel's whole hot loop)."""
    if per_iteration <= 0 or work % per_iteration:
        raise BnnccError(f"hot loop: {per_iteration} per iteration does not divide the kernel's {work}")
    return work // per_iteration


def _hot_loop(code: list[Instruction], work, total: int, triple: str, mcpu: str, ceil: bool) -> LoopEstimate:
    """The innermost loop of ``code`` that does the most ``work`` per pass. LLVM may emit one loop
    in several versions (a peeled or a task-range copy): loops that tie share the trip count,
    at the mean of their cycles per iteration."""
    loops = [(work(loop), loop) for loop in innermost_loops(code)]
    best = max((w for w, _ in loops), default=0)
    if best == 0:
        raise BnnccError("kernel: no innermost loop does its work (popcount or multiply-accumulate)")
    tied = [loop for w, loop in loops if w == best]
    cycles = sum(cycles_per_iteration(loop, triple, mcpu) for loop in tied) / len(tied)
    iterations = -(-total // best) if ceil else trip_count(total, best)
    return LoopEstimate(best, iterations, cycles, len(tied[0]))


def estimate_binary(code: list[Instruction], bits: int, triple: str, mcpu: str) -> LoopEstimate:
    """The hot loop of a binary conv kernel that popcounts ``bits`` bits in all (``binary_bits``)."""
    return _hot_loop(code, binary_bits, bits, triple, mcpu, ceil=False)


def estimate_macs(code: list[Instruction], macs: int, triple: str, mcpu: str) -> LoopEstimate:
    """The hot loop of a kernel that does ``macs`` multiply-accumulates (``mac_lanes``); a loop
    whose MACs per pass do not divide ``macs`` counts ceil(macs / per pass) iterations."""
    return _hot_loop(code, mac_lanes, macs, triple, mcpu, ceil=True)


# -- layers ---------------------------------------------------------------------------------------------
# the kind of layer (bnncc.cost's op_type) each kernel family computes, by symbol prefix
KERNEL_LAYERS = {POKE_CONV_KERNEL: "BinaryConv", binary_conv.KERNEL_NAME: "BinaryConv",
                 quant.CONV_KERNEL_NAME: "QuantConv", quant.SE_GATE_KERNEL_NAME: "SEGate",
                 quant.HEAD_KERNEL_NAME: "QuantGemm"}


def layer_kind(kernel: str) -> str | None:
    """The cost layer type kernel symbol ``kernel`` computes (None: a kernel without MACs)."""
    return next((kind for prefix, kind in KERNEL_LAYERS.items() if kernel.startswith(prefix)), None)


def match_calls(calls: list[str], layers: list) -> list[tuple[object, str]]:
    """(cost layer, kernel) pairs: the k-th call of a kind's kernel computes the k-th layer of that
    kind (the lowering emits the calls in graph order; layers of one shape share a kernel)."""
    pairs, queues = [], {}
    for layer in layers:
        queues.setdefault(layer.op_type, []).append(layer)
    for kernel in calls:
        kind = layer_kind(kernel)
        if kind is not None and queues.get(kind):
            pairs.append((queues[kind].pop(0), kernel))
    left = {kind: len(q) for kind, q in queues.items() if q and kind in KERNEL_LAYERS.values()}
    if left:
        raise BnnccError(f"layers without a kernel call: {left}")
    return pairs


def node_of(layer_name: str) -> str:
    """The node of a binary conv cost layer: a PokeConv's is called ``<node>/binary``, a BinaryConv's ``<node>``."""
    return layer_name.removesuffix("/binary")


@dataclass(frozen=True)
class LayerEstimate:
    layer: str
    op_type: str
    kernel: str
    macs: int  # the layer's MACs (binary MACs for a binary conv)
    loop: LoopEstimate

    @property
    def cycles(self) -> float:
        return self.loop.cycles

    @property
    def macs_per_cycle(self) -> float:
        return self.macs / self.cycles


def estimate_layers(functions: dict[str, list[Instruction]], model, pairs: list[tuple[object, str]],
                    triple: str, mcpu: str) -> list[LayerEstimate]:
    """Every (cost layer, kernel) pair's hot-loop estimate on ``mcpu``: binary convs by bits
    popcounted (the input channels from the conv's weight, input 1 of its node), others by MACs."""
    weights = {node.name: node.inputs[1].shape for node in model.graph if len(node.inputs) > 1}
    rows = []
    for layer, kernel in pairs:
        code = kernel_code(functions, kernel)
        if layer.op_type == "BinaryConv":
            cin = int(weights[node_of(layer.name)][1])
            loop = estimate_binary(code, layer.macs // cin * -(-cin // 32) * 32, triple, mcpu)
        else:
            loop = estimate_macs(code, layer.macs, triple, mcpu)
        rows.append(LayerEstimate(layer.name, layer.op_type, kernel, layer.macs, loop))
    return rows


# -- the conversion report ------------------------------------------------------------------------------
REPORT_CORE, REPORT_CLOCK = "cortex-a76", 2.4e9  # the core and clock report.md states its estimates at


def library_estimate(folder: str | Path, layers: list) -> dict:
    """The binary conv layers of the arm64 library folder ``folder`` (model.so, model.json's
    per-layer kernels, model.onnx) on ``REPORT_CORE`` at ``REPORT_CLOCK``, as report.json holds
    them; ``layers`` are the deployed graph's cost layers. Deterministic for one LLVM version."""
    folder = Path(folder)
    manifest = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    by_node = {node: entry["kernel"] for node, entry in manifest.get("instructions", {}).items()}
    pairs = [(layer, by_node[node_of(layer.name)]) for layer in layers
             if layer.op_type == "BinaryConv" and node_of(layer.name) in by_node]
    if not pairs:
        raise BnnccError(f"{folder / 'model.json'}: no binary conv layer with a kernel")
    rows = estimate_layers(disassemble(folder / "model.so"), ir.load(folder / "model.onnx"), pairs,
                           "aarch64", REPORT_CORE)
    version = subprocess.run([str(LLVM_BIN / "llvm-mca"), "--version"], capture_output=True, text=True).stdout
    return {
        "label": f"estimated, llvm-mca {REPORT_CORE} at {REPORT_CLOCK / 1e9:.1f} GHz",
        "llvm": re.search(r"version (\S+)", version).group(1),
        "core": REPORT_CORE,
        "clock_hz": REPORT_CLOCK,
        "layers": [{"layer": r.layer, "kernel": r.kernel, "binary_macs": r.macs,
                    "bits_per_iteration": r.loop.work_per_iteration, "iterations": r.loop.iterations,
                    "cycles_per_iteration": r.loop.cycles_per_iteration, "cycles": r.cycles} for r in rows],
        "binary_cycles": sum(r.cycles for r in rows),
    }
