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
from bnncc.ops.quant import QuantConv, quant_gemm

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


def se_gate(r, w1, bound1, b1, w2, bound2, b2, *, w_bits: int, a_bits: int, quantize_weights: bool = True):
    # On the pooled (N, C) vector the 1x1 convs are matrix products: F.linear is far cheaper than conv2d here.
    common = dict(w_bits=w_bits, a_bits=a_bits, quantize_weights=quantize_weights)
    g = _spatial_mean(r)
    h = F.relu(quant_gemm(g, w1.flatten(1), bound1, b1, a_signed=1, **common))
    h = quant_gemm(h, w2.flatten(1), bound2, b2, a_signed=0, **common)
    return F.hardsigmoid(h)[:, :, None, None]
