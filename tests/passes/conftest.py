"""Fixtures for the PokeBNN pass tests: a narrow float ResNet-50 in the v1.5 and v1 layouts."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from _support import CLASSES, SIZE, WIDTH, make_v1

from bnncc import zoo
from bnncc.frontend import load


@pytest.fixture(scope="session")
def small_resnet_path(tmp_path_factory):
    """A narrow float ResNet-50 v1.5, legacy export, symbolic batch."""
    path = tmp_path_factory.mktemp("small") / "resnet50_v15.onnx"
    return zoo.export_onnx(zoo.resnet50(WIDTH, CLASSES), path, input_size=SIZE, batch="symbolic")


@pytest.fixture(scope="session")
def small_v1_path(tmp_path_factory):
    """The same network in the v1 layout (stride on the first 1x1 conv of a block)."""
    path = tmp_path_factory.mktemp("small") / "resnet50_v1.onnx"
    return zoo.export_onnx(make_v1(zoo.resnet50(WIDTH, CLASSES)), path, input_size=SIZE, batch="symbolic")


@pytest.fixture
def small_model(small_resnet_path) -> ir.Model:
    """A fresh canonical copy of the narrow v1.5 ResNet-50 (passes change models in place)."""
    return load(small_resnet_path)

