"""Image files as a ``Dataset``: ImageFolder trees and WebDataset-layout tar shards, indexed, then read
and decoded batch by batch.

Opening a split only lists its images: for an ImageFolder tree (``train/<class>/<image>``) the
file names, for tar shards (``train-000000.tar``, ... holding ``<key>.jpg`` beside ``<key>.cls``, the
class number as text) each image member's byte range, read with ``tarfile`` once. The index is
numpy arrays (a few tens of bytes an image), so memory does not grow with the images' pixels, and
any image can be read on its own: the epoch order is a permutation of the whole split, as for
data held in memory, and a resumed run reads exactly the images it would have.

Decoding is Pillow's (libjpeg-turbo for JPEG), taken from the original image (pokebnn.md, "Data"),
turned as its EXIF orientation says (``bnncc.images.upright_crop``, which `bnncc run` decodes with too):

* training: an Inception-style random resized crop (area 0.1-1 of the image, aspect ratio
  3/4-4/3, 10 attempts, then the centre crop), resized bicubically to the model's input,
  flipped horizontally with probability 1/2; the draws come from a generator seeded by
  ``(seed, step, position in the global batch)``;
* evaluation: the centre box of the model input's shape, 224/256 of the largest that fits (of the
  short side, for a square input), resized bicubically to the model's input.

A JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT (Pillow's ``draft``) when the crop still
has at least the output's pixels at that scale. An image that cannot be read or decoded is
replaced by the next readable one of the split (deterministic, so a resumed run replaces it
alike) and reported in ``Loaded``'s bad list.
"""

from __future__ import annotations

import io
import math
import os
import re
import signal
import tarfile
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bnncc.errors import BnnccError
from bnncc.fileio import folder_id
from bnncc.images import EVAL_CROP, centre_box, quietly, upright_crop
from bnncc.train.data import Dataset, Loaded

__all__ = ["ImageFiles", "Names", "open_image_folder", "open_shards", "check_same_classes", "IMAGE_SUFFIXES"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageFolder's: TIFF, PPM and PGM were skipped, and a class of them alone refused as empty
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_CLASSES = 1_000_000  # a shard's class numbers size the network's head: a stray huge one is a corrupt shard
# a .cls member: a class number in ASCII digits, perhaps with a newline (webdataset's writers add none)
_CLASS_NUMBER = re.compile(rb"\s*[0-9]+\s*")
_MAX_CLS_BYTES = 64
_ATTEMPTS = 10  # random resized crop: draws before the centre-crop fallback
# What Pillow raises on a file it cannot read: OSError (truncated, unidentified, unreadable),
# SyntaxError and ValueError (malformed headers), EOFError (cut short), DecompressionBombError (more
# than twice its pixel guard: an image that would take gigabytes to decode).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class Names:
    """Many names in two arrays, their bytes end to end and where each ends: no Python object and no
    padding per name (a numpy array of fixed-width strings pads all to the longest)."""

    def __init__(self, names: list[str]):
        encoded = [os.fsencode(name) for name in names]
        self.data = np.frombuffer(b"".join(encoded), np.uint8)
        self.ends = np.cumsum([len(name) for name in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        begin = int(self.ends[i - 1]) if i else 0
        return os.fsdecode(self.data[begin:self.ends[i]].tobytes())

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.ends.nbytes


class ImageFiles(Dataset):
    """One split of image files: ``sources`` are class folders (ImageFolder) or tar shards.

    Image ``i`` is the file ``names[i]`` in folder ``sources[source[i]]``, or, with ``offsets``,
    ``sizes[i]`` bytes at ``offsets[i]`` of the shard ``sources[source[i]]`` (member ``names[i]``).
    """

    in_memory = False
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    eval_crop = EVAL_CROP

    def __init__(self, root: Path, sources: list[Path], source: np.ndarray, names: Names, labels: np.ndarray,
                 classes: list[str], offsets: np.ndarray | None = None, sizes: np.ndarray | None = None):
        if len(names) == 0:
            raise BnnccError(f"{root}: no images")
        self.root, self.sources, self.source, self.names = root, sources, source, names
        self.labels, self.classes, self.offsets, self.sizes = labels, classes, offsets, sizes
        self.num_classes = len(classes)

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, i: int) -> str:
        name = self.names[i]
        return f"{self.sources[self.source[i]]}:{name}" if self.offsets is not None else str(self.sources[self.source[i]] / name)

    def read(self, i: int) -> bytes:
        """The encoded bytes of image ``i``."""
        path = self.sources[self.source[i]]
        if self.offsets is None:
            return (path / self.names[i]).read_bytes()
        with open(path, "rb") as f:
            f.seek(int(self.offsets[i]))
            data = f.read(int(self.sizes[i]))
        if len(data) != self.sizes[i]:
            raise OSError(f"shard ends {self.sizes[i] - len(data)} bytes into the image")
        return data

    def load(self, index: torch.Tensor, shape: tuple[int, int, int], *, augment: bool, step: int = 0,
             seed: int = 0, positions: torch.Tensor | None = None) -> Loaded:
        """uint8 RGB images at the model's (H, W), NCHW in channels-last memory; see ``Dataset.batch``."""
        _, h, w = shape
        positions = torch.arange(len(index)) if positions is None else positions
        pictures, labels, bad = [], [], []
        for i, position in zip(index.tolist(), positions.tolist()):
            key = (seed, step, position) if augment else None
            picture, label = self._picture(i, (w, h), key, bad)
            pictures.append(picture)
            labels.append(label)
        images = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2)  # NHWC memory: channels-last NCHW
        return images, torch.tensor(labels, dtype=torch.int64), bad

    def finish(self, images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """Normalised in one pass that keeps the channels-last layout (the trainer's); to one
        channel for a grayscale model."""
        mean = torch.tensor(self.mean, device=images.device).reshape(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=images.device).reshape(1, 3, 1, 1) * 255
        images = images.float().sub_(mean).div_(std)
        if shape[0] == 1:
            return images.mean(dim=1, keepdim=True)
        if shape[0] != 3:
            raise BnnccError(f"{self.root}: cannot adapt RGB images to a {shape[0]}-channel model input")
        return images

    def _picture(self, i: int, size: tuple[int, int], key: tuple[int, int, int] | None,
                 bad: list[tuple[int, str]]) -> tuple[np.ndarray, int]:
        """Image ``i`` (or the next readable one) as (H, W, 3) uint8, and its label. Past more than
        1% of the split unreadable in a row, a black image: the loader stops the run on that count."""
        for attempt in range(len(self) // 100 + 2):
            j = (i + attempt) % len(self)
            try:
                return _decode(self.read(j), size, key), int(self.labels[j])
            except _DECODE_ERRORS as e:
                bad.append((j, _problem(e)))
        return np.zeros((size[1], size[0], 3), np.uint8), int(self.labels[i])


def _problem(error: Exception) -> str:
    """What was wrong with an image, in words (Pillow's own message names its in-memory buffer)."""
    if isinstance(error, UnidentifiedImageError):
        return "UnidentifiedImageError: not an image format Pillow reads"
    return f"{type(error).__name__}: {error}"


def _decode(data: bytes, size: tuple[int, int], key: tuple[int, int, int] | None) -> np.ndarray:
    """Crop (random for a ``key``, else the evaluation crop) and resize to ``size`` = (W, H)."""
    # beyond twice Pillow's pixel guard an image is a bad one (_DECODE_ERRORS); below, its draft
    # scale keeps a JPEG's decoding cheap
    with quietly(), Image.open(io.BytesIO(data)) as im:
        rng = np.random.default_rng(key) if key is not None else None
        box_of = ((lambda w, h: _random_box(w, h, rng)) if rng is not None
                  else (lambda w, h: centre_box(w, h, size, EVAL_CROP)))
        out = upright_crop(im, size, box_of, "RGB")
        if rng is not None and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out)


def _random_box(width: int, height: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Inception-style crop (left, top, right, bottom): area 0.08-1 of the image and covering at
    least 0.1 of it, so 0.1-1; aspect ratio log-uniform in 3/4-4/3."""
    for _ in range(_ATTEMPTS):
        area = width * height * rng.uniform(0.1, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if w <= width and h <= height:
            left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return left, top, left + w, top + h
    aspect = min(max(width / height, 3 / 4), 4 / 3)  # fallback: the centre crop of the nearest allowed ratio
    return centre_box(width, height, (aspect, 1.0), 1.0)


def open_image_folder(folder: Path, split: str) -> ImageFiles:
    """``folder/train`` or ``folder/val``: one folder of images per class, classes in name order, a
    class's images anywhere under its folder, as torchvision's ImageFolder takes them (those in
    subfolders were left out: a class of them alone was refused as empty).
    Hidden entries are no data: a notebook's .ipynb_checkpoints became a class, and the ._ files a
    Mac writes beside each image on other disks were counted as unreadable images."""
    root = folder / ("train" if split == "train" else "val")
    if not root.is_dir():
        raise BnnccError(f"{root}: no such folder (an ImageFolder tree has train/ and val/)")
    classes = sorted(entry.name for entry in os.scandir(root)
                     if not entry.name.startswith(".") and _safely(entry.is_dir))
    if not classes:
        raise BnnccError(f"{root}: no class folders{_images_without_a_class(root)}")
    # a link takes into a class no images of the splits' other folders: a link to another class's subfolder gave
    # its images two labels, and one to ../../val/<class> trained on the validation images
    fenced = {path.resolve() for path in (folder / "train", folder / "val", *(root / name for name in classes))}
    sources, names, labels = [], [], []
    for label, name in enumerate(classes):
        files = _image_names(root / name, {folder_id(os.stat(root / name))}, fenced, (root / name).resolve())
        if not files:
            raise BnnccError(f"{root / name}: no images (an empty class){_files_not_images(root / name)}")
        sources.append(root / name)
        names.extend(files)
        labels.append(np.full(len(files), label, np.int64))
    labels_a = np.concatenate(labels)
    return ImageFiles(root, sources, labels_a.astype(np.int32), Names(names), labels_a, classes)


def _image_names(folder: Path, seen: set[tuple[int, int]], fenced: set[Path], own: Path,
                 prefix: str = "") -> list[str]:
    """The image files under ``folder`` by their paths from it, depth first in name order: through links to
    folders, but not into a folder ``seen`` before (a link loop) nor one under a ``fenced`` folder outside
    the class's ``own``, hidden entries skipped."""
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError as e:  # (skipped, its images would be left out without a word)
        raise BnnccError(f"{folder}: cannot read this folder of the data set ({e.strerror or e})") from None
    names = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if _safely(entry.is_dir):
            entry_id, real = folder_id(entry.stat()), Path(entry.path).resolve()
            if entry_id not in seen and (real.is_relative_to(own) or fenced.isdisjoint((real, *real.parents))):
                seen.add(entry_id)
                names += _image_names(Path(entry.path), seen, fenced, own, f"{prefix}{entry.name}/")
        elif _is_image(entry):
            names.append(prefix + entry.name)
    return names


def _images_without_a_class(root: Path) -> str:
    """For a split without class folders: the images that lie in it directly, as ImageNet's 50,000 validation
    images come (refused as "no class folders" alone, which said nothing of them)."""
    images = [entry.name for entry in os.scandir(root) if not entry.name.startswith(".") and _is_image(entry)]
    if not images:
        return ""
    # (the training split's class folders are where a validation split's images go, not a training split's)
    imagenet = (" (ImageNet's validation images come so: sort them into the training split's class folders)"
                if root.name == "val" else "")
    return f"; its {len(images)} image(s) lie in it directly, where each belongs in the folder of its class{imagenet}"


def _files_not_images(folder: Path) -> str:
    """What an empty class folder holds instead of images, for its message: a class of .gif, .jfif or .heic
    files was refused as empty, which it did not look."""
    files = sorted(entry.name for entry in os.scandir(folder)
                   if not entry.name.startswith(".") and _safely(entry.is_file))
    if not files:
        return ""
    return (f"; its {len(files)} file(s), such as {files[0]}, are not named as images "
            f"(*{', *'.join(sorted(IMAGE_SUFFIXES))})")


def _is_image(entry: os.DirEntry) -> bool:
    """Whether a folder entry is a file (through links) named as an image."""
    return _safely(entry.is_file) and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES


def _safely(test) -> bool:
    """A folder entry's ``is_file`` or ``is_dir``, which follow links: a link into a loop raises, and
    is skipped like a link that leads nowhere (neither) and any other file that is no image."""
    try:
        return test()
    except OSError:
        return False


def open_shards(folder: Path, split: str) -> ImageFiles:
    """``folder/train-*.tar`` or ``folder/val-*.tar`` in the WebDataset layout; classes 0..max."""
    prefix = "train" if split == "train" else "val"
    shards = sorted(folder.glob(f"{prefix}-*.tar"))
    if not shards:
        raise BnnccError(f"{folder}: no {prefix}-*.tar shards")
    source, names, offsets, sizes, labels = [], [], [], [], []
    for number, samples in enumerate(_index_shards(shards)):
        for name, offset, size, label in samples:
            source.append(number)
            names.append(name)
            offsets.append(offset)
            sizes.append(size)
            labels.append(label)
    labels_a = np.array(labels, np.int64)
    present = np.bincount(labels_a) if len(labels_a) else np.zeros(0, np.int64)
    if split == "train" and (present == 0).any():  # a small validation split may lack a class
        raise BnnccError(f"{folder}/{prefix}-*.tar: class {int(np.argmin(present))} has no images "
                         f"(an empty class; the classes are 0 to {len(present) - 1})")
    return ImageFiles(folder / f"{prefix}-*.tar", shards, np.array(source, np.int32), Names(names),
                      labels_a, [str(c) for c in range(len(present))], np.array(offsets, np.int64),
                      np.array(sizes, np.int64))


def _index_shards(shards: list[Path]) -> list[list[tuple[str, int, int, int]]]:
    """Each shard's samples; shards in parallel processes (tarfile reads ~25,000 headers a second:
    ImageNet's 2.6 million members take two minutes in one process)."""
    from bnncc.train.loader import default_workers, stop_signals_held

    processes = min(len(shards), default_workers())
    if processes == 1:
        return [_index_shard(shard) for shard in shards]
    with ProcessPoolExecutor(processes, initializer=_end_with_the_run) as pool:
        with stop_signals_held():  # (the first task forks the processes)
            indexed = pool.map(_index_shard, shards, chunksize=max(1, len(shards) // (4 * processes)))
        return list(indexed)


def _end_with_the_run() -> None:
    """An indexing process ends on a stop signal. Forked under ``stop_signals_held``, it kept its holding
    handler, and a Ctrl-C to the process group stopped the run only once every shard was indexed (minutes
    on ImageNet): the pool waits for its work on the way out, and its end drops the work not started.
    A signal the run ignores (nohup's SIGHUP) stays ignored."""
    from bnncc.train.loader import STOPS

    for stop in STOPS:
        if signal.getsignal(stop) is not signal.SIG_IGN:
            signal.signal(stop, signal.SIG_DFL)


def _index_shard(shard: Path) -> list[tuple[str, int, int, int]]:
    """(image member, data offset, size, class) of each sample: members ``<key>.<ext>`` share their
    key (the name up to the first dot of its last part); ``<key>.cls`` holds the class number."""
    images: dict[str, tuple[str, int, int]] = {}
    classes: dict[str, int] = {}
    try:
        length = shard.stat().st_size
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.issparse():  # (its size is the file's, its stored bytes fewer: read as they lie, garbage)
                    raise BnnccError(f"{shard}: {member.name} is a sparse member, which bnncc does not read; write "
                                     f"the shard without tar's --sparse")
                if member.offset_data + member.size > length:  # tarfile takes a cut-short shard's end for its last
                    raise BnnccError(f"{shard}: cut short inside {member.name}")
                folder, _, base = member.name.rpartition("/")
                stem, _, extension = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                kind = "cls" if extension.lower() == "cls" else \
                    "image" if f".{extension.lower()}" in IMAGE_SUFFIXES else None
                # a second member of a sample's kind replaced the first without a word (its label too)
                if (kind == "cls" and key in classes) or (kind == "image" and key in images):
                    what = ".cls" if kind == "cls" else "image"
                    raise BnnccError(f"{shard}: sample {key!r} has more than one {what} member ({member.name} again); "
                                     f"a sample is one image and one .cls")
                if kind == "cls":
                    # ASCII digits only (int() also takes '1_0', '+1' and other scripts' digits), and
                    # a bounded read: the member's size is the shard's word
                    text = tar.extractfile(member).read(_MAX_CLS_BYTES + 1)
                    if len(text) > _MAX_CLS_BYTES or not _CLASS_NUMBER.fullmatch(text):
                        raise BnnccError(f"{shard}:{member.name}: not a class number ({text[:20]!r})")
                    classes[key] = int(text)
                    if not 0 <= classes[key] < MAX_CLASSES:
                        raise BnnccError(f"{shard}:{member.name}: class {classes[key]}, outside 0 to {MAX_CLASSES - 1}")
                elif kind == "image":
                    images[key] = (member.name, member.offset_data, member.size)
            # a tar ends in two zero blocks; without them the shard was cut, perhaps between members,
            # which tarfile takes for its end
            if tar.offset + 2 * tarfile.BLOCKSIZE > length:
                raise BnnccError(f"{shard}: cut short after {tar.members[-1].name if tar.members else 'its start'} "
                                 f"(no end-of-archive blocks)")
    except (tarfile.TarError, OSError) as e:
        raise BnnccError(f"{shard}: not a readable tar file ({e})") from None
    missing = images.keys() ^ classes.keys()
    if missing:
        key = min(missing)
        raise BnnccError(f"{shard}: sample {key!r} has " + ("no .cls member" if key in images else "no image member"))
    if any(label < 0 for label in classes.values()):
        raise BnnccError(f"{shard}: negative class number")
    return [(*images[key], classes[key]) for key in sorted(images)]


def check_same_classes(train: ImageFiles, val: ImageFiles) -> None:
    """The validation split must have the training split's classes: the same folder names, or for
    shards class numbers the training split has (a small validation split may lack some); it then
    counts the training split's classes."""
    if train.offsets is not None:
        if val.num_classes > train.num_classes:
            raise BnnccError(f"{val.root}: class {val.num_classes - 1} is not among the {train.num_classes} classes "
                             f"of {train.root}")
        val.classes, val.num_classes = train.classes, train.num_classes
    elif train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        # the same name in two Unicode forms (a copy through a Mac's disk leaves names decomposed) reads
        # alike in the message below: "only in train/: café; only in val/: café"
        same = sorted(set(map(_nfc, only_train)) & set(map(_nfc, only_val)))
        if same:
            raise BnnccError(f"{train.root.parent}: train/ and val/ spell class {same[0]!r} in different Unicode "
                             f"forms (composed, NFC, in one and decomposed, NFD, in the other); rename the folders "
                             f"of one split to the other's form")
        raise BnnccError(f"{train.root.parent}: train/ and val/ have different classes "
                         f"(only in train/: {', '.join(only_train[:5]) or 'none'}; "
                         f"only in val/: {', '.join(only_val[:5]) or 'none'})")


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)
