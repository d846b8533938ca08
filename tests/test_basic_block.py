"""Basic-block ResNets (ResNet-18/34): recognition, the PokeBNN rewrite, ACE and compilation."""

from __future__ import annotations

import json

import pytest

from bnncc import zoo
from bnncc.frontend import load, recognize
from bnncc.resnet import BasicBlock

# torchvision ResNet-18 by hand: (in, out, stride, projection) of the 8 basic blocks.
RESNET18_BLOCKS = [(64, 64, 1, False)] * 2 + [(64, 128, 2, True), (128, 128, 1, False),
                                              (128, 256, 2, True), (256, 256, 1, False),
                                              (256, 512, 2, True), (512, 512, 1, False)]


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory):
    return zoo.export_onnx(zoo.resnet18(num_classes=10), tmp_path_factory.mktemp("r18") / "r18.onnx", input_size=32)


def test_resnet18_is_recognised_as_basic_blocks(cli, resnet18_onnx):
    resnet = recognize(load(resnet18_onnx))
    assert all(isinstance(b, BasicBlock) for b in resnet.blocks)
    assert [len(s) for s in resnet.stages] == [2, 2, 2, 2]
    assert [(b.in_channels, b.out_channels, b.stride, b.shortcut is not None) for b in resnet.blocks] == RESNET18_BLOCKS
    assert [b.out_size for b in resnet.blocks][-1] == (1, 1) and resnet.head.in_features == 512
    code, out, err = cli("inspect", resnet18_onnx, "--json")
    assert code == 0, err
    structure = json.loads(out)
    assert [len(b["convs"]) for stage in structure["stages"] for b in stage] == [2] * 8
    assert structure["notes"] == ["basic blocks (ResNet-18/34 style): two 3x3 convs each"]


def test_resnet34_has_3_4_6_3_basic_blocks(tmp_path):
    path = zoo.export_onnx(zoo.resnet34(width=0.25, num_classes=10), tmp_path / "r34.onnx", input_size=32)
    resnet = recognize(load(path))
    assert [len(s) for s in resnet.stages] == [3, 4, 6, 3]
    assert all(isinstance(b, BasicBlock) for b in resnet.blocks)
