"""``bnncc run OUTDIR --input image.png|x.npy [--input ...] [--top K]``: the top classes of each input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from bnncc.cli._app import app, console, err_console
from bnncc.cli._inputs import read_input
from bnncc.errors import BnnccError, printable


@app.command("run")
def run_command(
    library: Path = typer.Argument(..., help="folder written by `bnncc compile`"),
    inputs: list[Path] = typer.Option(..., "--input", "-i", help="an image (PNG/JPEG/...) or a .npy array (C,H,W) "
                                      "or (N,C,H,W); repeat --input for more"),
    top: int = typer.Option(5, "--top", "-k", min=1, help="how many classes to print"),
) -> None:
    """Run the library on each INPUT and print the top classes with their logits."""
    from bnncc.runtime import load

    lib = load(library)
    preprocessing = lib.manifest.get("preprocessing")
    batches = [read_input(path, lib.input_chw, preprocessing) for path in inputs]  # every one read before any runs
    if preprocessing is None and any(path.suffix.lower() != ".npy" for path in inputs):
        # a note, on stderr: stdout holds the top classes alone, which scripts read
        err_console.print(f"{library}: records no input normalisation (bnncc fine-tuning records the one it "
                          f"trained with): images go in as pixels in [0, 1]", style="dim", highlight=False,
                          soft_wrap=True)
    for path, x in zip(inputs, batches):
        logits = lib(x)
        if not np.isfinite(logits).all():
            raise BnnccError(f"{path}: the network's outputs overflow (NaN or infinite logits) on inputs up to "
                             f"{np.abs(x).max():.3g}, far from what it was trained on")
        for i, row in enumerate(logits):
            # the input's path on a line of its own, not a table title, which is wrapped to the
            # table's width and cut at the terminal's: scripts read which input a table is of
            console.print(printable(f"{path} [{i}]" if len(logits) > 1 else str(path)), style="italic",
                          highlight=False, soft_wrap=True)
            table = Table()
            table.add_column("class", justify="right")
            table.add_column("logit", justify="right")
            for c in np.argsort(-row)[:top]:
                table.add_row(str(int(c)), f"{row[c]:.4f}")
            console.print(table)
