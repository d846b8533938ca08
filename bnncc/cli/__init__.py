"""The ``bnncc`` command line. Each command lives in its own module and calls a public function.

A command module defines its typer command on :data:`app` (imported from ``bnncc.cli._app``);
it is registered by being imported below. Errors raised as :class:`bnncc.errors.BnnccError`
become one line on stderr and exit code 2.
"""

from __future__ import annotations

import signal
import sys

from bnncc.cli._app import app, on_signal, run_app

# Importing a command module registers its command on `app`; keep one line per module.
from bnncc.cli import version_cmd  # noqa: E402,F401
from bnncc.cli import inspect_cmd  # noqa: E402,F401
from bnncc.cli import passes_cmd  # noqa: E402,F401
from bnncc.cli import rewrite_cmd  # noqa: E402,F401
from bnncc.cli import ace_cmd  # noqa: E402,F401
from bnncc.cli import compile_cmd  # noqa: E402,F401
from bnncc.cli import run_cmd  # noqa: E402,F401
from bnncc.cli import verify_cmd  # noqa: E402,F401
from bnncc.cli import finetune_cmd  # noqa: E402,F401
from bnncc.cli import export_cmd  # noqa: E402,F401
from bnncc.cli import targets_cmd  # noqa: E402,F401
from bnncc.cli import convert_cmd  # noqa: E402,F401
from bnncc.cli import bundle_cmd  # noqa: E402,F401
from bnncc.cli import demo_cmd  # noqa: E402,F401

__all__ = ["app", "main"]


def main() -> None:
    # SIGTERM (kill, a job scheduler, torchrun stopping its workers), Ctrl-C and SIGHUP (the
    # terminal closed) end the run as an exception does, so that the temporary files of an
    # unfinished output are removed on the way out; a signal the caller ignores (nohup, a
    # background job) stays ignored
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, on_signal)
    sys.exit(run_app())
