import gzip
import struct

import numpy as np
import pytest

from bnncc.frontend import load
from bnncc.rewriting import rewrite
from bnncc.zoo import export_onnx, resnet50


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


@pytest.fixture(scope="session")
def teacher_and_student(tmp_path_factory):
    """A tiny float ResNet-50 teacher (4 classes, 32 px) and its PokeBNN-1x rewrite, as ONNX files."""
    folder = tmp_path_factory.mktemp("ft")
    teacher = export_onnx(resnet50(width=0.125, num_classes=4).eval(), folder / "teacher.onnx", input_size=32)
    student, _ = rewrite(load(teacher), "pokebnn_1x", ["passes.poke_stem.mid_channels=8"])
    import onnx_ir as ir

    path = folder / "student.onnx"
    ir.save(student, path)
    return teacher, path
