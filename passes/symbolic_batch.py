"""Make a fixed batch dimension symbolic, so that a model exported for one batch size runs at any.

An exporter fixes the batch at the size of the example it traced (1, or whatever the user had at
hand); that size says nothing about the network. bnncc's libraries take any batch, and the graphs
it writes beside them (the reference that ``bnncc verify`` runs one image at a time, the rewritten
and trained models) must take any batch too: a ResNet exported at batch 4 was converted, and then
failed verification on its own reference graph. compile runs it on PokeBNN graphs for the same reason.
"""

from __future__ import annotations

__all__ = ["BATCH", "SymbolicBatchPass"]

import logging

import onnx_ir as ir

from bnncc.domain import DOMAIN
from bnncc.passes.set_opset import STABLE_OPS
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)

# the name of the batch dimension; the library manifest calls it the same (targets/build.py)
BATCH = "N"
# the ops that keep the batch axis first and as it is, by domain: the canonical ones, and those a
# PokeBNN graph adds (QuantizeWeights, which reads weights, is only ever inside bnncc's functions)
_BATCH_FIRST = {
    "": STABLE_OPS | {"BatchNormalization"},
    DOMAIN: frozenset({"BinarizeAct", "BinaryConv", "QuantConv", "QuantGemm", "DPReLU", "ReshapeAdd", "SEGate",
                       "PokeConv"}),
}


@register_pass("symbolic_batch")
class SymbolicBatchPass(ir.passes.InPlacePass):
    """Give the graph input's fixed batch dimension, and every value's, the symbolic name ``N``.

    1. Every node keeps the batch axis first and as it is (the canonical ops of :data:`STABLE_OPS`,
       and a PokeBNN graph's batch norms and bnncc ops), and the input's batch is a number: the
       first dimension of the input and of every node output becomes ``N``.
    2. A symbolic batch already, or any other op (a Reshape whose target fixes the batch): left
       alone (the front end refuses the op with its own message).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        x = graph.inputs[0] if len(graph.inputs) == 1 else None
        if x is None or x.shape is None or len(x.shape) == 0 or not isinstance(x.shape[0], int):
            return ir.passes.PassResult(model, False)
        if not all(node.op_type in _BATCH_FIRST.get(node.domain, ()) for node in graph):
            return ir.passes.PassResult(model, False)
        fixed = x.shape[0]
        for value in (x, *(output for node in graph for output in node.outputs)):
            if value.shape is not None and len(value.shape) > 0:
                value.shape = ir.Shape([ir.SymbolicDim(BATCH), *value.shape[1:]])
        logger.info("the input's fixed batch of %d is now symbolic (%s): the model takes any batch", fixed, BATCH)
        return ir.passes.PassResult(model, True)
