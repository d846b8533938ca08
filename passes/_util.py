"""Small helpers shared by the passes (and the lowering): constants, initializers, attributes, bit widths, wiring."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnncc.domain import DEFAULT_DOMAINS, IMPORT_NOTES_KEY
from bnncc.errors import BnnccError

__all__ = ["const_array", "initializer_bytes", "add_initializer", "static_dims", "int_attr", "ints_attr",
           "check_bit_widths", "add_import_note", "axes_of", "constant_inputs", "only_user", "replace_with_flatten",
           "take_over", "take_over_output"]


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (initializer or Constant node) as numpy, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def initializer_bytes(model: ir.Model) -> int:
    """The bytes of ``model``'s initializers: what its ONNX file holds beyond the nodes."""
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value is not None)


def constant_inputs(node: ir.Node, first: int, count: int) -> list[np.ndarray | None] | None:
    """The values of inputs ``first`` to ``first + count - 1`` of ``node``, None for one it omits
    (an optional input); None in all if one it gives is computed at run time."""
    given = [*node.inputs[first:], *[None] * count][:count]
    values = [const_array(v) for v in given]
    return None if any(v is not None and a is None for v, a in zip(given, values)) else values


def add_initializer(graph: ir.Graph, base_name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named ``base_name`` (suffixed when taken)."""
    name, suffix = base_name, 0
    while name in graph.initializers:
        suffix += 1
        name = f"{base_name}_{suffix}"
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(value)
    return value


def static_dims(value: ir.Value) -> tuple[int | str | None, ...] | None:
    """The value's shape with symbolic dims as their name (None when unnamed); None if unknown."""
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else d.value for d in value.shape)


def int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def ints_attr(node: ir.Node, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    attr = node.attributes.get(name)
    return default if attr is None else tuple(attr.as_ints())


def check_bit_widths(owner: str, **widths: int) -> None:
    """Each bit width of a pass's quantizers: 2 to 8, a signed quantizer of at least one level each
    side whose integers the kernels hold (int4 or int8)."""
    for key, value in widths.items():
        if not 2 <= value <= 8:
            raise BnnccError(f"{owner}: {key} must be 2 to 8 (a signed quantizer; the kernels hold int4 or int8), "
                             f"got {value}")


def add_import_note(model: ir.Model, note: str) -> None:
    """Record ``note`` under IMPORT_NOTES_KEY, after those recorded before."""
    notes = model.metadata_props.get(IMPORT_NOTES_KEY)
    model.metadata_props[IMPORT_NOTES_KEY] = note if not notes else f"{notes}\n{note}"


def axes_of(node: ir.Node, rank: int = 4) -> list[int] | None:
    """The ``axes`` of a reduction or Squeeze on a tensor of ``rank``, as 0..rank - 1 (an attribute in
    older opsets, the second input in newer ones); None where it has none or they are computed."""
    if "axes" in node.attributes:
        return [a % rank for a in node.attributes["axes"].as_ints()]
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if axes is None else [int(a) % rank for a in axes.reshape(-1)]


def only_user(value: ir.Value, op_type: str, domain: str = "") -> ir.Node | None:
    """The one node that reads ``value`` (not a graph output), if it is ``op_type`` of ``domain``: an op
    of another domain that shares the name is not ours."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    same_domain = node.domain in DEFAULT_DOMAINS if domain == "" else node.domain == domain
    return node if node.op_type == op_type and same_domain else None


def replace_with_flatten(graph: ir.Graph, node: ir.Node) -> None:
    """Put Flatten(node's first input, axis=1) in ``node``'s place, under its name."""
    flatten = ir.Node("", "Flatten", [node.inputs[0]], {"axis": ir.AttrInt64("axis", 1)}, name=node.name)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [flatten], [node.outputs[0]], [flatten.outputs[0]])


def take_over(old: ir.Value, new: ir.Value) -> None:
    """``new`` replaces ``old`` for every reader and graph output, and takes its name."""
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name = name


def take_over_output(graph: ir.Graph, node: ir.Node, value: ir.Value) -> None:
    """Remove ``node``, whose output ``value`` (its input's producer's output) now stands for; a
    graph output keeps its name (``take_over``); otherwise ``value`` keeps its own."""
    out = node.outputs[0]
    if out.is_graph_output():
        take_over(out, value)
    else:
        out.replace_all_uses_with(value)
    graph.remove(node, safe=True)
