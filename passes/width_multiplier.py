"""Scale the width of every block: f' = int(f * multiplier), outputs e * f'.

For a block with mid width f (the output channels of its first conv) and expansion
e = out / f (4 in ResNet-50's bottlenecks, 1 in basic blocks), the convs become

    1x1: Cin -> f',   3x3: f' -> f',   1x1: f' -> e f',   projection (if any): Cin -> e f'
    (basic block:  3x3: Cin -> f',   3x3: f' -> e f',   projection (if any): Cin -> e f')

where Cin is the previous block's new output (the first block keeps the stem's width: the stem
stays 64 wide, pokebnn.md section 3), and the dense head takes the last block's e f' features.
A block whose identity shortcut (a plain Add) would then join different widths, as ResNet-18's
first block does, is an error: only a ReshapeAdd shortcut matches widths.
On a ResNet-50 this is PokeBNN's f = int(base * multiplier) with base 64, 128, 256, 512.

Weights carry over where the new shape fits inside the old one: W'[:o, :i] = W[:o, :i] (the
first channels are kept). A tensor that grows is re-initialised: LeCun-normal kernels, zero
biases. A head already quantized by int8_head (QuantGemm) gets activation bounds of the new
width, all -1 (uncalibrated). The pass changes what the network computes unless the multiplier is 1
(no change).
"""

from __future__ import annotations

__all__ = ["WidthMultiplierPass"]

import logging

import numpy as np
import onnx_ir as ir

from bnncc.errors import BnnccError
from bnncc.passes._blocks import FloatBlock, float_blocks
from bnncc.passes._pokebnn import lecun_normal, refresh, uncalibrated_bound
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)

MAX_MULTIPLIER = 4
# The rewritten graph is one ONNX file, which protobuf caps at 2 GiB: the widened blocks' float32 weights, the SE
# gates poke_conv then adds (a fifth more at se_ratio 8) and the head must fit in it. 4x a ResNet-50 holds some
# 375 million; 2^30 (4 GiB) let 4x a ResNet-101 (some 680 million) through, whose rewrite failed only at its end
# (16x a ResNet-50, some 6 billion, was killed for memory on a 24 GiB machine)
MAX_WEIGHTS = 400_000_000


@register_pass("width_multiplier")
class WidthMultiplierPass(ir.passes.InPlacePass):
    """Multiply every float block's width by ``multiplier``; the stem stays, the head follows.

    1. Float blocks (bottleneck or basic) and multiplier != 1: convs, projections and the dense head resized,
       weights sliced or re-initialised (seeded by ``seed``).
    2. Multiplier 1, or no float block (e.g. after poke_conv): left alone; with another multiplier, a
       warning says so (a recipe with width_multiplier after poke_conv silently kept the widths).
    3. A plain Add shortcut between blocks of different new widths: an error.
    """

    def __init__(self, multiplier: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        # (the paper's widths are 0.5x to 2x; 16x a ResNet-50 held some 6 billion weights, and its
        # rewrite was killed for memory on a 24 GiB machine; 4x holds some 400 million)
        if not 0 < multiplier <= MAX_MULTIPLIER:
            raise BnnccError(f"width_multiplier: multiplier must be above 0 and at most {MAX_MULTIPLIER}, got {multiplier}")
        if seed < 0:
            raise BnnccError(f"width_multiplier: seed must be >= 0, got {seed}")
        self.multiplier = multiplier
        self.seed = seed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks = float_blocks(model.graph)
        if self.multiplier == 1.0 or not blocks:
            if self.multiplier != 1.0:
                logger.warning("no float block left to scale by %g: the widths stay as they are (in a recipe, "
                               "width_multiplier goes before poke_conv)", self.multiplier)
            return ir.passes.PassResult(model, modified=False)
        rng = np.random.default_rng(self.seed)
        modified = False
        widths = [self._new_widths(block) for block in blocks]  # all checked before anything changes
        in_channels = _weight(blocks[0].convs[0]).shape[1]
        _check_identity_shortcuts(blocks, widths, in_channels)
        convs = list(_new_conv_widths(blocks, widths, in_channels))
        _check_size(convs)
        head = _dense_after(blocks[-1].out_relu.outputs[0])
        if head is None:
            # a head the pass cannot follow kept its old width: a model read with onnx_ir.load (ReduceMean,
            # a Reshape to the old feature count) became a graph onnxruntime could not run
            raise BnnccError(f"width_multiplier: the last block's output {blocks[-1].out_relu.outputs[0].name!r} "
                             f"reaches no Gemm through GlobalAveragePool and Flatten; load the model with bnncc.load")
        for conv, cout, cin in convs:
            modified |= _resize_conv(conv, cout, cin, rng)
        in_channels = widths[-1][1]
        modified |= _resize(head.inputs[1], (_weight(head).shape[0], in_channels), rng, head.name)
        if head.op_type == "QuantGemm":  # int8_head ran first: its per-input bounds must take the new width
            modified |= _reset_bounds(head.inputs[2], in_channels, head.name)
        if modified:
            refresh(model)
        return ir.passes.PassResult(model, modified=modified)

    def _new_widths(self, block: FloatBlock) -> tuple[int, int]:
        """(f', e f') for the block."""
        f = _weight(block.convs[0]).shape[0]
        expansion = _weight(block.convs[-1]).shape[0] // f
        new_f = int(f * self.multiplier)
        if new_f < 1:
            raise BnnccError(f"width_multiplier: multiplier {self.multiplier} leaves no channel in "
                             f"{block.convs[0].name} (width {f})")
        return new_f, expansion * new_f


def _check_identity_shortcuts(blocks: list[FloatBlock], widths: list[tuple[int, int]], in_channels: int) -> None:
    """A plain Add adds the block input to its output: both must keep one width."""
    for block, (_, out) in zip(blocks, widths):
        if block.projection is None and block.merge.op_type == "Add" and in_channels != out:
            raise BnnccError(f"width_multiplier: block {block.merge.name!r} adds its {in_channels}-channel input "
                             f"to its {out}-channel output: an identity shortcut cannot join them")
        in_channels = out


def _new_conv_widths(blocks: list[FloatBlock], widths: list[tuple[int, int]], in_channels: int):
    """(conv, new out channels, new in channels) for every conv of the blocks, projections included."""
    for block, (f, out) in zip(blocks, widths):
        first, *middle, last = block.convs
        for conv, cout, cin in ((first, f, in_channels), *((c, f, f) for c in middle),
                                (last, out, f), (block.projection, out, in_channels)):
            if conv is not None:
                yield conv, cout, cin
        in_channels = out


def _check_size(convs: list[tuple[ir.Node, int, int]]) -> None:
    """Refuse a widened network too large to hold: the multiplier's cap alone let a repeated pass
    (4x, then 4x) or an already wide model through, which the rewrite then ran out of memory on."""
    weights = 0
    for conv, cout, cin in convs:
        kh, kw = _weight(conv).shape[2:]
        weights += cout * (cin // conv.attributes.get_int("group", 1)) * kh * kw
    if weights > MAX_WEIGHTS:
        raise BnnccError(f"width_multiplier: the widened blocks would hold {weights:,} weights, more than the "
                         f"{MAX_WEIGHTS:,} that fit one ONNX file (2 GiB) with their SE gates; choose a smaller "
                         f"multiplier")


def _weight(node: ir.Node) -> np.ndarray:
    tensor = node.inputs[1].const_value
    if tensor is None:
        raise BnnccError(f"node {node.name!r} ({node.op_type}): weight {node.inputs[1].name!r} is not an initializer")
    return tensor.numpy()


def _resize_conv(conv: ir.Node, cout: int, cin: int, rng: np.random.Generator) -> bool:
    """Resize a Conv's weight to (cout, cin/group, kh, kw) and its bias to (cout,)."""
    kh, kw = _weight(conv).shape[2:]
    cin_per_group = cin // conv.attributes.get_int("group", 1)
    changed = _resize(conv.inputs[1], (cout, cin_per_group, kh, kw), rng, conv.name)
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        changed |= _resize(conv.inputs[2], (cout,), rng, conv.name)
    return changed


def _resize(value: ir.Value, shape: tuple[int, ...], rng: np.random.Generator, owner: str) -> bool:
    """Slice the initializer to ``shape`` when it fits, else re-initialise it; True if it changed."""
    old = value.const_value.numpy()
    if old.shape == shape:
        return False
    if all(n <= o for n, o in zip(shape, old.shape)):
        new = np.ascontiguousarray(old[tuple(slice(0, n) for n in shape)])
        how = "sliced"
    elif len(shape) == 1:
        new = np.zeros(shape, old.dtype)
        how = "zeros"
    else:
        new = lecun_normal(rng, shape).astype(old.dtype)
        how = "LeCun-normal"
    value.const_value = ir.tensor(new, name=value.name)
    value.shape = ir.Shape(shape)
    logger.debug("%s: %s %s -> %s (%s)", owner, value.name, old.shape, shape, how)
    return True


def _reset_bounds(value: ir.Value, channels: int, owner: str) -> bool:
    """Make the activation bounds ``value`` ``channels`` long, all uncalibrated (-1): the features
    they were calibrated on changed with the width, so no old bound applies."""
    if value.const_value.shape == (channels,):
        return False
    value.const_value = ir.tensor(uncalibrated_bound(channels), name=value.name)
    value.shape = ir.Shape((channels,))
    logger.debug("%s: %s reset to %d uncalibrated bounds", owner, value.name, channels)
    return True


def _dense_after(value: ir.Value) -> ir.Node | None:
    """The Gemm/QuantGemm the value reaches through the canonical head's pooling and flattening, if any
    (not through a Reshape: its shape may hold the old width)."""
    while len(value.uses()) == 1:
        node = value.uses()[0].node
        if node.op_type in ("Gemm", "QuantGemm"):
            return node
        if node.op_type not in ("GlobalAveragePool", "Flatten"):
            return None
        value = node.outputs[0]
    return None
