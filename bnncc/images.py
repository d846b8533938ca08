"""Pixels as bnncc's networks take them: 8 bits a channel, in training and in ``bnncc run`` alike."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps

__all__ = ["EVAL_CROP", "EXIF_ORIENTATION", "bilinear_resize", "centre_box", "eight_bit", "orientation",
           "quietly", "upright_crop", "upright_size"]

# PIL modes of one channel of more than 8 bits, and the value of full white in each: convert("RGB")
# clipped them to 255, so a 16-bit PNG came out nearly white and a float TIFF black
_DEEP_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def eight_bit(image: Image.Image) -> Image.Image:
    """``image``, or its 8-bit grey form by its full scale where it has more than 8 bits a pixel.
    Networks train on 8-bit pixels, so a 16-bit picture gives what its 8-bit version gives."""
    white = _DEEP_MODES.get(image.mode)
    if white is None:
        return image
    grey = np.clip(np.asarray(image, dtype=np.float32) / white, 0.0, 1.0)
    return Image.fromarray(np.round(grey * 255.0).astype(np.uint8), mode="L")


EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how a viewer turns the stored pixels

# Evaluation's centre crop of image files: the box of the network's shape, this share of the largest
# that fits (224 of 256 of a square input, as ImageNet models are evaluated); fine-tuning records it,
# and `bnncc run` crops an image alike (bnncc.cli._inputs)
EVAL_CROP = 224 / 256


def centre_box(width: int, height: int, size: tuple[float, float], share: float) -> Box:
    """The centred box of ``size``'s aspect ratio whose shorter side is ``share`` of the image's room
    for it, and at least a pixel (a share of 1e-300, edited into a manifest, made a box of no size)."""
    scale = max(share * min(width / size[0], height / size[1]), 1 / min(size))
    w, h = scale * size[0], scale * size[1]
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h


Box = tuple[float, float, float, float]  # (left, top, right, bottom) in an image's upright pixels


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """Pillow opening and decoding without its warnings on stderr: an image of up to twice its pixel
    guard is decoded (its memory stays bounded; beyond, Pillow raises DecompressionBombError), a
    damaged EXIF block ("Corrupt EXIF data", warned by Image.open itself) is read as none, and a
    palette PNG with semi-transparent colours, as the web has many, goes to RGB or grey as its
    palette's colours (convert warns that RGBA would keep the transparency, which they drop as
    torchvision's loader does). Open inside."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", "(Possibly )?[Cc]orrupt EXIF", UserWarning)
        warnings.filterwarnings("ignore", "Palette images with Transparency expressed in bytes", UserWarning)
        yield


def orientation(opened: Image.Image) -> int:
    """The EXIF orientation (1 to 8) of an opened image file; 1 (as stored) without one, or when its
    EXIF is damaged or holds no orientation value."""
    with quietly():
        value = opened.getexif().get(EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(opened: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image file as a viewer shows it."""
    return _upright(opened.size, orientation(opened))


def _upright(size: tuple[int, int], turn: int) -> tuple[int, int]:
    """A stored (width, height) as shown after EXIF orientation ``turn``: 5 to 8 turn it a quarter."""
    return size[::-1] if turn in (5, 6, 7, 8) else size


def upright_crop(opened: Image.Image, size: tuple[int, int], box_of: Callable[[int, int], Box],
                 mode: str) -> Image.Image:
    """The image file ``opened`` (opened, not yet decoded) turned as its EXIF orientation says, its box
    ``box_of(width, height)`` of those upright pixels resized bicubically to ``size`` (W, H), in PIL
    ``mode``. A JPEG is decoded at the coarsest DCT scale (1/2, 1/4, 1/8) at which the box keeps at
    least ``size``'s pixels (a 13000x13000 one took 2.1 GB to be made 224x224 from its full size).
    Training, evaluation and `bnncc run` decode through here, so a file gives them the same pixels."""
    turn = orientation(opened)
    width, height = _upright(opened.size, turn)
    left, top, right, bottom = box_of(width, height)
    need = (math.ceil(width * size[0] / (right - left)), math.ceil(height * size[1] / (bottom - top)))
    # the DCT scale is chosen on the stored pixels, before the turn (a no-op but for JPEG)
    opened.draft("RGB", _upright(need, turn))
    image = ImageOps.exif_transpose(opened) if turn != 1 else opened
    sx, sy = image.size[0] / width, image.size[1] / height
    return eight_bit(image).convert(mode).resize(size, Image.Resampling.BICUBIC,
                                                 box=(left * sx, top * sy, right * sx, bottom * sy))


def bilinear_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Images ``x`` (..., H, W) resized to ``size`` (W, H) as float32 by the bilinear interpolation fine-tuning
    gives data held as arrays (IDX; torch's ``interpolate(mode="bilinear", align_corners=False)``: pixel
    centres, no antialiasing), which PIL's resize, antialiasing when it shrinks, does not reproduce."""
    rows, columns = (_bilinear_weights(n, out) for n, out in ((x.shape[-2], size[1]), (x.shape[-1], size[0])))
    # each output pixel reads at most two rows and two columns: only those are taken, before any conversion
    # (an 8000x8000 photo for a 28x28 network was made float64 whole: 2.8 GB; 0.9 without, Pillow's decoded copies)
    used_rows, used_columns = np.flatnonzero(rows.any(axis=0)), np.flatnonzero(columns.any(axis=0))
    x = x[..., used_rows, :][..., used_columns]
    return (rows[:, used_rows] @ x @ columns[:, used_columns].T).astype(np.float32)


def _bilinear_weights(n: int, out: int) -> np.ndarray:
    """(out, n) weights of the pixels each of ``out`` pixel centres lies between, the first and last clamped."""
    source = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(int), n - 1)
    high = np.minimum(low + 1, n - 1)
    weights = np.zeros((out, n), np.float64)
    np.add.at(weights, (np.arange(out), low), 1.0 - (source - low))
    np.add.at(weights, (np.arange(out), high), source - low)
    return weights
