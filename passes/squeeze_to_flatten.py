"""Rewrite a ``Squeeze`` of a pooled (N, C, 1, 1) tensor as ``Flatten(axis=1)``.

tf2onnx ends a Keras ResNet with GlobalAveragePool -> Squeeze(axes=[2, 3]) where torch writes
Flatten; for x of shape (N, C, 1, 1) both give (N, C), the same values in the same order. So does
torch's ``x.squeeze(-1).squeeze(-1)``, two Squeezes of one unit axis each.
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
    2. Squeeze over axis 2 of the (N, C, 1) that a Squeeze of x (N, C, 1, 1) over axis 2 or 3 gives,
       read only there: Flatten of x; the first Squeeze is left to ``remove_unused``.
    3. Any other Squeeze (other axes, no axes, H or W not 1, unknown shape): left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            source = _plane_source(node) if node.op_type == "Squeeze" and node.domain == "" else None
            if source is None:
                continue
            node.replace_input_with(0, source)
            replace_with_flatten(graph, node)
            logger.debug("rewrote Squeeze %s as Flatten", node.name)
            modified = True
        return ir.passes.PassResult(model, modified)


def _plane_source(node: ir.Node) -> ir.Value | None:
    """The (N, C, 1, 1) tensor whose H and W the Squeeze ``node`` drops (cases 1 and 2 above), or None."""
    x = node.inputs[0]
    dims = static_dims(x)
    # without axes, every unit axis: a batch of one would lose its batch axis too
    if _is_plane(dims) and sorted(axes_of(node) or ()) == [2, 3]:
        return x
    first = x.producer()
    if (dims is None or len(dims) != 3 or dims[2] != 1 or axes_of(node, rank=3) != [2] or first is None
            or first.op_type != "Squeeze" or first.domain != "" or len(x.uses()) != 1 or x.is_graph_output()):
        return None
    plane = first.inputs[0]
    return plane if _is_plane(static_dims(plane)) and axes_of(first) in ([2], [3]) else None


def _is_plane(dims: tuple | None) -> bool:
    """Whether ``dims`` are those of an (N, C, 1, 1) tensor."""
    return dims is not None and len(dims) == 4 and tuple(dims[2:]) == (1, 1)
