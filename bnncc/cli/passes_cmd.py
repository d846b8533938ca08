"""``bnncc passes``: list the registered graph passes, their parameters and one-line docs, and the
shipped recipes that chain them."""

from __future__ import annotations

import inspect

from rich.table import Table

from bnncc.cli._app import app, console
from bnncc.passmanager import list_passes, pass_factory
from bnncc.recipe import available_recipes, load_recipe


@app.command()
def passes() -> None:
    """List the registered passes a recipe can name, with their parameters, and the shipped recipes."""
    factories = {name: pass_factory(name) for name in list_passes()}
    console.print(_table("registered passes", ("pass", "parameters", "what it does"),
                         [(name, _parameters(f), _summary(f)) for name, f in factories.items()]))
    recipes = {name: load_recipe(name) for name in available_recipes()}
    console.print(_table("shipped recipes (--recipe NAME, or a .toml file of your own)",
                         ("recipe", "for blocks", "what it makes"),
                         [(name, r.blocks or "any", r.description) for name, r in recipes.items()]))


def _table(title: str, headers: tuple[str, str, str], rows: list[tuple[str, str, str]]) -> Table:
    """Names and parameters are what a recipe or a command line types: never wrapped (one parameter
    a line keeps that column narrow); the description folds into the rest, even at 80 columns."""
    table = Table(title=title)
    table.add_column(headers[0], no_wrap=True)
    table.add_column(headers[1], no_wrap=True)
    table.add_column(headers[2], min_width=20, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _parameters(factory) -> str:
    """``key=default`` for each keyword parameter of the pass, one a line."""
    params = inspect.signature(factory).parameters.values()
    return "\n".join(f"{p.name}={p.default!r}" for p in params if p.default is not p.empty)


def _summary(factory) -> str:
    """The first paragraph of the pass's docstring, on one line (its first line could end mid-sentence),
    with reST's double backquotes as single ones."""
    doc = inspect.getdoc(factory) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "`")
