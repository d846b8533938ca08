import numpy as np
import pytest
import torch

from bnncc.ops import OPS

from opsref import run_onnx, same_pads_np


def match_np(r, co, method):
    n, ci, h, w = r.shape
    out = np.zeros((n, co, h, w), dtype=np.float64)
    if ci >= co:
        k = ci // co
        for c in range(co):
            out[:, c] = r[:, c * k:(c + 1) * k].mean(axis=1)
    else:
        for c in range(co):
            if method == "tile":
                out[:, c] = r[:, c % ci]
            elif c < ci:
                out[:, c] = r[:, c]
    return out


def pool_np(r):
    n, c, h, w = r.shape
    top, _ = same_pads_np(h, 3, 2)
    left, _ = same_pads_np(w, 3, 2)
    ho, wo = -(-h // 2), -(-w // 2)
    out = np.zeros((n, c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            rows = [i * 2 - top + d for d in range(3) if 0 <= i * 2 - top + d < h]
            cols = [j * 2 - left + d for d in range(3) if 0 <= j * 2 - left + d < w]
            out[:, :, i, j] = r[:, :, rows][:, :, :, cols].sum(axis=(2, 3)) / 9.0  # pads counted
    return out


@pytest.mark.parametrize("ci,co,method,h,ho", [
    (96, 40, "zeropad", 5, 5),   # shrink by 2.4: k=2, channels 80..95 dropped
    (64, 64, "tile", 6, 6),      # identity
    (40, 96, "zeropad", 5, 5),   # expand by a non-integer ratio with zeros
    (64, 356, "tile", 4, 4),     # tile by a non-integer ratio (1.4x stage 1)
    (64, 256, "tile", 8, 4),     # tile then pool on an even size
    (256, 128, "zeropad", 7, 4), # shrink then pool on an odd size
])
def test_reshape_add_matches_numpy(ci, co, method, h, ho):
    rng = np.random.default_rng(ci + co)
    r = rng.standard_normal((2, ci, h, h)).astype(np.float32)
    y = rng.standard_normal((2, co, ho, ho)).astype(np.float32)
    matched = match_np(r, co, method)
    if ho != h:
        matched = pool_np(matched)
    expected = (y + matched).astype(np.float32)
    np.testing.assert_allclose(run_onnx("ReshapeAdd", [y, r], method=method), expected, rtol=1e-5, atol=1e-5)
    got = OPS["ReshapeAdd"].torch(torch.from_numpy(y), torch.from_numpy(r), method=method).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_shortcut_of_another_width_alone_is_pooled():
    """A flat input's height reaches 1 while its width still halves: the ONNX function compared
    heights only, and its reshape to the output's shape failed."""
    rng = np.random.default_rng(1)
    r = rng.standard_normal((2, 8, 1, 4)).astype(np.float32)
    y = rng.standard_normal((2, 8, 1, 2)).astype(np.float32)
    expected = (y + pool_np(r)).astype(np.float32)
    np.testing.assert_allclose(run_onnx("ReshapeAdd", [y, r], method="tile"), expected, rtol=1e-5, atol=1e-5)
    got = OPS["ReshapeAdd"].torch(torch.from_numpy(y), torch.from_numpy(r), method="tile").numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ci,co,method,h,ho", [
    (10, 4, "zeropad", 3, 3),   # k=2, channels 8..9 dropped
    (12, 3, "zeropad", 4, 2),   # k=4, then pool
    (3, 7, "tile", 3, 3),       # two blocks and a partial one
    (2, 6, "tile", 4, 2),       # three blocks, after the pool
    (3, 7, "zeropad", 4, 2),
    (5, 5, "tile", 2, 2),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reshape_add_backward_matches_finite_differences(ci, co, method, h, ho, channels_last):
    gen = torch.Generator().manual_seed(ci * co)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.randn(2, co, ho, ho, dtype=torch.float64, generator=gen).contiguous(memory_format=layout)
    r = torch.randn(2, ci, h, h, dtype=torch.float64, generator=gen).contiguous(memory_format=layout)
    y.requires_grad_()
    r.requires_grad_()
    assert torch.autograd.gradcheck(lambda y, r: OPS["ReshapeAdd"].torch(y, r, method=method), (y, r))
