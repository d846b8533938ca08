"""Cycle estimates of a built library's kernels without the hardware: each kernel's hot loop,
taken from the library's disassembly, through ``llvm-mca`` for a chosen core model, times the
loop's trip count, and for a binary conv the loops around it.

The hot loop's trip count comes from the layer's shape and the loop's own work, not from the
schedule's tiling, so it holds for whatever kernels the library has:

- a binary conv's hot loop is its innermost loop that popcounts the most bits per iteration
  (``cnt vN.16b``: 128 bits; ``vpopcntd``/``vpopcntq``: the register's width; ``vpshufb``, a
  lookup of one nibble of every byte: half the register's width); the kernel
  popcounts N*Ho*Wo*Cout*kh*kw*words*32 bits (words = ceil(Cin/32): the packed, zero-padded
  input), so the loop runs that many bits / bits per iteration times;
- another kernel's hot loop is its innermost loop with the most multiply-accumulate lanes per
  iteration (``fmla``, ``mla``, ``vfmadd``..., dot products at 4 per lane); it runs the layer's
  MACs / MAC lanes per iteration times.

Around a binary conv's hot loop (``Surround``): the loops that hold it, innermost first, each
with the code that lies in none of its inner loops (the chunk loop: the widening and zeroing of
the byte counters; the tile loop: the epilogue), run as often as the hot iterations over the
trip counts of the loops inside, which are read from their counters (``loop_trip_count``). The
chain stops at the first loop whose inner trip count cannot be read (the tile loop's own bound
is the thread's task range, so it is the last). What stays outside (a kernel's prologue,
bitpacking, padding copies, pooling, the VM's calls) is not counted. bench/arm64.py calibrates
the method against whole x86-64 kernels measured on the host (its own model, ``host_cpu``) and carries the spread
as the error bar.

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

from bnncc.errors import BnnccError, tool_said
from bnncc.targets.kernels import binary_conv, quant
from bnncc.targets.lower import POKE_CONV_KERNEL

__all__ = [
    "KERNEL_LAYERS", "LLVM_BIN", "Instruction", "LayerEstimate", "LoopEstimate", "Surround", "available", "host_cpu",
    "binary_bits", "cycles_per_iteration", "disassemble", "estimate_binary", "estimate_layers", "estimate_macs",
    "innermost_loops", "kernel_code", "layer_kind", "library_estimate", "loop_trip_count", "mac_lanes",
    "match_calls", "node_of", "trip_count",
]

LLVM_BIN = Path("/usr/lib/llvm-19/bin")
_ITERATIONS = 200  # llvm-mca's simulated iterations: enough for the steady state of a loop body


def _mca_version(field: str) -> str:
    """``field`` of ``llvm-mca --version`` (``version``: LLVM's, ``Host CPU:``: the CPU it takes this
    machine for)."""
    done = subprocess.run([str(LLVM_BIN / "llvm-mca"), "--version"], capture_output=True, text=True)
    match = re.search(rf"{field}\s*(\S+)", done.stdout)
    if done.returncode != 0 or not match:
        raise BnnccError(f"llvm-mca --version names no {field.rstrip(':')}")
    return match.group(1)


def host_cpu() -> str:
    """LLVM's name of this machine's CPU (``znver4`` on AMD Zen 4, ``znver2`` on Zen 2): the llvm-mca
    model that the estimate of the host's own kernels uses."""
    return _mca_version("Host CPU:")


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
        said = tool_said(done.stderr) or f"exit status {done.returncode}"
        raise BnnccError(f"{library}: llvm-objdump failed: {said}")
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
    return [code[a:b + 1] for a, b in _innermost(_loop_ranges(code))]


def _loop_ranges(code: list[Instruction]) -> list[tuple[int, int]]:
    """Every loop of ``code`` as (index of its first instruction, index of its backward branch)."""
    index = {instruction.address: k for k, instruction in enumerate(code)}
    return sorted({(index[i.target], k) for k, i in enumerate(code)
                   if i.target is not None and i.target <= i.address and i.target in index})


def _innermost(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges of ``ranges`` that hold no other."""
    return [(a, b) for a, b in ranges if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in ranges)]


# -- work per iteration ------------------------------------------------------------------------------
_X86_BITS = {"zmm": 512, "ymm": 256, "xmm": 128}


def binary_bits(loop: list[Instruction]) -> int:
    """Bits popcounted by one pass through ``loop``: aarch64 ``cnt`` of 16 or 8 bytes, x86
    ``vpopcntd``/``vpopcntq`` of its destination register's width, and ``vpshufb`` half of it (the
    x86 kernels without a vector popcount count 4 bits of every byte a table lookup:
    cpu_schedule._byte_counts)."""
    bits = 0
    for i in loop:
        if i.mnemonic == "cnt":
            bits += 128 if ".16b" in i.operands else 64
        elif i.mnemonic in ("vpopcntd", "vpopcntq", "vpshufb"):
            width = next((b for reg, b in _X86_BITS.items() if reg in i.operands.split(",")[-1]), 0)
            bits += width // 2 if i.mnemonic == "vpshufb" else width
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


# -- trip counts ----------------------------------------------------------------------------------------
_X86_FAMILY = {r: "rax" for r in ("rax", "eax", "ax", "al")} | {r: "rbx" for r in ("rbx", "ebx", "bx", "bl")} | {
    r: "rcx" for r in ("rcx", "ecx", "cx", "cl")} | {r: "rdx" for r in ("rdx", "edx", "dx", "dl")} | {
    r: "rsi" for r in ("rsi", "esi", "si", "sil")} | {r: "rdi" for r in ("rdi", "edi", "di", "dil")} | {
    r: "rbp" for r in ("rbp", "ebp", "bp", "bpl")}
# instructions that set the condition flags a loop's branch reads
_ARM_FLAG_SETTERS = ("cmp", "cmn", "subs", "adds", "tst", "ands")
_X86_FLAG_SETTERS = ("cmp", "add", "sub", "inc", "dec", "test", "and", "or", "xor")


def _register(operand: str) -> str:
    """A general register's family name: aarch64 w7/x7 -> 7; x86 %r12d/%r12 -> r12, %esi -> rsi."""
    name = operand.strip().lstrip("%")
    if re.fullmatch(r"[wx]\d+", name):
        return name[1:]
    if re.fullmatch(r"r\d+[dwb]?", name):
        return name.rstrip("dwb")
    return _X86_FAMILY.get(name, name)


def _immediate(operand: str) -> int | None:
    """``#0x8``, ``#-0x20``, ``$0x3``, ``xzr``/``wzr`` (0) as an int; None for anything else."""
    operand = operand.strip()
    if operand in ("xzr", "wzr"):
        return 0
    match = re.fullmatch(r"[#$](-?(?:0x[0-9a-f]+|\d+))", operand)
    return int(match.group(1), 0) if match else None


def _operands(instruction: Instruction) -> list[str]:
    return [o.strip() for o in instruction.operands.split(",")] if instruction.operands else []


def _is_x86(instruction: Instruction) -> bool:
    return "%" in instruction.operands or instruction.mnemonic.startswith("j")


def _writes(instruction: Instruction) -> str | None:
    """The general register ``instruction`` writes (aarch64: the first operand, x86: the last), if any."""
    ops, mnemonic = _operands(instruction), instruction.mnemonic
    if not ops or _is_branch(mnemonic) or mnemonic.startswith(("cmp", "cmn", "tst", "test", "st")):
        return None
    return _register(ops[-1] if _is_x86(instruction) else ops[0])


_STEPS = ("add", "adds", "sub", "subs", "inc", "dec")


def _step_mnemonic(instruction: Instruction) -> str:
    """``instruction``'s mnemonic without an x86 operand-size suffix (addq -> add, incl -> inc)."""
    mnemonic = instruction.mnemonic
    if _is_x86(instruction) and mnemonic not in _STEPS and mnemonic[:-1] in _STEPS:
        return mnemonic[:-1]
    return mnemonic


def loop_trip_count(code: list[Instruction], start: int, end: int) -> int | None:
    """Iterations of the loop ``code[start:end + 1]`` (its backward branch last) read from its
    counter: one register stepped by a constant in the loop (add/sub/subs, inc/dec), compared
    with a constant (or with zero by the step itself) right before the branch, and set to a
    constant before the loop (the last write to it before ``start``). None when the loop is
    not of that form (a bound from memory or a register: the parallel task loops)."""
    branch = code[end]
    condition = branch.mnemonic.removeprefix("b.").removeprefix("j")
    sets_flags = ((lambda m: m.startswith(_X86_FLAG_SETTERS)) if _is_x86(branch)
                  else (lambda m: m in _ARM_FLAG_SETTERS))
    setter = next((i for i in reversed(code[start:end]) if sets_flags(i.mnemonic)), None)
    if setter is None:
        return None
    ops = _operands(setter)
    x86 = _is_x86(setter)
    if setter.mnemonic.startswith("cmp"):  # aarch64 cmp reg, #imm; x86 cmp $imm, %reg
        counter, bound = (_register(ops[-1]), _immediate(ops[0])) if x86 else (_register(ops[0]), _immediate(ops[1]))
    else:  # the step sets the flags itself: counts to zero
        counter, bound = _writes(setter), 0
    if counter is None or bound is None:
        return None
    steps = []
    for i in code[start:end]:
        if _writes(i) != counter:
            continue
        ops, mnemonic = _operands(i), _step_mnemonic(i)
        if mnemonic in ("inc", "dec"):
            steps.append(1 if mnemonic == "inc" else -1)
        elif mnemonic in ("add", "adds", "sub", "subs"):
            value = _immediate(ops[0] if _is_x86(i) else ops[-1])
            same = _is_x86(i) or _register(ops[1]) == counter
            steps.append(None if value is None or not same else (value if mnemonic.startswith("add") else -value))
        else:
            steps.append(None)
    if len(steps) != 1 or not steps[0]:
        return None
    init = next((i for i in reversed(code[:start]) if _writes(i) == counter), None)
    if init is None:
        return None
    ops = _operands(init)
    if init.mnemonic.startswith("xor") and len(ops) == 2 and _register(ops[0]) == _register(ops[1]):
        first = 0
    elif init.mnemonic.startswith("mov"):
        first = _immediate(ops[0] if _is_x86(init) else ops[-1])
    else:
        first = None
    if first is None:
        return None
    distance, step = bound - first, steps[0]
    if condition == "ne":
        return distance // step if distance % step == 0 and distance // step > 0 else None
    if condition in ("lt", "lo", "cc", "l", "b") and step > 0 and distance > 0:
        return -(-distance // step)
    return None


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
    back-to-back iterations; the branch back is one of the loop's instructions). Also used for
    the straight-line code around a loop (``Surround``), run back to back the same way."""
    body = ".Lloop:\n" + "\n".join(i.text() for i in loop) + "\n"
    return _mca(body, triple, mcpu)


@dataclass(frozen=True)
class Surround:
    """A loop around the hot loop, run ``passes`` times in the kernel: its code that lies in none of
    its inner loops (a chunk's widening and the zeroing of its counters; a tile's sums stored),
    and the inner loops of that code that hold no hot loop (a fused epilogue's loop over the
    channel vectors), with their trip counts."""

    instructions: int  # of its own code
    passes: int
    own_cycles: float  # per pass: its own code
    loop_cycles: float  # per pass: its other inner loops

    @property
    def cycles_per_pass(self) -> float:
        return self.own_cycles + self.loop_cycles

    @property
    def cycles(self) -> float:
        return self.passes * self.cycles_per_pass


@dataclass(frozen=True)
class LoopEstimate:
    """A kernel's hot loop on one core model: work per iteration, trip count and cycles, and the
    loops around it whose passes could be counted (``around``, innermost first)."""

    work_per_iteration: int  # bits popcounted (binary) or MACs (others) per iteration
    iterations: int
    cycles_per_iteration: float
    instructions: int  # in the loop body
    around: tuple[Surround, ...] = ()

    @property
    def hot_cycles(self) -> float:
        return self.iterations * self.cycles_per_iteration

    @property
    def epilogue_cycles(self) -> float:
        """Of the loops around: the cycles of their inner loops (a fused epilogue's)."""
        return sum(s.passes * s.loop_cycles for s in self.around)

    @property
    def cycles(self) -> float:
        return self.hot_cycles + sum(s.cycles for s in self.around)


def trip_count(work: int, per_iteration: int) -> int:
    """Iterations of a loop that does ``per_iteration`` of the kernel's ``work`` per pass; the
    work must divide (else the loop is not the kernel's whole hot loop)."""
    if per_iteration <= 0 or work % per_iteration:
        raise BnnccError(f"hot loop: {per_iteration} per iteration does not divide the kernel's {work}")
    return work // per_iteration


def _nested(loops: list[tuple[int, int]], outer: tuple[int, int]) -> list[tuple[int, int]]:
    return [r for r in loops if outer[0] <= r[0] and r[1] <= outer[1] and r != outer]


def _own(code: list[Instruction], loops: list[tuple[int, int]], outer: tuple[int, int]) -> list[Instruction]:
    """The instructions of loop ``outer`` that lie in none of its inner loops."""
    nested = _nested(loops, outer)
    return [code[k] for k in range(outer[0], outer[1] + 1) if not any(c <= k <= d for c, d in nested)]


def _pass_cycles(code: list[Instruction], loops: list[tuple[int, int]], outer: tuple[int, int],
                 inner: tuple[int, int] | None, triple: str, mcpu: str) -> tuple[float, float]:
    """Cycles of one pass of loop ``outer`` leaving out its inner loop ``inner`` (counted on its own):
    (its own code, each other innermost loop in it whose trip count can be read, that many times)."""
    loop_cycles = 0.0
    for c, d in _innermost(_nested(loops, outer)):
        if inner is not None and inner[0] <= c and d <= inner[1]:
            continue
        trip = loop_trip_count(code, c, d)
        if trip is not None:
            loop_cycles += trip * cycles_per_iteration(code[c:d + 1], triple, mcpu)
    return cycles_per_iteration(_own(code, loops, outer), triple, mcpu), loop_cycles


def _surrounds(code: list[Instruction], loops: list[tuple[int, int]], hot: list[tuple[int, int]], iterations: int,
               triple: str, mcpu: str) -> tuple[Surround, ...]:
    """The loops around the first hot loop, innermost first, for as far out as their passes can be
    counted: the passes of the innermost are the hot iterations over those of the hot loops it
    holds (their trip counts read from the code), each further one's the passes of the loop
    inside over that loop's trip count. The outermost loop of a kernel (the tasks, a row of a
    channel tile each, shared by the threads) has no constant trip count, so the chain ends with it."""
    outer = sorted((r for r in loops if r[0] <= hot[0][0] and hot[0][1] <= r[1] and r != hot[0]),
                   key=lambda r: r[1] - r[0])
    levels, inner, passes = [], None, iterations
    for level in outer:
        if inner is None:
            trips = [loop_trip_count(code, *h) for h in hot if level[0] <= h[0] and h[1] <= level[1]]
            per_pass = None if None in trips else sum(trips)
        else:
            per_pass = loop_trip_count(code, *inner)
        if per_pass is None or passes % per_pass:
            break
        passes //= per_pass
        # the hot loops (and the loop of the level below, which holds them) are counted on their own
        skip = inner or (min(h[0] for h in hot), max(h[1] for h in hot))
        own, inner_loops = _pass_cycles(code, loops, level, skip, triple, mcpu)
        levels.append(Surround(len(_own(code, loops, level)), passes, own, inner_loops))
        inner = level
    return tuple(levels)


def _hot_loop(code: list[Instruction], work, total: int, triple: str, mcpu: str, ceil: bool,
              around: bool = False) -> LoopEstimate:
    """The loop of ``code`` whose own code (outside its inner loops) does the most ``work`` per
    pass: an innermost loop, or where LLVM unrolls a short reduction, the tile loop, whose inner
    loops (the epilogue's) then count with their trip counts. LLVM may emit one loop in several
    versions (a peeled or a task-range copy): loops that tie share the trip count, at the mean
    of their cycles per iteration. With ``around``, the loops around it too (``_surrounds``)."""
    loops = _loop_ranges(code)
    candidates = [(work(_own(code, loops, r)), r) for r in loops]
    best = max((w for w, _ in candidates), default=0)
    if best == 0:
        raise BnnccError("kernel: no loop does its work (popcount or multiply-accumulate)")
    tied = [r for w, r in candidates if w == best]
    cycles = sum(sum(_pass_cycles(code, loops, r, None, triple, mcpu)) for r in tied) / len(tied)
    iterations = -(-total // best) if ceil else trip_count(total, best)
    levels = _surrounds(code, loops, tied, iterations, triple, mcpu) if around else ()
    return LoopEstimate(best, iterations, cycles, len(_own(code, loops, tied[0])), levels)


def estimate_binary(code: list[Instruction], bits: int, triple: str, mcpu: str) -> LoopEstimate:
    """The hot loop of a binary conv kernel that popcounts ``bits`` bits in all (``binary_bits``),
    with the loops around it as far as their passes can be counted: the chunk loop (the widening
    of the byte counters) and the tile loop (the epilogue)."""
    return _hot_loop(code, binary_bits, bits, triple, mcpu, ceil=False, around=True)


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
# the core model and clock report.md states its estimates at: a Cortex-A76 at 2.4 GHz, by the model of
# its design in LLVM 19, the Neoverse N1's (-mcpu=cortex-a76 gets the Cortex-A57 model there)
REPORT_CORE, REPORT_CLOCK = "neoverse-n1", 2.4e9


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
    return {
        "label": f"estimated, Cortex-A76 at {REPORT_CLOCK / 1e9:.1f} GHz by llvm-mca's {REPORT_CORE} model",
        "llvm": _mca_version("version"),
        "core": REPORT_CORE,
        "clock_hz": REPORT_CLOCK,
        "layers": [{"layer": r.layer, "kernel": r.kernel, "binary_macs": r.macs,
                    "bits_per_iteration": r.loop.work_per_iteration, "iterations": r.loop.iterations,
                    "cycles_per_iteration": r.loop.cycles_per_iteration, "hot_cycles": r.loop.hot_cycles,
                    "cycles": r.cycles} for r in rows],
        "binary_cycles": sum(r.cycles for r in rows),
    }
