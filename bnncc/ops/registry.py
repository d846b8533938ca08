"""The op registry: one ``OpDef`` per op of the ``ai.bnncc`` domain, holding every face of the op.

Each op module (``bnncc/ops/<op>.py``) defines its op once and registers it here:

- ``functions``: the ONNX function(s), written with onnxscript. The first is the op itself; the
  others are overloads of the same op name (ONNX IR 10 ``overload``), e.g. PokeConv with the block
  shortcut. onnxruntime runs them: that run is the reference.
- ``torch``: the training implementation (straight-through gradients; it calls the fused CPU
  kernels of ``cpu_kernels`` where they run). Its signature says what the torch view passes:
  a ``training`` keyword gets the module's train/eval mode, a ``quantize_weights`` keyword the
  two-phase switch.
- ``layers`` and ``sops``: the cost rules (``bnncc.cost``): the MAC-counting layers of a node and
  its scalar ops by category.
- ``weight_inputs`` and ``state_inputs``: input positions of the layer weights and of the state
  training does not learn (batch-norm running statistics, activation bounds).
- ``bounds``: (input position, observer) per activation bound that calibration sets; the
  observer maps the op's input tensors and attributes to the per-channel max |x| it bounds.
- ``activation_inputs``: the positions of the tensors the op computes on (X; PokeConv's block
  shortcut R too); every other input is a parameter, stored in the graph as an initializer.
- ``optional_inputs``: positions a node may omit (PokeConv's SE gate and block shortcut); a
  weight, state or bound input there that a node omits is skipped, any other must be given.
- ``qonnx``: the QONNX emitter (``bnncc.qonnx``), or None where the op has no QONNX form.
- ``check``: raises a BnnccError naming the node when its constants are outside the op's domain
  (``bnncc.ops.checks``: a clip bound not a positive number, a quantizer scale that overflows, a
  batch norm variance plus epsilon not positive); None where every value is in it.

The TVM lowering is the one face kept out of this package, since TVM is heavy and optional for
training: ``bnncc.targets.lower`` registers it by op name (``register_lowering``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import onnx

from bnncc.domain import DOMAIN

__all__ = ["OpDef", "register", "OPS", "op_def"]


@dataclasses.dataclass(frozen=True)
class OpDef:
    """Every face of one ai.bnncc op (module docstring)."""

    name: str
    functions: tuple[Any, ...]  # onnxscript OnnxFunctions; functions[i > 0] are overloads
    overloads: tuple[str, ...] = ("",)  # the ONNX overload name of each function
    torch: Callable | None = None
    layers: Callable | None = None  # (node, shapes, float_bits) -> list[Layer]
    sops: Callable | None = None  # (node, shapes) -> dict[str, int]
    weight_inputs: tuple[int, ...] = ()
    state_inputs: tuple[int, ...] = ()
    bounds: tuple[tuple[int, Callable], ...] = ()
    activation_inputs: tuple[int, ...] = (0,)
    optional_inputs: tuple[int, ...] = ()
    qonnx: Callable | None = None  # (emitter, node, inputs, dims) -> output name
    check: Callable | None = None  # (node) -> None, or a BnnccError

    def protos(self) -> list[onnx.FunctionProto]:
        """The FunctionProtos of the op, each named after the op with its overload."""
        protos = []
        for function, overload in zip(self.functions, self.overloads, strict=True):
            proto = function.to_function_proto()
            proto.name = self.name
            proto.overload = overload
            protos.append(proto)
        return protos


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    """Add ``op`` to the registry under its name; a name is registered once."""
    if op.name in OPS:
        raise ValueError(f"ai.bnncc op {op.name!r} is registered twice")
    OPS[op.name] = op
    return op


def op_def(node) -> OpDef | None:
    """The OpDef of an onnx_ir node of the ai.bnncc domain, else None."""
    return OPS.get(node.op_type) if node.domain == DOMAIN else None
