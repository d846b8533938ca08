"""BatchNormalization in training mode on the fused CPU kernels (cpu_kernels.py).

A PokeBNN has two batch norms per PokeConv. On channels-last activations torch's CPU batch norm
reads and writes more than it needs; the kernels take one pass for the statistics and one to
normalise, and two back. Statistics are summed in float blocks, shifted by a sample of each
channel, and added up in double. Semantics are ``F.batch_norm(..., training=True)``'s: normalise
with the biased batch variance, ``running = (1 - momentum) * running + momentum * batch`` with
the unbiased one. Anything the kernels do not run (see cpu_kernels.py) goes to ``F.batch_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bnncc.ops import cpu_kernels

__all__ = ["batch_norm", "batch_norm_train", "kernels_fit"]


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, eps: float, momentum: float, running_mean, running_var, kernels):
        y, mean, var = cpu_kernels.batch_norm_forward(kernels, x, gamma, beta, eps, momentum, running_mean, running_var)
        ctx.save_for_backward(x, gamma, mean, var)
        ctx.eps, ctx.kernels = eps, kernels
        return y

    @staticmethod
    def backward(ctx, grad):
        x, gamma, mean, var = ctx.saved_tensors
        dx, d_gamma, d_beta = cpu_kernels.batch_norm_backward(ctx.kernels, grad, x, gamma, mean, var, ctx.eps)
        return dx, d_gamma, d_beta, None, None, None, None, None


def kernels_fit(x, running_mean, running_var, gamma, beta) -> bool:
    """Whether the training kernels take this batch norm's parameters and statistics (whether they
    take x's layout is ``cpu_kernels.kernels_for``'s to say)."""
    stats_fit = all(s is not None and s.dtype == torch.float32 and s.is_contiguous() for s in (running_mean, running_var))
    return gamma is not None and beta is not None and stats_fit and x.numel() // x.shape[1] >= 2


def batch_norm_train(x, running_mean, running_var, gamma, beta, momentum: float, eps: float) -> torch.Tensor:
    """``F.batch_norm(x, running_mean, running_var, gamma, beta, True, momentum, eps)``."""
    kernels = cpu_kernels.kernels_for(x)
    if kernels is None or not kernels_fit(x, running_mean, running_var, gamma, beta):
        return F.batch_norm(x, running_mean, running_var, gamma, beta, True, momentum, eps)
    return _BatchNorm.apply(x, gamma, beta, eps, momentum, running_mean, running_var, kernels)


def batch_norm(x, scale, bias, mean, var, *, momentum: float, eps: float, training: bool) -> torch.Tensor:
    """ONNX BatchNormalization (its input order) as torch's batch norm: batch statistics and the
    running statistics' update in training (on the kernels where they run)."""
    if training:
        return batch_norm_train(x, mean, var, scale, bias, momentum, eps)
    return F.batch_norm(x, mean, var, scale, bias, False, momentum, eps)
