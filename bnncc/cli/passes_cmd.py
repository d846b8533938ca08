"""``bnncc passes``: list the registered graph passes, their parameters and one-line docs."""

from __future__ import annotations

import inspect

from rich.table import Table

from bnncc.cli._app import app, console
from bnncc.passmanager import list_passes, pass_factory


@app.command()
def passes() -> None:
    """List the registered passes a recipe can name, with their parameters."""
    table = Table(title="registered passes")
    for column in ("pass", "parameters", "what it does"):
        table.add_column(column)
    for name in list_passes():
        factory = pass_factory(name)
        table.add_row(name, _parameters(factory), _summary(factory))
    console.print(table)


def _parameters(factory) -> str:
    """``key=default`` for each keyword parameter of the pass."""
    params = inspect.signature(factory).parameters.values()
    return ", ".join(f"{p.name}={p.default!r}" for p in params if p.default is not p.empty)


def _summary(factory) -> str:
    """The first line of the pass's docstring."""
    doc = inspect.getdoc(factory) or ""
    return doc.splitlines()[0] if doc else ""
