"""Find the float blocks of a ResNet graph, before or after the PokeBNN passes touched it.

A float block is a bottleneck (ResNet-50) or a basic block (ResNet-18/34)::

    x -> Conv(1x1) -> Relu -> Conv(3x3) -> Relu -> Conv(1x1) = y     bottleneck
    x -> Conv(3x3) -> Relu -> Conv(3x3) = y                          basic block
    merge(y, shortcut) -> Relu = block output

where ``merge`` is an ``Add`` with shortcut ``x`` (identity) or ``Conv(x)`` (projection), or,
once ``remove_projection_shortcuts`` ran, an ``ai.bnncc`` ``ReshapeAdd(y, x, method="tile")``.
The block input ``x`` is the value where the two branches meet: in the node DAG it is the output of
the immediate dominator of the merge node, which networkx computes. A block the PokeConv pass
already rewrote has no such chain and is not listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import onnx_ir as ir

from bnncc.domain import DOMAIN
from bnncc.passes._util import only_user

__all__ = ["FloatBlock", "float_blocks", "node_dag"]

_SOURCE = "<inputs>"


@dataclass(frozen=True)
class FloatBlock:
    """One float block, as graph nodes (valid until those nodes are removed)."""

    convs: tuple[ir.Node, ...]  # bottleneck: 1x1 reduce, 3x3, 1x1 expand; basic block: 3x3, 3x3
    relus: tuple[ir.Node, ...]  # after every conv but the last
    projection: ir.Node | None  # the shortcut Conv, None for an identity or ReshapeAdd shortcut
    merge: ir.Node  # Add or ReshapeAdd
    out_relu: ir.Node

    @property
    def input(self) -> ir.Value:
        """The value entering the block, read from the graph (an earlier rewrite may have replaced it)."""
        return self.convs[0].inputs[0]


def node_dag(graph: ir.Graph) -> nx.DiGraph:
    """Producer -> consumer edges between the graph's nodes; graph inputs hang off one source node."""
    dag = nx.DiGraph()
    dag.add_node(_SOURCE)
    for node in graph:
        dag.add_node(node)
        for value in node.inputs:
            if value is None or value.is_initializer():
                continue
            producer = value.producer()
            dag.add_edge(producer if producer is not None else _SOURCE, node)
    return dag


def float_blocks(graph: ir.Graph) -> list[FloatBlock]:
    """The float blocks (bottlenecks or basic blocks) of ``graph`` in graph order."""
    dag = node_dag(graph)
    dominators = nx.immediate_dominators(dag, _SOURCE)
    blocks = []
    for node in graph:
        if _is_merge(node) and node in dominators:
            block = _match(node, dominators[node])
            if block is not None:
                blocks.append(block)
    return blocks


def _is_merge(node: ir.Node) -> bool:
    if node.op_type == "Add" and node.domain == "":
        return True
    return (node.op_type == "ReshapeAdd" and node.domain == DOMAIN
            and node.attributes.get_string("method") == "tile")


def _match(merge: ir.Node, dominator: ir.Node | str) -> FloatBlock | None:
    """The block ending in ``merge`` whose input is produced by ``dominator``, or None."""
    if dominator == _SOURCE or len(dominator.outputs) != 1 or len(merge.inputs) != 2:
        return None
    x = dominator.outputs[0]
    out_relu = only_user(merge.outputs[0], "Relu")
    if out_relu is None:
        return None
    orders = [(0, 1)] if merge.op_type == "ReshapeAdd" else [(0, 1), (1, 0)]
    for main, short in orders:
        chain = _main_chain(merge.inputs[main], x)
        projection = _shortcut(merge.inputs[short], x, merge.op_type == "ReshapeAdd")
        if chain is not None and projection is not False:
            convs, relus = chain
            return FloatBlock(convs, relus, projection, merge, out_relu)
    return None


def _main_chain(y: ir.Value, x: ir.Value) -> tuple[tuple[ir.Node, ...], tuple[ir.Node, ...]] | None:
    """Conv -> Relu -> Conv from ``x`` to ``y`` (basic block), or Conv -> Relu -> Conv -> Relu -> Conv
    (bottleneck), each inner value used once. The chain must start at ``x`` exactly, so a
    bottleneck's last three nodes are never taken for a basic block."""
    nodes = []
    value = y
    for op_type in ("Conv", "Relu", "Conv", "Relu", "Conv"):
        node = value.producer()
        if node is None or node.op_type != op_type or node.domain != "":
            return None
        if value is not y and len(value.uses()) != 1:
            return None
        nodes.append(node)
        value = node.inputs[0]
        if value is x and op_type == "Conv" and len(nodes) > 1:
            convs, relus = nodes[::-1][::2], nodes[::-1][1::2]
            return tuple(convs), tuple(relus)
    return None


def _shortcut(value: ir.Value, x: ir.Value, parameter_free: bool) -> ir.Node | None | bool:
    """None for an identity shortcut, the Conv of a projection, False when neither."""
    if value is x:
        return None
    producer = value.producer()
    if parameter_free or producer is None or producer.op_type != "Conv" or producer.domain != "":
        return False
    return producer if producer.inputs[0] is x and len(value.uses()) == 1 else False
