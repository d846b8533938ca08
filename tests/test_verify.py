"""The comparison rule of ``bnncc verify`` (bnncc.verification.judge), on synthetic logits."""

from __future__ import annotations

import numpy as np

from bnncc import verification as v


def _logits(top: int) -> np.ndarray:
    out = np.linspace(0, 0.1, 10).astype(np.float32)
    out[[top, 9]] = out[[9, top]]
    return out


def test_inputs_within_tolerance_pass_and_are_not_explained():
    ref = _logits(9)
    report = v.judge([(ref + 1e-6, ref, ref)])
    assert report.ok and report.explained == 0 and report.argmax_agree == 1 and report.inputs == 1


def test_an_argmax_change_inside_the_networks_rounding_spread_is_explained():
    """Optimized and unoptimized onnxruntime disagree on input 1 (argmax 9 vs 3), so the network is
    that sensitive to rounding: the library's argmax change on input 0, where the two happen to
    agree, is no larger than that and is explained."""
    ref = _logits(9)
    report = v.judge([(_logits(3), ref, ref), (ref, ref, _logits(3))])
    assert report.ok and report.explained == 1 and report.argmax_agree == 1 and report.max_spread > 0


def test_an_argmax_change_where_the_references_always_agree_fails():
    ref = _logits(9)
    report = v.judge([(_logits(3), ref, ref + 1e-7), (ref, ref, ref)])
    assert not report.ok and "argmax 3 != reference 9" in report.failures[0]


def test_a_difference_far_beyond_the_spread_fails():
    ref = _logits(9)
    spread = 1e-3  # over the tolerance (~2e-5): the network is rounding-sensitive
    report = v.judge([(ref + 5 * spread, ref, ref + spread), (ref + 3 * spread, ref, ref)])
    assert len(report.failures) == 1 and "input 0" in report.failures[0] and report.explained == 1


def test_a_moved_input_run_far_off_makes_the_spread():
    """The other runs stacked (unoptimized, then the moved inputs): one moved run that jumps, as on
    an input on a knife edge, sets the network's spread, and the library's difference on another
    input, where every run agreed, is explained by it."""
    ref = _logits(9)
    others = np.stack([ref, ref + 1e-7, ref + 2e-3, ref])
    report = v.judge([(ref + 5e-3, ref, np.stack([ref] * 4)), (ref, ref, others)])
    assert report.ok and report.explained == 1 and abs(report.max_spread - 2e-3) < 1e-6
    assert not v.judge([(ref + 5e-3, ref, np.stack([ref] * 4)), (ref, ref, np.stack([ref] * 4))]).ok
