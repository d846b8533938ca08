"""BinarizeAct: activations to +-B/2, and the straight-through estimators shared by binary ops.

Forward::

    y = +B/2  if x >= 0        (sign(0) = +1, unlike ONNX Sign and torch.sign)
        -B/2  otherwise

Backward (straight-through, clipped at the bound B)::

    dy/dx = 1  if |x| < B
            0  otherwise

Binary weights, per output channel o with scale s_o = max|W[o]| / 2::

    Wq[o] = s_o * (+1 if W[o] >= 0 else -1),    dWq/dW = 1 (s_o is stop-gradient)
"""

from __future__ import annotations

import torch
from onnxscript import script

from bnncc.ops._opset import bnncc_opset, op

__all__ = ["BinarizeAct", "binarize_act", "binarize_weights"]


@script(bnncc_opset, default_opset=op)
def BinarizeAct(X, clip_bound: float = 3.0):
    half = op.CastLike(op.Constant(value_float=clip_bound), X) * op.CastLike(0.5, X)
    return op.Where(X >= op.CastLike(0.0, X), half, op.Neg(half))


class _SteBinarize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, clip_bound: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip_bound = clip_bound
        half = 0.5 * clip_bound
        return torch.where(x >= 0, torch.full_like(x, half), torch.full_like(x, -half))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() < ctx.clip_bound).to(grad.dtype), None


def binarize_act(x: torch.Tensor, clip_bound: float = 3.0) -> torch.Tensor:
    """Torch BinarizeAct with the clipped straight-through gradient."""
    return _SteBinarize.apply(x, float(clip_bound))


def binarize_weights(w: torch.Tensor) -> torch.Tensor:
    """sign(W) * max|W[o]|/2 per output channel (axis 0), gradient 1 (straight through)."""
    scale = w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) * 0.5
    wq = torch.where(w.detach() >= 0, scale, -scale)
    return w + (wq - w).detach()
