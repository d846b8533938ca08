"""``bnncc convert MODEL --recipe R --target T [--data DIR --epochs N | --max-steps N] [-o OUTDIR]``."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from bnncc.cli._app import app, console
from bnncc.errors import BnnccError


@app.command()
def convert(
    model: Path = typer.Argument(..., help="ONNX model of a float ResNet (e.g. a torchvision ResNet-50 export)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", show_default=False,
                                          help="folder for model.so, model.json, model.onnx and the report "
                                               "[default: MODEL-RECIPE-TARGET in the current folder]"),
    recipe: str = typer.Option("pokebnn_1x", "--recipe", "-r", help="shipped recipe name or path to a .toml"),
    target: str = typer.Option("x86-64", "--target", "-t", help="x86-64 (this CPU; x86-64-avx2, -avx512bw, -avx512: a class), arm64 or cuda"),
    data: Optional[Path] = typer.Option(None, "--data", help="IDX folder, ImageFolder tree or tar shards: fine-tune on it"),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="fine-tuning epochs (default 1; with --data)"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="stop fine-tuning after N steps"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="fine-tuning batch size (default 64; with --data)"),
    overrides: list[str] = typer.Option([], "--set", help="override a recipe key, e.g. train.lr=3e-2"),
    seed: int = typer.Option(0, "--seed", help="seed of data order and augmentation"),
) -> None:
    """Import, rewrite, fine-tune (with --data), compile and report; reuse stages whose inputs did not change."""
    from bnncc.pipeline import ConvertOptions, convert as run_convert
    from bnncc.targets.bundle import bundles

    training = {"epochs": epochs, "max_steps": max_steps, "batch_size": batch_size}
    given = {name: value for name, value in training.items() if value is not None}
    if data is None and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise BnnccError(f"{flags}: set the fine-tune, which runs only with --data DIR")
    if output is None:
        output = default_output(model, recipe, target)
    options = ConvertOptions(recipe=recipe, overrides=tuple(overrides), target=target, data=data, seed=seed, **given)
    result = run_convert(model, output, options)
    print_result(result)
    if bundles(target):
        bundle = shlex.join(["bnncc", "bundle", str(result.outdir)])
        console.print(f"to run it without Python (on the device): {bundle} -o DIR", soft_wrap=True, highlight=False)
    if not result.trained:
        # the recipe's rate is the paper's for 800 ImageNet epochs; a few epochs need far more (README)
        rate = [] if any(o.startswith("train.lr=") for o in overrides) else ["--set", "train.lr=3e-2"]
        command = ["bnncc", "convert", str(model), "--recipe", recipe, "--target", target,
                   *[a for o in overrides for a in ("--set", o)], "--data", "DIR", "--epochs", "N", *rate,
                   "-o", str(output)]
        untrained_notice(shlex.join(command))


def default_output(model: Path, recipe: str, target: str) -> Path:
    """``resnet50-pokebnn_1x-arm64`` for ``bnncc convert resnet50.onnx --recipe pokebnn_1x --target arm64``: the
    one-line command a user reads first names no folder, and conversions of one model by other recipes or for
    other targets must not overwrite each other."""
    return Path(f"{model.stem}-{Path(recipe).name.removesuffix('.toml')}-{target}")


def print_result(result) -> None:
    """The stage table (ACE, whether reused, seconds) and where the outputs are."""
    table = Table(title=f"bnncc convert -> {result.outdir}")
    # trainable: `bnncc ace`'s params also count batch-norm statistics. At 80 columns rich narrowed every
    # column and cut a ResNet-50's 25,557,032 params to "25,557,0…": the numbers do not wrap, their headings
    # are two lines, and the stage names wrap instead
    for column in ("stage", "ACE\n(1e9)", "CPU64\n(1e6)", "trainable\nparams", "size", "reused", "seconds"):
        table.add_column(column, justify="left" if column == "stage" else "right", no_wrap=column != "stage")
    keys = {"float import": "import", "rewrite": "rewrite", "fine-tune": "finetune", "compiled": "compile"}
    for stage in result.report.stages:
        key = keys[stage.name]
        table.add_row(stage.name, f"{stage.cost.total / 1e9:.4f}", f"{stage.cost.cpu64 / 1e6:.2f}",
                      f"{stage.cost.trainable_params:,}", f"{stage.file_bytes / 2**20:.2f} MiB",
                      "yes" if result.cached.get(key) else "", f"{result.seconds.get(key, 0):.1f}")
    console.print(table)
    accuracy = result.report.accuracy or {}
    if accuracy.get("student_top1") is not None:
        line = f"top-1: teacher {accuracy['teacher_top1']:.2f}%, PokeBNN {accuracy['student_top1']:.2f}%"
        if accuracy.get("library_top1") is not None:
            line += f", compiled library {accuracy['library_top1']:.2f}%"
        console.print(line, soft_wrap=True)
    if result.report.latency:
        threads = result.report.latency["threads"]
        console.print(f"latency (batch 1, {threads} thread{'' if threads == 1 else 's'}): "
                      f"{result.report.latency['median_ms']:.2f} ms", soft_wrap=True)
    console.print(f"outputs: {result.outdir}/model.so, model.json, model.onnx; report {result.outdir}/report.md",
                  soft_wrap=True)


def untrained_notice(command: str) -> None:
    console.print(Text.assemble(("The network is untrained:", "bold yellow"),
                                " its binary weights come straight from the rewrite, so its outputs are not "
                                "meaningful. To fine-tune it on a data set (IDX folder, ImageFolder tree or tar "
                                f"shards), run:\n  {command}"), soft_wrap=True)
