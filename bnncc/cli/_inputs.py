"""Inputs as `bnncc run` and `bnncc verify` read them: images and .npy arrays -> float32 NCHW."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bnncc.cli._app import err_console
from bnncc.errors import BnnccError
from bnncc.fileio import require_file
from bnncc.images import bilinear_resize, centre_box, quietly, upright_crop, upright_size
from bnncc.runtime import largest_magnitude


def read_input(path: Path, chw: tuple[int, int, int], preprocessing: dict | None) -> np.ndarray:
    """(N, C, H, W) float32: a .npy as it is; an image decoded as evaluation decoded it (upright, the
    centre box of the manifest's ``crop``, else whole), resized to (H, W), scaled to [0, 1] and
    normalised with the manifest's mean/std when it records them."""
    require_file(path, "an image or .npy file")
    try:
        x = _read_array(path, chw) if path.suffix.lower() == ".npy" else _read_image(path, chw, preprocessing)
    except OSError as e:  # no permission, an I/O error (an image's own errors are said where it is decoded)
        raise BnnccError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(x) == 0:
        raise BnnccError(f"{path}: holds no images (a batch of 0)")
    return x


def _read_array(path: Path, chw: tuple[int, int, int]) -> np.ndarray:
    """A .npy of real numbers, (C, H, W) or (N, C, H, W), as float32 (N, ...); no pickled objects.
    Its header is read first: a .npz named .npy was taken apart as an archive, a header that
    claims more data than the file holds asked for that much memory (56 GiB) before failing, and
    an array of another image size than ``chw`` was read whole (twice its size in memory) before
    its shape was refused."""
    header = _array_header(path)
    if header is None:
        raise BnnccError(f"{path}: not a .npy array (no .npy header{'; a .npz archive' if _is_zip(path) else ''})")
    shape, dtype, data_bytes = header
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise BnnccError(f"{path}: an array of {dtype}; expected real numbers")
    if len(shape) not in (3, 4):
        raise BnnccError(f"{path}: an array of shape {shape}; expected (C, H, W) or (N, C, H, W)")
    needed = math.prod(shape) * dtype.itemsize
    if needed > data_bytes:
        raise BnnccError(f"{path}: truncated; its header gives {shape} {dtype} ({needed} bytes) but the file holds "
                         f"{data_bytes} bytes of data")
    if shape[-3:] != chw:  # said before any input runs, naming this one (an image is decoded to ``chw``)
        raise BnnccError(f"{path}: images of shape {shape[-3:]}; the network takes {chw} (C, H, W)")
    x = np.load(path, allow_pickle=False)
    if not np.isfinite(x).all():
        raise BnnccError(f"{path}: holds NaN or infinite values")
    with np.errstate(over="ignore"):  # said below, in one line
        narrow = x.astype(np.float32)
    if not np.isfinite(narrow).all():
        raise BnnccError(f"{path}: holds values beyond float32's range (up to {largest_magnitude(x)})")
    return narrow[None] if narrow.ndim == 3 else narrow


def _array_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """(shape, dtype, bytes after the header) of a .npy file, or None when it has no .npy header."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as f:
        try:
            reader = readers.get(np.lib.format.read_magic(f))
            if reader is None:
                return None
            shape, _, dtype = reader(f)
        except ValueError:  # no magic string, or a header numpy cannot read
            return None
        return tuple(shape), dtype, path.stat().st_size - f.tell()


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


# the PIL mode an image is read in for a network of so many input channels: a one-channel network takes
# the mean of the RGB channels, as fine-tuning gives it image files (ImageFiles.finish), not Pillow's
# grey ("L": 0.299 R + 0.587 G + 0.114 B, a saturated green 0.25 brighter than it trained on)
_MODES = {1: "RGB", 3: "RGB", 4: "RGBA"}


def _read_image(path: Path, chw: tuple[int, int, int], preprocessing: dict | None) -> np.ndarray:
    from PIL import Image

    channels, height, width = chw
    crop = (preprocessing or {}).get("crop")
    if channels not in _MODES:
        raise BnnccError(f"{path}: the network takes {channels}-channel inputs, and an image gives 1 (grey), 3 (RGB) "
                         f"or 4 (RGBA); give its pixels as a .npy of shape ({channels}, {height}, {width}) instead")
    try:
        # an image of up to twice PIL's pixel guard is read (its memory is bounded), beyond it is refused
        with quietly(), Image.open(path) as opened:
            size = upright_size(opened)
            box_of = ((lambda w, h: centre_box(w, h, (width, height), crop)) if crop
                      else (lambda w, h: (0, 0, w, h)))
            # fine-tuning resized data held as arrays (IDX) by torch's bilinear interpolation, not bicubically
            bilinear = (preprocessing or {}).get("resize") == "bilinear"
            image = upright_crop(opened, size if bilinear else (width, height), box_of, _MODES[channels])
            x = np.asarray(image).transpose(2, 0, 1)  # (C, H, W) bytes: a large image is resized before it is float
            x = (bilinear_resize(x, (width, height)) if bilinear else x.astype(np.float32)) / 255.0
            if channels == 1:
                x = x.mean(axis=0, keepdims=True)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's decoding errors
        raise BnnccError(f"{path}: not a readable image ({e})") from None
    if size != (width, height) or crop:  # said, since a tiny or oddly shaped image classifies poorly
        cropped = f"centre-cropped ({crop:.3g}) and " if crop else ""
        # on stderr: stdout holds `run`'s top classes alone, which scripts read
        err_console.print(f"{path}: a {size[0]}x{size[1]} image, {cropped}resized to the network's {width}x{height}",
                          style="dim", highlight=False, soft_wrap=True)
    if preprocessing:
        mean = np.asarray(preprocessing["mean"], np.float32).reshape(-1, 1, 1)
        std = np.asarray(preprocessing["std"], np.float32).reshape(-1, 1, 1)
        x = (x - mean) / std
    return x[None]
