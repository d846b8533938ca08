"""``bnncc ace MODEL [--json] [--float-bits N] [--per-layer/--no-per-layer]``: the cost of any bnncc graph."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bnncc.cli._app import app, console
from bnncc.domain import FLOAT_BITS


@app.command()
def ace(
    model: Path = typer.Argument(..., help="ONNX model: a float ResNet or a (rewritten) PokeBNN graph"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    float_bits: int = typer.Option(16, "--float-bits", min=FLOAT_BITS.start, max=FLOAT_BITS[-1],
                                   help="count a float MAC as N x N bits (16: bf16)"),
    per_layer: bool = typer.Option(True, "--per-layer/--no-per-layer", help="one row per conv and dense layer"),
) -> None:
    """Print MODEL's ACE, CPU64, MACs, weight bits, parameters and scalar ops, per layer and in total."""
    from bnncc.cost import ace as measure, format_summary, format_table

    report = measure(model, float_bits=float_bits)
    if as_json:
        data = report.to_dict()
        if not per_layer:
            del data["layers"]
        # soft_wrap: machine-read output must not be broken across lines
        console.print(json.dumps(data, indent=2), highlight=False, soft_wrap=True)
    else:
        # the path on a line of its own, not the table's title, which is wrapped to the table's width:
        # a long path came out cut in two, in a file too, where no line held it
        console.print(str(model), style="italic", highlight=False, soft_wrap=True)
        console.print(format_table(report, per_layer=per_layer))
        # the exact figures a paragraph of its own, wrapped to the console's width: as the table's caption they
        # were wrapped to the table's, in a file too, where "MACs" ended one line and its figure began the next
        console.print(format_summary(report), style="table.caption", highlight=False)
