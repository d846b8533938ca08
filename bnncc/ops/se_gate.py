"""SEGate: the 4-bit squeeze-excite gate of a PokeConv, computed from the conv's input R.

    g = mean_HW(R)                                   (N, Ci, 1, 1)
    g = QuantConv(g, W1, bound1, B1; 1x1, signed)    (N, Ci//8, 1, 1)
    g = relu(g)
    g = QuantConv(g, W2, bound2, B2; 1x1, unsigned)  (N, Co, 1, 1)
    hard_sigmoid(g) = max(0, min(1, g / 6 + 1/2))    (ONNX HardSigmoid, alpha 1/6, beta 1/2)

torch's hardsigmoid computes min(max(g + 3, 0), 6) / 6, the same function at most 2^-24 apart.
Both convs use w_bits-bit weights and a_bits-bit activations (each 4 when the node omits it, as in PokeBNN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnxscript import script

from bnncc.ops import checks, cpu_kernels, qonnx_nodes
from bnncc.ops._opset import bnncc_opset, op
from bnncc.ops.counting import Layer, numel
from bnncc.ops.quant import QuantConv, act_quantize, act_quantize_backward, channel_absmax, quant_conv, weight_grid
from bnncc.ops.registry import OpDef, register

__all__ = ["SEGate", "se_gate", "observe_pool", "observe_first_input", "observe_hidden", "switch", "layer", "sops",
           "emit_qonnx"]


@script(bnncc_opset, default_opset=op)
def SEGate(R, W1, bound1, B1, W2, bound2, B2, w_bits: int = 4, a_bits: int = 4):
    g = op.GlobalAveragePool(R)
    h = QuantConv(g, W1, bound1, B1, w_bits=w_bits, a_bits=a_bits, a_signed=1, kernel_shape=[1, 1],
                  strides=[1, 1], pads=[0, 0, 0, 0], group=1)
    h = op.Relu(h)
    h = QuantConv(h, W2, bound2, B2, w_bits=w_bits, a_bits=a_bits, a_signed=0, kernel_shape=[1, 1],
                  strides=[1, 1], pads=[0, 0, 0, 0], group=1)
    return op.HardSigmoid(h, alpha=1.0 / 6.0, beta=0.5)


def _squeeze(r: torch.Tensor, bound: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, its signed quantized values), g the mean of ``r`` (N, C, H, W) over H and W, as (N, C)."""
    kernels = cpu_kernels.kernels_for(r)
    if kernels is not None:  # one pass and one call; the mean summed in double
        return cpu_kernels.mean_quantize_acts(kernels, r, bound, bits, signed=1)
    n, c, h, w = r.shape
    if r.is_contiguous(memory_format=torch.channels_last):
        # NHWC in memory: a reduction over outer axes, vectorized along C
        g = r.mean(dim=(2, 3))
    else:
        # NCHW: a product with a 1/HW vector; torch's reductions over a short inner axis (2x2 at
        # the last stage) run an unvectorized path, ten times slower than this.
        g = (r.reshape(n, c, h * w) @ r.new_full((h * w, 1), 1.0 / (h * w))).reshape(n, c)
    return g, act_quantize(g, bound, bits, signed=1)


class _SEGate(torch.autograd.Function):
    """The gate as one autograd node with its backward written out: on the pooled (N, C)
    vectors every op is small and costs its dispatch more than its work, 48 times a step, so
    the quantizers are one fused call each (quant.py), the relu rides in the second one, and
    the 1x1 convs are matrix products (addmm, as F.linear runs them); gradients are the
    quantizers' straight-through ones."""

    @staticmethod
    def forward(ctx, r, w1, bound1, b1, w2, bound2, b2, w_bits: int, a_bits: int, quantize_weights: bool):
        w1q, w2q = (weight_grid(w.flatten(1), w_bits) if quantize_weights else w.flatten(1) for w in (w1, w2))
        g, x1 = _squeeze(r, bound1, a_bits)
        a = torch.addmm(b1, x1, w1q.t())
        x2 = act_quantize(a, bound2, a_bits, signed=0, relu=True)
        z = torch.addmm(b2, x2, w2q.t())
        ctx.save_for_backward(g, bound1, x1, w1q, a, bound2, x2, w2q, z)
        ctx.a_bits, ctx.r_shape, ctx.w_shapes = a_bits, r.shape, (w1.shape, w2.shape)
        return F.hardsigmoid(z)[:, :, None, None]

    @staticmethod
    def backward(ctx, grad):
        g, bound1, x1, w1q, a, bound2, x2, w2q, z = ctx.saved_tensors
        dz = torch.ops.aten.hardsigmoid_backward(grad.flatten(1), z)
        da = act_quantize_backward(dz @ w2q, a, bound2, ctx.a_bits, signed=0, relu=True)
        n, c, height, width = ctx.r_shape
        dg = act_quantize_backward(da @ w1q, g, bound1, ctx.a_bits, signed=1, divisor=height * width)
        # dg is already divided by H x W: the mean's gradient, spread over H x W as a broadcast view
        # (autograd adds it to R's other gradients)
        dr = dg[:, :, None, None].expand(n, c, height, width)
        dw1 = (da.t() @ x1).reshape(ctx.w_shapes[0])
        dw2 = (dz.t() @ x2).reshape(ctx.w_shapes[1])
        return dr, dw1, None, da.sum(0), dw2, None, dz.sum(0), None, None, None


def se_gate(r, w1, bound1, b1, w2, bound2, b2, *, w_bits: int = 4, a_bits: int = 4, quantize_weights: bool = True):
    return _SEGate.apply(r, w1, bound1, b1, w2, bound2, b2, w_bits, a_bits, quantize_weights)


# The faces below take the gate's own inputs (R, W1, bound1, B1, W2, bound2, B2) and bit widths, so
# that PokeConv, which holds an SE gate, calls them with its inputs at their places (all but
# emit_qonnx: the QONNX export expands a PokeConv into its ops first).


def observe_pool(r: torch.Tensor) -> torch.Tensor:
    """bound1's activation: the first SE conv reads g = mean_HW(R)."""
    return channel_absmax(r.mean(dim=(2, 3), keepdim=True))


def observe_first_input(args, attrs) -> torch.Tensor:
    """``observe_pool`` of the op's first input, as a bound observer (``OpDef.bounds``). A named function,
    not a lambda: the torch view holds it, and a lambda there kept torch.save from pickling the module."""
    return observe_pool(args[0])


def observe_hidden(r, w1, bound1, b1, *, w_bits: int, a_bits: int, quantize_weights: bool = True) -> torch.Tensor:
    """bound2's activation: relu(QuantConv(mean_HW(R), W1, bound1, B1; signed)), the first conv
    following the two-phase weight switch as the gate does."""
    g = quant_conv(r.mean(dim=(2, 3), keepdim=True), w1, bound1, b1, w_bits=w_bits, a_bits=a_bits, a_signed=1,
                   kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], group=1, quantize_weights=quantize_weights)
    return channel_absmax(torch.relu(g))


def switch(attrs: dict) -> dict:
    """The attributes that switch observe_hidden's weight quantization."""
    return {k: v for k, v in attrs.items() if k == "quantize_weights"}


def layer(node, shapes, inputs, w_bits: int, a_bits: int, name: str) -> Layer:
    """Two 1x1 convs on the pooled (1x1) vector: MACs = |W1| + |W2| = Ci*Ch + Ch*Co."""
    weights = numel(shapes.static(node, inputs[1])) + numel(shapes.static(node, inputs[4]))
    return Layer(name, "SEGate", "conv", w_bits, a_bits, weights, weights, weights * w_bits)


def sops(node, shapes, inputs) -> dict[str, int]:
    """Pool over H, W (H*W*Ci adds, Ci multiplies), ReLU on Ch, hard-sigmoid on Co."""
    ci, h, w = shapes.per_image(node, inputs[0])
    hidden = shapes.static(node, inputs[1])[0]
    co = shapes.static(node, inputs[4])[0]
    return {"se_pool": ci * h * w, "se_pool_mul": ci, "se_relu": hidden, "se_hardsigmoid": co}


def emit_qonnx(e, inputs: list[str], w_bits: int, a_bits: int, name: str) -> str:
    """GlobalAveragePool, quantized 1x1 conv, Relu, quantized 1x1 conv, HardSigmoid."""
    r, w1, bound1, b1, w2, bound2, b2 = inputs
    bits = dict(w_bits=w_bits, a_bits=a_bits)
    g = e.node("GlobalAveragePool", [r], f"{name}.pool")
    h = qonnx_nodes.quant_conv(e, f"{name}.conv1", g, w1, bound1, b1, signed=True, rank=4, kernel_shape=[1, 1], **bits)
    h = e.node("Relu", [h], f"{name}.relu")
    h = qonnx_nodes.quant_conv(e, f"{name}.conv2", h, w2, bound2, b2, signed=False, rank=4, kernel_shape=[1, 1],
                               **bits)
    return e.node("HardSigmoid", [h], name, alpha=1.0 / 6.0, beta=0.5)


def _bits(node) -> tuple[int, int]:
    return node.attributes.get_int("w_bits", 4), node.attributes.get_int("a_bits", 4)


def check_quantizers(node, inputs, w_bits: int, a_bits: int) -> None:
    """The gate's two weight scales and two activation bounds, of ``inputs`` (R, W1, bound1, B1, W2,
    bound2, B2) given as positions in ``node``: the first activation quantizer signed, the second
    (after the relu) unsigned."""
    checks.weight_scales(node, inputs[1], w_bits)
    checks.weight_scales(node, inputs[4], w_bits)
    checks.act_bounds(node, inputs[2], a_bits, signed=True)
    checks.act_bounds(node, inputs[5], a_bits, signed=False)


def _observe_hidden(args, attrs) -> torch.Tensor:
    return observe_hidden(*args[:4], w_bits=attrs.get("w_bits", 4), a_bits=attrs.get("a_bits", 4), **switch(attrs))


def _check(node) -> None:
    check_quantizers(node, range(7), checks.bits(node, "w_bits", 4), checks.bits(node, "a_bits", 4))


OP = register(OpDef(
    "SEGate", (SEGate,), torch=se_gate,
    layers=lambda node, shapes, float_bits: [layer(node, shapes, node.inputs, *_bits(node), node.name)],
    sops=lambda node, shapes: sops(node, shapes, node.inputs),
    weight_inputs=(1, 4), state_inputs=(2, 5),
    bounds=((2, observe_first_input), (5, _observe_hidden)),
    qonnx=lambda e, node, inputs, dims: emit_qonnx(e, inputs, *_bits(node), node.name),
    check=_check,
))
