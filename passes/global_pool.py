"""Rewrite spatial means as ``GlobalAveragePool``.

For x of shape (N, C, H, W): ReduceMean(x, axes=[2, 3], keepdims=1) = GlobalAveragePool(x), and
AveragePool(x, kernel=(H, W), no padding) = GlobalAveragePool(x) (one window covers the plane).
ReduceMean with keepdims=0 gives (N, C) = Flatten(GlobalAveragePool(x), axis=1), and so does a
mean over axes 1 and 2 of Transpose(x, perm=[0, 2, 3, 1]), x in NHWC (tf2onnx's Keras head).
"""

from __future__ import annotations

__all__ = ["GlobalPoolPass"]

import logging

import onnx_ir as ir

from bnncc.passes._util import axes_of, int_attr, ints_attr, static_dims
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("global_pool")
class GlobalPoolPass(ir.passes.InPlacePass):
    """Replace whole-plane means of a rank-4 tensor with GlobalAveragePool.

    1. ReduceMean over axes {2, 3} (attribute before opset 18, input from 18; negative axes
       allowed), keepdims=1: GlobalAveragePool.
    2. The same with keepdims=0: GlobalAveragePool then Flatten(axis=1).
    3. AveragePool whose kernel equals the static input (H, W), without padding: GlobalAveragePool.
    4. ReduceMean over axes {1, 2}, keepdims=0, of Transpose(x, perm=[0, 2, 3, 1]) with x rank 4:
       GlobalAveragePool of x then Flatten(axis=1); the Transpose is left to ``remove_unused``.
    5. Any other ReduceMean or AveragePool (other axes, smaller kernel, padding, unknown shape):
       left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            source = _plane_source(node) if node.domain == "" else None
            if source is None:
                continue
            flatten = node.op_type == "ReduceMean" and int_attr(node, "keepdims", 1) == 0
            new_nodes = [ir.Node("", "GlobalAveragePool", [source], name=node.name)]
            if flatten:
                new_nodes.append(ir.Node("", "Flatten", new_nodes[0].outputs, {"axis": ir.AttrInt64("axis", 1)},
                                         name=f"{node.name}_flatten"))
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], new_nodes, [node.outputs[0]], [new_nodes[-1].outputs[0]]
            )
            logger.debug("rewrote %s %s as GlobalAveragePool", node.op_type, node.name)
            modified = True
        return ir.passes.PassResult(model, modified)


def _plane_source(node: ir.Node) -> ir.Value | None:
    """The (N, C, H, W) tensor whose plane mean ``node`` takes (cases 1-4 above), or None."""
    x = node.inputs[0]
    if node.op_type == "AveragePool":
        return x if _covers_plane(node) else None
    if node.op_type != "ReduceMean":
        return None
    if _reduces(node, [2, 3]):
        return x
    if int_attr(node, "keepdims", 1) == 0 and _reduces(node, [1, 2]) and _to_nhwc(x):
        return x.producer().inputs[0]
    return None


def _reduces(node: ir.Node, plane: list[int]) -> bool:
    """Whether the ReduceMean averages a rank-4 tensor over exactly the axes ``plane``."""
    dims = static_dims(node.inputs[0])
    if dims is None or len(dims) != 4:
        return False
    # no axes: a mean over all axes (or a no-op), not a spatial pool
    return sorted(axes_of(node) or ()) == plane


def _to_nhwc(value: ir.Value) -> bool:
    """Whether ``value`` is Transpose(x, perm=[0, 2, 3, 1]) of a rank-4 x."""
    node = value.producer()
    dims = None if node is None else static_dims(node.inputs[0])
    return (node is not None and node.op_type == "Transpose" and node.domain == "" and dims is not None
            and len(dims) == 4 and ints_attr(node, "perm", ()) == (0, 2, 3, 1))


def _covers_plane(node: ir.Node) -> bool:
    dims = static_dims(node.inputs[0])
    if dims is None or len(dims) != 4 or not all(isinstance(d, int) for d in dims[2:]):
        return False
    pads = ints_attr(node, "pads", (0, 0, 0, 0))
    auto_pad = node.attributes["auto_pad"].as_string() if "auto_pad" in node.attributes else "NOTSET"
    kernel = ints_attr(node, "kernel_shape", ())
    return kernel == tuple(dims[2:]) and not any(pads) and auto_pad in ("NOTSET", "VALID")
