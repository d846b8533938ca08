"""Quantize the dense head: ``Gemm(X, W, b)`` -> ``QuantGemm(X, W, act_bound, b)`` at 8/8 bits.

QuantGemm (ai.bnncc, spec.md) computes Y = Xq Wq^T + b with per-output-channel weights
Wq = clip(floor(W s + 0.5), +-(2^(w-1)-1)) / s, s = (2^(w-1)-1) / max|W[o]|, and signed per-input
activations quantized with the bound act_bound[i] once calibrated (-1 until then: X passes
through). The float fc weights and bias carry over unchanged (canonical Gemm: W (out, in),
transB=1). The weights are rounded, so the outputs change by design; the dense ACE goes from 256
to w_bits x a_bits per MAC.
"""

from __future__ import annotations

__all__ = ["Int8HeadPass"]

import logging

import onnx_ir as ir

from bnncc.domain import DOMAIN
from bnncc.errors import BnnccError
from bnncc.passes._pokebnn import refresh, uncalibrated_bound
from bnncc.passes._util import add_initializer, check_bit_widths, take_over
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("int8_head")
class Int8HeadPass(ir.passes.InPlacePass):
    """Replace every float ``Gemm`` by a ``QuantGemm`` with the same weights and bias.

    1. A canonical Gemm (transB=1, no transA, alpha or beta; constant W and bias): replaced.
    2. No Gemm (e.g. a QuantGemm already): left alone.
    3. A Gemm in any other form: an error (load the model through bnncc.frontend.load).
    """

    def __init__(self, w_bits: int = 8, a_bits: int = 8) -> None:
        super().__init__()
        check_bit_widths("int8_head", w_bits=w_bits, a_bits=a_bits)
        self.w_bits = w_bits
        self.a_bits = a_bits

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        gemms = [n for n in graph if n.op_type == "Gemm" and n.domain == ""]
        for gemm in gemms:
            weight, bias = self._check(gemm)
            in_features = weight.const_value.shape[1]
            bound = add_initializer(graph, f"{gemm.name}.act_bound", uncalibrated_bound(in_features))
            quant = ir.node("QuantGemm", [gemm.inputs[0], weight, bound, bias],
                            {"w_bits": self.w_bits, "a_bits": self.a_bits, "a_signed": 1},
                            domain=DOMAIN, name=gemm.name)
            graph.insert_before(gemm, quant)
            take_over(gemm.outputs[0], quant.outputs[0])
            graph.remove(gemm, safe=True)
            logger.debug("%s: Gemm -> QuantGemm (%d/%d bits, %d inputs)", gemm.name, self.w_bits, self.a_bits,
                         in_features)
        if gemms:
            refresh(model)
        return ir.passes.PassResult(model, modified=bool(gemms))

    @staticmethod
    def _check(gemm: ir.Node) -> tuple[ir.Value, ir.Value]:
        """The Gemm's constant weight and bias; an error when the Gemm is not canonical."""
        attrs = gemm.attributes
        canonical = (attrs.get_int("transB", 0) == 1 and attrs.get_int("transA", 0) == 0
                     and attrs.get_float("alpha", 1.0) == 1.0 and attrs.get_float("beta", 1.0) == 1.0
                     and len(gemm.inputs) == 3 and all(v is not None and v.const_value is not None
                                                       for v in gemm.inputs[1:]))
        if not canonical:
            raise BnnccError(f"int8_head: node {gemm.name!r} (Gemm) is not canonical (transB=1, constant W and "
                             "bias, no alpha/beta/transA); load the model with bnncc.frontend.load")
        return gemm.inputs[1], gemm.inputs[2]
