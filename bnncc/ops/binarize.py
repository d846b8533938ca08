"""BinarizeAct: activations to +-B/2, and the straight-through estimators shared by binary ops.

Forward::

    y = +B/2  if x >= 0        (sign(0) = +1, unlike ONNX Sign and torch.sign)
        -B/2  otherwise

Backward (straight-through, clipped at the bound B)::

    dy/dx = 1  if |x| < B
            0  otherwise

Binary weights, per output channel o with scale s_o = max|W[o]| / 2 (stop-gradient)::

    Wq[o] = s_o * (+1 if W[o] >= 0 else -1)
    dWq/dW = 1  if |W| < (1 - 2^-7) max|W[o]|
             0  otherwise (the largest weights of the channel, its maximum included)

AQT's half-shift quantizer clips W / max|W[o]| to +-(1 - 2^-7) before its floor (pokebnn.md §4:
"the max-magnitude element is clipped, so its gradient is 0").
"""

from __future__ import annotations

import torch
from onnxscript import script

from bnncc.domain import DEFAULT_CLIP_BOUND
from bnncc.ops import checks, cpu_kernels
from bnncc.ops._opset import bnncc_opset, op
from bnncc.ops.counting import per_output
from bnncc.ops.registry import OpDef, register

__all__ = ["BinarizeAct", "binarize_act", "binarize_weights", "straight_through"]

WEIGHT_CLIP = 1 - 2**-7  # the binary weights' clip, a share of max|W[o]|: the weights' STE window


@script(bnncc_opset, default_opset=op)
def BinarizeAct(X, clip_bound: float = DEFAULT_CLIP_BOUND):
    half = op.CastLike(op.Constant(value_float=clip_bound), X) * op.CastLike(0.5, X)
    return op.Where(X >= op.CastLike(0.0, X), half, op.Neg(half))


class _StraightThrough(torch.autograd.Function):
    """Value ``q`` exactly; gradient to ``x`` is the incoming one.

    One node instead of ``x + (q - x).detach()``, which costs three ops and can round q by an ulp.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` (computed without gradient from x) with the straight-through gradient to ``x``."""
    return _StraightThrough.apply(x, q.detach())


class _BinarizeAct(torch.autograd.Function):
    """Written with copysign and hardtanh's backward, never a bool tensor: torch's CPU compares
    and where() are unvectorized, and this op runs on every binary conv's input (25x faster)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip_bound: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip_bound = clip_bound
        ctx.kernels = cpu_kernels.kernels_for(x)
        if ctx.kernels is not None:  # one pass instead of two
            return cpu_kernels.binarize_acts(ctx.kernels, x, clip_bound)
        # x + 0.0 turns -0.0 into +0.0, so zero of either sign gives +B/2, as x >= 0 does
        return torch.copysign(x.new_full((), 0.5 * clip_bound), x + 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        if ctx.kernels is not None:
            return cpu_kernels.binarize_acts_backward(ctx.kernels, grad, x, ctx.clip_bound), None
        # hardtanh's gradient is exactly the clipped STE: grad where -B < x < B, else 0
        return torch.ops.aten.hardtanh_backward(grad, x, -ctx.clip_bound, ctx.clip_bound), None


def binarize_act(x: torch.Tensor, clip_bound: float = DEFAULT_CLIP_BOUND) -> torch.Tensor:
    """Torch BinarizeAct with the clipped straight-through gradient."""
    return _BinarizeAct.apply(x, float(clip_bound))


class _BinarizeWeights(torch.autograd.Function):
    """Written with hardtanh's backward, as _BinarizeAct: a mask of the weights made in the forward (a
    compare, a cast and a product, kept to the backward) took a PokeBNN-1x step at 64 px (batch 16) from
    0.56-0.58 s of CPU to 0.65-0.75 s; this one takes 0.58-0.63 s."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        kernels = cpu_kernels.weight_kernels_for(w)
        if kernels is not None:
            wq = cpu_kernels.binarize_weights(kernels, w)
        else:
            scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) * 0.5
            # copysign rather than where(w >= 0, ...), as in _BinarizeAct: where() is unvectorized
            # (6 ms a step over the 48 binary convs' weights); w + 0.0 makes -0.0 count as positive
            wq = torch.copysign(scale, w + 0.0)
        # |Wq| is max|W[o]| / 2 throughout channel o: its first weight gives the channel's clip
        first = wq[(slice(None), *[slice(0, 1)] * (w.dim() - 1))]
        ctx.save_for_backward(w, first.abs() * (2 * WEIGHT_CLIP))
        return wq

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, clip = ctx.saved_tensors
        # grad where -1 < W / clip < 1, else 0; an all-zero channel (clip 0: 0 / 0 is NaN, which hardtanh's
        # backward passes) keeps its gradient, having no scale to clip to
        return torch.ops.aten.hardtanh_backward(grad, w / clip, -1.0, 1.0)


def binarize_weights(w: torch.Tensor) -> torch.Tensor:
    """sign(W) * max|W[o]|/2 per output channel (axis 0), straight through but for the weights
    at or beyond WEIGHT_CLIP of their channel's maximum (gradient 0)."""
    return _BinarizeWeights.apply(w)


OP = register(OpDef("BinarizeAct", (BinarizeAct,), torch=binarize_act, sops=per_output("binarize"),
                    check=lambda node: checks.positive_attribute(node, "clip_bound", DEFAULT_CLIP_BOUND)))
