"""DPReLU: a PReLU with learned slopes on both sides and learned shifts, per channel (axis 1).

    t = x - bias_x
    y = (pos_slope if t >= 0 else neg_slope) * t - bias_y

Initialised bias_x = bias_y = 0, pos_slope = 1, neg_slope = 0.25 (pokebnn.md section 2).
"""

from __future__ import annotations

import torch
from onnxscript import script

from bnncc.ops._opset import bnncc_opset, op

__all__ = ["DPReLU", "dprelu"]


@script(bnncc_opset, default_opset=op)
def DPReLU(X, bias_x, bias_y, pos_slope, neg_slope):
    axes = op.Constant(value_ints=[0, 2, 3])
    t = X - op.Unsqueeze(bias_x, axes)
    slope = op.Where(t >= op.CastLike(0.0, X), op.Unsqueeze(pos_slope, axes), op.Unsqueeze(neg_slope, axes))
    return slope * t - op.Unsqueeze(bias_y, axes)


def dprelu(x, bias_x, bias_y, pos_slope, neg_slope) -> torch.Tensor:
    def per_channel(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(1, -1, 1, 1)

    t = x - per_channel(bias_x)
    return torch.where(t >= 0, per_channel(pos_slope), per_channel(neg_slope)) * t - per_channel(bias_y)
