"""The typer application and the error boundary shared by every command."""

from __future__ import annotations

import logging
import os
import signal
import traceback

import typer
from rich.console import Console
from rich.text import Text
from typer.exceptions import TyperException

from bnncc.errors import BnnccError, printable

__all__ = ["app", "console", "err_console", "run_app"]

app = typer.Typer(
    name="bnncc",
    help="Compile a float ResNet-50 (ONNX) into a PokeBNN binarized network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _Console(Console):
    """A console whose text shows every character: the paths and names it prints are the user's, and
    an ESC in a file name recoloured the terminal through a result line or a table (rich drops BEL and
    CR, not ESC). Line breaks and tabs are the layout's (tables, JSON) and stay."""

    def render_str(self, text: str, **kwargs):
        return super().render_str(printable(text, keep="\n\t"), **kwargs)


# no console markup: what is printed holds the user's paths and names, and "[x]" in one was eaten
# as a style tag (bad[bold].onnx was reported as bad.onnx); styled parts are rich Text. No emoji codes
# either, for the same reason: a node 'conv:fire:1' came out of `ace --json` with a flame emoji for ':fire:'
console = _Console(markup=False, emoji=False)
err_console = _Console(stderr=True, markup=False, emoji=False)
# the tables are laid out for 80 columns (ace's numbers are never cut there); in a narrower terminal
# rich dropped whole columns and cut numbers to "0.0015…": they are drawn 80 wide and the terminal wraps them
MIN_WIDTH = 80
# an output that is no terminal (a file, a pipe, a CI log) has no width to fit, yet rich gave it 80 columns
# (or COLUMNS, or the width of the terminal it was started from): `ace > costs.txt` folded layer names over
# two lines and `targets | cat` cut the paths it found to "/usr/bin/aarch…"; there, lines are as long as
# their contents
PIPE_WIDTH = 10_000


def _print_version(value: bool) -> None:
    if value:
        from bnncc import __version__

        console.print(f"bnncc {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    # the spelling scripts and users try first; `bnncc version` adds the dependencies' versions
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print bnncc's version and exit (`bnncc version`: its dependencies' too)."),
) -> None:
    """Compile a float ResNet-50 (ONNX) into a PokeBNN binarized network."""


# the signals that stopped this run (on_signal): one that arrives while TVM's compiler runs Python
# code of ours comes back from it as TVM's RuntimeError, not as the exception the handler raised
_signals: list[int] = []


def on_signal(signum: int, frame) -> None:
    """SIGINT as KeyboardInterrupt, SIGTERM and SIGHUP as SystemExit(128 + the signal): the run ends
    as an exception does, removing the temporary files of an unfinished output on the way out."""
    _signals.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def run_app(argv: list[str] | None = None) -> int:
    """Run the CLI. A BnnccError becomes one line on stderr and exit code 2, and so does a usage
    error (an unknown option, a value out of range); ``--help`` exits 0. Anything else is a bug or
    an input bnncc does not check yet: one line naming the exception, exit code 1, and its traceback
    only with BNNCC_DEBUG=1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not console.is_terminal:
        console.width = PIPE_WIDTH
    elif console.width < MIN_WIDTH:
        console.width = MIN_WIDTH
    # onnx_ir's shape inference logs a failure with its traceback and goes on; bnncc refuses such a
    # model itself, in one line
    logging.getLogger("onnx_ir.passes.common.shape_inference").setLevel(logging.ERROR)
    try:
        code = app(args=argv, prog_name="bnncc", standalone_mode=False)
    except BnnccError as e:
        _error(str(e))
        return 2
    except TyperException as e:  # click's usage errors (standalone mode would draw them in a box)
        context = getattr(e, "ctx", None)
        hint = f" (see `{context.command_path} --help`)" if context is not None else ""
        _error(f"{e.format_message()}{hint}")
        return e.exit_code
    except typer.Abort:  # click's form of KeyboardInterrupt
        _error("interrupted")
        return 128 + signal.SIGINT
    except SystemExit as e:
        if isinstance(e.__context__, BrokenPipeError):
            # the reader of the output has gone (`bnncc passes | head`, `bnncc --help | head`): rich's
            # consoles, ours and the one typer draws help with, exit quietly with status 1, which says
            # that verify failed or bnncc hit a bug; a tool that SIGPIPE ends exits 141
            return 128 + signal.SIGPIPE
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001  (the last boundary: no traceback for users)
        if _signals:
            if _signals[-1] == signal.SIGINT:
                _error("interrupted")
            return 128 + _signals[-1]
        debug = bool(os.environ.get("BNNCC_DEBUG"))
        if debug:  # printed here, not re-raised: TVM's exception hook shows only a note for its own errors
            traceback.print_exc()
        lines = str(e).strip().splitlines()
        _error(f"unexpected {type(e).__name__}: {lines[0] if lines else 'no message'}"
               f"{'' if debug else ' (BNNCC_DEBUG=1 shows the traceback)'}")
        return 1
    if code == 128 + signal.SIGINT:
        # typer turns a KeyboardInterrupt (Ctrl-C, on_signal) into a silent Exit(130); no command
        # exits 130 itself, so say why the run ended, as an interrupt inside TVM's compiler does
        _error("interrupted")
    return code if isinstance(code, int) else 0


def _error(message: str) -> None:
    # one line whatever the message holds: a path with a newline split it in two
    one_line = printable(message)
    err_console.print(Text.assemble(("error:", "bold red"), " ", one_line), highlight=False, soft_wrap=True)
