"""MNIST-style IDX files for the tests that train: the writer, and a learnable data set."""

import gzip
import struct

import numpy as np


def write_idx(path, array: np.ndarray) -> None:
    """``array`` as a gzipped IDX file of unsigned bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def brightness_idx(folder, train_images: int, test_images: int):
    """A learnable 4-class IDX data set of 8x8 images in ``folder`` (made if absent): the class is
    the image's brightness level, which survives the random crops and flips of training augmentation."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train_images), ("t10k", test_images)):
        labels = rng.integers(0, 4, n)
        images = rng.integers(0, 40, (n, 8, 8)) + 50 * labels[:, None, None]
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder
