"""Fold an inference-mode BatchNormalization into the Conv that feeds it.

With s = gamma / sqrt(var + eps) per output channel c:

    BN(Conv(x, W, b)) = s * (W * x + b - mean) + beta = (s W) * x + (s (b - mean) + beta)

so W'[c] = s[c] W[c] and b'[c] = s[c] (b[c] - mean[c]) + beta[c] (b = 0 when the Conv has no
bias). Computed in float64, stored in the weight's dtype.
"""

from __future__ import annotations

__all__ = ["FoldBatchNormPass"]

import logging

import numpy as np
import onnx_ir as ir

from bnncc.errors import BnnccError
from bnncc.passes._util import add_initializer, const_array, int_attr, take_over_output
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("fold_batchnorm")
class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold ``BatchNormalization(Conv(x))`` into the Conv, any opset (7..28).

    1. Conv with constant W (and bias, if any), BN with constant per-channel parameters (C values
       each, ``spatial`` 1 or per-channel-shaped), only its first output used, not in training
       mode, the Conv output used only by the BN: folded.
    2. A BN after anything else, a Conv output with other users, non-constant parameters or in
       training mode: left alone. Training mode is ``training_mode=1`` from opset 14; before it, a
       BN that names its running statistics outputs (onnxruntime, the reference, then normalizes
       with the batch's statistics, used or not).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or bn.domain != "":
                continue
            if self._try_fold(graph, bn, model.opset_imports.get("", 0)):
                modified = True
        return ir.passes.PassResult(model, modified)

    def _try_fold(self, graph: ir.Graph, bn: ir.Node, opset: int) -> bool:
        conv = bn.inputs[0].producer()
        if conv is None or conv.op_type != "Conv" or conv.domain != "":
            return False
        conv_out = conv.outputs[0]
        if len(conv_out.uses()) != 1 or conv_out.is_graph_output():
            return False
        statistics = [o for o in bn.outputs[1:] if o.name]
        if int_attr(bn, "training_mode", 0) != 0 or (opset < 14 and statistics) or any(
                o.uses() or o.is_graph_output() for o in statistics):
            return False
        weight = const_array(conv.inputs[1])
        params = [const_array(v) for v in bn.inputs[1:5]]
        bias = const_array(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
        if weight is None or any(p is None for p in params):
            return False
        channels = weight.shape[0]
        if any(p.size != channels for p in params) or (len(conv.inputs) > 2 and bias is None):
            return False
        gamma, beta, mean, var = (p.reshape(-1).astype(np.float64) for p in params)
        eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
        if not np.all(var + eps > 0):  # also catches NaN: the fold would write NaN weights
            raise BnnccError(f"node '{bn.name}' (BatchNormalization): running variance + epsilon is not positive")
        scale = gamma / np.sqrt(var + eps)
        b = np.zeros(channels) if bias is None else bias.astype(np.float64)
        new_weight = (weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))).astype(weight.dtype)
        new_bias = (scale * (b - mean) + beta).astype(weight.dtype)
        w_value = add_initializer(graph, f"{conv.name or 'conv'}.weight", new_weight)
        b_value = add_initializer(graph, f"{conv.name or 'conv'}.bias", new_bias)
        conv.replace_input_with(1, w_value)
        if len(conv.inputs) < 3:
            conv.resize_inputs(3)
        conv.replace_input_with(2, b_value)
        take_over_output(graph, bn, conv_out)
        logger.debug("folded %s into %s", bn.name, conv.name)
        return True
