"""Training data: MNIST-style IDX folders held in memory, ImageFolder trees and tar shards read file by file.

Every split is a ``Dataset``. Batches are drawn deterministically from ``(seed, step)``: the sample
order of each epoch is a permutation seeded by ``seed + epoch``, and each image is augmented with a
generator seeded by ``(seed, step, position in the global batch)``. So a run resumed at step k sees
exactly the batches an uninterrupted run sees, and DDP ranks take disjoint slices of the same global
batch. ``Dataset.load`` makes a batch's images (in a ``DataLoader`` worker for image files, see
``bnncc.train.loader``); ``Dataset.finish`` turns them into the model's normalised input.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bnncc.errors import BnnccError

__all__ = ["Dataset", "ImageData", "Loaded", "dataset_kind", "open_dataset", "open_splits", "read_idx"]

logger = logging.getLogger(__name__)


def read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip or raw, told by its first bytes): magic 0x00 0x00 dtype ndim, big-endian
    dims, then data; of ``ndim`` dimensions where it is given.

    The data is read into an array of the size the header gives, which must fit in half this
    machine's memory, and not a byte further: a gzip file of 9 MB that inflates to 2 GiB (or
    more than its header says) took memory until the process was killed."""
    try:
        # not by the name: a download inflated on its way (a .gz served as Content-Encoding: gzip, which the
        # browser undoes) keeps its .gz, and such a file was refused as "Not a gzipped file"
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
        with (gzip.open if compressed else open)(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != 0x08:
                raise BnnccError(f"{path}: not an IDX file of unsigned bytes (its magic number is "
                                 f"{magic.hex() or 'missing'}, expected 000008 and the number of dimensions)")
            dimensions = f"{magic[3]} dimension{'' if magic[3] == 1 else 's'}"
            # a damaged count read data as dimensions: the file was refused as a data set of 10^9 GiB, or
            # named in a line of 255 dimensions
            if ndim is not None and magic[3] != ndim:
                raise BnnccError(f"{path}: an IDX file of {dimensions} (its magic number is {magic.hex()}); "
                                 f"expected {ndim}")
            header = f.read(4 * magic[3])
            if len(header) < 4 * magic[3]:
                raise BnnccError(f"{path}: IDX header of {dimensions} cut short")
            dims = tuple(int(d) for d in np.frombuffer(header, dtype=">u4"))
            size = math.prod(dims)
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            if size > memory // 2:
                raise BnnccError(f"{path}: IDX header says {dims}, {size / 2**30:.1f} GiB to hold in memory, more "
                                 f"than half of this machine's {memory / 2**30:.1f} GiB; use an ImageFolder tree or "
                                 f"tar shards for a data set this large")
            data = np.empty(size, np.uint8)
            read = _read_into(f, memoryview(data))
            if read != size or f.read(1):
                raise BnnccError(f"{path}: IDX header says {dims} but holds "
                                 f"{'more than ' if read == size else ''}{read} bytes")
    except (OSError, EOFError, zlib.error) as e:  # zlib: a damaged gzip body
        raise BnnccError(f"{path}: not a readable IDX file ({e})") from None
    return data.reshape(dims)


def _read_into(f, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``f`` until it is full or ``f`` ends; the bytes read."""
    done = 0
    while done < len(buffer):
        count = f.readinto(buffer[done:])
        if not count:
            break
        done += count
    return done


# One batch as ``Dataset.load`` makes it: images, int64 labels, and the (index, reason) of each
# image that could not be read and was replaced.
Loaded = tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]


@functools.lru_cache(maxsize=2)
def _epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch; cached, since every step of the epoch asks for it."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class Dataset:
    """One split of a data set: ``len(split)`` images of ``num_classes`` classes (their ``labels``), loaded batch
    by batch."""

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_memory = True  # False: images are read and decoded per batch, worth worker processes
    # evaluation's centre crop (a share of the largest box of the input's shape, bnncc.images.centre_box);
    # None: the whole image
    eval_crop: float | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: torch.Tensor, shape: tuple[int, int, int], *, augment: bool, step: int = 0,
             seed: int = 0, positions: torch.Tensor | None = None) -> Loaded:
        """The images ``index`` for a model input of ``shape`` = (C, H, W); see ``batch``."""
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """Where image ``i`` comes from, for messages."""
        raise NotImplementedError

    def labels_digest(self) -> str:
        """SHA-256 of the class count and every image's label (``labels``, in order): how a resumed run tells
        its data from another data set of as many images, where the data's paths may differ between
        machines (a few milliseconds for ImageNet's 1.28M labels)."""
        labels = np.ascontiguousarray(np.asarray(self.labels), dtype=np.int64)
        return hashlib.sha256(f"{self.num_classes}:".encode() + labels.tobytes()).hexdigest()

    def batch_indices(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """Indices of the global batch at ``step`` (epochs are seeded permutations, last partial batch dropped)."""
        per_epoch = max(len(self) // batch_size, 1)
        epoch, offset = divmod(step, per_epoch)
        return _epoch_order(len(self), seed, epoch)[offset * batch_size:(offset + 1) * batch_size]

    def finish(self, images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """Loaded images (on any device) as the model's normalised float input of ``shape``."""
        raise NotImplementedError

    def batch(self, index: torch.Tensor, shape: tuple[int, int, int], *, augment: bool, step: int = 0,
              seed: int = 0, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images adapted to ``shape`` = (C, H, W), normalised; random crop + flip when ``augment``.

        The augmentation of an image depends on ``(seed, step, position)``, its position in the
        global batch (default: its row here), so DDP ranks augment their slices as one process would.
        Loads in this process; training and evaluation load through ``bnncc.train.loader.Loader``.
        """
        images, labels, bad = self.load(index, shape, augment=augment, step=step, seed=seed, positions=positions)
        # once each, as the loader logs them: a bad image that follows another is met twice in one load
        for i, reason in dict(bad).items():
            logger.warning("%s: unreadable image (%s), replaced", self.describe(i), reason)
        return self.finish(images, shape), labels


class ImageData(Dataset):
    """One split of an IDX data set, held in memory as uint8 NCHW images plus integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, mean: tuple[float, ...],
                 std: tuple[float, ...], source: Path):
        self.images = images  # uint8 (N, C, H, W)
        self.labels = labels  # int64 (N,)
        self.num_classes, self.mean, self.std, self.source = num_classes, mean, std, source

    def __len__(self) -> int:
        return self.images.shape[0]

    def describe(self, i: int) -> str:
        return f"{self.source}: image {i}"

    def finish(self, images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        return _adapt(images, shape, self.mean, self.std)

    def load(self, index: torch.Tensor, shape: tuple[int, int, int], *, augment: bool, step: int = 0,
             seed: int = 0, positions: torch.Tensor | None = None) -> Loaded:
        """Floats in [0, 1] at the stored size, augmented by one ``roi_align``; ``finish`` resizes."""
        images = self.images[index].float() / 255.0
        if augment:
            positions = torch.arange(len(index)) if positions is None else positions
            images = _augment(images, [seed * 1_000_003 + step * 65_537 + int(p) for p in positions])
        return images, self.labels[index], []


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
    mean_t = torch.tensor(mean, device=images.device).reshape(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).reshape(1, -1, 1, 1)
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
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1).astype(np.int64)
    if len(labels) != len(images):
        raise BnnccError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path.name}")
    if not labels.size:
        raise BnnccError(f"{images_path}: no images")
    if not images.shape[1] or not images.shape[2]:  # (training resized them, and stopped in torch's words)
        raise BnnccError(f"{images_path}: images of {images.shape[1]}x{images.shape[2]} pixels")
    # the classes are 0 to the largest training label, each with images: a stray large label (a
    # corrupt file) would otherwise make a network of that many classes
    train_labels_path = labels_path if prefix == "train" else _idx_file(folder, "train", "labels") or labels_path
    present = np.bincount(labels if prefix == "train" else read_idx(train_labels_path, 1).astype(np.int64))
    classes = len(present)
    if (present == 0).any():
        raise BnnccError(f"{train_labels_path}: class {int(np.argmin(present))} has no images (the labels go up "
                         f"to {classes - 1})")
    if labels.max() >= classes:
        raise BnnccError(f"{labels_path}: label {int(labels.max())}, where the training labels are 0 to {classes - 1}")
    images_t = torch.from_numpy(images.copy()).unsqueeze(1)
    # Normalise with the training split's own statistics, whichever split this is.
    train_images_path = images_path if prefix == "train" else _idx_file(folder, "train", "images") or images_path
    train_images = images if prefix == "train" else read_idx(train_images_path, 3)
    mean = float(train_images.mean() / 255.0)
    std = float(train_images.std() / 255.0)
    if std == 0:  # (normalising divided by 0: the run stopped on a loss of NaN, blaming its learning rate)
        raise BnnccError(f"{train_images_path}: every pixel of every image is {train_images.flat[0]}: nothing to "
                         f"learn from, and no spread to normalise by")
    return ImageData(images_t, torch.from_numpy(labels), classes, (mean,), (std,), images_path)


def open_dataset(path: str | Path, split: str) -> Dataset:
    """Open ``split`` ("train" or "val") of an IDX folder, an ImageFolder tree (``train/``, ``val/``)
    or a folder of tar shards (``train-*.tar``, ``val-*.tar``).

    IDX images are read into memory. Image files are only indexed here; each batch reads and
    decodes its own (``bnncc.train.imagefiles``), so memory does not grow with the data set.
    """
    from bnncc.train.imagefiles import open_image_folder, open_shards

    opener = {"idx": _open_idx, "image folder": open_image_folder, "shards": open_shards}[dataset_kind(path)]
    return opener(Path(path), split)


def dataset_kind(path: str | Path) -> str:
    """Which kind of data set the folder ``path`` holds ("idx", "image folder" or "shards"), by its
    names alone (``open_dataset``), so that a command can refuse a wrong folder before any work."""
    folder = Path(path)
    if not folder.is_dir():
        raise BnnccError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}; --data takes the "
                         f"folder of a data set (IDX files, an ImageFolder tree or tar shards)")
    if any(folder.glob("*-images-idx3-ubyte*")):
        return "idx"
    if (folder / "train").is_dir():
        return "image folder"
    if any(folder.glob("train-*.tar")):
        return "shards"
    raise BnnccError(f"{folder}: neither an IDX folder (train-images-idx3-ubyte.gz ...), an ImageFolder tree "
                     "(train/<class>/*.jpg, val/<class>/*.jpg) nor tar shards (train-000000.tar ..., val-000000.tar ...)")


def open_splits(path: str | Path) -> tuple[Dataset, Dataset]:
    """The training and validation splits, checked to share their classes (for image files)."""
    from bnncc.train.imagefiles import ImageFiles, check_same_classes

    train, val = open_dataset(path, "train"), open_dataset(path, "val")
    if isinstance(train, ImageFiles):
        check_same_classes(train, val)
    return train, val
