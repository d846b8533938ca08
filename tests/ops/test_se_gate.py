import numpy as np
import torch

from bnncc.ops import TORCH_OPS

from opsref import run_onnx
from test_quant import quant_acts_np, quant_weights_np


def test_se_gate_matches_numpy_and_is_a_hard_sigmoid_gate():
    rng = np.random.default_rng(5)
    ci, co = 64, 48
    r = rng.standard_normal((2, ci, 5, 5)).astype(np.float32)
    w1 = rng.standard_normal((ci // 8, ci, 1, 1)).astype(np.float32)
    b1 = rng.standard_normal(ci // 8).astype(np.float32)
    w2 = rng.standard_normal((co, ci // 8, 1, 1)).astype(np.float32)
    b2 = rng.standard_normal(co).astype(np.float32)
    bound1 = np.full(ci, 0.6, dtype=np.float32)
    bound2 = np.full(ci // 8, 4.0, dtype=np.float32)
    g = r.mean(axis=(2, 3))
    h = quant_acts_np(g, bound1, 4, 1) @ quant_weights_np(w1[:, :, 0, 0], 4).T + b1
    h = np.maximum(h, 0)
    h = quant_acts_np(h, bound2, 4, 0) @ quant_weights_np(w2[:, :, 0, 0], 4).T + b2
    expected = (np.clip(h + 3, 0, 6) / 6)[:, :, None, None]
    inputs = [r, w1, bound1, b1, w2, bound2, b2]
    got = run_onnx("SEGate", inputs, w_bits=4, a_bits=4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for layout in (torch.contiguous_format, torch.channels_last):  # the trainer's format is channels_last
        tensors = [torch.tensor(a, requires_grad=a.ndim > 1 or a is b1 or a is b2) for a in inputs]
        tensors[0] = tensors[0].contiguous(memory_format=layout)
        got_t = TORCH_OPS["SEGate"](*tensors, w_bits=4, a_bits=4)
        np.testing.assert_allclose(got_t.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert got.min() >= 0 and got.max() <= 1
