"""Give an NHWC graph input, transposed to NCHW before any use, the NCHW layout itself.

tf2onnx keeps a Keras model's NHWC input (unless told ``--inputs-as-nchw``) and transposes it
with perm [0, 3, 1, 2] before the stem conv. With the input declared (N, C, H, W) and the
Transpose gone, every node reads the same tensor; only the layout the caller hands in changes,
to the one bnncc's graphs and libraries take (``bnncc run`` lays images out itself).
"""

from __future__ import annotations

__all__ = ["NchwInputPass"]

import logging

import onnx_ir as ir

from bnncc.passes._util import add_import_note, ints_attr
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)

_TO_NCHW = (0, 3, 1, 2)


@register_pass("nchw_input")
class NchwInputPass(ir.passes.InPlacePass):
    """Declare a rank-4 graph input NCHW where its only readers transpose it to NCHW.

    1. A rank-4 graph input (not also a graph output) read only by Transposes with perm
       [0, 3, 1, 2]: its shape becomes (N, C, H, W), the Transposes' readers read it, and the
       Transposes are removed.
    2. Any other input (read by anything else, or by another permutation): left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for value in graph.inputs:
            transposes = [use.node for use in value.uses()]
            if (value.shape is None or len(value.shape) != 4 or value.is_graph_output() or not transposes
                    or not all(_to_nchw(node) for node in transposes)):
                continue
            n, h, w, c = value.shape
            value.shape = ir.Shape([n, c, h, w])
            for node in transposes:
                ir.convenience.replace_all_uses_with(node.outputs[0], value)
                graph.remove(node, safe=True)
            add_import_note(model, f"input '{value.name}' is NHWC in the file; bnncc takes it as NCHW")
            logger.debug("declared input %s NCHW in place of its Transpose", value.name)
            modified = True
        return ir.passes.PassResult(model, modified)


def _to_nchw(node: ir.Node) -> bool:
    return (node.op_type == "Transpose" and node.domain == "" and ints_attr(node, "perm", ()) == _TO_NCHW
            and not node.outputs[0].is_graph_output())
