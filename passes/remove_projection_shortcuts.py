"""Replace every projection shortcut by PokeBNN's parameter-free block shortcut.

A ResNet block whose shape changes adds a 1x1 projection of its input x::

    Add(y, Conv(x, Wp, bp))   ->   ReshapeAdd(y, x, method="tile")

``ReshapeAdd`` (ai.bnncc, spec.md) matches x to y with no parameters: it repeats the channels of x
(out c = x[c mod Cin]) or averages consecutive groups of them, then, when the spatial size
differs, takes a 3x3 stride-2 SAME average pool that counts padded cells. This changes what the
block computes (by design: pokebnn.md section 2, "ResNet's 1x1 projection shortcuts are removed
entirely") and removes the projection's MACs from the ACE. Identity shortcuts are left as ``Add``.
"""

from __future__ import annotations

__all__ = ["RemoveProjectionShortcutsPass"]

import logging

import onnx_ir as ir

from bnncc.domain import DOMAIN
from bnncc.passes._blocks import float_blocks
from bnncc.passes._pokebnn import refresh
from bnncc.passes._util import take_over
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("remove_projection_shortcuts")
class RemoveProjectionShortcutsPass(ir.passes.InPlacePass):
    """Replace ``Add(y, Conv(x))`` projection shortcuts with ``ReshapeAdd(y, x, method="tile")``.

    1. A float block (bottleneck or basic) whose shortcut is a Conv of the block input: the Add becomes a
       ReshapeAdd tile from the block input, the Conv and its weights are removed.
    2. A block with an identity shortcut, or one already rewritten: left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        blocks = [b for b in float_blocks(graph) if b.projection is not None]
        for block in blocks:
            projection, merge = block.projection, block.merge
            y = merge.inputs[1 - list(merge.inputs).index(projection.outputs[0])]
            reshape_add = ir.node("ReshapeAdd", [y, block.input], {"method": "tile"}, domain=DOMAIN,
                                  name=merge.name)
            graph.insert_before(merge, reshape_add)
            take_over(merge.outputs[0], reshape_add.outputs[0])
            graph.remove([merge, projection], safe=True)
            logger.debug("%s: projection %s removed, shortcut is ReshapeAdd(tile) from %s",
                         merge.name, projection.name, block.input.name)
        if blocks:
            refresh(model)
        return ir.passes.PassResult(model, modified=bool(blocks))
