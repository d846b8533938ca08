"""Replace the ResNet stem (7x7/2 conv, ReLU, 3x3/2 max-pool) by PokeBNN's PokeInit stem.

PokeInit (pokebnn.md section 3), for an input of Cin channels and a stem C wide (64 in ResNet-50):

    QuantConv 4x4, stride 4, VALID, Cin -> M          (8-bit weights and signed 8-bit activations)
    BatchNormalization -> DPReLU
    QuantConv 3x3, stride 1, SAME (pads 1), group M, M -> C   (each group: 1 input, C/M outputs)
    BatchNormalization -> DPReLU

with M = ``mid_channels`` (32). No input pixel is used twice by the 4x4/4 conv, and it downsamples
by 4 as the 7x7/2 conv plus the 3x3/2 pool did (224 -> 56), so the blocks see the same size.
The float stem weights cannot carry over (other kernel); every new kernel is LeCun-normal, biases 0,
BN 1/0/0/1, DPReLU 0/0/1/0.25, activation bounds -1 (not calibrated yet). The network's output
changes; the stem's ACE drops from 7x7x3x64 float MACs per 112x112 pixel to
56x56 x (4x4xCin x M + 3x3 x C) MACs at 8 x 8 bits.

A float stem of another size keeps its size: the window is s x s, stride s, where s is the stride
of the float conv times that of its pool (2 for a stem without a max-pool: 224 -> 112), and an
input that s does not divide is padded by what gives the float stem's size, half of it (rounded
down) above and to the left (225 px: 57x57, pads 1 and 2). Where no padding gives it (a pool
without padding: 224 -> 55), the pass refuses; a fixed 4x4/4 window had put the blocks at another
size without a word.
"""

from __future__ import annotations

__all__ = ["PokeStemPass", "stem_window"]

import logging

import numpy as np
import onnx_ir as ir

from bnncc.domain import DOMAIN
from bnncc.errors import BnnccError
from bnncc.passes._pokebnn import add_node, batch_norm, dprelu, lecun_normal, refresh, uncalibrated_bound
from bnncc.passes._util import add_initializer, check_bit_widths, ints_attr, only_user, static_dims, take_over
from bnncc.passmanager import register_pass

logger = logging.getLogger(__name__)


@register_pass("poke_stem")
class PokeStemPass(ir.passes.InPlacePass):
    """Replace ``MaxPool(Relu(Conv(input)))`` (or ``Relu(Conv(input))``) with the PokeInit stem.

    1. A float Conv on the graph input followed by a Relu, and a MaxPool if there is one: replaced.
    2. Anything else on the graph input (e.g. a PokeInit stem already): left alone.
    """

    def __init__(self, mid_channels: int = 32, w_bits: int = 8, a_bits: int = 8, seed: int = 0) -> None:
        super().__init__()
        if mid_channels < 1:
            raise BnnccError(f"poke_stem: mid_channels must be >= 1, got {mid_channels}")
        check_bit_widths("poke_stem", w_bits=w_bits, a_bits=a_bits)
        if seed < 0:
            raise BnnccError(f"poke_stem: seed must be >= 0, got {seed}")
        self.mid_channels = mid_channels
        self.w_bits = w_bits
        self.a_bits = a_bits
        self.seed = seed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        stem = _float_stem(graph)
        if stem is None:
            return ir.passes.PassResult(model, modified=False)
        conv, last = stem[0], stem[-1]
        sizes = [static_dims(value) for value in (conv.inputs[0], last.outputs[0])]
        if not all(dims is not None and all(isinstance(d, int) for d in dims[2:]) for dims in sizes):
            # the window follows from the image sizes: a model read with onnx_ir.load has none inferred,
            # and failed in stem_window with "TypeError: 'NoneType' object is not iterable"
            raise BnnccError(f"poke_stem: the stem ({', '.join(node.name for node in stem)}) has no inferred "
                             f"image size; load the model with bnncc.load")
        out_channels, in_channels = conv.inputs[1].const_value.shape[:2]
        mid = self.mid_channels
        try:
            window, pads = stem_window(stem)
        except BnnccError as e:
            raise BnnccError(f"poke_stem: {e}") from None
        if out_channels % mid:
            fits = max(d for d in range(1, min(mid, out_channels) + 1) if out_channels % d == 0)
            raise BnnccError(f"poke_stem: the stem's {out_channels} output channels ({conv.name}) are not a "
                             f"multiple of mid_channels={mid}; set one that divides them, e.g. "
                             f"--set passes.poke_stem.mid_channels={fits}")
        rng = np.random.default_rng(self.seed)
        x = self._quant_conv(graph, conv.inputs[0], "stem/conv1", lecun_normal(rng, (mid, in_channels, window, window)),
                             kernel_shape=[window, window], strides=[window, window], pads=pads, group=1)
        x = dprelu(graph, batch_norm(graph, x, "stem/bn1", mid), "stem/dprelu1", mid)
        x = self._quant_conv(graph, x, "stem/conv2", lecun_normal(rng, (out_channels, 1, 3, 3)),
                             kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], group=mid)
        x = dprelu(graph, batch_norm(graph, x, "stem/bn2", out_channels), "stem/dprelu2", out_channels)
        take_over(last.outputs[0], x)
        graph.remove(stem, safe=True)
        logger.debug("stem %s replaced by PokeInit (%d -> %d -> %d channels)",
                     ", ".join(n.name for n in stem), in_channels, mid, out_channels)
        refresh(model)
        return ir.passes.PassResult(model, modified=True)

    def _quant_conv(self, graph: ir.Graph, x: ir.Value, name: str, weight: np.ndarray, **conv) -> ir.Value:
        """QuantConv(x) with ``weight``, zero bias, uncalibrated per-input-channel bounds."""
        in_channels = weight.shape[1] * conv["group"]
        inputs = [
            x,
            add_initializer(graph, f"{name}.weight", weight),
            add_initializer(graph, f"{name}.act_bound", uncalibrated_bound(in_channels)),
            add_initializer(graph, f"{name}.bias", np.zeros(weight.shape[0], np.float32)),
        ]
        return add_node(graph, "QuantConv", inputs, name, domain=DOMAIN,
                        w_bits=self.w_bits, a_bits=self.a_bits, a_signed=1, **conv)


def stem_window(stem: list[ir.Node]) -> tuple[int, list[int]]:
    """The PokeInit conv's window (its stride too) and its ONNX pads (top, left, bottom, right):
    the size the float ``stem`` ([Conv, Relu] or [Conv, Relu, MaxPool]) gives, from its input's
    (module docstring). The front end refuses a stem this refuses, so every recipe takes what it
    accepts."""
    conv, last = stem[0], stem[-1]
    for node in (conv, *stem[2:]):
        # a stride beyond the window skips pixels, which no ResNet's stem does (a pool stride of
        # 2^62 made a PokeInit window of 2^63, and rewrite then failed allocating its weights)
        kernel, strides = ints_attr(node, "kernel_shape", ()), ints_attr(node, "strides", (1, 1))
        if any(s > k for s, k in zip(strides, kernel)):
            raise BnnccError(f"the stem's {node.op_type} {node.name!r} has strides {list(strides)} beyond its "
                             f"{'x'.join(map(str, kernel))} window; a PokeInit stem takes none that skip pixels")
    strides = ints_attr(conv, "strides", (1, 1))
    if len(stem) == 3:
        strides = tuple(a * b for a, b in zip(strides, ints_attr(stem[2], "strides", (1, 1))))
    size, out = list(conv.inputs[0].shape)[2:], list(last.outputs[0].shape)[2:]
    where = f"the stem ({', '.join(node.name for node in stem)}) takes {'x'.join(map(str, size))} pixels to " \
            f"{'x'.join(map(str, out))}"
    if len(set(strides)) != 1:
        raise BnnccError(f"{where} with strides {list(strides)} along H and W; PokeInit's are equal")
    window = strides[0]
    extra = [window * o - i for i, o in zip(size, out)]
    if not all(0 <= e < window for e in extra):
        raise BnnccError(f"{where}; a PokeInit stem of {window}x{window} windows, stride {window}, "
                         f"cannot give that size")
    return window, [extra[0] // 2, extra[1] // 2, extra[0] - extra[0] // 2, extra[1] - extra[1] // 2]


def _float_stem(graph: ir.Graph) -> list[ir.Node] | None:
    """[Conv, Relu] or [Conv, Relu, MaxPool] starting at the graph input, else None."""
    if len(graph.inputs) != 1:
        return None
    conv = only_user(graph.inputs[0], "Conv")
    relu = only_user(conv.outputs[0], "Relu") if conv is not None else None
    if relu is None:
        return None
    pool = only_user(relu.outputs[0], "MaxPool")
    return [conv, relu] if pool is None else [conv, relu, pool]

