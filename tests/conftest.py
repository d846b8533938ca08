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


@pytest.fixture
def terminal(monkeypatch):
    """``terminal(width)``: the CLI's stdout is a terminal that wide (under ``cli`` it is a pipe, whose lines
    are as long as their contents)."""
    from bnncc.cli._app import console

    def resize(width: int) -> None:
        monkeypatch.setattr(console, "_force_terminal", True)  # rich's own switch (FORCE_COLOR sets it)
        monkeypatch.setattr(console, "width", width)

    return resize


@pytest.fixture(scope="session")
def resnet50_onnx(tmp_path_factory):
    """Float ResNet-50 ONNX files by kind: torch legacy (BN folded, fixed batch), torch dynamo
    (opset 18, external data, symbolic batch) and the onnx wheel's light_resnet50 (opset 9, BN, Sum)."""
    import os

    import onnx

    from bnncc import zoo

    folder = tmp_path_factory.mktemp("resnet50")
    module = zoo.resnet50()
    light = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_resnet50.onnx")
    return {
        "legacy": zoo.export_onnx(module, folder / "legacy.onnx", exporter="legacy"),
        "dynamo": zoo.export_onnx(module, folder / "dynamo.onnx", exporter="dynamo", batch="symbolic"),
        "light": light,
    }
