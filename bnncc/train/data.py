"""Training data: MNIST-style IDX folders and ImageFolder trees, adapted to a model's input.

Batches are drawn deterministically from ``(seed, step)``: the sample order of each epoch is a
permutation seeded by ``seed + epoch``, and each image is augmented with a generator seeded by
``(seed, step, position in the global batch)``. So a run resumed at step k sees exactly the batches an uninterrupted run sees,
and DDP ranks take disjoint slices of the same global batch.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bnncc.errors import BnnccError

__all__ = ["ImageData", "open_dataset", "read_idx"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or raw): magic 0x00 0x00 dtype ndim, big-endian dims, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise BnnccError(f"{path}: not a readable IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise BnnccError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise BnnccError(f"{path}: IDX header says {tuple(dims)} but holds {data.size} bytes")
    return data.reshape(dims)


@dataclass
class ImageData:
    """One split of a data set held as uint8 NCHW images plus integer labels."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch_indices(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """Indices of the global batch at ``step`` (epochs are seeded permutations, last partial batch dropped)."""
        per_epoch = max(len(self) // batch_size, 1)
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        return order[offset * batch_size:(offset + 1) * batch_size]

    def batch(self, index: torch.Tensor, shape: tuple[int, int, int], *, augment: bool, step: int = 0,
              seed: int = 0, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images adapted to ``shape`` = (C, H, W), normalised; random crop + flip when ``augment``.

        The augmentation of an image depends on ``(seed, step, position)``, its position in the
        global batch (default: its row here), so DDP ranks augment their slices as one process would.
        """
        images = self.images[index].float() / 255.0
        if augment:
            positions = torch.arange(len(index)) if positions is None else positions
            images = _augment(images, [seed * 1_000_003 + step * 65_537 + int(p) for p in positions])
        return _adapt(images, shape, self.mean, self.std), self.labels[index]


def _augment(images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Random resized crop (area 0.35-1, aspect 3/4-4/3) and horizontal flip, one seed per image.

    The crop boxes are drawn per image; the resampling of the whole batch is one ``roi_align``
    (bilinear, one sample per output cell), so augmentation costs no Python loop over pixels.
    """
    from torchvision.ops import roi_align

    n, _, h, w = images.shape
    boxes = torch.empty(n, 5)
    flips = torch.empty(n, dtype=torch.bool)
    for i, seed in enumerate(seeds):
        u_area, u_aspect, u_top, u_left, u_flip = np.random.default_rng(seed).random(5)
        area = h * w * (0.35 + 0.65 * u_area)
        aspect = float(np.exp(np.log(3 / 4) + np.log(16 / 9) * u_aspect))
        ch = min(float(h), (area / aspect) ** 0.5)
        cw = min(float(w), (area * aspect) ** 0.5)
        top, left = (h - ch) * u_top, (w - cw) * u_left
        boxes[i] = torch.tensor([i, left, top, left + cw, top + ch])
        flips[i] = bool(u_flip < 0.5)
    out = roi_align(images, boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


def _adapt(images: torch.Tensor, shape: tuple[int, int, int], mean, std) -> torch.Tensor:
    """Match channels (repeat 1 -> C, or average C -> 1) and size, then normalise."""
    c, h, w = shape
    mean_t = torch.tensor(mean).reshape(1, -1, 1, 1)
    std_t = torch.tensor(std).reshape(1, -1, 1, 1)
    images = (images - mean_t) / std_t
    if images.shape[1] != c:
        if images.shape[1] == 1:
            images = images.expand(-1, c, -1, -1)
        elif c == 1:
            images = images.mean(dim=1, keepdim=True)
        else:
            raise BnnccError(f"cannot adapt {images.shape[1]}-channel images to a {c}-channel model input")
    if images.shape[2:] != (h, w):
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    return images.contiguous()


def _idx_file(folder: Path, prefix: str, kind: str) -> Path | None:
    for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz",
                 f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"):
        if (folder / name).is_file():
            return folder / name
    return None


def _open_idx(folder: Path, split: str) -> ImageData:
    prefix = "train" if split == "train" else "t10k"
    images_path, labels_path = _idx_file(folder, prefix, "images"), _idx_file(folder, prefix, "labels")
    if images_path is None or labels_path is None:
        raise BnnccError(f"{folder}: no {prefix}-images-idx3-ubyte(.gz) / {prefix}-labels-idx1-ubyte(.gz) pair")
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise BnnccError(f"{images_path}: expected (N, H, W) images and N labels, got {images.shape} and {labels.shape}")
    images_t = torch.from_numpy(images.copy()).unsqueeze(1)
    # Normalise with the training split's own statistics, whichever split this is.
    train_images = images if prefix == "train" else read_idx(_idx_file(folder, "train", "images") or images_path)
    mean = float(train_images.mean() / 255.0)
    std = float(train_images.std() / 255.0)
    return ImageData(images_t, torch.from_numpy(labels), int(labels.max()) + 1, (mean,), (std,))


def _open_image_folder(folder: Path, split: str, size: int) -> ImageData:
    from PIL import Image

    root = folder / ("train" if split == "train" else "val")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise BnnccError(f"{root}: no class folders")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            with Image.open(path) as im:
                im = im.convert("RGB")
                scale = size / min(im.size)
                im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))))
                left, top = (im.width - size) // 2, (im.height - size) // 2
                im = im.crop((left, top, left + size, top + size))
                images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
                labels.append(label)
    if not images:
        raise BnnccError(f"{root}: no images")
    return ImageData(torch.stack(images), torch.tensor(labels), len(classes), IMAGENET_MEAN, IMAGENET_STD)


def open_dataset(path: str | Path, split: str, image_size: int = 224) -> ImageData:
    """Open ``split`` ("train" or "val") of an IDX folder or an ImageFolder tree (``train/``, ``val/``).

    ImageFolder images are decoded once, resized on the short side to ``image_size`` and
    center-cropped (the usual evaluation crop; training adds random resized crops and flips).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise BnnccError(f"{folder}: no such data directory")
    if any(folder.glob("*-images-idx3-ubyte*")):
        return _open_idx(folder, split)
    if (folder / "train").is_dir():
        return _open_image_folder(folder, split, image_size)
    raise BnnccError(f"{folder}: neither an IDX folder (train-images-idx3-ubyte.gz ...) nor an ImageFolder tree "
                     "(train/<class>/*.png, val/<class>/*.png)")
