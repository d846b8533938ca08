"""Helpers shared by the PokeBNN pass tests (imported by the test modules and conftest)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort


# width 0.25: stem 16, bottleneck widths 16, 32, 64, 128 (outputs 64 .. 512); every SE gate has
# at least 2 hidden channels. 64x64 inputs: the blocks run at 16, 8, 4 and 2 pixels.
WIDTH = 0.25
SIZE = 64
CLASSES = 10


def make_v1(module):
    """Move every strided bottleneck's stride from the 3x3 conv to the first 1x1 (ResNet v1), in place."""
    for block in (b for layer in (module.layer2, module.layer3, module.layer4) for b in layer):
        if block.conv2.stride != (1, 1):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
    return module


def op_counts(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph)


def run_ort(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """The model's first output on ``x``, as onnxruntime computes it."""
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def random_input(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)


def ace_total(model: ir.Model) -> float:
    """The cost model's total ACE of ``model``."""
    from bnncc.cost import ace

    return ace(model).total


def conv_macs(model: ir.Model, node_name: str) -> int:
    """MACs of a Conv from its weight and its output shape: Ho Wo Cout (Cin/g) kh kw."""
    node = model.graph.node(node_name)
    cout, cin_per_group, kh, kw = node.inputs[1].const_value.shape
    ho, wo = node.outputs[0].shape[2:]
    return ho * wo * cout * cin_per_group * kh * kw
