"""Give every Conv a bias initializer: ``Conv(x, W)`` = ``Conv(x, W, 0)``."""

from __future__ import annotations

__all__ = ["AddConvBiasPass"]

import logging

import numpy as np
import onnx_ir as ir

from bnncc.passes._util import add_initializer, const_array
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("add_conv_bias")
class AddConvBiasPass(ir.passes.InPlacePass):
    """Add a zero bias to Conv nodes that have none, so later passes can assume one.

    1. ``Conv(x, W)`` with constant W: gets ``B = zeros(W.shape[0])``.
    2. A Conv that has a bias already, or whose W is not constant: left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Conv" or node.domain != "":
                continue
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                continue
            weight = const_array(node.inputs[1])
            if weight is None:
                continue
            bias = add_initializer(graph, f"{node.name or 'conv'}.bias", np.zeros(weight.shape[0], weight.dtype))
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(2, bias)
            logger.debug("added a zero bias to %s", node.name)
            modified = True
        return ir.passes.PassResult(model, modified)
