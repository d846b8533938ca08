"""Rewrite ``Add(MatMul(X, W), b)`` as ``Gemm(X, W^T, b, transB=1)``.

For X of shape (N, in), constant W (in, out) and constant b (out,) or (1, out):
X W + b = Gemm(X, W^T, b) with transB=1. A MatMul without a following Add gets b = 0.
"""

from __future__ import annotations

__all__ = ["MatMulAddToGemmPass"]

import logging

import numpy as np
import onnx_ir as ir

from bnncc.passes._util import add_initializer, const_array, static_dims
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("matmul_add_to_gemm")
class MatMulAddToGemmPass(ir.passes.InPlacePass):
    """Replace a dense layer written as MatMul (+ Add) with one Gemm.

    1. MatMul(X rank 2, W constant 2-D) whose only user is Add with a constant bias of ``out``
       values: Gemm(X, W^T, b), replacing both nodes.
    2. The same MatMul with any other users: Gemm with a zero bias.
    3. A MatMul of rank other than 2 or with a non-constant W: left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain != "" or node.graph is None:
                continue
            dims = static_dims(node.inputs[0])
            weight = const_array(node.inputs[1])
            if dims is None or len(dims) != 2 or weight is None or weight.ndim != 2:
                continue
            add, bias = _bias_add(node, weight.shape[1])
            old_nodes = [node] if add is None else [node, add]
            if bias is None:
                bias = np.zeros(weight.shape[1], weight.dtype)
            w_value = add_initializer(graph, f"{node.name or 'gemm'}.weight", np.ascontiguousarray(weight.T))
            b_value = add_initializer(graph, f"{node.name or 'gemm'}.bias", bias.reshape(-1).astype(weight.dtype))
            gemm = ir.Node("", "Gemm", [node.inputs[0], w_value, b_value], {"transB": ir.AttrInt64("transB", 1)},
                           name=node.name)
            old_out = old_nodes[-1].outputs[0]
            ir.convenience.replace_nodes_and_values(graph, old_nodes[-1], old_nodes, [gemm], [old_out],
                                                    [gemm.outputs[0]])
            logger.debug("rewrote MatMul %s as Gemm", node.name)
            modified = True
        return ir.passes.PassResult(model, modified)


def _bias_add(matmul: ir.Node, out_features: int) -> tuple[ir.Node | None, np.ndarray | None]:
    """The Add that adds a constant (out,) or (1, out) bias to the MatMul's output, if any."""
    output = matmul.outputs[0]
    users = output.uses()
    if len(users) != 1 or output.is_graph_output():
        return None, None
    add = users[0].node
    if add.op_type != "Add" or add.domain != "":
        return None, None
    other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
    bias = const_array(other)
    if bias is None or bias.size != out_features or bias.shape not in ((out_features,), (1, out_features)):
        return None, None
    return add, bias
