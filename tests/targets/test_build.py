"""``targets.build.atomic_dir``: which failures inside it are the output folder's."""

from __future__ import annotations

import errno
import os

import pytest

from bnncc.errors import BnnccError
from bnncc.targets.build import atomic_dir


def test_a_failed_write_is_the_folders_and_leaves_nothing(tmp_path):
    with pytest.raises(BnnccError, match=r"lib: cannot write there \(No space left on device\)"):
        with atomic_dir(tmp_path / "lib") as tmp:
            (tmp / "model.so").write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []


def test_a_file_that_cannot_be_read_is_named_not_called_unwritable(tmp_path):
    """A kernel source missing from an install (the wheel lacked bmma_conv.cuh), read while the
    library was written, came out as "lib: cannot write there (No such file or directory)"."""
    with pytest.raises(FileNotFoundError, match="bmma_conv.cuh"):
        with atomic_dir(tmp_path / "lib"):
            (tmp_path / "bmma_conv.cuh").read_text()
    assert os.listdir(tmp_path) == []
