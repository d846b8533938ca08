"""``bnncc version``: print the versions of bnncc and the libraries it builds on."""

from __future__ import annotations

from importlib import metadata

from bnncc.cli._app import app, console

PACKAGES = ("bnncc", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "torch", "apache-tvm", "apache-tvm-ffi")


@app.command()
def version() -> None:
    """Print the versions of bnncc and its main dependencies."""
    for name in PACKAGES:
        try:
            console.print(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            console.print(f"{name} (not installed)")
