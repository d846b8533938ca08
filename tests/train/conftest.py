import gzip
import struct

import numpy as np
import pytest


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory):
    """A learnable 4-class IDX data set of 8x8 images: the class is the image's brightness level.

    Brightness survives the random crops and flips of training augmentation."""
    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 64)):
        labels = rng.integers(0, 4, n)
        images = rng.integers(0, 40, (n, 8, 8)) + 50 * labels[:, None, None]
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder
