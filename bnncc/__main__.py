"""``python -m bnncc`` (and ``torchrun -m bnncc finetune ...``) and the ``bnncc`` script: the command line."""

import signal
import sys


def _interrupted_while_loading(signum: int, frame) -> None:
    """Ctrl-C in the seconds the command modules take to load (onnx_ir, sympy, typer) ended the run
    with the traceback of an import; bnncc.cli.main replaces this with its own handling."""
    sys.stderr.write("error: interrupted\n")
    raise SystemExit(128 + signum)


def main() -> None:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not one the caller ignores)
        signal.signal(signal.SIGINT, _interrupted_while_loading)
    from bnncc.cli import main as run

    run()


if __name__ == "__main__":
    main()
