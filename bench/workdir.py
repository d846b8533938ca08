"""Where a bench keeps its files: a folder the user names (made, kept), else a temporary one that is
removed at the end, since graphs, shards and checkpoints take hundreds of MB."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable


def in_workdir(workdir: str | None, prefix: str, run: Callable[[Path], None]) -> None:
    """``run(folder)`` in ``workdir``, or in a temporary folder named ``prefix...`` removed afterwards."""
    if workdir:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        run(Path(workdir))
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            run(Path(tmp))
