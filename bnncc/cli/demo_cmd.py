"""``bnncc demo [-o OUTDIR] [--data DIR]``: the whole pipeline on an embedded default, in a few minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bnncc.cli._app import app, console
from bnncc.cli.convert_cmd import print_result


@app.command()
def demo(
    output: Path = typer.Option(Path("bnncc-demo"), "--output", "-o", help="folder for the teacher, library and report"),
    data: Optional[Path] = typer.Option(None, "--data", help="IDX folder, ImageFolder tree or tar shards (default: the shipped "
                                                            "2000 + 500 image Fashion-MNIST sample)"),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1,
                                         help="fine-tuning epochs of the PokeBNN student (default: 3)"),
    teacher_epochs: Optional[int] = typer.Option(None, "--teacher-epochs", min=1,
                                                 help="training epochs of the float teacher (default: 10)"),
) -> None:
    """Train a narrow torchvision ResNet-50 teacher, convert it to PokeBNN-1x with a short fine-tune, compile
    it for this machine and write the report."""
    import dataclasses

    from bnncc.data import FASHION_MNIST_SAMPLE
    from bnncc.pipeline import DemoOptions, check_demo, demo as run_demo

    check_demo(output, data or FASHION_MNIST_SAMPLE)
    console.print(f"bnncc demo: ResNet-50 (torchvision definition, width x{DemoOptions.width}) on "
                  f"{data or 'the shipped Fashion-MNIST sample'}, PokeBNN-1x, host target", soft_wrap=True)
    chosen = {k: v for k, v in dict(epochs=epochs, teacher_epochs=teacher_epochs).items() if v is not None}
    result = run_demo(output, data, dataclasses.replace(DemoOptions(), **chosen))
    print_result(result)
