"""Rewrite a ``Clip`` that bounds its input only from below, at 0, as the ``Relu`` it computes.

    Clip(x, 0, max) = max(x, 0) = Relu(x)    where max is absent, +inf or float32's largest value

torch writes ``clamp(min=0)`` (``x.clamp_min(0)``) so: before opset 11 as the attribute ``min``
(``max`` then defaults to float32's largest), from opset 11 as a constant ``min`` input, ``max``
omitted. Such a model was refused as one of "an activation other than Relu".
"""

from __future__ import annotations

__all__ = ["ClipToReluPass"]

import logging

import numpy as np
import onnx_ir as ir

from bnncc.passes._util import constant_inputs
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)

_FLOAT32_MAX = float(np.finfo(np.float32).max)


@register_pass("clip_to_relu")
class ClipToReluPass(ir.passes.InPlacePass):
    """Replace every Clip that computes a Relu with Relu.

    1. Clip of min 0 and no upper bound (``max`` absent, +inf or float32's largest), as attributes
       (opsets 6 to 10) or constant inputs (from 11): Relu of its input.
    2. Any other Clip (ReLU6's max of 6, another min, bounds computed at run time): left alone (the
       front end refuses it, naming it).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Clip" or node.domain != "" or _bounds(node) != (0.0, _FLOAT32_MAX):
                continue
            relu = ir.Node("", "Relu", [node.inputs[0]], name=node.name)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [relu], [node.outputs[0]], [relu.outputs[0]])
            logger.debug("rewrote Clip %s as Relu", node.name)
            modified = True
        return ir.passes.PassResult(model, modified)


def _bounds(node: ir.Node) -> tuple[float, float] | None:
    """The Clip's (min, max), an unbounded max (absent or +inf) as float32's largest; None where a bound is not a
    constant."""
    if len(node.inputs) < 2:  # the attributes of opsets 6 to 10, float32's extremes by default
        low, high = node.attributes.get_float("min", -_FLOAT32_MAX), node.attributes.get_float("max", _FLOAT32_MAX)
    else:
        values = constant_inputs(node, 1, 2)
        if values is None or any(v is not None and v.size != 1 for v in values):
            return None
        low, high = (None if v is None else float(v.reshape(-1)[0]) for v in values)
        low, high = -_FLOAT32_MAX if low is None else low, _FLOAT32_MAX if high is None else high
    # +inf as an attribute too: torch's hardtanh(x, 0, inf) and clamp(x, 0, inf) before opset 11 write max=inf
    return (low, min(high, _FLOAT32_MAX))
