"""The x86-64 target: this host's LLVM target, and the vectors ``cpu_schedule`` schedules for.

Vector width follows the target: 16 uint32 lanes (zmm, one VPOPCNTD per 16 words) when it has
AVX-512 VPOPCNTDQ, else 8 lanes (ymm), counted in byte lanes with vpshufb nibble table lookups and
widened once per chunk of up to 31 steps by vpmaddubsw + vpmaddwd (``cpu_schedule._byte_counts``).
AVX2 convs with whole vectors of output channels split their activations into nibbles once per call
(``counts_nibbles``; binary_conv2d's ``nibbles``), so that a lookup needs no masking of its own, the
smaller ones with their weights split into nibbles ahead (``split_convs``). Both classes take their
weights blocked by channel vectors where the channels fill them (``weight_lanes``).
A target without AVX2 is not scheduled (``schedule`` returns None).
"""

from __future__ import annotations

from bnncc.targets import cpu_schedule
from bnncc.targets.cpu_schedule import VectorUnit
from bnncc.targets.tvm_compat import NUM_THREADS, Target, has_cpu_features, make_target, tirx

__all__ = ["counts_nibbles", "cpu_flags", "host_target", "schedule", "split_convs", "target_for_flags", "vector_lanes",
           "weight_lanes"]

# Register tile of the binary conv: as many accumulator vectors as lanes (x86-64 has 32 zmm / 16
# ymm; the rest hold weights, the broadcast activation word and, on AVX2, the nibble table).
# AVX2 has no vector popcount: it counts in byte lanes (cpu_schedule._byte_counts).
_UNITS = {16: VectorUnit(lanes=16, accumulators=16, float_lookup="llvm.x86.avx512.permvar.sf.512"),
          8: VectorUnit(lanes=8, accumulators=8, byte_counts=True, nibble_lookup="llvm.x86.avx2.pshuf.b",
                        pair_multiply_adds=("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"))}

_AVX512 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
_AVX2 = {"avx2", "bmi2", "fma", "movbe"}


def target_for_flags(flags: set[str], cores: int) -> Target:
    """The LLVM target for a CPU with these /proc/cpuinfo flags: x86-64-v4 with AVX-512, else v3 (AVX2) or v2,
    plus VPOPCNTDQ when present (it is outside every x86-64-vN level)."""
    if _AVX512 <= flags:
        mcpu = "x86-64-v4"
    elif _AVX2 <= flags:
        mcpu = "x86-64-v3"
    else:
        mcpu = "x86-64-v2"
    spec = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": cores}
    if mcpu == "x86-64-v4" and "avx512_vpopcntdq" in flags:
        spec["mattr"] = ["+avx512vpopcntdq"]
    return make_target(spec)


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags, as /proc/cpuinfo spells them (``avx512_vpopcntdq``)."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        line = next(line for line in f if line.startswith("flags"))
    return set(line.split(":", 1)[1].split())


def host_target() -> Target:
    """The target of this machine; num-cores = the threads TVM will use."""
    return target_for_flags(cpu_flags(), NUM_THREADS)


def vector_lanes(target: Target) -> int | None:
    """uint32 lanes per popcount vector on ``target``; None if it is not an x86-64 AVX2 CPU."""
    if target.kind.name != "llvm" or not str(target.attrs.get("mtriple", "x86_64")).startswith("x86_64"):
        return None
    if has_cpu_features(target, ["avx512f", "avx512vpopcntdq"]):
        return 16
    if has_cpu_features(target, ["avx2"]):
        return 8
    return None


def counts_nibbles(target: Target, out_channels: int) -> bool:
    """Whether a binary conv of ``out_channels`` outputs for ``target`` is built with ``nibbles``
    (binary_conv2d; cpu_schedule.counts_nibbles): on AVX2, where whole vectors of channels are
    counted by vpshufb lookups."""
    lanes = vector_lanes(target)
    return lanes is not None and cpu_schedule.counts_nibbles(_UNITS[lanes], out_channels)


def weight_lanes(target: Target, out_channels: int) -> int | None:
    """The channel vector by which a binary conv of ``out_channels`` outputs for ``target`` takes its
    weights blocked (bitpack.blocked_weights): the target's vector, where the channels fill whole
    vectors; None (the plain layout) otherwise or on a target that is no x86-64 CPU with AVX2.

    Blocked weights are what every AVX2 kernel counting nibbles takes; on AVX-512 they took 3.5-4.6%
    off PokeBNN-1x (stage 4's kernels 19-23%: a tile's weights, first read from L3, come as a run of
    adjacent lines; bench/RESULTS.md)."""
    lanes = vector_lanes(target)
    return lanes if lanes is not None and out_channels % lanes == 0 else None


def split_convs(target: Target, convs: dict) -> set:
    """The keys of the binary convs ``{key: (in_channels, out_channels, kernel)}`` of a network whose
    kernels for ``target`` take their weights split into nibbles ahead (cpu_schedule.split_convs)."""
    lanes = vector_lanes(target)
    return cpu_schedule.split_convs(_UNITS[lanes], convs) if lanes is not None else set()


def schedule(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """``func`` scheduled for ``target`` (``cpu_schedule``), or None when ``func`` is no kernel of
    ours or ``target`` no x86-64 CPU with AVX2."""
    lanes = vector_lanes(target)
    return cpu_schedule.schedule(func, target, None if lanes is None else _UNITS[lanes])
