"""Checks of an ai.bnncc node's constants and attributes against its op's domain (spec.md): values
for which the op's own float32 arithmetic is undefined or overflows, bit widths no quantizer has,
float constants that are NaN, infinite, or of another type than float32 (onnxruntime refuses
those). Each op's ``check`` face (``OpDef``) calls these; ``bnncc.ops.check_graph`` runs them over
a graph, so that every command refuses such a graph alike (a library built from it would compute
something finite where onnxruntime, the reference, computes NaN). A constant computed in the graph
rather than stored is not checked.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from bnncc.errors import BnnccError
from bnncc.ops.counting import bits_attr

__all__ = ["stored_parameters", "required_attributes", "float32_constants", "bits", "positive_attribute",
           "batch_norm", "act_bounds", "weight_scales"]

# bit widths of the int-k quantizers: a signed one needs a level each side of 0 (at 1 bit its scale is
# 0 / max|W|), and float32 holds the integers of up to 24 bits exactly
MIN_BITS, MAX_BITS = 2, 24


def _where(node: ir.Node) -> str:
    return f"node {node.name!r} ({node.op_type})"


def _constant(node: ir.Node, index: int) -> tuple[str, np.ndarray] | None:
    """(name, float64 values) of input ``index`` where it is a stored constant, else None."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None or value.const_value is None:
        return None
    return value.name, value.const_value.numpy().astype(np.float64)


def stored_parameters(node: ir.Node, activations: tuple[int, ...]) -> None:
    """Every input but the ``activations`` is a stored initializer: the parameters training learns
    and writes back, the kernels pack at compile time, and the QONNX export quantizes."""
    for index, value in enumerate(node.inputs):
        if value is None or index in activations or value.const_value is not None:
            continue
        source = f"computed by node {value.producer().name!r}" if value.producer() is not None else "no initializer"
        raise BnnccError(f"{_where(node)}: input {value.name!r} is {source}; the op's parameters are stored "
                         f"initializers")


def required_attributes(node: ir.Node, names: tuple[str, ...]) -> None:
    """The attributes the op has no default for (its faces read them; onnxruntime may infer some)."""
    missing = [name for name in names if name not in node.attributes]
    if missing:
        raise BnnccError(f"{_where(node)}: missing the attribute(s) {', '.join(missing)}")


def float32_constants(node: ir.Node) -> None:
    """Every stored float input is float32, the type the ops' functions (and the standard ops they
    call) take with float32 activations: onnxruntime refuses a float16 or double weight there; and
    finite (a file's tensors are checked as it is read; this covers a graph built in memory)."""
    for value in node.inputs:
        if value is None or value.const_value is None or not value.const_value.dtype.is_floating_point():
            continue
        dtype = value.const_value.dtype
        if dtype != ir.DataType.FLOAT:
            raise BnnccError(f"{_where(node)}: input {value.name!r} is {dtype.name.lower()}; the graph's constants "
                             f"are float32")
        if not np.isfinite(value.const_value.numpy()).all():
            raise BnnccError(f"{_where(node)}: input {value.name!r} holds NaN or infinite values")


def bits(node: ir.Node, name: str, default: int | None = None) -> int:
    """A quantizer's bit width attribute, MIN_BITS to MAX_BITS."""
    value = bits_attr(node, name) if default is None else node.attributes.get_int(name, default)
    if not MIN_BITS <= value <= MAX_BITS:
        raise BnnccError(f"{_where(node)}: {name} = {value}; a quantizer takes {MIN_BITS} to {MAX_BITS} bits")
    return value


def positive_attribute(node: ir.Node, name: str, default: float) -> None:
    """A float attribute that scales the op (a clip bound): finite and above 0."""
    value = node.attributes.get_float(name, default)
    if not (math.isfinite(value) and value > 0):
        raise BnnccError(f"{_where(node)}: {name} = {value}; expected a positive number (finite)")


def batch_norm(node: ir.Node, var_index: int, epsilon: float) -> None:
    """A batch norm's variance (input ``var_index``) plus ``epsilon``: positive, so its scale
    1 / sqrt(var + eps) is a number, and epsilon finite."""
    if not math.isfinite(epsilon):
        raise BnnccError(f"{_where(node)}: epsilon = {epsilon}; expected a finite number")
    found = _constant(node, var_index)
    if found is None:
        return
    name, var = found
    bad = np.flatnonzero(~(var.reshape(-1) + epsilon > 0))
    if bad.size:
        c = int(bad[0])
        raise BnnccError(f"{_where(node)}: input {name!r}: variance {var.reshape(-1)[c]:g} of channel {c} plus "
                         f"epsilon {epsilon:g} is not positive")


def act_bounds(node: ir.Node, index: int, a_bits: int, signed: bool) -> None:
    """An activation quantizer's bounds (input ``index``, per channel): each <= 0 (not calibrated:
    the channel stays float) or large enough that its scale, levels / bound in float32 as the
    reference computes it, is finite."""
    found = _constant(node, index)
    if found is None:
        return
    name, bounds = found
    levels = float(2 ** (a_bits - 1) - 1 if signed else 2 ** a_bits)
    c = _overflowing_scale(levels, bounds.reshape(-1))
    if c is not None:
        raise BnnccError(f"{_where(node)}: input {name!r}: bound {bounds.reshape(-1)[c]:g} of channel {c} makes the "
                         f"{a_bits}-bit quantizer's scale ({levels:g} / bound) overflow float32; a bound is <= 0 (not "
                         f"calibrated) or at least {_smallest_divisor(levels):.3g}")


def weight_scales(node: ir.Node, index: int, w_bits: int) -> None:
    """A weight quantizer's scales (input ``index``, per output channel o): (2^(b-1) - 1) / max|W[o]|
    in float32 as the reference computes it is finite where max|W[o]| > 0. A smaller max (a
    denormal, or below 2e-38 at 4 bits) makes the reference's scale inf and its zero weights
    0 * inf = NaN, where the kernels, which divide by that scale, computed 0."""
    found = _constant(node, index)
    if found is None or found[1].ndim == 0 or found[1].size == 0:
        return  # no output channels to scale: a wrong shape, which each face reports as such
    name, weights = found
    levels = float(2 ** (w_bits - 1) - 1)
    peaks = np.abs(weights.reshape(len(weights), -1)).max(axis=1).astype(np.float32)
    o = _overflowing_scale(levels, peaks)
    if o is not None:
        raise BnnccError(f"{_where(node)}: input {name!r}: max |W| {peaks[o]:.3g} of output channel {o} makes the "
                         f"{w_bits}-bit quantizer's scale ({levels:g} / max |W|) overflow float32; a channel's "
                         f"weights are all 0 or reach at least {_smallest_divisor(levels):.3g}")


def _overflowing_scale(levels: float, divisors: np.ndarray) -> int | None:
    """The first position whose divisor is > 0 and makes ``levels / divisor``, in float32 as the reference
    computes a quantizer's scale, overflow; None where none does."""
    with np.errstate(divide="ignore", over="ignore"):
        scales = np.float32(levels) / divisors.astype(np.float32)
    bad = np.flatnonzero((divisors > 0) & ~np.isfinite(scales))
    return int(bad[0]) if bad.size else None


def _smallest_divisor(levels: float) -> float:
    """About the smallest divisor of ``levels`` whose quotient float32 holds."""
    return levels / float(np.finfo(np.float32).max)
