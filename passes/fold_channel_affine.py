"""Fold a per-channel Mul or Add of constants into the Conv that feeds it.

tf2onnx writes a batch norm after a biased conv as Conv(x, W, b) -> Mul(s) -> Add(t), with s and
t of shape (1, C, 1, 1). Per output channel c:

    Conv(x, W, b) * s = Conv(x, s W, s b)        Conv(x, W, b) + t = Conv(x, W, b + t)

Computed in float64, stored in the weight's dtype. Runs after ``add_conv_bias``, so every Conv
has its bias.
"""

from __future__ import annotations

__all__ = ["FoldChannelAffinePass"]

import logging

import numpy as np
import onnx_ir as ir

from bnncc.passes._util import add_initializer, const_array, take_over_output
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("fold_channel_affine")
class FoldChannelAffinePass(ir.passes.InPlacePass):
    """Fold ``Mul(Conv(x), s)`` and ``Add(Conv(x), t)`` into the Conv, in graph order (so a Mul
    then an Add both fold).

    1. A Mul or Add whose one input is a Conv's output, read only there, and whose other is a
       constant of one value per output channel (shape (1, C, 1, 1), (C, 1, 1) or one value),
       the Conv with constant W and bias: folded, the Conv takes over the output.
    2. Any other Mul or Add (of two activations, as a residual Add; of a constant that varies
       over H or W; after anything but a Conv): left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type in ("Mul", "Add") and node.domain == "" and self._try_fold(graph, node):
                modified = True
        return ir.passes.PassResult(model, modified)

    def _try_fold(self, graph: ir.Graph, node: ir.Node) -> bool:
        conv = next((v.producer() for v in node.inputs if v.producer() is not None
                     and v.producer().op_type == "Conv" and v.producer().domain == ""), None)
        if conv is None or len(node.inputs) != 2 or len(conv.inputs) < 3:
            return False
        conv_out = conv.outputs[0]
        other = node.inputs[1] if node.inputs[0] is conv_out else node.inputs[0]
        weight, bias = const_array(conv.inputs[1]), const_array(conv.inputs[2])
        values = _per_channel(const_array(other), None if weight is None else weight.shape[0])
        if values is None or bias is None or len(conv_out.uses()) != 1 or conv_out.is_graph_output():
            return False
        dtype = weight.dtype
        if node.op_type == "Mul":
            weight = weight * values.reshape(-1, *([1] * (weight.ndim - 1)))
            bias = bias * values
        else:
            bias = bias + values
        conv.replace_input_with(1, add_initializer(graph, f"{conv.name or 'conv'}.weight", weight.astype(dtype)))
        conv.replace_input_with(2, add_initializer(graph, f"{conv.name or 'conv'}.bias", bias.astype(dtype)))
        take_over_output(graph, node, conv_out)
        logger.debug("folded %s %s into %s", node.op_type, node.name, conv.name)
        return True


def _per_channel(constant: np.ndarray | None, channels: int | None) -> np.ndarray | None:
    """``constant`` as ``channels`` float64 values if it holds one value per channel of an NCHW
    tensor (or one value for all), else None."""
    if constant is None or channels is None or constant.dtype.kind != "f" or constant.ndim > 4:
        return None
    shape = (1,) * (4 - constant.ndim) + constant.shape
    if constant.size == 1:
        return np.full(channels, float(constant.reshape(-1)[0]))
    if shape != (1, channels, 1, 1):
        return None
    return constant.reshape(-1).astype(np.float64)
