"""Run one ai.bnncc node through onnxruntime (the reference) for the op tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from bnncc.ops import DOMAIN, attach_functions


def run_onnx(op_type: str, inputs: list[np.ndarray], **attributes) -> np.ndarray:
    names = [f"in{i}" for i in range(len(inputs))]
    node = helper.make_node(op_type, names, ["out"], domain=DOMAIN, **attributes)
    graph = helper.make_graph(
        [node], op_type,
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, a.shape) for n, a in zip(names, inputs)],
        [helper.make_value_info("out", helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    attach_functions(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, inputs)))[0]


def same_pads_np(size: int, k: int, s: int) -> tuple[int, int]:
    """TF SAME padding written out independently of bnncc."""
    out = int(np.ceil(size / s))
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2
