"""The comparison rule of ``bnncc verify`` (bnncc/verify.py), on synthetic reference tensors."""

from __future__ import annotations

import numpy as np

from bnncc import verify as v


def _logits(top: int) -> np.ndarray:
    out = np.linspace(0, 0.1, 10).astype(np.float32)
    out[[top, 9]] = out[[9, top]]
    return out


def _binary_input(near_zero: bool) -> np.ndarray:
    x = np.random.default_rng(0).uniform(0.5, 2, (1, 4, 3, 3)).astype(np.float32)
    x[0, 2, 1, 1] = -3.7e-9 if near_zero else -0.4  # ResNet-50, seed 0, input 1: this sign flipped
    return x


def _binary_checks() -> list:
    return [v._Check(1, "near-zero binarization inputs", v._near_zero)]


def test_a_sign_flip_that_moves_the_argmax_is_explained():
    """A BinaryConv input within rounding of 0 flips sign: 96% of the logits move and the argmax
    of an untrained network with nearly tied logits too; that is explained, not failed."""
    report = v.VerifyReport()
    v._compare(report, 0, _logits(3), _logits(9), [_logits(9), _binary_input(True)], _binary_checks())
    assert report.ok and report.explained == 1 and report.argmax_agree == 0


def test_an_argmax_difference_without_a_near_threshold_value_fails():
    report = v.VerifyReport()
    v._compare(report, 0, _logits(3), _logits(9), [_logits(9), _binary_input(False)], _binary_checks())
    assert report.failures == ["input 0: argmax 3 != reference 9 with no near-threshold input"]


def test_inputs_within_tolerance_are_not_explained():
    report = v.VerifyReport()
    ref = _logits(9)
    v._compare(report, 0, ref + 1e-6, ref, [ref, _binary_input(True)], _binary_checks())
    assert report.ok and report.explained == 0 and report.argmax_agree == 1


def test_near_level_counts_only_boundaries_that_change_the_level():
    bound = np.array([2.0, 2.0, 2.0, -1.0])
    s = 7 / 2.0  # int4 signed: 7 levels a side
    # channel 0: at the 0 <-> 1 boundary; 1: mid-level; 2: beyond the clip (7.5 / s); 3: uncalibrated
    x = np.array([[0.5 / s + 1e-9, 1.0 / s, 7.5 / s, 0.5 / s]])
    assert v._near_level(x, bound, 4, signed=True) == 1
    assert v._near_level(x[:, 1:], bound[1:], 4, signed=True) == 0
    # unsigned (16 levels of 2 / 16): 0 is no boundary (relu output: floor(0) = 0 either side),
    # 1 / s_u is one, 16 / s_u is past the clip
    su = 16 / 2.0
    h = np.array([[0.0, 1.0 / su, 16.0 / su, 0.3 / su]])
    assert v._near_level(h, bound, 4, signed=False) == 1
    # distance relative to the tensor's max |x|: 1e-5 * max is near, 1e-4 * max is not
    far = np.array([[0.5 / s + 1e-4 * 2.0, 2.0, 2.0, 0.0]])
    assert v._near_level(far, bound, 4, signed=True) == 0


def test_se_gate_checks_its_pooled_mean_and_hidden_layer():
    """The SE quantizers' inputs are inside the SEGate function; they are recomputed from its input."""
    import onnx_ir as ir

    cin, hidden = 8, 2
    rng = np.random.default_rng(1)
    consts = [rng.uniform(-1, 1, (hidden, cin, 1, 1)), np.full(cin, 2.0), rng.uniform(-1, 1, hidden),
              rng.uniform(-1, 1, (4, hidden, 1, 1)), np.full(hidden, 2.0), np.zeros(4)]
    inputs = [ir.Value(name="r")] + [ir.Value(name=f"c{i}", const_value=ir.tensor(np.asarray(c, np.float32)))
                                     for i, c in enumerate(consts)]
    node = ir.node("SEGate", inputs, {"w_bits": 4, "a_bits": 4}, domain="ai.bnncc")
    count = v._se_counter(node)
    r = rng.uniform(-2, 2, (1, cin, 2, 2))
    r[0, 3] = r[0, 3] - r[0, 3].mean() + 0.5 / 3.5  # channel 3's mean exactly on the 0 <-> 1 boundary
    assert count(r) >= 1
    r[0, 3] += 0.1
    assert count(r) == 0


def test_most_inputs_explained_is_a_systematic_failure():
    """A wrong kernel moves every input; a large network has near-zero binarized values in every
    input, so each would be 'explained': more than half of them explained fails."""
    report = v.VerifyReport()
    for i in range(4):
        v._compare(report, i, _logits(3), _logits(9), [_logits(9), _binary_input(True)], _binary_checks())
    v._check_systematic(report)
    assert report.explained == 4 and len(report.failures) == 1 and "systematic" in report.failures[0]
    report = v.VerifyReport()
    for i in range(8):
        top = 3 if i == 1 else 9
        v._compare(report, i, _logits(top), _logits(9), [_logits(9), _binary_input(True)], _binary_checks())
    v._check_systematic(report)
    assert report.ok and report.explained == 1
