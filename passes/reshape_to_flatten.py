"""Rewrite a ``Reshape`` that flattens (N, C, H, W) to (N, C*H*W) as ``Flatten(axis=1)``.

The target shape is read element by element, through the chains exporters build to compute it
(``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])`` and the like): an element is a constant or
"dimension i of value v". The Reshape flattens when the target is [batch, rest] with batch one
of: the input's dim 0 (through Shape), 0 (copy, when allowzero=0), -1, or N (a constant, or any
value's dimension of N's size or symbolic name); and rest -1 or C*H*W (a constant, or any value's
dimension of that size); batch and rest not both -1. So ``x.view(-1, c)`` with c read from the
tensor before the pool is a flatten too. The dead shape chain is left to ``remove_unused``.
"""

from __future__ import annotations

__all__ = ["ReshapeToFlattenPass"]

import logging
import math

import numpy as np
import onnx_ir as ir

from bnncc.passes._util import const_array, constant_inputs, int_attr, ints_attr, replace_with_flatten, static_dims
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)

# An element of a computed shape: an int, or (value, axis) for "dimension axis of value".
ShapeElem = int | tuple[ir.Value, int]


@register_pass("reshape_to_flatten")
class ReshapeToFlattenPass(ir.passes.InPlacePass):
    """Replace flattening Reshapes of rank-4 tensors with Flatten(axis=1).

    1. Constant target ([N, C*H*W], [-1, C*H*W], [0, -1], ...): Flatten.
    2. Target computed from Shape/Gather/Unsqueeze/Concat/Slice/Squeeze/Cast: Flatten.
    3. Any other Reshape (other target, rank != 4, unknown C, H or W): left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Reshape" or node.domain != "" or not _flattens(node):
                continue
            replace_with_flatten(graph, node)
            logger.debug("rewrote Reshape %s as Flatten", node.name)
            modified = True
        return ir.passes.PassResult(model, modified)


def _flattens(node: ir.Node) -> bool:
    x = node.inputs[0]
    dims = static_dims(x)
    if dims is None or len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
        return False
    target = _shape_elements(node.inputs[1])
    if target is None or len(target) != 2:
        return False
    batch, rest = target
    features = math.prod(dims[1:])
    batch_ok = (
        batch == (x, 0)
        or batch == -1
        or (batch == 0 and int_attr(node, "allowzero", 0) == 0)
        or (dims[0] is not None and _size(batch) == dims[0])
    )
    return batch_ok and (rest == -1 or _size(rest) == features) and not (batch == -1 and rest == -1)


def _size(element: ShapeElem) -> int | str | None:
    """What ``element`` stands for: a constant, or the static size or symbolic name of the
    dimension it reads (None where that is unknown)."""
    if isinstance(element, int):
        return element
    dims = static_dims(element[0])
    return None if dims is None else dims[element[1]]


def _shape_elements(value: ir.Value) -> list[ShapeElem] | None:
    """The 1-D int tensor ``value`` as elements, or None where it cannot be read."""
    array = const_array(value)
    if array is not None:
        return [int(v) for v in array.reshape(-1)] if array.ndim <= 1 else None
    node = value.producer()
    if node is None or node.domain != "":
        return None
    if node.op_type == "Shape":
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        start, end = int_attr(node, "start", 0), node.attributes.get("end")
        if rank is None:
            return None
        stop = rank if end is None else end.as_int()
        return [(node.inputs[0], axis) for axis in range(rank)[start:stop]]
    if node.op_type in ("Cast", "Unsqueeze", "Squeeze"):
        return _shape_elements(node.inputs[0])  # one element stays one element
    if node.op_type == "Concat":
        parts = [_shape_elements(v) for v in node.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if node.op_type == "Gather":
        source, index = _shape_elements(node.inputs[0]), const_array(node.inputs[1])
        if source is None or index is None or int_attr(node, "axis", 0) != 0:
            return None
        return [source[int(i)] for i in index.reshape(-1)]
    if node.op_type == "Slice":
        source, bounds = _shape_elements(node.inputs[0]), _slice_bounds(node)
        return None if source is None or bounds is None else source[bounds[0] : bounds[1]]
    return None


def _slice_bounds(node: ir.Node) -> tuple[int, int] | None:
    """(start, end) of a Slice of a 1-D tensor with step 1: attributes before opset 10, inputs
    (starts, ends, axes, steps) from 10 (Paddle's flatten slices Shape(x)[0:1] this way)."""
    if "starts" in node.attributes:
        starts, ends = ints_attr(node, "starts", ()), ints_attr(node, "ends", ())
        axes, steps = ints_attr(node, "axes", (0,)), (1,)
    else:
        values = constant_inputs(node, 1, 4)
        if values is None:
            return None  # computed at run time
        starts, ends, axes, steps = values
        axes, steps = (0,) if axes is None else axes, (1,) if steps is None else steps
    if starts is None or ends is None or [np.size(v) for v in (starts, ends, axes, steps)] != [1] * 4:
        return None
    if int(np.ravel(axes)[0]) not in (0, -1) or int(np.ravel(steps)[0]) != 1:
        return None
    return int(np.ravel(starts)[0]), int(np.ravel(ends)[0])
