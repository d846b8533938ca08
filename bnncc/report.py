"""The conversion report: cost at every stage, per layer, accuracy and latency, as JSON, Markdown and plots.

A stage is one artifact of the pipeline (the float import, the rewritten PokeBNN graph, the
fine-tuned graph, the compiled library) and its :class:`bnncc.cost.CostReport`. The compiled
library runs the last ONNX stage's graph, so its cost is that graph's; its size is the library's.

Files written into the report folder, each atomically:

- ``report.json``: everything that is a function of the inputs (costs, sizes, accuracy); the
  same inputs give the same bytes.
- ``latency.json`` (libraries this CPU runs only): the measured latency, which varies from run to run and
  is therefore kept out of ``report.json``.
- ``report.md``: both, as tables, with the two plots; for an arm64 library, the binary convs'
  cycles estimated by llvm-mca (``bnncc.targets.estimate.library_estimate``, deterministic, so
  also in ``report.json``), or a note saying why there is no estimate.
- ``ace_stages.png``: ACE per stage; ``ace_layers.png``: ACE per layer of the deployed graph.
  Both log-scale, since the float import costs two orders of magnitude more than PokeBNN.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from pathlib import Path

from bnncc.cost import CostReport
from bnncc.errors import BnnccError
from bnncc.fileio import atomic_write_bytes, atomic_write_text

__all__ = ["Stage", "Report", "write_report", "REPORT_FORMAT"]

logger = logging.getLogger(__name__)

REPORT_FORMAT = "bnncc-report/1"
STAGES_PLOT = "ace_stages.png"
LAYERS_PLOT = "ace_layers.png"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage: its name, its artifact's file name and size in bytes, and the graph's cost."""

    name: str
    artifact: str
    file_bytes: int
    cost: CostReport

    def to_dict(self) -> dict:
        """Totals only; the per-layer table is the report's, for the deployed graph."""
        return {
            "stage": self.name,
            "artifact": self.artifact,
            "file_bytes": self.file_bytes,
            "ace": self.cost.total,
            "cpu64": self.cost.cpu64,
            "macs": self.cost.macs,
            "binary_macs": self.cost.binary_macs,
            "trainable_params": self.cost.trainable_params,
            "weight_bits": self.cost.weight_bits,
            # the weights as the target stores them: w_bits per weight, float weights at 32 bits
            "weight_bytes": self.cost.weight_bits // 8,
        }


@dataclasses.dataclass(frozen=True)
class Report:
    """What one ``bnncc convert`` produced.

    ``accuracy`` maps names such as ``student_top1`` to percentages (None: not measured);
    ``latency`` holds milliseconds per batch-1 image measured on the host (None: not the host).
    """

    model: str
    recipe: str
    target: str
    trained: bool
    stages: tuple[Stage, ...]
    accuracy: dict[str, float | None] | None = None
    latency: dict[str, float] | None = None
    estimate: dict | None = None  # arm64: ``library_estimate``'s figures, or {"skipped": why}

    @property
    def deployed(self) -> Stage:
        """The last stage: the one whose graph the library runs."""
        return self.stages[-1]

    @property
    def ace_reduction(self) -> float | None:
        """The float import's ACE over the deployed graph's (None for a deployed ACE of 0)."""
        deployed = self.deployed.cost.total
        return self.stages[0].cost.total / deployed if deployed else None

    def to_dict(self) -> dict:
        """The deterministic part of the report (no latency)."""
        return {
            "format": REPORT_FORMAT,
            "model": self.model,
            "recipe": self.recipe,
            "target": self.target,
            "trained": self.trained,
            "stages": [stage.to_dict() for stage in self.stages],
            "ace_reduction": self.ace_reduction,
            "accuracy": self.accuracy,
            "layers": [_layer_row(layer) for layer in self.deployed.cost.layers],
            **({"estimate": self.estimate} if self.estimate is not None else {}),
        }


def _layer_row(layer) -> dict:
    return {"name": layer.name, "op": layer.op_type, "w_bits": layer.w_bits, "a_bits": layer.a_bits,
            "macs": layer.macs, "ace": layer.ace, "cpu64": layer.cpu64, "weight_bits": layer.weight_bits}


def write_report(report: Report, folder: str | Path) -> list[Path]:
    """Write report.json, latency.json (when measured), report.md and the two plots into ``folder``
    (for an arm64 target, the library folder: its estimate is added first, ``arm64_estimate``)."""
    folder = Path(folder)
    if report.target == "arm64" and report.estimate is None:
        report = dataclasses.replace(report, estimate=arm64_estimate(report, folder))
    written = [folder / "report.json", folder / STAGES_PLOT, folder / LAYERS_PLOT, folder / "report.md"]
    atomic_write_text(written[0], json.dumps(report.to_dict(), indent=2) + "\n")
    atomic_write_bytes(written[1], _stages_plot(report))
    atomic_write_bytes(written[2], _layers_plot(report))
    atomic_write_text(written[3], markdown(report))
    if report.latency is not None:
        written.append(folder / "latency.json")
        atomic_write_text(written[-1], json.dumps(report.latency, indent=2) + "\n")
    else:  # an earlier report's figure would pass for this library's
        (folder / "latency.json").unlink(missing_ok=True)
    logger.info("report written to %s", folder / "report.md")
    return written


def arm64_estimate(report: Report, folder: Path) -> dict:
    """The binary convs' llvm-mca estimate of the arm64 library in ``folder``, or why there is none."""
    from bnncc.targets import estimate  # here, not at the top: it imports TVM, which other targets' reports skip

    if not estimate.available():
        return {"skipped": f"llvm-19 not installed ({estimate.LLVM_BIN}/llvm-mca; apt-get install llvm-19)"}
    try:
        return estimate.library_estimate(folder, report.deployed.cost.layers)
    except (BnnccError, OSError) as error:  # a kernel form the estimator does not know: say so, convert on
        return {"skipped": f"no estimate: {error}"}


# --------------------------------------------------------------------------- markdown


def markdown(report: Report) -> str:
    """The report as Markdown: summary, stage table, accuracy, latency, plots, per-layer table."""
    lines = [f"# bnncc report: {_code(Path(report.model).name)}", "",
             f"Recipe {_code(report.recipe)}, target {_code(report.target)}. "
             + ("Fine-tuned with distillation from the float import." if report.trained else
                "**Not fine-tuned: the binary network has untrained weights and its outputs are not "
                "meaningful.**"), ""]
    reduction = report.ace_reduction
    if reduction:
        # in bit-MACs, as the stages plot labels them: in units of 1e9, "g" wrote a ResNet-152 at 448 px's
        # 1.18e13 as "1.178e+04e9"
        lines += [f"ACE falls from {report.stages[0].cost.total:.4g} (float import) to "
                  f"{report.deployed.cost.total:.4g} (deployed): {reduction:.1f}x less.", ""]
    lines += ["## Cost at every stage", "",
              "| stage | artifact | file size | ACE (1e9) | CPU64 (1e6) | trainable params | weight size |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for stage in report.stages:
        cost = stage.cost
        lines.append(f"| {stage.name} | {_cell(stage.artifact)} | {_bytes(stage.file_bytes)} | "
                     f"{cost.total / 1e9:.4f} | "
                     f"{cost.cpu64 / 1e6:.2f} | {cost.trainable_params:,} | {_bytes(cost.weight_bits // 8)} |")
    lines += ["", "ACE = MACs x weight bits x activation bits (float MACs at "
              f"{report.stages[0].cost.float_bits} x {report.stages[0].cost.float_bits}); CPU64 = binary MACs / 64 "
              "+ other MACs; weight size at each layer's weight bits (float weights at 32).", ""]
    if report.accuracy:
        rows = []
        for who in ("teacher", "student", "library"):
            top1, top5 = report.accuracy.get(f"{who}_top1"), report.accuracy.get(f"{who}_top5")
            if top1 is not None or top5 is not None:
                rows.append(f"| {_WHO[who]} | {percent(top1)} | {percent(top5)} |")
        lines += ["## Accuracy (test split)", ""]
        if rows:
            lines += ["| model | top-1 | top-5 |", "|---|---:|---:|", *rows, ""]
            if report.accuracy.get("student_top1") is not None and report.accuracy.get("library_top1") is None:
                # convert runs only a library this CPU runs (registry.runs_natively): say why its row is missing
                lines += [f"The {_code(report.target)} library is not run on this machine: `bnncc verify` compares it "
                          "with the fine-tuned graph where it runs.", ""]
        else:  # the test split's classes are not the network's (fine-tuning distils: it needs no labels)
            lines += ["Not measured: the test split's labels are of other classes than the network's outputs "
                      "(fine-tuning distils from the float model and needs no labels).", ""]
    if report.latency:
        threads = report.latency["threads"]
        lines += ["## Latency on this machine", "",
                  f"Batch 1, {threads} thread{'' if threads == 1 else 's'}, median of {report.latency['runs']} runs: "
                  f"**{report.latency['median_ms']:.2f} ms** (min {report.latency['min_ms']:.2f} ms). "
                  "Measured values: `latency.json` (not in report.json, which is reproducible).", ""]
        load, cpus = report.latency.get("load_average"), report.latency.get("cpus")
        if load is not None and cpus and load > 0.5 * cpus:
            lines += [f"The machine was busy (load average {load:.1f} on {cpus} CPUs): the figure is contention, "
                      "not the library; measure again on a quiet machine.", ""]
    if report.estimate is not None:
        lines += _estimate_lines(report.estimate)
    lines += ["## Plots", "", f"![ACE per stage]({STAGES_PLOT})", "", f"![ACE per layer]({LAYERS_PLOT})", "",
              f"## Per layer ({report.deployed.name})", "",
              "| layer | op | w x a | MACs | ACE (1e6) | share | CPU64 | weight bits |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    total = report.deployed.cost.total or 1
    for layer in report.deployed.cost.layers:
        lines.append(f"| {_cell(layer.name)} | {layer.op_type} | {layer.w_bits}x{layer.a_bits} | {layer.macs:,} | "
                     f"{layer.ace / 1e6:.3f} | {100 * layer.ace / total:.1f}% | {layer.cpu64:,.0f} | "
                     f"{layer.weight_bits:,} |")
    return "\n".join(lines) + "\n"


def _estimate_lines(estimate: dict) -> list[str]:
    """The arm64 estimate section: per binary conv, its cycles, binary MACs per cycle and time."""
    if "skipped" in estimate:
        return ["## Estimated speed on ARM", "", f"Skipped: {estimate['skipped']}.", ""]
    clock = estimate["clock_hz"]
    total = estimate["binary_cycles"]
    macs = sum(row["binary_macs"] for row in estimate["layers"])
    lines = [f"## Speed on ARM ({estimate['label']})", "",
             f"**Estimates, not measurements** (LLVM {estimate['llvm']}): each binary conv's hot loop from this "
             "library's disassembly through llvm-mca, times its trip count (bits the layer popcounts / bits per "
             "iteration), plus the loops around it (chunk widening, tile epilogue: `bnncc.targets.estimate`). "
             "Not counted: the int8 stem and head, the SE gates; "
             "the whole network and the error bar from calibrating the method on x86-64: `bench/arm64.py`, "
             "bench/RESULTS.md.", "",
             f"Binary convs, one core: **{total / clock * 1e3:.2f} ms** ({total / 1e6:.1f} Mcycles, "
             f"{macs / total:.1f} binary MACs/cycle).", "",
             "| layer | kernel | binary MACs | bits/iter | iterations | cycles/iter | bMACs/cycle | ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in estimate["layers"]:
        lines.append(f"| {_cell(row['layer'])} | {_cell(row['kernel'])} | {row['binary_macs']:,} | {row['bits_per_iteration']} | "
                     f"{row['iterations']:,} | {row['cycles_per_iteration']:.1f} | "
                     f"{row['binary_macs'] / row['cycles']:.1f} | {row['cycles'] / clock * 1e3:.3f} |")
    return lines + [""]


_WHO = {"teacher": "float teacher (import)", "student": "PokeBNN (onnx graph, fake-quant)",
        "library": "PokeBNN (compiled library)"}


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _code(text) -> str:
    """``text`` (a node or file name: the user's) as a Markdown code span on one line. Inside a code span
    no character acts as Markdown or HTML (a name "<img onerror=...>" or "[x](javascript:...)"); its
    fence is longer than any run of backticks in the name."""
    line = " ".join(str(text).split()) or "-"
    fence = "`" * (max(map(len, re.findall("`+", line)), default=0) + 1)
    if line.startswith("`") or line.endswith("`"):
        line = f" {line} "
    return fence + line + fence


def _cell(text) -> str:
    """``text`` as a code span in a table cell: a table splits its rows at "|" before it reads code spans."""
    return _code(text).replace("|", "\\|")


def percent(value: float | None) -> str:
    """An accuracy as the tables show it ("-" where none was measured)."""
    return "-" if value is None else f"{value:.2f}%"


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    """A figure drawn by the Agg backend, whatever backend the user's matplotlib defaults to."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    """PNG bytes without the Software/date metadata, so the same report gives the same file."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _stages_plot(report: Report) -> bytes:
    """One bar per stage, log scale, labelled with its ACE."""
    figure = _figure(7, 4)
    axes = figure.add_subplot()
    names = [stage.name for stage in report.stages]
    values = [max(stage.cost.total, 1) / 1e9 for stage in report.stages]
    colours = ["#7f7f7f"] + ["#1f77b4"] * (len(values) - 1)
    bars = axes.bar(names, values, color=colours)
    # (the float import's 1.05e12 read "1.05e+03e9" in units of 1e9)
    axes.bar_label(bars, labels=[f"{stage.cost.total:.3g}" for stage in report.stages], padding=2, fontsize=9)
    axes.set_yscale("log")
    axes.set_ylim(min(values) / 3, max(values) * 4)
    axes.set_ylabel("ACE (1e9 bit-MACs, log)")
    # "$" escaped: matplotlib reads text between two as math, and a file named "a$\badcmd$.onnx" failed the report
    axes.set_title(f"ACE per stage: {Path(report.model).name}, {report.recipe}".replace("$", r"\$"))
    axes.grid(axis="y", which="major", alpha=0.3)
    figure.tight_layout()
    return _png(figure)


_OP_COLOURS = {"BinaryConv": "#1f77b4", "QuantConv": "#ff7f0e", "SEGate": "#2ca02c", "QuantGemm": "#d62728",
               "Conv": "#7f7f7f", "Gemm": "#8c564b", "MatMul": "#8c564b"}


def _layers_plot(report: Report) -> bytes:
    """One bar per counted layer of the deployed graph, in graph order, coloured by op type."""
    layers = report.deployed.cost.layers
    figure = _figure(max(7.0, 0.09 * len(layers) + 2), 4.2)
    axes = figure.add_subplot()
    colours = [_OP_COLOURS.get(layer.op_type, "#9467bd") for layer in layers]
    axes.bar(range(len(layers)), [max(layer.ace, 1) / 1e6 for layer in layers], color=colours, width=0.85)
    axes.set_yscale("log")
    axes.set_xlim(-1, len(layers))
    axes.set_xlabel("layer, in graph order (stem left, head right)")
    axes.set_ylabel("ACE (1e6 bit-MACs, log)")
    axes.set_title(f"ACE per layer ({report.deployed.name}), total {report.deployed.cost.total / 1e9:.3g}e9")
    from matplotlib.patches import Patch

    present = sorted({layer.op_type for layer in layers})
    axes.legend(handles=[Patch(color=_OP_COLOURS.get(op, "#9467bd"), label=op) for op in present],
                fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.grid(axis="y", which="major", alpha=0.3)
    figure.tight_layout()
    return _png(figure)
