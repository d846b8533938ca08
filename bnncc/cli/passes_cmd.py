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
    table = Table(title="registered passes")
    # Pass names and parameters are what a recipe types: never wrapped (one parameter a line keeps
    # that column narrow); the description folds into the rest, even at 80 columns.
    table.add_column("pass", no_wrap=True)
    table.add_column("parameters", no_wrap=True)
    table.add_column("what it does", min_width=20, overflow="fold")
    for name in list_passes():
        factory = pass_factory(name)
        table.add_row(name, _parameters(factory), _summary(factory))
    console.print(table)
    recipes = Table(title="shipped recipes (--recipe NAME, or a .toml file of your own)")
    recipes.add_column("recipe", no_wrap=True)
    recipes.add_column("for blocks", no_wrap=True)
    recipes.add_column("what it makes", min_width=20, overflow="fold")
    for name in available_recipes():
        recipe = load_recipe(name)
        recipes.add_row(name, recipe.blocks or "any", recipe.description)
    console.print(recipes)


def _parameters(factory) -> str:
    """``key=default`` for each keyword parameter of the pass, one a line."""
    params = inspect.signature(factory).parameters.values()
    return "\n".join(f"{p.name}={p.default!r}" for p in params if p.default is not p.empty)


def _summary(factory) -> str:
    """The first line of the pass's docstring."""
    doc = inspect.getdoc(factory) or ""
    return doc.splitlines()[0] if doc else ""
