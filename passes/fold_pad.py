"""Fold a zero ``Pad`` of the spatial axes into the Conv or MaxPool that reads it.

Keras' ``ZeroPadding2D`` (and so tf2onnx's ResNet-50) pads before the stem conv and the max pool
instead of giving them padding. For x of shape (N, C, H, W) and pads p >= 0 on H and W only:

- Conv(Pad(x, p), pads=q) = Conv(x, pads=q + p): a Conv pads with zeros itself.
- MaxPool(Pad(x, p), pads=q) = MaxPool(x, pads=q + p) when x >= 0 (x comes from a Relu): MaxPool
  ignores its own padding, and a window always holds at least one element of x (p + q is below
  the kernel, which MaxPool requires), so the zeros the Pad added never exceed that element.
"""

from __future__ import annotations

__all__ = ["FoldPadPass"]

import logging

import onnx_ir as ir

from bnncc.passes._util import constant_inputs, ints_attr, static_dims, take_over_output
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("fold_pad")
class FoldPadPass(ir.passes.InPlacePass):
    """Remove a Pad whose every reader can take its padding.

    1. Pad of a rank-4 tensor, mode "constant", value 0, pads >= 0 on H and W only (attribute form
       before opset 11, inputs after; an ``axes`` input naming the axes it pads), read only by
       Convs and by MaxPools of a Relu's output, each with explicit pads (``auto_pad`` NOTSET or
       VALID) that stay below the kernel: the pads are added to each reader's, the Pad removed.
    2. Any other Pad (reflect or edge mode, another value, negative pads, N or C padded, other
       readers, a graph output): left alone, and refused later by the front end, naming it.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Pad" or node.domain != "":
                continue
            pads = _spatial_pads(node)
            output = node.outputs[0]
            readers = [use.node for use in output.uses()]
            if pads is None or not readers or output.is_graph_output() or not all(
                    _can_take(reader, node, pads) for reader in readers):
                continue
            for reader in readers:
                own = _own_pads(reader)
                reader.attributes["pads"] = ir.AttrInt64s("pads", [a + b for a, b in zip(own, pads)])
                reader.attributes["auto_pad"] = ir.AttrString("auto_pad", "NOTSET")
            take_over_output(graph, node, node.inputs[0])
            logger.debug("folded Pad %s into %d reader(s)", node.name, len(readers))
            modified = True
        return ir.passes.PassResult(model, modified)


def _spatial_pads(pad: ir.Node) -> tuple[int, int, int, int] | None:
    """The Pad's (h_begin, w_begin, h_end, w_end) if it zero-pads only H and W of a rank-4 tensor."""
    dims = static_dims(pad.inputs[0])
    if dims is None or len(dims) != 4:
        return None
    mode = pad.attributes["mode"].as_string() if "mode" in pad.attributes else "constant"
    if "pads" in pad.attributes:  # before opset 11: attributes
        pads = list(pad.attributes["pads"].as_ints())
        value = pad.attributes["value"].as_float() if "value" in pad.attributes else 0.0
        axes = list(range(4))
    else:
        values = constant_inputs(pad, 1, 3)
        if values is None or values[0] is None:
            return None  # computed at run time
        pads, value, axes = values
        value = 0.0 if value is None or value.size == 0 else float(value.reshape(-1)[0])
        axes = list(range(4)) if axes is None else [int(a) % 4 for a in axes.reshape(-1)]
        pads = [int(p) for p in pads.reshape(-1)]
    if mode != "constant" or value != 0.0 or len(pads) != 2 * len(axes):
        return None
    begin, end = [0] * 4, [0] * 4
    for axis, first, last in zip(axes, pads[: len(axes)], pads[len(axes):]):
        begin[axis], end[axis] = first, last
    if min(begin + end) < 0 or any(begin[:2] + end[:2]):
        return None
    return begin[2], begin[3], end[2], end[3]


def _can_take(reader: ir.Node, pad: ir.Node, pads: tuple[int, ...]) -> bool:
    """Whether ``reader`` reads the Pad as its data input only and can pad by ``pads`` itself."""
    if reader.domain != "" or reader.op_type not in ("Conv", "MaxPool"):
        return False
    if reader.inputs[0] is not pad.outputs[0] or any(v is pad.outputs[0] for v in reader.inputs[1:]):
        return False
    own = _own_pads(reader)
    if own is None or len(own) != 4:
        return False
    if reader.op_type == "Conv":
        return True
    source, kernel = pad.inputs[0].producer(), ints_attr(reader, "kernel_shape", ())
    return (source is not None and source.op_type == "Relu" and source.domain == "" and len(kernel) == 2
            and all(own[i] + pads[i] < kernel[i % 2] for i in range(4)))


def _own_pads(reader: ir.Node) -> tuple[int, ...] | None:
    """The reader's explicit pads (VALID: none); None for SAME_UPPER or SAME_LOWER."""
    auto_pad = reader.attributes["auto_pad"].as_string() if "auto_pad" in reader.attributes else "NOTSET"
    if auto_pad == "VALID":
        return 0, 0, 0, 0
    return ints_attr(reader, "pads", (0, 0, 0, 0)) if auto_pad == "NOTSET" else None
