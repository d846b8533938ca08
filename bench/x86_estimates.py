"""The x86 classes without a vector popcount on the Intel cores of AVX-512BW (Skylake-SP, Cascade
Lake), without the hardware: the binary conv kernels of the AVX2 build and of the AVX-512BW build
(512-bit nibble lookups, bnncc.targets.x86_64) through llvm-mca's models of those cores.

Run: ``TVM_NUM_THREADS=1 .venv/bin/python bench/x86_estimates.py [--results bench/RESULTS.md]`` (needs
llvm-19 and gcc; about 6 minutes on 2 shared cores; the calibration runs the builds this CPU runs: on an
AVX2 CPU the AVX2 build's only).

1. For every ResNet-50 binary conv shape at batch 1 (``kernels.resnet50_shapes``), each build's kernel
   as bench/kernels.py builds it, disassembled and estimated by ``bnncc.targets.estimate`` (its hot
   loop of vpshufb lookups times its trip count, plus the loops around it whose passes can be
   counted) on ``MODELS``: the AVX-512BW build against the AVX2 build on the cores that would run
   it. (Both cores run a vpshufb of either width on one port, one a cycle: so the 512-bit lookups
   count twice the bits a cycle where the 256-bit ones are the bound.)
2. Calibrates the method on this machine (bench/arm64.py's ``calibrate``): both builds' kernels
   measured (one thread, CPU time, in cycles at the clock measured right before; per shape the two
   builds take turns, ``ROUNDS`` each, and the fastest counts, so that a slow stretch of a shared
   machine falls on both) against the estimate with LLVM's model of this CPU. On Zen 4, which runs a
   512-bit instruction as two 256-bit halves, the model's zmm figures are the part to distrust:
   the measured AVX-512BW / AVX2 ratio says how much.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
from pathlib import Path

from arm64 import calibrate, x86_kernel_estimate
from kernels import AVX2, AVX2_FLAGS, AVX512BW, AVX512BW_FLAGS, cpu_model, resnet50_shapes, write_section
from rich.console import Console

from bnncc.targets import estimate, x86_64

SECTION = "## AVX-512BW and AVX2 kernels on Intel core models (llvm-mca)"
BUILDS = {AVX2: AVX2_FLAGS, AVX512BW: AVX512BW_FLAGS}
# (label, llvm-mca core model): the Intel cores with AVX-512BW and no VPOPCNTDQ (LLVM 19's cascadelake
# model gives every one of these kernels the same cycles as skylake-avx512: one core design)
MODELS = [("Skylake-SP / Cascade Lake", "skylake-avx512")]
ROUNDS = 3  # of each build's kernel per shape in the calibration, taking turns


def estimates(workdir: Path) -> dict[str, dict[str, list[float]]]:
    """{build: {core model: estimated cycles of each shape's kernel, in resnet50_shapes order}}."""
    rows: dict[str, dict[str, list[float]]] = {}
    for name, flags in BUILDS.items():
        target = x86_64.target_for_flags(flags, 1)
        for _, model in MODELS:
            rows.setdefault(name, {})[model] = [x86_kernel_estimate(shape, target, workdir, model)[1].cycles
                                                for shape in resnet50_shapes()]
    return rows


def weighted(cycles: list[float]) -> float:
    """The 48 convs of one forward pass: each shape's cycles times how often it runs."""
    return sum(c * shape.count for c, shape in zip(cycles, resnet50_shapes()))


def report(rows: dict, calibration: dict[str, list[dict]]) -> str:
    shapes = resnet50_shapes()
    header = ["layer", "shape", "count"] + [f"{label}: AVX2 / AVX-512BW cycles" for label, _ in MODELS] + \
        [f"{label}: AVX2 / AVX-512BW" for label, _ in MODELS] + ["this CPU measured: AVX2 / AVX-512BW"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    measured = {name: [r["measured"] for r in runs] for name, runs in calibration.items()}
    both = len(measured) == len(BUILDS)  # an AVX2 CPU measures the AVX2 build only
    for k, shape in enumerate(shapes):
        cells = [shape.name, f"{shape.cin}->{shape.cout} {shape.kernel}x{shape.kernel}/{shape.stride} @{shape.size}",
                 str(shape.count)]
        cells += [f"{rows[AVX2][model][k]:,.0f} / {rows[AVX512BW][model][k]:,.0f}" for _, model in MODELS]
        cells += [f"{rows[AVX2][model][k] / rows[AVX512BW][model][k]:.2f}x" for _, model in MODELS]
        cells.append(f"{measured[AVX2][k] / measured[AVX512BW][k]:.2f}x" if both else "-")
        lines.append("| " + " | ".join(cells) + " |")
    totals = [f"{weighted(rows[AVX2][model]):,.0f} / {weighted(rows[AVX512BW][model]):,.0f}" for _, model in MODELS]
    totals += [f"**{weighted(rows[AVX2][model]) / weighted(rows[AVX512BW][model]):.2f}x**" for _, model in MODELS]
    totals.append(f"{weighted(measured[AVX2]) / weighted(measured[AVX512BW]):.2f}x" if both else "-")
    lines.append("| all 48 binary convs |  | 48 | " + " | ".join(totals) + " |")
    host = estimate.host_cpu()
    spread = []
    for name, runs in calibration.items():
        ratios = [r["measured"] / r["estimated"] for r in runs]
        estimated = weighted([r["estimated"] for r in runs])
        spread.append(f"{name}: measured / estimated {statistics.median(ratios):.2f} per shape (median; "
                      f"{min(ratios):.2f}-{max(ratios):.2f}), all 48 convs {weighted(measured[name]) / estimated:.2f}")
    if both:
        model_ratio = weighted([r["estimated"] for r in calibration[AVX2]]) / \
            weighted([r["estimated"] for r in calibration[AVX512BW]])
        spread.append(f"the `{host}` model puts AVX2 / AVX-512BW at {model_ratio:.2f}x for the 48 convs, where this "
                      f"CPU measures {weighted(measured[AVX2]) / weighted(measured[AVX512BW]):.2f}x")
    else:
        spread.append("this CPU cannot run the AVX-512BW build")
    return "\n".join([
        SECTION, "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {cpu_model()} (calibration only). Command: "
        "`TVM_NUM_THREADS=1 .venv/bin/python bench/x86_estimates.py --results bench/RESULTS.md`. LLVM 19 "
        "(`llvm-objdump`, `llvm-mca`).", "",
        "Each ResNet-50 binary conv kernel at batch 1 (packed activations in, int32 out, as bench/kernels.py builds "
        "it), of the AVX2 build (x86-64-v3: 256-bit nibble lookups) and of the AVX-512BW build (x86-64-v4 without "
        "VPOPCNTDQ: 512-bit lookups), estimated by `bnncc.targets.estimate` with llvm-mca's models of the Intel "
        "cores that have AVX-512BW and no VPOPCNTDQ: its hot loop of vpshufb lookups times its trip count, plus "
        "the loops around it whose passes can be counted (steady state, all loads hitting L1). One thread; "
        "cycles a call.", "",
        *lines, "",
        f"Calibration on this machine (LLVM's model of it: `{host}`; the kernels measured by CPU time, one thread, "
        "in cycles at the clock measured right before): " + "; ".join(spread) + ".", "", "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="write the table into this markdown file's section")
    args = parser.parse_args()
    if not estimate.available():
        raise SystemExit("llvm-19 not found: apt-get install llvm-19")
    if not AVX2_FLAGS <= x86_64.cpu_flags():
        raise SystemExit("the calibration runs the AVX2 build: it needs an AVX2 CPU")
    with tempfile.TemporaryDirectory() as tmp:
        rows = estimates(Path(tmp))
        runs_here = {name: x86_64.target_for_flags(flags, 1) for name, flags in BUILDS.items()
                     if flags <= x86_64.cpu_flags()}
        calibration = calibrate(Path(tmp), runs_here, ROUNDS)
    text = report(rows, calibration)
    Console(width=220).print(text, markup=False, highlight=False)
    if args.results:
        write_section(args.results, text, SECTION)


if __name__ == "__main__":
    main()
