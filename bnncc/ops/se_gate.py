"""SEGate: the 4-bit squeeze-excite gate of a PokeConv, computed from the conv's input R.

    g = mean_HW(R)                                   (N, Ci, 1, 1)
    g = QuantConv(g, W1, bound1, B1; 1x1, signed)    (N, Ci//8, 1, 1)
    g = relu(g)
    g = QuantConv(g, W2, bound2, B2; 1x1, unsigned)  (N, Co, 1, 1)
    hard_sigmoid(g) = min(max(g + 3, 0), 6) / 6

Both convs use w_bits-bit weights and a_bits-bit activations (4 and 4 in PokeBNN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnxscript import script

from bnncc.ops._opset import bnncc_opset, op
from bnncc.ops.quant import ActGrid, QuantConv, act_grid, act_grid_backward, weight_grid

__all__ = ["SEGate", "se_gate"]


@script(bnncc_opset, default_opset=op)
def SEGate(R, W1, bound1, B1, W2, bound2, B2, w_bits: int, a_bits: int):
    g = op.GlobalAveragePool(R)
    h = QuantConv(g, W1, bound1, B1, w_bits=w_bits, a_bits=a_bits, a_signed=1, kernel_shape=[1, 1],
                  strides=[1, 1], pads=[0, 0, 0, 0], group=1)
    h = op.Relu(h)
    h = QuantConv(h, W2, bound2, B2, w_bits=w_bits, a_bits=a_bits, a_signed=0, kernel_shape=[1, 1],
                  strides=[1, 1], pads=[0, 0, 0, 0], group=1)
    return op.HardSigmoid(h, alpha=1.0 / 6.0, beta=0.5)


def _spatial_mean(r: torch.Tensor) -> torch.Tensor:
    """mean over H and W of ``r`` (N, C, H, W), as (N, C)."""
    n, c, h, w = r.shape
    if r.is_contiguous(memory_format=torch.channels_last):
        # NHWC in memory: a reduction over outer axes, vectorized along C
        return r.mean(dim=(2, 3))
    # NCHW: a product with a 1/HW vector; torch's reductions over a short inner axis (2x2 at
    # the last stage) run an unvectorized path, ten times slower than this.
    return (r.reshape(n, c, h * w) @ r.new_full((h * w, 1), 1.0 / (h * w))).reshape(n, c)


class _SEGate(torch.autograd.Function):
    """The gate as one autograd node with its backward written out: on the pooled (N, C)
    vectors every op is small, so the ~25 ops forward and the ~30 of autograd's backward cost
    their dispatch more than their work, 48 times a step. The 1x1 convs are matrix products
    (addmm, as F.linear runs them); gradients are the quantizers' straight-through ones."""

    @staticmethod
    def forward(ctx, r, w1, bound1, b1, w2, bound2, b2, w_bits: int, a_bits: int, quantize_weights: bool):
        def weights(w):
            w = w.flatten(1)
            return weight_grid(w, w_bits) if quantize_weights else w

        w1q, w2q = weights(w1), weights(w2)
        x1, grid1 = act_grid(_spatial_mean(r), bound1, a_bits, signed=1)
        h = torch.relu(torch.addmm(b1, x1, w1q.t()))
        x2, grid2 = act_grid(h, bound2, a_bits, signed=0)
        z = torch.addmm(b2, x2, w2q.t())
        ctx.save_for_backward(w1q, x1, grid1.scaled, grid1.weight, h, w2q, x2, grid2.scaled, grid2.weight, z)
        ctx.windows = (grid1.window, grid2.window)
        ctx.r_shape, ctx.w_shapes = r.shape, (w1.shape, w2.shape)
        return F.hardsigmoid(z)[:, :, None, None]

    @staticmethod
    def backward(ctx, grad):
        w1q, x1, scaled1, weight1, h, w2q, x2, scaled2, weight2, z = ctx.saved_tensors
        window1, window2 = ctx.windows
        dz = torch.ops.aten.hardsigmoid_backward(grad.flatten(1), z)
        dh = act_grid_backward(dz @ w2q, ActGrid(scaled2, weight2, window2))
        dh = torch.ops.aten.threshold_backward(dh, h, 0)  # relu's: where h > 0
        dg = act_grid_backward(dh @ w1q, ActGrid(scaled1, weight1, window1))
        n, c, height, width = ctx.r_shape
        # the mean's gradient, spread over H x W as a broadcast view (autograd adds it to R's other gradients)
        dr = (dg / (height * width))[:, :, None, None].expand(n, c, height, width)
        dw1 = (dh.t() @ x1).reshape(ctx.w_shapes[0])
        dw2 = (dz.t() @ x2).reshape(ctx.w_shapes[1])
        return dr, dw1, None, dh.sum(0), dw2, None, dz.sum(0), None, None, None


def se_gate(r, w1, bound1, b1, w2, bound2, b2, *, w_bits: int, a_bits: int, quantize_weights: bool = True):
    return _SEGate.apply(r, w1, bound1, b1, w2, bound2, b2, w_bits, a_bits, quantize_weights)
