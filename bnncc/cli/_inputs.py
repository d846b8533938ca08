"""Inputs as `bnncc run` and `bnncc verify` read them: images and .npy arrays -> float32 NCHW."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from bnncc.cli._app import console
from bnncc.errors import BnnccError
from bnncc.fileio import require_file
from bnncc.images import EXIF_ORIENTATION


def read_input(path: Path, chw: tuple[int, int, int], preprocessing: dict | None) -> np.ndarray:
    """(N, C, H, W) float32: a .npy as it is; an image cropped as evaluation cropped (the manifest's
    ``crop``, else whole), resized to (H, W), scaled to [0, 1] and normalised with the manifest's
    mean/std when it records them."""
    require_file(path, "an image or .npy file")
    x = _read_array(path) if path.suffix.lower() == ".npy" else _read_image(path, chw, preprocessing)
    if len(x) == 0:
        raise BnnccError(f"{path}: holds no images (a batch of 0)")
    if tuple(x.shape[1:]) != chw:  # said before any input runs, naming this one
        raise BnnccError(f"{path}: images of shape {tuple(x.shape[1:])}; the network takes {chw} (C, H, W)")
    return x


def _read_array(path: Path) -> np.ndarray:
    """A .npy of real numbers, (C, H, W) or (N, C, H, W), as float32 (N, ...); no pickled objects.
    Its header is read first: a .npz named .npy was taken apart as an archive, and a header that
    claims more data than the file holds asked for that much memory (56 GiB) before failing."""
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
    x = np.load(path, allow_pickle=False)
    if not np.isfinite(x).all():
        raise BnnccError(f"{path}: holds NaN or infinite values")
    with np.errstate(over="ignore"):  # said below, in one line
        narrow = x.astype(np.float32)
    if not np.isfinite(narrow).all():
        raise BnnccError(f"{path}: holds values beyond float32's range (up to {np.abs(x).max():.3g})")
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


# the PIL mode an image is read in for a network of so many input channels
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _read_image(path: Path, chw: tuple[int, int, int], preprocessing: dict | None) -> np.ndarray:
    from PIL import Image, ImageOps

    channels, height, width = chw
    crop = (preprocessing or {}).get("crop")
    if channels not in _MODES:
        raise BnnccError(f"{path}: the network takes {channels}-channel inputs, and an image gives 1 (grey), 3 (RGB) "
                         f"or 4 (RGBA); give its pixels as a .npy of shape ({channels}, {height}, {width}) instead")
    try:
        with warnings.catch_warnings():
            # an image of more pixels than PIL's guard against decompression bombs but fewer than twice
            # that is read (its memory is bounded); PIL's warning would print its own lines
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                # its size as a viewer shows it: EXIF orientations 5 to 8 turn it a quarter
                size = opened.size[::-1] if opened.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else opened.size
                # a JPEG decoded at the smallest of 1/2, 1/4, 1/8 its size still above the network's
                # (its crop's, with one): a 13000x13000 one took 2.1 GB to be made 224x224
                need = (math.ceil(max(width, height) / crop),) * 2 if crop else (width, height)
                opened.draft("L" if channels == 1 else "RGB", need)
                image = ImageOps.exif_transpose(opened)
                x = _pixels(image, channels, (width, height), crop)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's decoding errors
        raise BnnccError(f"{path}: not a readable image ({e})") from None
    if size != (width, height):  # said, since a tiny or oddly shaped image classifies poorly
        cropped = f"its centre ({crop:.3g} of the short side) " if crop else ""
        console.print(f"{path}: a {size[0]}x{size[1]} image, {cropped}resized to the network's {width}x{height}",
                      style="dim", highlight=False)
    if preprocessing:
        mean = np.asarray(preprocessing["mean"], np.float32).reshape(-1, 1, 1)
        std = np.asarray(preprocessing["std"], np.float32).reshape(-1, 1, 1)
        x = (x - mean) / std
    return x[None]


def _pixels(image, channels: int, size: tuple[int, int], crop: float | None) -> np.ndarray:
    """(C, H, W) float32 in [0, 1] of the PIL ``image`` resized bicubically to ``size`` (W, H): with a
    ``crop``, its centre box of ``size``'s aspect whose short side is that share of the image's room
    for it, as evaluation decodes image files (bnncc.train.imagefiles); else the whole image."""
    from PIL import Image

    from bnncc.images import centre_box, eight_bit

    box = centre_box(*image.size, size, crop) if crop else None
    image = eight_bit(image).convert(_MODES[channels]).resize(size, Image.Resampling.BICUBIC, box=box)
    return np.asarray(image, dtype=np.float32).reshape(size[1], size[0], channels).transpose(2, 0, 1) / 255.0
