"""Bring every dense layer to ``Gemm(X, W, b)`` with W of shape (out, in), transB=1.

Gemm computes Y = alpha * A' B' + beta * C (A' = A^T when transA, B' = B^T when transB). With
constant B and C: W = alpha * (B if transB else B^T) and b = beta * C (zeros when C is absent),
flattened to (out,). transA is not rewritten.
"""

from __future__ import annotations

__all__ = ["NormalizeGemmPass"]

import logging

import numpy as np
import onnx_ir as ir

from bnncc.passes._util import add_initializer, const_array, int_attr
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("normalize_gemm")
class NormalizeGemmPass(ir.passes.InPlacePass):
    """Fold alpha, beta and transB into Gemm's constant weight and bias.

    1. Gemm with transB=0, alpha != 1, beta != 1, no C or C of shape (1, out): rewritten to
       Gemm(A, W (out, in), b (out,), transB=1).
    2. A Gemm already in that form, with transA=1, or with non-constant B or C: left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Gemm" or node.domain != "" or int_attr(node, "transA", 0) != 0:
                continue
            b = const_array(node.inputs[1])
            c = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            has_c = len(node.inputs) > 2 and node.inputs[2] is not None
            if b is None or b.ndim != 2 or (has_c and c is None):
                continue
            alpha = node.attributes["alpha"].as_float() if "alpha" in node.attributes else 1.0
            beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
            trans_b = int_attr(node, "transB", 0)
            out_features = b.shape[0] if trans_b else b.shape[1]
            if c is not None and c.size not in (1, out_features):
                continue  # a per-row C is not a bias
            canonical = trans_b == 1 and alpha == 1.0 and beta == 1.0 and has_c and c.shape == (out_features,)
            if canonical:
                continue
            weight = (b if trans_b else b.T) * np.asarray(alpha, b.dtype)
            bias = np.zeros(out_features, b.dtype) if c is None else (c * np.asarray(beta, c.dtype))
            bias = np.broadcast_to(bias.reshape(-1), (out_features,)).astype(b.dtype)
            w_value = add_initializer(graph, f"{node.name or 'gemm'}.weight", np.ascontiguousarray(weight))
            b_value = add_initializer(graph, f"{node.name or 'gemm'}.bias", bias)
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(1, w_value)
            node.replace_input_with(2, b_value)
            for name in ("alpha", "beta", "transA"):
                node.attributes.pop(name, None)
            node.attributes["transB"] = ir.AttrInt64("transB", 1)
            logger.debug("normalized Gemm %s", node.name)
            modified = True
        return ir.passes.PassResult(model, modified)
