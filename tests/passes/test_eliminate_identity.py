"""eliminate_identity: onnx_ir's Identity elimination on the graph; the ai.bnncc functions stay as defined."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from _support import random_input, run_ort

from bnncc.passes.remove_projection_shortcuts import RemoveProjectionShortcutsPass
from bnncc.passmanager import get_pass


def test_a_graph_with_reshape_add_stays_valid_and_computes_the_same(small_model):
    """onnx_ir's pass edited ReshapeAdd's function too, whose If branch returns Identity(matched) of
    the outer scope: a recipe naming eliminate_identity after remove_projection_shortcuts was refused
    with "the rewritten model is not valid ONNX: Graph output 'pooled_39' is not an output of any node"."""
    RemoveProjectionShortcutsPass()(small_model)
    x = random_input()
    expected = run_ort(small_model, x)
    logits = small_model.graph.outputs[0]  # an Identity of the graph's own, which the pass removes
    identity = ir.node("Identity", [logits], name="extra_identity")
    identity.outputs[0].name, identity.outputs[0].shape, identity.outputs[0].type = "out", logits.shape, logits.type
    small_model.graph.append(identity)
    small_model.graph.outputs[0] = identity.outputs[0]

    assert get_pass("eliminate_identity")(small_model).modified

    assert "Identity" not in {node.op_type for node in small_model.graph}
    onnx.checker.check_model(ir.to_proto(small_model))
    np.testing.assert_array_equal(run_ort(small_model, x), expected)
