"""The comparison rule of ``bnncc verify`` (bnncc/verify.py), on synthetic logits."""

from __future__ import annotations

import numpy as np

from bnncc import verify as v


def _logits(top: int) -> np.ndarray:
    out = np.linspace(0, 0.1, 10).astype(np.float32)
    out[[top, 9]] = out[[9, top]]
    return out


def test_inputs_within_tolerance_pass_and_are_not_explained():
    report = v.VerifyReport()
    ref = _logits(9)
    v._compare(report, 0, ref + 1e-6, ref, ref)
    assert report.ok and report.explained == 0 and report.argmax_agree == 1


def test_an_argmax_change_inside_the_rounding_spread_is_explained():
    """Optimized and unoptimized onnxruntime themselves disagree (argmax 9 vs 3): the library's
    argmax 3 differs from the reference no more than the two references differ."""
    report = v.VerifyReport()
    v._compare(report, 0, _logits(3), _logits(9), _logits(3))
    assert report.ok and report.explained == 1 and report.argmax_agree == 0 and report.max_spread > 0


def test_an_argmax_change_where_the_references_agree_fails():
    report = v.VerifyReport()
    ref = _logits(9)
    v._compare(report, 0, _logits(3), ref, ref + 1e-7)
    assert not report.ok and "argmax 3 != reference 9" in report.failures[0]


def test_a_difference_far_beyond_the_spread_fails():
    report = v.VerifyReport()
    ref = _logits(9)
    spread = 1e-3  # over the tolerance (~2e-5), so the network is rounding-sensitive here
    v._compare(report, 0, ref + 5 * spread, ref, ref + spread)
    assert not report.ok and report.explained == 0
    v._compare(report, 1, ref + 3 * spread, ref, ref + spread)
    assert len(report.failures) == 1 and report.explained == 1
