"""stride_to_3x3: a v1 bottleneck's stride moves from its first 1x1 conv to its 3x3 conv."""

from __future__ import annotations

import numpy as np
import torch
from _support import CLASSES, WIDTH, ace_total, conv_macs, random_input, run_ort

from bnncc import zoo
from bnncc.frontend import load, recognize
from bnncc.passes.stride_to_3x3 import StrideTo3x3Pass


def _strides(model, name):
    return list(model.graph.node(name).attributes.get_ints("strides"))


def test_v1_becomes_v15(small_v1_path):
    model = load(small_v1_path)
    strided = [b for b in recognize(model).blocks if b.stride == 2]
    assert len(strided) == 3 and not any(b.stride_on_3x3 for b in strided)
    first_macs = sum(conv_macs(model, b.convs[0]) for b in strided)
    ace_before = ace_total(model)

    assert StrideTo3x3Pass()(model).modified

    for block in strided:
        assert _strides(model, block.convs[0]) == [1, 1] and _strides(model, block.convs[1]) == [2, 2]
    assert all(b.stride_on_3x3 for b in recognize(model).blocks if b.stride == 2)
    # the 1x1 now runs at the input size (4x the pixels), the 3x3 keeps its output size
    assert ace_total(model) == ace_before + 3 * 256 * first_macs


def test_result_computes_the_v15_network(small_v1_path):
    """Same weights, strides on the 3x3: torchvision's own v1.5 ResNet is the reference."""
    model = load(small_v1_path)
    StrideTo3x3Pass()(model)
    reference = zoo.resnet50(WIDTH, CLASSES)  # same seed, hence the same weights, v1.5 layout
    x = random_input()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_ort(model, x), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_does_not_fire_on_v15(small_model):
    assert not StrideTo3x3Pass()(small_model).modified


def test_make_v1_really_changes_the_network(small_v1_path, small_model):
    """Guard for the reference above: v1 and v1.5 differ on the same input."""
    x = random_input()
    assert not np.allclose(run_ort(load(small_v1_path), x), run_ort(small_model, x), atol=1e-3)
