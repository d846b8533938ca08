"""Move a bottleneck's stride from its first 1x1 conv to its 3x3 conv (ResNet v1 -> v1.5).

ResNet v1 downsamples with the first 1x1 conv (stride s) and runs the 3x3 at stride 1; v1.5
(torchvision, and PokeBNN: pokebnn.md section 2) runs the 1x1 at stride 1 and the 3x3 at stride s.
The output size is the same: for input H, the 1x1 gives floor((H-1)/s)+1 and the padded 3x3
(pads 1, kernel 3) keeps it; the 3x3 at stride s gives floor((H+2-3)/s)+1, equal for any H.
The block computes something different (the 3x3 now sees every input position, the 1x1 MACs grow
by s^2 and the 3x3's stay), so the ACE changes; the weights stay. Basic blocks (two 3x3 convs)
have no 1x1 to move a stride from and are left alone.
"""

from __future__ import annotations

__all__ = ["StrideTo3x3Pass"]

import logging

import onnx_ir as ir

from bnncc.passes._blocks import float_blocks
from bnncc.passes._pokebnn import refresh
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("stride_to_3x3")
class StrideTo3x3Pass(ir.passes.InPlacePass):
    """Put the stride of every float bottleneck on its 3x3 conv.

    1. First conv strided, 3x3 conv at stride 1: the strides swap.
    2. Stride already on the 3x3 (v1.5), a block with no stride, or a basic block: left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for block in float_blocks(model.graph):
            if len(block.convs) != 3:  # a basic block: both convs are 3x3
                continue
            first, middle = block.convs[0], block.convs[1]
            strides = list(first.attributes.get_ints("strides", (1, 1)))
            if strides == [1, 1] or list(middle.attributes.get_ints("strides", (1, 1))) != [1, 1]:
                continue
            middle.attributes["strides"] = ir.Attr("strides", ir.AttributeType.INTS, strides)
            first.attributes["strides"] = ir.Attr("strides", ir.AttributeType.INTS, [1, 1])
            logger.debug("%s: stride %s moved from %s to %s", block.merge.name, strides, first.name, middle.name)
            modified = True
        if modified:
            refresh(model)
        return ir.passes.PassResult(model, modified=modified)
