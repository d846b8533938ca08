"""Pixels as bnncc's networks take them: 8 bits a channel, in training and in ``bnncc run`` alike."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["EVAL_CROP", "EXIF_ORIENTATION", "centre_box", "eight_bit"]

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

# Evaluation's centre crop of image files, as a share of the short side (224 of 256, as ImageNet models
# are evaluated); fine-tuning records it, and `bnncc run` crops an image alike (bnncc.cli._inputs)
EVAL_CROP = 224 / 256


def centre_box(width: int, height: int, size: tuple[float, float], share: float) -> tuple[float, float, float, float]:
    """The centred box (left, top, right, bottom) of ``size``'s aspect ratio whose shorter side is
    ``share`` of the image's room for it."""
    scale = share * min(width / size[0], height / size[1])
    w, h = scale * size[0], scale * size[1]
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h
