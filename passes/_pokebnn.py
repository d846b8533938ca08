"""Building blocks the PokeBNN passes share: initialisers, BN and DPReLU nodes, and the final refresh.

Initialisation follows pokebnn.md sections 2-4 (the Flax defaults of google/aqt):

- kernels: LeCun normal, a normal with std sqrt(1/fan_in) truncated to +-2 std and rescaled by
  1/0.87962566 so the truncated draw keeps variance 1/fan_in (fan_in = Cin/groups * kh * kw);
- biases 0; BN gamma/beta/mean/var = 1/0/0/1 (epsilon 1e-5, momentum 0.9);
- DPReLU bias_x/bias_y/pos_slope/neg_slope = 0/0/1/0.25;
- activation bounds of QuantConv/QuantGemm/SEGate = -1: not calibrated yet, so those activations
  stay float until training calibrates them (spec.md: a bound <= 0 means float).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from bnncc.domain import BN_EPSILON, BN_MOMENTUM, DOMAIN
from bnncc.errors import BnnccError
from bnncc.ops import attach_functions
from bnncc.passes._util import add_initializer

__all__ = ["lecun_normal", "uncalibrated_bound", "add_node", "batch_norm_params", "batch_norm", "dprelu_params",
           "dprelu", "drop_unused", "refresh"]

# std of a standard normal truncated to [-2, 2]
_TRUNCATED_STD = 0.87962566103423978


def lecun_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """LeCun-normal kernel of ``shape`` (out, in/groups, kh, kw) or (out, in), float32."""
    fan_in = int(np.prod(shape[1:]))
    draw = rng.standard_normal(shape)
    outside = np.abs(draw) > 2.0
    while outside.any():  # resample the tails: a normal truncated to +-2
        draw[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(draw) > 2.0
    return (draw * (np.sqrt(1.0 / fan_in) / _TRUNCATED_STD)).astype(np.float32)


def uncalibrated_bound(channels: int) -> np.ndarray:
    """Activation bounds of -1: the quantizer passes activations through until calibration."""
    return np.full(channels, -1.0, np.float32)


def add_node(graph: ir.Graph, op_type: str, inputs: list[ir.Value | None], name: str, *,
             domain: str = "", overload: str = "", **attributes) -> ir.Value:
    """Append ``op_type(inputs)`` named ``name`` (its output too) to ``graph``; return the output."""
    node = ir.node(op_type, inputs, attributes or None, domain=domain, overload=overload, name=name,
                   outputs=[ir.Value(name=name)])
    graph.append(node)
    return node.outputs[0]


def batch_norm_params(graph: ir.Graph, name: str, channels: int, gamma: float = 1.0) -> list[ir.Value]:
    """gamma ``gamma``, beta 0, mean 0, var 1 over ``channels``, as initializers ``<name>.gamma`` ..."""
    return [
        add_initializer(graph, f"{name}.gamma", np.full(channels, gamma, np.float32)),
        add_initializer(graph, f"{name}.beta", np.zeros(channels, np.float32)),
        add_initializer(graph, f"{name}.mean", np.zeros(channels, np.float32)),
        add_initializer(graph, f"{name}.var", np.ones(channels, np.float32)),
    ]


def batch_norm(graph: ir.Graph, x: ir.Value, name: str, channels: int, gamma: float = 1.0) -> ir.Value:
    """Inference BatchNormalization over ``channels`` (``batch_norm_params``)."""
    return add_node(graph, "BatchNormalization", [x, *batch_norm_params(graph, name, channels, gamma)], name,
                    epsilon=BN_EPSILON, momentum=BN_MOMENTUM)


def dprelu_params(graph: ir.Graph, name: str, channels: int) -> list[ir.Value]:
    """bias_x 0, bias_y 0, pos_slope 1, neg_slope 0.25 over ``channels``, as initializers ``<name>.bias_x`` ..."""
    return [
        add_initializer(graph, f"{name}.{key}", np.full(channels, init, np.float32))
        for key, init in (("bias_x", 0.0), ("bias_y", 0.0), ("pos_slope", 1.0), ("neg_slope", 0.25))
    ]


def dprelu(graph: ir.Graph, x: ir.Value, name: str, channels: int) -> ir.Value:
    """DPReLU over ``channels`` (``dprelu_params``)."""
    return add_node(graph, "DPReLU", [x, *dprelu_params(graph, name, channels)], name, domain=DOMAIN)


def drop_unused(graph: ir.Graph) -> None:
    """Remove the initializers that no node reads and that are neither graph inputs nor outputs.

    Every initializer of ``graph`` is checked: a node removed with ``graph.remove(..., safe=True)``
    has already lost its inputs, so the values a pass replaced cannot be found through it.
    ``refresh`` calls this, so a PokeBNN pass needs no cleanup of its own.
    """
    kept = frozenset([*graph.inputs, *graph.outputs])
    unused = [name for name, value in graph.initializers.items() if not value.uses() and value not in kept]
    for name in unused:
        del graph.initializers[name]


def refresh(model: ir.Model) -> None:
    """Drop unused initializers, sort the graph, attach the ai.bnncc functions if it uses any and
    infer every value's shape anew.

    Shapes are cleared first: a pass that changes widths or strides leaves stale ones behind.
    """
    graph = model.graph
    drop_unused(graph)  # the weights and biases a pass replaced
    graph.sort()
    attach_functions(model)
    for node in graph:
        for value in node.outputs:
            value.shape = None
    ShapeInferencePass()(model)
    missing = [v.name for node in graph for v in node.outputs if v.shape is None]
    if missing:
        raise BnnccError(f"shape inference left {len(missing)} values without a shape, first {missing[0]!r}")
