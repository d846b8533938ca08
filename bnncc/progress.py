"""Where progress bars go: stderr, since stdout holds the result lines that scripts read; and only a
terminal, since elsewhere (a CI log, a pipe) rich printed the bar's last frame at the end, before a
failed run's one-line error, where the result lines already say the same."""

from __future__ import annotations

from rich.console import Console

__all__ = ["bar_console"]


def bar_console() -> Console | None:
    """The console of a progress bar, or None where no bar is drawn (stderr is no terminal)."""
    console = Console(stderr=True)
    return console if console.is_terminal else None
