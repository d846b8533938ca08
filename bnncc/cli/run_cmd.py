"""``bnncc run OUTDIR --input image.png|x.npy [--top K]``: the top classes of one input."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from bnncc.cli._app import app, console
from bnncc.errors import BnnccError
from bnncc.fileio import require_file


@app.command("run")
def run_command(
    library: Path = typer.Argument(..., help="folder written by `bnncc compile`"),
    input: Path = typer.Option(..., "--input", "-i", help="an image (PNG/JPEG) or a .npy array (C,H,W) or (N,C,H,W)"),
    top: int = typer.Option(5, "--top", "-k", min=1, help="how many classes to print"),
) -> None:
    """Run the library on INPUT and print the top classes with their logits."""
    from bnncc.runtime import load

    lib = load(library)
    x = _read_input(input, lib.input_chw, lib.manifest.get("preprocessing"))
    logits = lib(x)
    for i, row in enumerate(logits):
        table = Table(title=f"{input} [{i}]" if len(logits) > 1 else str(input))
        table.add_column("class", justify="right")
        table.add_column("logit", justify="right")
        for c in np.argsort(-row)[:top]:
            table.add_row(str(int(c)), f"{row[c]:.4f}")
        console.print(table)


def _read_input(path: Path, chw: tuple[int, int, int], preprocessing: dict | None) -> np.ndarray:
    """(N, C, H, W) float32: a .npy as it is, an image resized to (H, W), scaled to [0, 1] and
    normalised with the manifest's mean/std when it records them."""
    require_file(path, "an image or .npy file")
    x = _read_array(path) if path.suffix == ".npy" else _read_image(path, chw, preprocessing)
    if len(x) == 0:
        raise BnnccError(f"{path}: holds no images (a batch of 0)")
    if not np.isfinite(x).all():
        raise BnnccError(f"{path}: holds NaN or infinite values")
    return x


def _read_array(path: Path) -> np.ndarray:
    """A .npy of real numbers, (C, H, W) or (N, C, H, W), as float32 (N, ...); no pickled objects."""
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # truncated, pickled objects, not a .npy at all
        lines = str(e).strip().splitlines()
        raise BnnccError(f"{path}: not a readable .npy array ({lines[0] if lines else type(e).__name__})") from None
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise BnnccError(f"{path}: an array of {x.dtype}; expected real numbers")
    if x.ndim not in (3, 4):
        raise BnnccError(f"{path}: an array of shape {x.shape}; expected (C, H, W) or (N, C, H, W)")
    x = x.astype(np.float32)
    return x[None] if x.ndim == 3 else x


def _read_image(path: Path, chw: tuple[int, int, int], preprocessing: dict | None) -> np.ndarray:
    from PIL import Image

    channels, height, width = chw
    try:
        with warnings.catch_warnings():
            # an image of more pixels than PIL's guard against decompression bombs but fewer than twice
            # that is read (its memory is bounded); PIL's warning would print its own lines
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            if image.size != (width, height):  # said, since a tiny or oddly shaped image classifies poorly
                console.print(f"{path}: a {image.size[0]}x{image.size[1]} image, resized to the network's "
                              f"{width}x{height}", style="dim", highlight=False)
            image = image.convert("RGB" if channels == 3 else "L").resize((width, height))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's decoding errors
        raise BnnccError(f"{path}: not a readable image ({e})") from None
    x = np.asarray(image, dtype=np.float32).reshape(height, width, channels).transpose(2, 0, 1) / 255.0
    if preprocessing:
        mean = np.asarray(preprocessing["mean"], np.float32).reshape(-1, 1, 1)
        std = np.asarray(preprocessing["std"], np.float32).reshape(-1, 1, 1)
        x = (x - mean) / std
    return x[None]
