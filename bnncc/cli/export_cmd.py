"""``bnncc export``: write a PokeBNN graph in another dialect (QONNX, for FINN and hls4ml)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnncc.cli._app import app, console
from bnncc.errors import BnnccError
from bnncc.fileio import check_writable, refuse_overwriting


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="PokeBNN graph (from `bnncc rewrite` or `bnncc finetune`).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the exported model.")],
    format: Annotated[str, typer.Option("--format", help="Export dialect: qonnx.")] = "qonnx",
    batch: Annotated[int, typer.Option("--batch", "-b", min=1,  # -b: as compile's and verify's
                                       help="Fixed batch size of the export (FINN wants static shapes).")] = 1,
) -> None:
    """Export a PokeBNN graph as QONNX (BipolarQuant / IntQuant + standard ONNX)."""
    from bnncc.frontend import input_files
    from bnncc.qonnx import export_qonnx

    if format != "qonnx":
        raise BnnccError(f"--format {format!r}: the export formats are: qonnx")
    refuse_overwriting({"the result": output}, input_files("the input model", model))
    check_writable(output)
    console.print(f"wrote {export_qonnx(model, output, batch)}", soft_wrap=True)  # one line in a pipe too
