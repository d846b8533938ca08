"""``bnncc inspect MODEL [--json]``: show the ResNet structure the front end recognises."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer
from rich.table import Table

from bnncc.cli._app import app, console
from bnncc.errors import printable
from bnncc.resnet import ResNet


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="ONNX model of a float ResNet (bottleneck or basic blocks)"),
    as_json: bool = typer.Option(False, "--json", help="print the structure as JSON"),
) -> None:
    """Load MODEL, canonicalize it and print its stem, blocks and head."""
    from bnncc.frontend import load, recognize

    resnet = recognize(load(model))
    if as_json:
        # soft_wrap: long node names must not be broken across lines in machine-read output
        console.print(json.dumps(dataclasses.asdict(resnet), indent=2), highlight=False, soft_wrap=True)
    else:
        console.print(_table(resnet))


def _table(resnet: ResNet) -> Table:
    """One row for the stem, one per block, one for the head; size is the output size."""
    n, c, h, w = resnet.input_shape
    table = Table(title=printable(f"{resnet.input_name} ({n}, {c}, {h}, {w}) -> {resnet.output_name}"))
    for column in ("part", "stage", "index", "in", "mid", "out", "stride", "size", "shortcut"):
        table.add_column(column)
    stem = resnet.stem
    table.add_row("stem", "", "", str(c), "", str(stem.out_channels), str(stem.stride),
                  _size(stem.out_size), "")
    for b in resnet.blocks:
        table.add_row("block", str(b.stage), str(b.index), str(b.in_channels), str(b.mid_channels),
                      str(b.out_channels), str(b.stride), _size(b.out_size), "projection" if b.shortcut else "identity")
    head = resnet.head
    table.add_row("head", "", "", str(head.in_features), "", str(head.num_classes), "", "1x1", "")
    if resnet.notes:
        table.caption = "; ".join(resnet.notes)
    return table


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
