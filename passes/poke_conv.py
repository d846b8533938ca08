"""Turn every float block conv into a PokeConv (pokebnn.md section 2, bnncc/ops/poke_conv.py).

A float bottleneck ``x -> conv1 -> relu -> conv2 -> relu -> conv3 -> add(., shortcut) -> relu``
becomes three ``ai.bnncc.PokeConv`` nodes: y_i = PokeConv(x_i, W_i, ...) with x_1 = x and W_i the
float conv's weight (k x k, its stride, TF SAME, no bias); the last also reads the block input x
as its block shortcut (the op's "block" overload), and its first batch norm starts at gamma 0.
A basic block ``x -> conv1 -> relu -> conv2 -> add(., shortcut) -> relu`` (ResNet-18/34) becomes two
PokeConvs the same way: each 3x3 conv with its own local shortcut around it (Bi-Real Net's
arrangement), the second also adding the block input. The last y is the block output (no ReLU:
the DPReLUs replaced them all). With ``se_gate=False`` the PokeConvs have no SE gate (inputs
10-15 omitted, the op's "ungated" overloads): a basic-block network then is Bi-Real Net's
arrangement with PokeBNN's DPReLU, stem and head. The binary weights are the
float convs' weights (BinaryConv keeps only their signs and per-channel max); the float conv's
bias, the folded BatchNorm shift of the float model, is dropped: the new BN after the binary conv
takes its role. Everything else is new and initialised as in ``_pokebnn``; initializers are named
after the float conv: ``<conv>/bn.gamma``, ``<conv>/dprelu.pos_slope``, ``<conv>/se.w1``,
``<conv>/bn_split.var`` and so on, and the node after the float conv itself. The stride stays
where the float conv had it (run stride_to_3x3 first for v1 models). The block's shortcut must
be parameter-free already (identity, or a ReshapeAdd from remove_projection_shortcuts).
"""

from __future__ import annotations

__all__ = ["PokeConvPass"]

import logging

import numpy as np
import onnx
import onnx_ir as ir

from bnncc.domain import DEFAULT_CLIP_BOUND, DOMAIN
from bnncc.errors import BnnccError
from bnncc.ops.poke_conv import overload
from bnncc.passes._blocks import FloatBlock, float_blocks
from bnncc.passes._pokebnn import (add_node, batch_norm_params, dprelu_params, lecun_normal, refresh,
                                   uncalibrated_bound)
from bnncc.passes._util import add_initializer, check_bit_widths, initializer_bytes, take_over
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("poke_conv")
class PokeConvPass(ir.passes.InPlacePass):
    """Replace every float block by one PokeConv per conv (three in a bottleneck, two in a basic block).

    1. A float block with an identity or ReshapeAdd shortcut: rewritten.
    2. A block with a projection Conv shortcut: an error (run remove_projection_shortcuts).
    3. No float block (e.g. already rewritten): left alone.
    """

    def __init__(self, clip_bound: float = DEFAULT_CLIP_BOUND, se_gate: bool = True, se_ratio: int = 8,
                 se_w_bits: int = 4, se_a_bits: int = 4, seed: int = 0) -> None:
        super().__init__()
        # the graph holds it as a float32 attribute: 3.4e39 became inf there and 1e-50 zero
        with np.errstate(over="ignore"):
            stored = np.float32(clip_bound)
        if not 0 < stored < np.inf:
            raise BnnccError(f"poke_conv: clip_bound must be a finite number > 0 in float32, got {clip_bound}")
        if se_ratio < 1:
            raise BnnccError(f"poke_conv: se_ratio must be >= 1, got {se_ratio}")
        check_bit_widths("poke_conv", se_w_bits=se_w_bits, se_a_bits=se_a_bits)
        if seed < 0:
            raise BnnccError(f"poke_conv: seed must be >= 0, got {seed}")
        self.clip_bound = clip_bound
        self.se_gate = se_gate  # se_ratio and the SE bit widths are unused without it
        self.se_ratio = se_ratio
        self.se_w_bits = se_w_bits
        self.se_a_bits = se_a_bits
        self.seed = seed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        blocks = float_blocks(graph)
        for block in blocks:
            if block.projection is not None:
                raise BnnccError(f"poke_conv: block {block.merge.name!r} has the projection shortcut "
                                 f"{block.projection.name!r}; run remove_projection_shortcuts first")
        if self.se_gate:
            self._check_size(model, blocks)
        rng = np.random.default_rng(self.seed)
        for block in blocks:
            self._rewrite_block(graph, block, rng)
        if blocks:
            refresh(model)
        return ir.passes.PassResult(model, modified=bool(blocks))

    def _check_size(self, model: ir.Model, blocks: list[FloatBlock]) -> None:
        """Refuse SE gates that would take the graph past one ONNX file (protobuf's 2 GiB) before making any:
        at se_ratio 1 they hold 8 times the weights they hold at 8, and 3x a ResNet-101 at se_ratio 1 (3.3 GiB)
        made them all, in minutes and 5 GB, to be refused by the checker at the end."""
        se_weights = 0
        for block in blocks:
            for conv in block.convs:
                out_channels, in_channels = conv.inputs[1].const_value.shape[:2]
                se_weights += in_channels // self.se_ratio * (in_channels + out_channels)
        size = 4 * se_weights + initializer_bytes(model)
        if size > onnx.checker.MAXIMUM_PROTOBUF:
            raise BnnccError(f"poke_conv: with SE gates of {se_weights:,} float32 weights at se_ratio={self.se_ratio}, "
                             f"the graph would take {size / 2**30:.1f} GiB, more than the 2 GiB one ONNX file holds; "
                             f"choose a larger se_ratio or a smaller width")

    def _rewrite_block(self, graph: ir.Graph, block: FloatBlock, rng: np.random.Generator) -> None:
        x = y = block.input
        for conv in block.convs[:-1]:
            y = self._poke_conv(graph, y, conv, rng)
        y = self._poke_conv(graph, y, block.convs[-1], rng, block_input=x)
        take_over(block.out_relu.outputs[0], y)
        old = [*block.convs, *block.relus, block.merge, block.out_relu]
        graph.remove(old, safe=True)
        logger.debug("block %s: convs %s -> PokeConvs", block.merge.name, ", ".join(c.name for c in block.convs))

    def _poke_conv(self, graph: ir.Graph, x: ir.Value, conv: ir.Node, rng: np.random.Generator,
                   block_input: ir.Value | None = None) -> ir.Value:
        """The PokeConv replacing ``conv`` on input ``x``; ``block_input`` marks the block's last conv."""
        name = conv.name
        weight = conv.inputs[1]
        out_channels, in_channels, kh, kw = weight.const_value.shape
        if conv.attributes.get_int("group", 1) != 1 or set(conv.attributes.get_ints("dilations", (1, 1))) != {1}:
            raise BnnccError(f"poke_conv: node {name!r} (Conv): groups or dilations are not supported")
        inputs = [
            x, weight,
            *batch_norm_params(graph, f"{name}/bn", out_channels, gamma=0.0 if block_input is not None else 1.0),
            *dprelu_params(graph, f"{name}/dprelu", out_channels),
            # the SE gate's six inputs, or six omitted ones: later inputs keep their positions
            *(self._se_params(graph, f"{name}/se", in_channels, out_channels, rng) if self.se_gate else [None] * 6),
            *batch_norm_params(graph, f"{name}/bn_split", out_channels),
        ]
        if block_input is not None:
            inputs.append(block_input)
        se_bits = dict(se_w_bits=self.se_w_bits, se_a_bits=self.se_a_bits) if self.se_gate else {}
        return add_node(graph, "PokeConv", inputs, name, domain=DOMAIN,
                        overload=overload(self.se_gate, block_input is not None),
                        kernel_shape=[kh, kw], strides=list(conv.attributes.get_ints("strides", (1, 1))),
                        clip_bound=self.clip_bound, **se_bits)

    def _se_params(self, graph: ir.Graph, name: str, in_channels: int, out_channels: int,
                   rng: np.random.Generator) -> list[ir.Value]:
        """The SE gate's Cin -> Cin // se_ratio -> Cout: LeCun-normal kernels, zero biases, bounds -1."""
        hidden = in_channels // self.se_ratio
        if hidden < 1:
            raise BnnccError(f"poke_conv: {name}: {in_channels} input channels leave no SE channel "
                             f"at se_ratio={self.se_ratio}")
        return [
            add_initializer(graph, f"{name}.w1", lecun_normal(rng, (hidden, in_channels, 1, 1))),
            add_initializer(graph, f"{name}.bound1", uncalibrated_bound(in_channels)),
            add_initializer(graph, f"{name}.b1", np.zeros(hidden, np.float32)),
            add_initializer(graph, f"{name}.w2", lecun_normal(rng, (out_channels, hidden, 1, 1))),
            add_initializer(graph, f"{name}.bound2", uncalibrated_bound(hidden)),
            add_initializer(graph, f"{name}.b2", np.zeros(out_channels, np.float32)),
        ]
