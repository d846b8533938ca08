"""Estimated speed of PokeBNN-1x (torchvision ResNet-50, 224 px, batch 1) on one ARM core, without the hardware.

Run: ``TVM_NUM_THREADS=1 .venv/bin/python bench/arm64.py [--results bench/RESULTS.md] [--workdir DIR]``
(needs llvm-19, g++-aarch64-linux-gnu, gcc; about 8 minutes on 2 shared cores, 5 of them building
the library, which ``--workdir`` keeps for the next run).

1. Builds the arm64 library for one thread (``bnncc.zoo`` ResNet-50 -> ``pokebnn_1x`` -> lower
   and compile for aarch64), disassembles it and estimates every layer's hot loop with llvm-mca
   (``bnncc.targets.estimate``: trip counts from the layer's shape and the loop's work per pass)
   on Cortex-A76, Neoverse-N1 and Cortex-A72, at the clocks of ``CORES``.
2. Calibrates the method on this machine: the same estimate, with the ``znver4`` model, for the
   x86-64 binary conv kernels of bench/kernels.py (one thread, all ResNet-50 binary conv shapes),
   against their measured CPU times at the clock measured right before each. The median of
   measured / estimated scales the ARM figures and its range is their error bar (it says how
   far llvm-mca's model is from a real core, measured on the only core at hand).

qemu dynamic instruction counts are not given: a TCG plugin needs qemu's ``qemu-plugin.h``, which
Debian ships only in the qemu source package, and this machine's apt has no deb-src entries
(``apt-get source qemu`` fails), so no plugin can be built here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
from rich.console import Console

import bnncc
from bnncc import zoo
from bnncc.targets import arm64, estimate, x86_64
from bnncc.targets import tvm_compat as tc
from bnncc.targets.kernels import binary_conv as bc
from bnncc.targets.lower import function_name, lower
from kernels import binary_conv_seconds, resnet50_shapes, write_section

SECTION = "## ARM64 estimates (llvm-mca)"
# core model -> (clock in Hz, a board that has it): the clock each estimate is stated at
CORES = {"cortex-a76": (2.4e9, "Cortex-A76 (Pixel 4 class, Raspberry Pi 5)"),
         "neoverse-n1": (2.5e9, "Neoverse-N1 (AWS Graviton2)"),
         "cortex-a72": (1.5e9, "Cortex-A72 (Raspberry Pi 4)")}
HOST_MODEL = "znver4"  # AMD Zen 4: family 25 with AVX-512 (/proc/cpuinfo)


def build_arm64(workdir: Path) -> tuple[ir.Model, Path, list[str]]:
    """PokeBNN-1x of a random-weight torchvision ResNet-50 as an arm64 library for one thread:
    the graph, the library and the kernels ``batch_1`` calls, in order; kept in ``workdir``
    (graph, library, calls.json) and taken from there when all three are present."""
    graph, library, calls_file = workdir / "pokebnn_1x.onnx", workdir / "pokebnn_1x_arm64.so", workdir / "calls.json"
    if graph.is_file() and library.is_file() and calls_file.is_file():
        return ir.load(graph), library, json.loads(calls_file.read_text(encoding="utf-8"))
    onnx_path = zoo.export_onnx(zoo.resnet50(), workdir / "resnet50.onnx")
    model, _ = bnncc.rewrite(bnncc.load(onnx_path), "pokebnn_1x")
    target = arm64.arm64_target(cores=1)
    lowered = lower(model, target, (1,), schedule=arm64.schedule)
    arm64.export_arm64(tc.compile_module(lowered.module, target), library)
    calls = [binding.value.args[0].name_hint
             for block in lowered.module[function_name(1)].body.blocks for binding in block.bindings
             if getattr(getattr(binding.value, "op", None), "name", "").startswith("relax.call_tir")]
    ir.save(model, graph)
    calls_file.write_text(json.dumps(calls), encoding="utf-8")
    return model, library, calls


def arm_estimates(model: ir.Model, library: Path, calls: list[str]) -> dict[str, list[estimate.LayerEstimate]]:
    functions = estimate.disassemble(library)
    pairs = estimate.match_calls(calls, bnncc.ace(model).layers)
    return {core: estimate.estimate_layers(functions, model, pairs, "aarch64", core) for core in CORES}


# A chain of dependent adds runs at one per cycle on any x86-64 core: its rate per second of CPU
# time is the clock the kernels ran at (a VM's /proc/cpuinfo states the nominal clock, not the
# boost). CPU time, here and for the kernels, leaves out the time others' processes hold the core.
_CLOCK_C = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec a, b;
    unsigned long n = 100000000UL, x = 0;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    for (unsigned long i = 0; i < n; i++)
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    printf("%f\n", 4.0 * n / ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9));
    return 0;
}
"""


def clock_meter(workdir: Path):
    """A function that returns the clock this core runs at now, in Hz: the fastest of 5 runs of
    ``_CLOCK_C`` (about 0.1 s each), as the kernel times are the fastest of 5 loops: on a shared
    machine others' work only slows both, and a kernel's cycles are its time at the clock of
    the moment it ran."""
    source, binary = workdir / "clock.c", workdir / "clock"
    source.write_text(_CLOCK_C, encoding="utf-8")
    subprocess.run(["gcc", "-O2", str(source), "-o", str(binary)], check=True)
    return lambda: max(float(subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout)
                       for _ in range(5))


def calibrate(workdir: Path) -> list[dict]:
    """For every ResNet-50 binary conv shape at batch 1: the x86-64 kernel's znver4 estimate and
    its measured CPU time (bench/kernels.py, one thread) in cycles at the clock measured right before."""
    clock = clock_meter(workdir)
    target = x86_64.target_for_flags(x86_64.cpu_flags(), 1)
    rng = np.random.default_rng(0)
    rows = []
    for shape in resnet50_shapes():
        func = bc.binary_conv2d_func(1, shape.size, shape.size, shape.cin, shape.cout, shape.kernel, shape.stride)
        library = tc.export_library(x86_64.schedule(func, target), target, workdir / "kernel.so")
        out = bc.out_size(shape.size, shape.stride)
        macs = out * out * shape.cout * shape.kernel**2 * shape.cin
        code = estimate.kernel_code(estimate.disassemble(library), "main")  # export_library names it main
        loop = estimate.estimate_binary(code, macs // shape.cin * -(-shape.cin // 32) * 32, "x86_64", HOST_MODEL)
        hz = clock()
        measured = binary_conv_seconds(shape, 1, target, rng, timer=time.process_time) * hz
        rows.append({"shape": shape, "macs": macs, "estimated": loop.cycles, "measured": measured, "clock": hz})
    return rows


def error_bar(calibration: list[dict]) -> tuple[float, float, float]:
    """(median, min, max) of measured / estimated cycles over the calibration shapes."""
    ratios = [r["measured"] / r["estimated"] for r in calibration]
    return statistics.median(ratios), min(ratios), max(ratios)


def _label(row: estimate.LayerEstimate) -> str:
    return estimate.node_of(row.layer)


def three_by_three(model: ir.Model) -> set[str]:
    """The binary conv layers (cost layer names) with a 3x3 kernel: the layers the ARM engines publish."""
    return {f"{n.name}/binary" for n in model.graph if n.op_type == "PokeConv" and list(n.inputs[1].shape)[2:] == [3, 3]}


def layer_lines(rows: list[estimate.LayerEstimate], threes: set[str], clock: float) -> list[list[str]]:
    """The binary 3x3 convs, one line each."""
    return [[_label(r), r.kernel, f"{r.macs / 1e6:.1f}", str(r.loop.work_per_iteration), f"{r.loop.iterations:,}",
             f"{r.loop.cycles_per_iteration:.1f}", f"{r.macs_per_cycle:.1f}", f"{r.cycles / clock * 1e3:.3f}"]
            for r in rows if r.layer in threes]


def breakdown(rows: list[estimate.LayerEstimate], threes: set[str]) -> dict[str, float]:
    """Estimated cycles by layer kind: binary 3x3, binary 1x1, stem, SE gates, head."""
    groups: dict[str, float] = {}
    for r in rows:
        kind = ("binary 3x3" if r.layer in threes else "binary 1x1") if r.op_type == "BinaryConv" else {
            "QuantConv": "stem (int8 convs)", "SEGate": "SE gates (dense)", "QuantGemm": "head (int8 fc)"}[r.op_type]
        groups[kind] = groups.get(kind, 0.0) + r.cycles
    return groups


HEADER = ["layer", "kernel", "bMACs (1e6)", "bits/iter", "iterations", "cycles/iter", "bMACs/cycle", "ms"]


def report(estimates, threes: set[str], calibration) -> str:
    """The printed and Markdown summary."""
    median, low, high = error_bar(calibration)
    clocks = [r["clock"] for r in calibration]
    lines = [SECTION, "",
             f"Date: {datetime.date.today().isoformat()}. Machine: AMD EPYC (Zen 4, family 25, AVX-512), "
             f"clock measured before each kernel (a chain of dependent adds per second of CPU time) "
             f"{min(clocks) / 1e9:.2f}-{max(clocks) / 1e9:.2f} GHz; kernel times in CPU time (one thread). Command: `TVM_NUM_THREADS=1 .venv/bin/python bench/arm64.py "
             "--results bench/RESULTS.md`. LLVM 19 (`llvm-objdump`, `llvm-mca`).", "",
             "**Estimates, not measurements**: each layer's hot loop from the arm64 library's disassembly through "
             "`llvm-mca` (steady state, all loads hitting L1), times its trip count: bits the layer popcounts "
             "(N·Ho·Wo·Cout·k²·32·ceil(Cin/32)) / bits popcounted per pass, or for the int8 layers MACs / MAC lanes "
             "per pass. Outside the hot loops (prologues, per-tile epilogues, bitpacking, pooling, padding, "
             "the VM) nothing is counted; where LLVM unrolls a short reduction the hot loop is the tile loop "
             "and holds its epilogue.", "",
             f"Calibration on this CPU (`znver4`, the same estimate for the x86-64 binary conv kernels of "
             f"bench/kernels.py, one thread, {len(calibration)} ResNet-50 shapes): measured / estimated cycles "
             f"median **{median:.2f}**, range {low:.2f}-{high:.2f}. ARM times below are estimate x "
             f"{median:.2f} with that range as the error bar.", "",
             "| shape | estimated kcycles | clock GHz | measured CPU µs | measured kcycles | measured / estimated |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in calibration:
        s = r["shape"]
        lines.append(f"| {s.cin}->{s.cout} {s.kernel}x{s.kernel}/{s.stride} @{s.size} | {r['estimated'] / 1e3:,.0f} | "
                     f"{r['clock'] / 1e9:.2f} | {r['measured'] / r['clock'] * 1e6:.0f} | {r['measured'] / 1e3:,.0f} | "
                     f"{r['measured'] / r['estimated']:.2f} |")
    a76 = estimates["cortex-a76"]
    clock = CORES["cortex-a76"][0]
    lines += ["", f"3x3 binary convs on Cortex-A76 at {clock / 1e9:.1f} GHz (hot loop; target >= 70 bMACs/cycle):", "",
              "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(line) + " |" for line in layer_lines(a76, threes, clock)]
    lines += ["", "Whole network, batch 1, one core (hot loops of all binary and int8 layers):", "",
              "| core | clock | binary 3x3 bMACs/cycle | estimate ms | x calibration (range) ms |",
              "|---|---:|---:|---:|---:|"]
    for core, (hz, board) in CORES.items():
        rows = estimates[core]
        cycles = sum(r.cycles for r in rows)
        three = [r for r in rows if r.layer in threes]
        rate = sum(r.macs for r in three) / sum(r.cycles for r in three)
        ms = cycles / hz * 1e3
        lines.append(f"| {board} | {hz / 1e9:.1f} GHz | {rate:.1f} | {ms:.1f} | "
                     f"{ms * median:.1f} ({ms * low:.1f}-{ms * high:.1f}) |")
    total = sum(r.cycles for r in a76)
    groups = breakdown(a76, threes)
    lines += ["", "Where the Cortex-A76 cycles go:", "", "| layers | Mcycles | share |", "|---|---:|---:|"]
    for kind, cycles in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {cycles / 1e6:.1f} | {cycles / total:.0%} |")
    three = [r for r in a76 if r.layer in threes]
    rate = sum(r.macs for r in three) / sum(r.cycles for r in three)
    other = total - groups.get("binary 3x3", 0.0) - groups.get("binary 1x1", 0.0)
    lines += ["", f"Issue 18's targets: 3x3 binary convs >= 70 bMACs/cycle on Cortex-A76: **{rate:.1f}**, "
              f"{'met' if rate >= 70 else 'not met'} (x calibration {rate / median:.1f}, range "
              f"{rate / high:.1f}-{rate / low:.1f}); non-binary layers below a quarter of the cycles: "
              f"**{other / total:.0%}** of the hot-loop cycles (the work outside hot loops not counted)."]
    lines += ["", "qemu dynamic instruction counts: not given; a TCG plugin needs `qemu-plugin.h`, which Debian "
              "ships only in the qemu source package, and this machine's apt has no deb-src entries.", "", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="write the summary into this markdown file's section")
    parser.add_argument("--workdir", type=Path, help="keep the arm64 build here and reuse it (default: a temporary folder)")
    args = parser.parse_args()
    if not estimate.available():
        raise SystemExit("llvm-19 not found: apt-get install llvm-19")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model, library, calls = build_arm64(workdir)
        estimates = arm_estimates(model, library, calls)
        calibration = calibrate(Path(tmp))
    text = report(estimates, three_by_three(model), calibration)
    Console(width=200).print(text)
    if args.results:
        write_section(args.results, text, SECTION)


if __name__ == "__main__":
    main()
