"""``bnncc compile MODEL --target x86-64|arm64|cuda -o OUTDIR [--batch N]...``: PokeBNN graph -> library folder."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bnncc.cli._app import app, console
from bnncc.domain import MAX_BATCH


@app.command("compile")
def compile_command(
    model: Path = typer.Argument(..., help="PokeBNN ONNX graph (from `bnncc rewrite`)"),
    output: Path = typer.Option(..., "--output", "-o", help="library folder to write (model.so, model.json, model.onnx)"),
    target: str = typer.Option("x86-64", "--target", "-t", help="x86-64 (this CPU; x86-64-avx2, -avx512bw, -avx512: a class), arm64 or cuda (`bnncc targets`)"),
    batch: list[int] = typer.Option([1], "--batch", "-b", min=1,
                                    help=f"batch size to compile for, 1 to {MAX_BATCH} (a target may take fewer); "
                                         "repeat for several"),
) -> None:
    """Lower MODEL through TVM with bnncc's kernels and write a standalone library."""
    from bnncc.targets.build import compile as compile_model

    folder = compile_model(model, output, target=target, batches=tuple(batch), show_progress=True)
    size = (folder / "model.so").stat().st_size
    # the batches as recorded: compile adds batch 1 to those asked for
    held = sorted(int(b) for b in json.loads((folder / "model.json").read_text(encoding="utf-8"))["functions"])
    # soft_wrap here and below: a result line stays one line in a pipe (80 columns), for scripts and logs
    console.print(f"{model} -> {folder}/model.so ({size / 2**20:.1f} MiB, {target}, batch {', '.join(map(str, held))})",
                  soft_wrap=True)
