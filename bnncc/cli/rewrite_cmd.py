"""``bnncc rewrite MODEL --recipe NAME -o OUT [--set key=value]...``: float ResNet -> PokeBNN graph."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import typer
from rich.table import Table

from bnncc.cli._app import app, console
from bnncc.fileio import atomic_path, check_writable, refuse_overwriting
from bnncc.passmanager import PassRecord


@app.command()
def rewrite(
    model: Path = typer.Argument(..., help="ONNX model of a float ResNet (bottleneck or basic blocks)"),
    recipe: str = typer.Option("pokebnn_1x", "--recipe", "-r", help="shipped recipe name or path to a .toml"),
    output: Path = typer.Option(..., "--output", "-o", help="where to write the rewritten ONNX model"),
    overrides: list[str] = typer.Option([], "--set", help="override a recipe key, e.g. passes.poke_conv.clip_bound=2"),
) -> None:
    """Rewrite MODEL with a recipe's passes, write the result and print ACE after every pass."""
    from bnncc.frontend import input_files, load
    from bnncc.rewriting import rewrite as rewrite_model

    refuse_overwriting({"the result": output}, input_files("the input model", model))
    check_writable(output)
    result, rows = rewrite_model(load(model), recipe, overrides)
    with atomic_path(output) as tmp:
        ir.save(result, tmp)
    # on a line of its own, not the table's title, which is wrapped to the table's width: the paths came
    # out cut in two, in a file too, where no line held them
    console.print(f"{model} -> {output} ({recipe})", style="italic", highlight=False, soft_wrap=True)
    console.print(_table(rows))


def _table(rows: list[PassRecord]) -> Table:
    """One row per pass: whether it changed the model, the node count and the ACE after it (exact, as
    `bnncc ace` gives it: ".4g" read "9.25e+11" beside "9.548e+11" and hid a pass's small change)."""
    table = Table()
    for column, justify in (("pass", "left"), ("modified", "left"), ("nodes", "right"), ("ACE", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(row.name, "yes" if row.modified else "", str(row.nodes), f"{row.measure.total:,}")
    return table
