"""Estimated speed of PokeBNN networks (batch 1) on one ARM core, without the hardware.

Run: ``TVM_NUM_THREADS=1 .venv/bin/python bench/arm64.py [--recipes pokebnn_1x resnet18_bireal ...]
[--results bench/RESULTS.md] [--workdir DIR]`` (needs llvm-19, g++-aarch64-linux-gnu, gcc; about
6 minutes on 2 shared cores, half of it building the libraries, which ``--workdir`` keeps for the
next run). ``pokebnn_1x`` is PokeBNN-1x of a torchvision ResNet-50 at 224 px; ``resnet18_bireal``
(no SE gates) and ``resnet18_pokebnn`` are ResNet-18 arrangements, set beside the times the ARM
engines publish for Bi-Real Net 18.

1. Builds each recipe's arm64 library for one thread (``bnncc.zoo`` network, random weights ->
   recipe -> lower and compile for aarch64), disassembles it and estimates every layer with
   llvm-mca (``bnncc.targets.estimate``): a binary conv's hot loop times its trip count (from the
   layer's shape), plus the loops around it whose passes can be counted (the chunk loop: its
   byte counters' widening and zeroing; the tile loop: its epilogue); an int8 layer's hot loop.
   Core models: ``neoverse-n1`` (the Cortex-A76's server twin, and the only model of that core
   design in LLVM 19), ``cortex-a76`` (which LLVM 19 schedules with its Cortex-A57 model, the
   same as ``cortex-a72``), ``cortex-a72``, at the clocks of ``CORES``.
2. Calibrates the method on this machine: the same estimate, with LLVM's model of this CPU
   (``estimate.host_cpu``: ``znver4`` on Zen 4), for the
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
import os
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
from bnncc.targets.lower import IMAGE_FUNCTION, lower
from kernels import binary_conv_func, binary_conv_seconds, cpu_model, resnet50_shapes, write_section

SECTION = "## ARM64 estimates (llvm-mca)"
# (label, llvm-mca core model, clock in Hz): the cores and clocks the estimates are stated at
CORES = [("Cortex-A76 (Pixel 4 class, Raspberry Pi 5), neoverse-n1 model", "neoverse-n1", 2.4e9),
         ("Cortex-A76, cortex-a76 model (LLVM 19: Cortex-A57's)", "cortex-a76", 2.4e9),
         ("Neoverse-N1 (AWS Graviton2)", "neoverse-n1", 2.5e9),
         ("Cortex-A72 (Raspberry Pi 4)", "cortex-a72", 1.5e9)]
A76_MODEL, A76_CLOCK = "neoverse-n1", 2.4e9  # the target's core: the model of its design, at 2.4 GHz
# recipe -> the zoo network it is applied to
NETWORKS = {"pokebnn_1x": zoo.resnet50, "resnet18_bireal": zoo.resnet18, "resnet18_pokebnn": zoo.resnet18}
# what each ResNet-18 recipe is, for the comparison with Bi-Real Net 18
RESNET18 = {"resnet18_bireal": "ResNet-18, Bi-Real arrangement (no SE gates)",
            "resnet18_pokebnn": "ResNet-18, PokeBNN arrangement (4-bit SE gates)"}
# Bi-Real Net 18 on one ARM core, as published (../shared/reference/anchors.md): (engine, core, ms)
BIREAL18 = [("daBNN", "Pixel 1, 1 thread", 61.3),
            ("Larq Compute Engine", "Pixel 1, 1 thread", 41.6),
            ("Bolt", "one Cortex-A76", 30.7)]


def build_arm64(recipe: str, workdir: Path) -> tuple[ir.Model, Path, list[str]]:
    """``recipe`` on its random-weight zoo network (``NETWORKS``) as an arm64 library for one
    thread: the graph, the library and the kernels ``batch_1`` calls, in order; kept in
    ``workdir`` (graph, library, calls json) and taken from there when all three are present."""
    graph, library = workdir / f"{recipe}.onnx", workdir / f"{recipe}_arm64.so"
    calls_file = workdir / f"{recipe}_calls.json"
    if graph.is_file() and library.is_file() and calls_file.is_file():
        return ir.load(graph), library, json.loads(calls_file.read_text(encoding="utf-8"))
    onnx_path = zoo.export_onnx(NETWORKS[recipe](), workdir / f"{recipe}_float.onnx")
    model, _ = bnncc.rewrite(bnncc.load(onnx_path), recipe)
    target = arm64.arm64_target(cores=1)
    lowered = lower(model, target, (1,), schedule=arm64.schedule)
    arm64.export_arm64(tc.compile_module(lowered.module, target), library)
    calls = [binding.value.args[0].name_hint
             for block in lowered.module[IMAGE_FUNCTION].body.blocks for binding in block.bindings
             if getattr(getattr(binding.value, "op", None), "name", "").startswith("relax.call_tir")]
    ir.save(model, graph)
    calls_file.write_text(json.dumps(calls), encoding="utf-8")
    return model, library, calls


def arm_estimates(model: ir.Model, library: Path, calls: list[str]) -> dict[str, list[estimate.LayerEstimate]]:
    """Every layer's estimate, by llvm-mca core model."""
    functions = estimate.disassemble(library)
    pairs = estimate.match_calls(calls, bnncc.ace(model).layers)
    models = {mcpu for _, mcpu, _ in CORES}
    return {mcpu: estimate.estimate_layers(functions, model, pairs, "aarch64", mcpu) for mcpu in models}


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


def x86_kernel_estimate(shape, target, workdir: Path, model: str) -> tuple[int, estimate.LoopEstimate]:
    """(binary MACs, llvm-mca estimate on core ``model``) of the x86-64 kernel of ``shape`` at batch
    1 as bench/kernels.py builds it for ``target``."""
    library = tc.export_library(binary_conv_func(shape, 1, target), target, workdir / "kernel.so")
    out = bc.out_size(shape.size, shape.stride)
    macs = out * out * shape.cout * shape.kernel**2 * shape.cin
    code = estimate.kernel_code(estimate.disassemble(library), "main")  # export_library names it main
    return macs, estimate.estimate_binary(code, macs // shape.cin * -(-shape.cin // 32) * 32, "x86_64", model)


def calibrate(workdir: Path, targets: dict[str, object], rounds: int = 1) -> dict[str, list[dict]]:
    """For every ResNet-50 binary conv shape at batch 1 and every build of ``targets`` (name -> an x86-64
    target this CPU runs): the kernel's estimate (LLVM's model of this CPU) and its measured CPU time
    (bench/kernels.py, one thread) in cycles at the clock measured right before, the fastest of
    ``rounds``, the builds taking turns shape by shape (so that a slow stretch of a shared machine
    falls on all of them)."""
    clock = clock_meter(workdir)
    model = estimate.host_cpu()
    rows: dict[str, list[dict]] = {name: [] for name in targets}
    for shape in resnet50_shapes():
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, target in targets.items():
                hz = clock()
                seconds = binary_conv_seconds(shape, 1, target, np.random.default_rng(0), timer=time.process_time)
                runs[name].append((seconds * hz, hz))
        for name, target in targets.items():
            macs, loop = x86_kernel_estimate(shape, target, workdir, model)
            measured, hz = min(runs[name])
            rows[name].append({"shape": shape, "macs": macs, "estimated": loop.cycles, "hot": loop.hot_cycles,
                               "measured": measured, "clock": hz})
    return rows


def error_bar(calibration: list[dict]) -> tuple[float, float, float]:
    """(median, min, max) of measured / estimated cycles over the calibration shapes."""
    ratios = [r["measured"] / r["estimated"] for r in calibration]
    return statistics.median(ratios), min(ratios), max(ratios)


def three_by_three(model: ir.Model) -> set[str]:
    """The binary conv layers (cost layer names) with a 3x3 kernel: the layers the ARM engines publish."""
    return {f"{n.name}/binary" for n in model.graph
            if n.op_type == "PokeConv" and list(n.inputs[1].shape)[2:] == [3, 3]}


def rate(rows: list[estimate.LayerEstimate], layers: set[str], part: str = "whole") -> float:
    """Binary MACs per cycle over ``layers``: the ``whole`` estimate, the ``count`` (all but the loops of
    a fused epilogue: hot loops, chunk widening, the tiles' own code) or the ``hot`` loops alone."""
    chosen = [r for r in rows if r.layer in layers]
    cycles = {"whole": lambda r: r.cycles, "count": lambda r: r.cycles - r.loop.epilogue_cycles,
              "hot": lambda r: r.loop.hot_cycles}[part]
    return sum(r.macs for r in chosen) / sum(cycles(r) for r in chosen)


def layer_lines(rows: list[estimate.LayerEstimate], threes: set[str], clock: float) -> list[str]:
    """The binary 3x3 convs, one table line each."""
    return [f"| {estimate.node_of(r.layer)} | {r.kernel} | {r.macs / 1e6:.1f} | {r.loop.work_per_iteration} | "
            f"{r.loop.iterations:,} | {r.loop.cycles_per_iteration:.1f} | {rate([r], {r.layer}, 'hot'):.1f} | "
            f"{rate([r], {r.layer}, 'count'):.1f} | {r.macs_per_cycle:.1f} | {r.cycles / clock * 1e3:.3f} |"
            for r in rows if r.layer in threes]


def breakdown(rows: list[estimate.LayerEstimate], threes: set[str]) -> dict[str, float]:
    """Estimated cycles by layer kind: binary 3x3, binary 1x1, stem, SE gates, head."""
    groups: dict[str, float] = {}
    for r in rows:
        kind = ("binary 3x3" if r.layer in threes else "binary 1x1") if r.op_type == "BinaryConv" else {
            "QuantConv": "stem (int8 convs)", "SEGate": "SE gates (dense)", "QuantGemm": "head (int8 fc)"}[r.op_type]
        groups[kind] = groups.get(kind, 0.0) + r.cycles
    return groups


def hot_loop_text(library: Path, rows: list[estimate.LayerEstimate], layer: str) -> list[str]:
    """The hot loop of ``layer``'s kernel in ``library``, one instruction a line, with its size and copies."""
    row = next(r for r in rows if r.layer == layer)
    loops = estimate.innermost_loops(estimate.kernel_code(estimate.disassemble(library), row.kernel))
    best = max(estimate.binary_bits(loop) for loop in loops)
    hot = [loop for loop in loops if estimate.binary_bits(loop) == best]
    return ["```", f"{row.kernel}: {len(hot[0])} instructions, {best} bits a pass; {len(hot)} such loops in the kernel",
            *(f"    {i.mnemonic} {i.operands}" for i in hot[0]), "```"]


def network_ms(rows: list[estimate.LayerEstimate], clock: float) -> float:
    return sum(r.cycles for r in rows) / clock * 1e3


HEADER = ["layer", "kernel", "bMACs (1e6)", "bits/iter", "iterations", "cycles/iter", "bMACs/cycle: hot loop",
          "count", "whole", "ms"]


def report(networks: dict, calibration: list[dict], load: str) -> str:
    """The printed and Markdown summary; ``networks``: recipe -> (model, library, estimates by core model)."""
    median, low, high = error_bar(calibration)
    clocks = [r["clock"] for r in calibration]
    lines = [SECTION, "",
             f"Date: {datetime.date.today().isoformat()}. Machine: {cpu_model()} (LLVM's model of it: "
             f"`{estimate.host_cpu()}`), {os.cpu_count()} CPUs (load average {load}); clock measured before each "
             f"kernel (a chain of dependent adds per second of CPU time) "
             f"{min(clocks) / 1e9:.2f}-{max(clocks) / 1e9:.2f} GHz; kernel "
             "times in CPU time (one thread). Command: `TVM_NUM_THREADS=1 .venv/bin/python bench/arm64.py "
             "--results bench/RESULTS.md`. LLVM 19 (`llvm-objdump`, `llvm-mca`).", "",
             "**Estimates, not measurements**: each layer's code from the arm64 library's disassembly through "
             "`llvm-mca` (steady state, all loads hitting L1). A binary conv: its hot loop times its trip count "
             "(bits the layer popcounts, N·Ho·Wo·Cout·k²·32·ceil(Cin/32), over bits per pass), "
             "plus the code of the "
             "loops around it, each run as often as the hot loop's passes over the trip counts read from the "
             "loop counters: the chunk loop (the widening of the byte counters after each chunk of at most 31 "
             "steps, their zeroing) and the tile loop (the epilogue); each such block's straight-line code runs "
             "through llvm-mca whole, both sides of its branches. An int8 layer: its hot loop, MACs over MAC lanes "
             "per pass. Not counted: the code outside the tile loops (a kernel's prologue), bitpacking and padding "
             "stages, the VM.", "",
             "Core models: LLVM 19 has no model of the Cortex-A76 itself: `-mcpu=cortex-a76` schedules with its "
             "Cortex-A57 model (3-wide dispatch, `ldp q` 3 micro-ops; the same as `cortex-a72`, AArch64Processors.td), "
             "while `neoverse-n1` models the Neoverse N1, the server core built on the A76's design (same 4-wide "
             "decode, 2 vector and 2 load pipes). The A76 figures below are the N1 model at the A76's 2.4 GHz; the "
             "`cortex-a76` model's are given beside them.", "",
             f"Calibration on this CPU (`{estimate.host_cpu()}`, the same estimate for the x86-64 binary conv "
             "kernels of "
             f"bench/kernels.py, one thread, {len(calibration)} ResNet-50 shapes): measured / estimated cycles "
             f"median **{median:.2f}**, range {low:.2f}-{high:.2f}. ARM times below are estimate x "
             f"{median:.2f} with that range as the error bar.", "",
             "| shape | hot loop kcycles | estimated kcycles | clock GHz | measured CPU µs | measured kcycles | "
             "measured / estimated |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in calibration:
        s = r["shape"]
        lines.append(f"| {s.cin}->{s.cout} {s.kernel}x{s.kernel}/{s.stride} @{s.size} | {r['hot'] / 1e3:,.0f} | "
                     f"{r['estimated'] / 1e3:,.0f} | {r['clock'] / 1e9:.2f} | {r['measured'] / r['clock'] * 1e6:.0f} | "
                     f"{r['measured'] / 1e3:,.0f} | {r['measured'] / r['estimated']:.2f} |")
    model, library, estimates = networks["pokebnn_1x"]
    threes = three_by_three(model)
    a76 = estimates[A76_MODEL]
    lines += ["", f"PokeBNN-1x (ResNet-50): 3x3 binary convs on the Cortex-A76 at {A76_CLOCK / 1e9:.1f} GHz "
              "(neoverse-n1 model; target >= 70 bMACs/cycle). Binary MACs per cycle of the hot loop alone; "
              "of the count (the hot "
              "loop and the code of the loops around it: chunk widening, zeroing, the sums stored, the tile's "
              "addressing); of the whole layer (with the fused PokeConv epilogue's loop over the channel vectors: "
              "scale, shortcut, DPReLU, SE gate):", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += layer_lines(a76, threes, A76_CLOCK)
    lines += ["", "Whole networks, batch 1, one core (all binary and int8 layers as above):", "",
              "| network | core | clock | binary 3x3 bMACs/cycle (whole) | estimate ms | x calibration (range) ms |",
              "|---|---|---:|---:|---:|---:|"]
    for recipe, (net, _, rows_by_core) in networks.items():
        for label, mcpu, hz in CORES:
            rows = rows_by_core[mcpu]
            ms = network_ms(rows, hz)
            lines.append(f"| {recipe} | {label} | {hz / 1e9:.1f} GHz | {rate(rows, three_by_three(net)):.1f} | "
                         f"{ms:.1f} | "
                         f"{ms * median:.1f} ({ms * low:.1f}-{ms * high:.1f}) |")
    total = sum(r.cycles for r in a76)
    around = sum(r.cycles - r.loop.hot_cycles - r.loop.epilogue_cycles for r in a76)
    epilogues = sum(r.loop.epilogue_cycles for r in a76)
    groups = breakdown(a76, threes)
    lines += ["", "Where the PokeBNN-1x Cortex-A76 cycles go (neoverse-n1 model):", "",
              "| layers | Mcycles | share |", "|---|---:|---:|"]
    for kind, cycles in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {cycles / 1e6:.1f} | {cycles / total:.0%} |")
    lines += [f"| of the binary convs: the code around their hot loops (chunk widening, tiles) | {around / 1e6:.1f} | "
              f"{around / total:.0%} |",
              f"| of the binary convs: the fused epilogues' loops | {epilogues / 1e6:.1f} | {epilogues / total:.0%} |"]
    whole, count, hot = (rate(a76, threes, part) for part in ("whole", "count", "hot"))
    a57 = [rate(estimates["cortex-a76"], threes, part) for part in ("whole", "count", "hot")]
    other = total - groups.get("binary 3x3", 0.0) - groups.get("binary 1x1", 0.0)
    lines += ["", f"Issue 18's targets. 3x3 binary convs >= 70 bMACs/cycle on the Cortex-A76 (neoverse-n1 model): the "
              f"count **{count:.1f}**, {'met' if count >= 70 else 'not met'}; the whole layers with their fused "
              f"epilogues **{whole:.1f}**, {'met' if whole >= 70 else 'not met'}; the hot loops alone {hot:.1f} "
              f"(x calibration: count {count / median:.1f}, range {count / high:.1f}-{count / low:.1f}; whole "
              f"{whole / median:.1f}, range {whole / high:.1f}-{whole / low:.1f}). By the `cortex-a76` (A57) model: "
              f"count {a57[1]:.1f}, whole {a57[0]:.1f}, hot loops {a57[2]:.1f}. Non-binary layers below a quarter "
              f"of the cycles: **{other / total:.0%}**.", ""]
    lines += ["Inner loops of the new kernels (PokeBNN-1x library, the first pass of each kernel's hot loop as "
              "`llvm-objdump` prints it): a 3x3 conv, 256 -> 256 at 14 px (`/layer3/layer3.1/conv2/Conv`):", ""]
    lines += hot_loop_text(library, a76, "/layer3/layer3.1/conv2/Conv/binary")
    lines += ["", "and a 1x1 conv, 1024 -> 256 at 14 px (`/layer3/layer3.1/conv1/Conv`):", ""]
    lines += hot_loop_text(library, a76, "/layer3/layer3.1/conv1/Conv/binary")
    resnet18 = [recipe for recipe in RESNET18 if recipe in networks]
    if resnet18:
        lines += ["", "ResNet-18 beside Bi-Real Net 18 on one ARM core. bnncc's rows are **estimates** (this bench: "
                  "every 3x3 conv binary with a real-valued shortcut, Bi-Real Net's arrangement, and PokeBNN's 8-bit "
                  "stem and head; `resnet18_bireal` without SE gates, `resnet18_pokebnn` with them); the others are "
                  "the engines' published measurements (../shared/reference/anchors.md). The estimates leave out "
                  "what the method leaves out (bitpacking and padding stages, pooling, the VM's calls; weights and "
                  "activations are assumed in L1), so a board would be slower by that much.", "",
                  "| engine | network | core | ms, batch 1, 1 thread | kind |", "|---|---|---|---:|---|"]
        lines += [f"| {engine} | Bi-Real Net 18 | {core} | {ms} | published |" for engine, core, ms in BIREAL18]
        for recipe in resnet18:
            rows_by_core = networks[recipe][2]
            for label, mcpu, hz in CORES:
                if mcpu == "neoverse-n1" and hz != A76_CLOCK:
                    continue
                ms = network_ms(rows_by_core[mcpu], hz)
                lines.append(f"| bnncc | {RESNET18[recipe]} | {label}, {hz / 1e9:.1f} GHz | {ms * median:.1f} "
                             f"({ms * low:.1f}-{ms * high:.1f}; {ms:.1f} uncalibrated) | estimate x calibration |")
    lines += ["", "qemu dynamic instruction counts: not given; a TCG plugin needs `qemu-plugin.h`, which Debian "
              "ships only in the qemu source package, and this machine's apt has no deb-src entries.", "", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=sorted(NETWORKS), default=list(NETWORKS),
                        help="the networks to estimate (pokebnn_1x, which the report details, is always built)")
    parser.add_argument("--results", type=Path, help="write the summary into this markdown file's section")
    parser.add_argument("--workdir", type=Path,
                        help="keep the arm64 builds here and reuse them (default: a temporary folder)")
    args = parser.parse_args()
    if not estimate.available():
        raise SystemExit("llvm-19 not found: apt-get install llvm-19")
    recipes = ["pokebnn_1x"] + [r for r in args.recipes if r != "pokebnn_1x"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        networks = {}
        for recipe in recipes:
            model, library, calls = build_arm64(recipe, workdir)
            networks[recipe] = (model, library, arm_estimates(model, library, calls))
        loads = [os.getloadavg()[0]]
        calibration = calibrate(Path(tmp), {"host": x86_64.target_for_flags(x86_64.cpu_flags(), 1)})["host"]
        loads.append(os.getloadavg()[0])
        text = report(networks, calibration, f"{min(loads):.1f}-{max(loads):.1f}")
    Console(width=200).print(text, markup=False, highlight=False)
    if args.results:
        write_section(args.results, text, SECTION)


if __name__ == "__main__":
    main()
