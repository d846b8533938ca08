"""What the QONNX emitters of ops are made of (``OpDef.qonnx``; ``bnncc.qonnx`` runs them).

QONNX carries every value in float ("fake quant") and quantizes with ``IntQuant`` and
``BipolarQuant`` nodes of the domain ``qonnx.custom_op.general``. Two roundings set them apart
from bnncc's reference, both only at the boundaries between two levels: QONNX divides by its scale
(bound / levels) where the reference multiplies by levels / bound, so a value within a float32
rounding of a boundary may fall on the neighbouring level; and its HALF_UP rounds ties away from
zero where the reference rounds them up (floor(x + 0.5)).

An emitter is ``emit(e, node, inputs, dims) -> output name``: ``e`` an :class:`Emitter`, ``inputs``
the names of the node's inputs in the new graph, ``dims(value)`` the shape of an ONNX value.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from bnncc.errors import BnnccError

__all__ = ["QONNX_DOMAIN", "Emitter", "int_quant", "quant_weights", "quant_acts", "per_channel", "quant_conv"]

QONNX_DOMAIN = "qonnx.custom_op.general"


class Emitter:
    """Collects the new graph's nodes and constant initializers, with unique names."""

    def __init__(self, model: ir.Model):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.consts = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()
                       if v.const_value is not None}
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}__q{self.count}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op_type: str, inputs: list[str], base: str, domain: str = "", **attrs) -> str:
        out = self.name(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def value(self, name: str) -> np.ndarray:
        if name not in self.consts:
            raise BnnccError(f"'{name}' must be a constant initializer for the QONNX export")
        return self.consts[name]


def int_quant(e: Emitter, x: str, scale: np.ndarray, bits: int, signed: bool, base: str, rounding: str) -> str:
    return e.node("IntQuant", [x, e.const(f"{base}.scale", scale.astype(np.float32)),
                               e.const(f"{base}.zeropt", np.float32(0)), e.const(f"{base}.bits", np.float32(bits))],
                  base, domain=QONNX_DOMAIN, signed=int(signed), narrow=int(signed), rounding_mode=rounding)


def quant_weights(e: Emitter, w_name: str, bits: int, base: str) -> str:
    """Narrow signed IntQuant per output channel, scale max|W[o]| / (2^(b-1) - 1), HALF_UP."""
    w = e.value(w_name)
    m = 2 ** (bits - 1) - 1
    wmax = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    scale = (np.where(wmax > 0, wmax, 1.0) / m).reshape((-1,) + (1,) * (w.ndim - 1))
    return int_quant(e, w_name, scale, bits, True, f"{base}.wq", "HALF_UP")


def quant_acts(e: Emitter, x: str, bound_name: str, bits: int, signed: bool, rank: int, base: str) -> str:
    """IntQuant per input channel (signed Bc/(2^(a-1)-1) HALF_UP, unsigned Bc/2^a FLOOR); channels
    whose bound is uncalibrated (<= 0) stay float."""
    bound = e.value(bound_name).astype(np.float64)
    calibrated = bound > 0
    if not calibrated.any():
        return x  # not calibrated: the reference keeps these activations float
    shape = (1, -1) + (1,) * (rank - 2)
    safe = np.where(calibrated, bound, 1.0)
    scale = (safe / (2 ** (bits - 1) - 1) if signed else safe / 2**bits).reshape(shape)
    quantized = int_quant(e, x, scale, bits, signed, f"{base}.aq", "HALF_UP" if signed else "FLOOR")
    if calibrated.all():
        return quantized
    # Channels never seen nonzero in calibration stay float, as in the reference.
    mask = e.const(f"{base}.calibrated", calibrated.reshape(shape))
    return e.node("Where", [mask, quantized, x], f"{base}.aq_or_float")


def per_channel(e: Emitter, name: str, base: str) -> str:
    """A (C,) constant as (1, C, 1, 1)."""
    return e.const(base, e.value(name).reshape(1, -1, 1, 1).astype(np.float32))


def quant_conv(e: Emitter, base: str, x: str, w: str, bound: str, b: str, w_bits: int, a_bits: int, signed: bool,
               rank: int, **conv_attrs) -> str:
    """Quantized activations and weights, then Conv (rank 4) or Gemm (rank 2)."""
    xq = quant_acts(e, x, bound, a_bits, signed, rank, base)
    wq = quant_weights(e, w, w_bits, base)
    if rank == 2:
        return e.node("Gemm", [xq, wq, b], base, transB=1)
    return e.node("Conv", [xq, wq, b], base, **conv_attrs)
