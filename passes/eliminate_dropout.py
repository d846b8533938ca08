"""Rewrite an inference ``Dropout`` as ``Identity``, for ``eliminate_identity`` to remove.

Out of training a Dropout passes its input through: before opset 12 always (it has no training
mode; onnxruntime runs it as an identity), from opset 12 when its ``training_mode`` input is absent
or false. onnxscript's constant folder removes only the opset-12 form, so a Dropout that an opset-9
to 11 exporter (the model zoo's, tf2onnx's, MXNet's) left before the classifier was refused as an
unsupported op.
"""

from __future__ import annotations

__all__ = ["EliminateDropoutPass"]

import logging

import onnx_ir as ir

from bnncc.passes._util import const_array
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("eliminate_dropout")
class EliminateDropoutPass(ir.passes.InPlacePass):
    """Replace every Dropout that computes an identity with Identity.

    1. Dropout without a ``training_mode`` input or with a constant false one, its mask output
       absent or read by nothing: Identity of its input.
    2. A Dropout in training mode (or of a mode computed at run time), or one whose mask is read:
       left alone (the front end refuses it, naming it).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Dropout" or node.domain != "" or not _is_identity(node):
                continue
            identity = ir.Node("", "Identity", [node.inputs[0]], name=node.name)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [identity], [node.outputs[0]],
                                                    [identity.outputs[0]])
            logger.debug("rewrote Dropout %s as Identity", node.name)
            modified = True
        return ir.passes.PassResult(model, modified)


def _is_identity(node: ir.Node) -> bool:
    mode = node.inputs[2] if len(node.inputs) > 2 else None
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    inference = mode is None or (const_array(mode) is not None and not const_array(mode).any())
    return inference and (mask is None or (not mask.uses() and not mask.is_graph_output()))
