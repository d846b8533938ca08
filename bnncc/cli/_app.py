"""The typer application and the error boundary shared by every command."""

from __future__ import annotations

import logging
import typer
from rich.console import Console

from bnncc.errors import BnnccError

__all__ = ["app", "console", "err_console", "run_app"]

app = typer.Typer(
    name="bnncc",
    help="Compile a float ResNet-50 (ONNX) into a PokeBNN binarized network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Compile a float ResNet-50 (ONNX) into a PokeBNN binarized network."""


def run_app(argv: list[str] | None = None) -> int:
    """Run the CLI; a BnnccError becomes one line on stderr and exit code 2.

    Usage errors are typer's own (exit 2); ``--help`` exits 0.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(args=argv, prog_name="bnncc")
    except BnnccError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True, markup=True)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
