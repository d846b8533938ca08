"""``verify``: a compiled library against onnxruntime running the reference PokeBNN graph.

What may differ, and the rule. The library and onnxruntime sum every float part (the binary
convs' scales and BN, shortcuts, pooling, SE, the int8 stem and head) in different orders, so
values differ by float32 rounding, ~1e-7 relative. A binarized network amplifies some of that:
a value within rounding of a decision threshold (a BinaryConv input at 0, an int-k quantizer
input at a level boundary) flips one bit or one level, which moves everything after it. How
much depends on the network. A small one, or a trained one whose activations keep away from
the thresholds, agrees to ~1e-6; an untrained ResNet-50 does not even agree with itself:
onnxruntime with and without its graph optimizations (which fuse and reorder the same float
operations) gives logits 0.15-0.19 apart, argmax different on 2 of 4 inputs (PokeBNN-1x from
torchvision's untrained ResNet-50, 224 px, logits up to 1.5).

So each input is also run by onnxruntime unoptimized, and optimized on PERTURBATIONS copies of
the input moved by MOVE relative noise (8 float32 roundings: a sum in another order, as the
library's are, differs by a few): the largest distance of these runs from the reference, the
*rounding spread*, measures how sensitive this network is. The moved copies find the inputs near
a threshold that the two orders of evaluation happen to agree on: an untrained ResNet-18 cut after
its third stage agreed with the library to 2e-6 on 63 of 64 inputs, and on the 64th by 6.2e-3,
as far as onnxruntime moves its own logits there when the input moves by 1e-7 (in 5 of 30 tries;
by 1e-6, 21 of 30). A single input's spread is a noisy measure (a flip is a chance event: every
run may happen to agree on an input where the library flips one bit), so the network's spread is
the largest over all inputs. An input passes when the library's argmax equals the reference's and

    max |logits - reference| <= ATOL + RTOL * max |reference|  (RTOL = 1e-4: ~1000x the rounding);

otherwise it is *explained* (counted and reported, not failed) when the network's spread itself
exceeds that tolerance and the library is within SPREAD_FACTOR (4) times it: the library then
differs from the reference no more than two float32 evaluations of the same graph differ from
each other. Anything else fails: a wrong kernel gives differences on a network whose spread is
small, or far beyond it. A bug small enough to hide inside a large spread is the per-kernel
tests' to find (tests/targets), which compare each kernel with numpy exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnncc.errors import BnnccError

__all__ = ["VerifyReport", "verify", "judge", "ATOL", "RTOL", "SPREAD_FACTOR", "PERTURBATIONS", "MOVE"]

logger = logging.getLogger(__name__)

ATOL = 1e-5
RTOL = 1e-4
SPREAD_FACTOR = 4.0
PERTURBATIONS = 3
MOVE = 8 * float(np.finfo(np.float32).eps)


@dataclass
class VerifyReport:
    """Argmax agreement and the largest logit differences over all inputs."""

    inputs: int = 0
    argmax_agree: int = 0
    max_abs_diff: float = 0.0
    max_ref: float = 0.0
    max_spread: float = 0.0  # largest distance of onnxruntime's other runs (unoptimized, moved inputs) from its reference
    explained: int = 0  # inputs over tolerance or argmax apart, but within SPREAD_FACTOR x the spread
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def verify(folder: str | os.PathLike, reference: str | os.PathLike | None = None, *, n: int = 8, batch: int = 1,
           images: list[np.ndarray] = (), seed: int = 0) -> VerifyReport:
    """Run the library in ``folder`` on ``n`` random N(0, 1) inputs (plus ``images``, NCHW) in batches of
    ``batch`` and compare each with onnxruntime on ``reference`` (default: folder/model.onnx)."""
    from bnncc.runtime import load

    library = load(folder)
    reference = Path(reference) if reference is not None else Path(folder) / "model.onnx"
    optimized, unoptimized, input_name = _reference_sessions(reference)
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n, *library.input_chw)).astype(np.float32)
    if len(images):
        data = np.concatenate([data, np.stack(images).astype(np.float32)])
    runs = []
    for start in range(0, len(data), batch):
        x = data[start:start + batch]
        got = library(x)
        for i in range(len(x)):
            image = x[i:i + 1]
            moved = [(image * (1 + MOVE * rng.standard_normal(image.shape))).astype(np.float32)
                     for _ in range(PERTURBATIONS)]
            others = [unoptimized.run(None, {input_name: image})[0][0],
                      *(optimized.run(None, {input_name: m})[0][0] for m in moved)]
            runs.append((got[i], optimized.run(None, {input_name: image})[0][0], np.stack(others)))
    return judge(runs)


def _reference_sessions(path: Path):
    """onnxruntime on the reference graph with all graph optimizations and with none."""
    import onnx_ir as ir
    import onnxruntime as ort

    from bnncc import frontend
    from bnncc.ops import attach_functions

    if not path.is_file():
        raise BnnccError(f"{path}: no such reference model")
    model = frontend.read(path)
    attach_functions(model)
    serialized = ir.to_proto(model).SerializeToString()
    sessions = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = level
        sessions.append(ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"]))
    return sessions[0], sessions[1], model.graph.inputs[0].name


def judge(runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> VerifyReport:
    """The rule (module docstring) over (library, reference, other reference runs) logits per input:
    the other runs one array of logits, or several stacked."""
    report = VerifyReport(inputs=len(runs))
    report.max_spread = max((float(np.abs(alt - ref).max()) for _, ref, alt in runs), default=0.0)
    for index, (got, ref, _) in enumerate(runs):
        diff = float(np.abs(got - ref).max())
        report.max_abs_diff = max(report.max_abs_diff, diff)
        report.max_ref = max(report.max_ref, float(np.abs(ref).max()))
        tolerance = ATOL + RTOL * float(np.abs(ref).max())
        same = int(got.argmax()) == int(ref.argmax())
        report.argmax_agree += same
        if same and diff <= tolerance:
            continue
        what = (f"argmax {int(got.argmax())} != reference {int(ref.argmax())}" if not same
                else f"logit difference {diff:.3g} over tolerance {tolerance:.3g}")
        if report.max_spread > tolerance and diff <= SPREAD_FACTOR * report.max_spread:
            report.explained += 1
            logger.info("input %d: %s, within %g x the rounding spread %.3g", index, what, SPREAD_FACTOR,
                        report.max_spread)
        else:
            report.failures.append(f"input {index}: {what}; difference {diff:.3g}, rounding spread "
                                   f"{report.max_spread:.3g} (tolerance {tolerance:.3g})")
    return report
