"""Drop a Softmax or LogSoftmax on the graph output, so that the model returns logits.

softmax and its log (logits less their logsumexp, as torch's ``log_softmax`` heads for NLLLoss
write) are strictly increasing in each logit, so the predicted class (argmax) is unchanged; the
compiler, the cost model and distillation work on logits. Changes the output values by design:
the output name is kept and now carries the logits.
"""

from __future__ import annotations

__all__ = ["StripSoftmaxPass"]

import logging

import onnx_ir as ir

from bnncc.passes._util import add_import_note, int_attr, take_over_output
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("strip_softmax")
class StripSoftmaxPass(ir.passes.InPlacePass):
    """Remove a Softmax or LogSoftmax whose output is a graph output.

    1. ``y = Softmax(x)`` (or LogSoftmax) over the classes (x of shape (N, classes), axis 1 or -1), y a graph output,
       x produced by a node and used only here: the producer of x now writes y.
    2. A Softmax inside the graph, on a graph input, or over another axis (over the batch it changes
       which class each image's output ranks first): left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type not in ("Softmax", "LogSoftmax") or node.domain != "":
                continue
            x, y = node.inputs[0], node.outputs[0]
            if not y.is_graph_output() or x.producer() is None or len(x.uses()) != 1 or x.is_graph_output():
                continue
            if x.shape is None or len(x.shape) != 2 or int_attr(node, "axis", 1) not in (1, -1):
                continue
            take_over_output(graph, node, x)
            add_import_note(model, f"the output {node.op_type} is dropped: the graph returns logits")
            logger.info("removed the output %s %s: the model now returns logits", node.op_type, node.name)
            modified = True
        return ir.passes.PassResult(model, modified)
