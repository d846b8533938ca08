"""Rewrite a ``Squeeze`` of a pooled (N, C, 1, 1) tensor as ``Flatten(axis=1)``.

tf2onnx ends a Keras ResNet with GlobalAveragePool -> Squeeze(axes=[2, 3]) where torch writes
Flatten; for x of shape (N, C, 1, 1) both give (N, C), the same values in the same order.
"""

from __future__ import annotations

__all__ = ["SqueezeToFlattenPass"]

import logging

import onnx_ir as ir

from bnncc.passes._util import axes_of, replace_with_flatten, static_dims
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("squeeze_to_flatten")
class SqueezeToFlattenPass(ir.passes.InPlacePass):
    """Replace Squeezes that drop the unit H and W of a rank-4 tensor with Flatten(axis=1).

    1. Squeeze of x (N, C, 1, 1) over axes {2, 3} (attribute before opset 13, input from 13;
       negative axes allowed): Flatten.
    2. Any other Squeeze (other axes, no axes, H or W not 1, unknown shape): left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Squeeze" or node.domain != "" or not _drops_plane(node):
                continue
            replace_with_flatten(graph, node)
            logger.debug("rewrote Squeeze %s as Flatten", node.name)
            modified = True
        return ir.passes.PassResult(model, modified)


def _drops_plane(node: ir.Node) -> bool:
    dims = static_dims(node.inputs[0])
    if dims is None or len(dims) != 4 or tuple(dims[2:]) != (1, 1):
        return False
    # without axes, every unit axis: a batch of one would lose its batch axis too
    return sorted(axes_of(node) or ()) == [2, 3]
