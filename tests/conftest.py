"""Shared fixtures: small models built once per session, run bnncc's CLI in-process."""

from __future__ import annotations

import pytest

from bnncc.cli._app import run_app


@pytest.fixture
def cli(capsys):
    """Run ``bnncc ARGS...`` in-process; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = run_app([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
