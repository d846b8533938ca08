"""A plain `pip install .` carries every file the package reads, as the editable install does."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import warnings
import zipfile
from pathlib import Path

from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_data_file_of_the_package_folders(tmp_path):
    """The CUDA tensor-core kernel's bmma_conv.cuh was left out of the wheel: a compile with
    BNNCC_CUDA_MMA=1 from a plain install failed."""
    source = tmp_path / "source"  # a copy: setuptools' build/ folder keeps the files of earlier builds
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", "build", "*.egg-info", ".git", "__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            tmp_path, source], check=True, capture_output=True, text=True)
    # a data folder (runner/, fashion_mnist/) missing from `packages` gave a page of setuptools warnings a build
    assert "Warning:" not in built.stderr, built.stderr
    wheel, = tmp_path.glob("bnncc-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    expected = set()
    for package, folder in folders.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts:
                expected.add("/".join([*package.split("."), *path.relative_to(ROOT / folder).parts]))
    assert expected and expected - packed == set()


def test_setuptools_reads_pyproject_without_a_deprecation():
    """`license = { text = ... }` was deprecated in setuptools 77, which stops building such projects after
    2027-02-18; `pip install .` takes the newest setuptools, so the install would have failed from then on."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_configuration(Distribution(), ROOT / "pyproject.toml")
