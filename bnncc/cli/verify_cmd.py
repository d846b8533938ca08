"""``bnncc verify OUTDIR [--reference MODEL.onnx] [--n N] [--batch B] [--input IMAGE ...]``: library vs onnxruntime."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from bnncc.cli._app import app, console

# runs of this many inputs or fewer (the default 8) print no progress bar: they take seconds
QUIET_UP_TO = 16


@app.command("verify")
def verify_command(
    library: Path = typer.Argument(..., help="folder written by `bnncc compile`"),
    reference: Path = typer.Option(None, "--reference", "-r",
                                   help="reference PokeBNN graph (default LIBRARY/model.onnx)"),
    # no typer max: verify refuses more than MAX_INPUTS itself, saying why
    n: int = typer.Option(8, "--n", min=1, help="random inputs (at most 1000: each takes 6 onnxruntime runs)"),
    batch: int = typer.Option(1, "--batch", "-b", min=1, help="batch size of the library calls"),
    inputs: list[Path] = typer.Option([], "--input", "-i", help="also an image (PNG/JPEG/...) or a .npy array, read "
                                      "as `bnncc run` reads it; repeat --input for more"),
) -> None:
    """Compare the library with onnxruntime on random inputs (and the given ones); exit 1 on disagreement."""
    from bnncc.cli._inputs import read_input
    from bnncc.runtime import read_library
    from bnncc.verification import verify

    manifest, _ = read_library(library)
    chw, preprocessing = tuple(manifest["input"]["shape"][1:]), manifest.get("preprocessing")
    images = [image for path in inputs for image in read_input(path, chw, preprocessing)]
    report = verify(library, reference, n=n, batch=batch, images=images,
                    show_progress=n + len(images) > QUIET_UP_TO)
    console.print(f"argmax agreement {report.argmax_agree}/{report.inputs}; largest logit difference "
                  f"{report.max_abs_diff:.3g} (largest reference logit {report.max_ref:.3g}); onnxruntime's "
                  f"rounding spread (unoptimized, folded parameters moved by 2e-7, inputs by 1e-6) "
                  f"{report.max_spread:.3g}; inputs explained by that spread: {report.explained}", soft_wrap=True)
    for line in report.failures:
        console.print(Text.assemble(("FAIL", "red"), " ", line), soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)
