"""``bnncc verify OUTDIR [--reference MODEL.onnx] [--n N] [--batch B]``: library vs onnxruntime."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from bnncc.cli._app import app, console


@app.command("verify")
def verify_command(
    library: Path = typer.Argument(..., help="folder written by `bnncc compile`"),
    reference: Path = typer.Option(None, "--reference", "-r", help="reference PokeBNN graph (default OUTDIR/model.onnx)"),
    n: int = typer.Option(8, "--n", min=1, max=10000, help="random inputs"),
    batch: int = typer.Option(1, "--batch", "-b", min=1, help="batch size of the library calls"),
) -> None:
    """Compare the library with onnxruntime on random inputs; exit 1 on disagreement."""
    from bnncc.verification import verify

    report = verify(library, reference, n=n, batch=batch)
    console.print(f"argmax agreement {report.argmax_agree}/{report.inputs}; largest logit difference "
                  f"{report.max_abs_diff:.3g} (largest reference logit {report.max_ref:.3g}); onnxruntime's "
                  f"rounding spread (unoptimized, inputs moved by 1e-6) {report.max_spread:.3g}; inputs "
                  f"explained by that spread: {report.explained}")
    for line in report.failures:
        console.print(Text.assemble(("FAIL", "red"), " ", line))
    if not report.ok:
        raise typer.Exit(1)
