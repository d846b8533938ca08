"""The x86-64 target: this host's LLVM target, and the vectors ``cpu_schedule`` schedules for.

Three classes of CPU (``popcount_class``), each with its vector unit:

- AVX-512 VPOPCNTDQ (Ice Lake and later, Zen 4 and later): 16 uint32 lanes (zmm), one VPOPCNTD per 16
  words;
- AVX-512BW without VPOPCNTDQ (Skylake-SP, Cascade Lake, Cooper Lake): 16 lanes counted in byte lanes
  with 512-bit vpshufb nibble table lookups, widened once per chunk of up to 31 steps by vpmaddubsw +
  vpmaddwd (``cpu_schedule._byte_counts``). Those CPUs run a vpshufb of either width on one port, so
  that 512-bit lookups count twice the bits a cycle of 256-bit ones (bench/RESULTS.md);
- AVX2: the same in 8 lanes (ymm).

Convs counting nibbles with whole vectors of output channels split their activations into nibbles
once per call (``counts_nibbles``; binary_conv2d's ``nibbles``), so that a lookup needs no masking of
its own, the smaller ones with their weights split into nibbles ahead (``split_convs``). Every class
takes its weights blocked by channel vectors where the channels fill them (``weight_lanes``).
A target without AVX2 is not scheduled (``schedule`` returns None).
"""

from __future__ import annotations

from bnncc.errors import BnnccError
from bnncc.targets import cpu_schedule
from bnncc.targets.cpu_schedule import VectorUnit
from bnncc.targets.tvm_compat import NUM_THREADS, Target, has_cpu_features, make_target, tirx

__all__ = ["AVX2", "AVX512BW", "AVX512_VPOPCNTDQ", "CLASS_FLAGS", "UNITS", "class_target", "counts_nibbles",
           "cpu_flags", "host_target", "missing_flags", "popcount_class", "schedule", "split_convs",
           "target_for_flags", "vector_lanes", "vector_unit", "weight_lanes"]

# the popcount classes (module docstring)
AVX512_VPOPCNTDQ = "avx512-vpopcntdq"
AVX512BW = "avx512bw"
AVX2 = "avx2"
# Register tile of the binary conv: as many accumulator vectors as lanes (x86-64 has 32 zmm / 16
# ymm; the rest hold weights, the broadcast activation word and, counting nibbles, the table).
# Without a vector popcount the unit counts in byte lanes (cpu_schedule._byte_counts).
_FLOAT_LOOKUP_512 = "llvm.x86.avx512.permvar.sf.512"
UNITS = {
    AVX512_VPOPCNTDQ: VectorUnit(lanes=16, accumulators=16, float_lookup=_FLOAT_LOOKUP_512),
    AVX512BW: VectorUnit(lanes=16, accumulators=16, byte_counts=True, nibble_lookup="llvm.x86.avx512.pshuf.b.512",
                         pair_multiply_adds=("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"),
                         float_lookup=_FLOAT_LOOKUP_512),
    AVX2: VectorUnit(lanes=8, accumulators=8, byte_counts=True, nibble_lookup="llvm.x86.avx2.pshuf.b",
                     pair_multiply_adds=("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd")),
}

_AVX512_FLAGS = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
_AVX2_FLAGS = {"avx2", "bmi2", "fma", "movbe"}
# the /proc/cpuinfo flags by which ``target_for_flags`` picks each class
CLASS_FLAGS = {AVX2: _AVX2_FLAGS, AVX512BW: _AVX2_FLAGS | _AVX512_FLAGS,
               AVX512_VPOPCNTDQ: _AVX2_FLAGS | _AVX512_FLAGS | {"avx512_vpopcntdq"}}
# the CPU features of those targets by LLVM's names, each with the /proc/cpuinfo flag that says a CPU has it
_FEATURE_FLAGS = {flag.replace("_", ""): flag for flag in _AVX2_FLAGS | _AVX512_FLAGS | {"avx512_vpopcntdq"}}


def target_for_flags(flags: set[str], cores: int) -> Target:
    """The LLVM target for a CPU with these /proc/cpuinfo flags: x86-64-v4 with AVX-512, else v3 (AVX2) or v2,
    plus VPOPCNTDQ when present (it is outside every x86-64-vN level)."""
    if _AVX512_FLAGS <= flags:
        mcpu = "x86-64-v4"
    elif _AVX2_FLAGS <= flags:
        mcpu = "x86-64-v3"
    else:
        mcpu = "x86-64-v2"
    spec = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": cores}
    if mcpu == "x86-64-v4" and "avx512_vpopcntdq" in flags:
        spec["mattr"] = ["+avx512vpopcntdq"]
    return make_target(spec)


def missing_flags(target: Target, flags: set[str]) -> list[str]:
    """The CPU features code built for ``target`` may use that a CPU with ``flags`` lacks, as
    /proc/cpuinfo names them: such code ends the process at the first of them it runs (SIGILL)."""
    return sorted(flag for feature, flag in _FEATURE_FLAGS.items()
                  if flag not in flags and has_cpu_features(target, [feature]))


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags, as /proc/cpuinfo spells them (``avx512_vpopcntdq``)."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        line = next((line for line in f if line.startswith("flags")), None)
    if line is None:  # an aarch64 host names its features on a "Features" line
        raise BnnccError("this host is no x86-64 CPU (/proc/cpuinfo has no flags line): an x86 library cannot run "
                         "here, and one is built by naming its class as the target (x86-64-avx2, x86-64-avx512bw, "
                         "x86-64-avx512)")
    return set(line.split(":", 1)[1].split())


def host_target() -> Target:
    """The target of this machine; num-cores = the threads TVM will use."""
    return target_for_flags(cpu_flags(), NUM_THREADS)


def class_target(name: str) -> Target:
    """The target of any CPU of class ``name`` (a library built on one machine for others)."""
    return target_for_flags(CLASS_FLAGS[name], NUM_THREADS)


def popcount_class(target: Target) -> str | None:
    """The class whose kernels ``target`` gets (module docstring); None if it is no x86-64 AVX2 CPU."""
    if target.kind.name != "llvm" or not str(target.attrs.get("mtriple", "x86_64")).startswith("x86_64"):
        return None
    if has_cpu_features(target, ["avx512f", "avx512vpopcntdq"]):
        return AVX512_VPOPCNTDQ
    if has_cpu_features(target, ["avx512f", "avx512bw"]):
        return AVX512BW
    if has_cpu_features(target, ["avx2"]):
        return AVX2
    return None


def vector_unit(target: Target) -> VectorUnit | None:
    """The vector unit of ``target``'s class; None if it is no x86-64 AVX2 CPU."""
    name = popcount_class(target)
    return None if name is None else UNITS[name]


def vector_lanes(target: Target) -> int | None:
    """uint32 lanes per popcount vector on ``target``; None if it is not an x86-64 AVX2 CPU."""
    unit = vector_unit(target)
    return None if unit is None else unit.lanes


def counts_nibbles(target: Target, out_channels: int) -> bool:
    """Whether a binary conv of ``out_channels`` outputs for ``target`` is built with ``nibbles``
    (binary_conv2d; cpu_schedule.counts_nibbles): on a class without a vector popcount, where whole
    vectors of channels are counted by vpshufb lookups."""
    return cpu_schedule.counts_nibbles(vector_unit(target), out_channels)


def weight_lanes(target: Target, out_channels: int) -> int | None:
    """The channel vector by which a binary conv of ``out_channels`` outputs for ``target`` takes its
    weights blocked (bitpack.blocked_weights): the target's vector, where the channels fill whole
    vectors; None (the plain layout) otherwise or on a target that is no x86-64 CPU with AVX2.

    Blocked weights are what every kernel counting nibbles takes; on AVX-512 VPOPCNTDQ they took
    0.5-1.5% off PokeBNN-1x in calm minutes and 3.5-5% when L3 was slow (stage 4's kernels 19-23%:
    a tile's weights, first read from L3, come as a run of adjacent lines; bench/RESULTS.md)."""
    lanes = vector_lanes(target)
    return lanes if lanes is not None and out_channels % lanes == 0 else None


def split_convs(target: Target, convs: dict) -> set:
    """The keys of the binary convs ``{key: (in_channels, out_channels, kernel)}`` of a network whose
    kernels for ``target`` take their weights split into nibbles ahead (cpu_schedule.split_convs)."""
    unit = vector_unit(target)
    return cpu_schedule.split_convs(unit, convs) if unit is not None else set()


def schedule(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """``func`` scheduled for ``target`` (``cpu_schedule``), or None when ``func`` is no kernel of
    ours or ``target`` no x86-64 CPU with AVX2."""
    return cpu_schedule.schedule(func, target, vector_unit(target))
