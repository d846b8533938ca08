"""``verify``: a compiled library against onnxruntime running the reference PokeBNN graph.

What may differ, and the rule. The binary convolutions are exact integers in both, but every
float part (BN, shortcuts, pooling, SE, the int8 stem and head on quantized values) sums in a
different order, so values differ by float32 rounding: about 1e-7 relative, seen as ~1e-6 on
logits. A rounding difference only becomes large when a value sits within that rounding of a
decision threshold, where it moves everything after it by a whole quantization step:

- a BinaryConv input within ~1e-6 of 0: its sign, one bit, flips;
- an int-k activation quantizer input within that rounding of a level boundary: the level flips,
  one step of the int8 stem, the int4 SE gate or the int8 head. Boundaries, with s = levels / B_c
  per channel: signed x s + 0.5 = k, for k in (-m, m] (floor(x s + 0.5) changes from k - 1 to k,
  both inside the clip range), m = 2^(a-1) - 1; unsigned x s = k, for k in [1, 2^a - 1].
  Uncalibrated channels (B_c <= 0) pass floats through: no boundary. The library runs the
  quantizer itself with the reference's float32 operations in its order (bnncc.targets.kernels.
  quant.quantize_act), so only a quantizer input that is itself computed differently can flip:
  the stem's second conv input (a conv + BN + DPReLU), the SE gate's pooled mean and its hidden
  layer, the head's pooled mean. The stem's first quantizer reads the network input, identical
  in both, and is not probed: a flip there is a bug.

A flip changes logits by far more than the tolerance and, on an untrained network whose
logits are nearly tied, often the argmax too. So each input passes when the argmax agrees and

    max |logits - reference| <= ATOL + RTOL * max |reference|  (RTOL = 1e-4: ~1000x the rounding);

an input that fails either is "explained" (counted and reported, not failed) when the reference
holds a value within FLIP_RTOL = 1e-5 (relative to the max |x| of its tensor, ~100x the rounding)
of one of the thresholds above, read from onnxruntime with the BinaryConv inputs and the
QuantConv / QuantGemm / SEGate inputs as extra graph outputs (the SE gate's pooled mean and
hidden layer recomputed from its input in float64: the distance to a threshold only needs to be
known to ~1e-5, not to the bit).

Existence of such a value is weak evidence in a large network: ResNet-50 holds millions of
binarized values, some within 1e-12 of 0 in every input, so one is always found, while an actual
flip happens to about one input in ten. What a rounding flip cannot do is hit most inputs, as a
wrong kernel would; so more than MAX_EXPLAINED (a half) of the inputs explained, beyond the first,
is a failure ("systematic").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnncc.errors import BnnccError

__all__ = ["VerifyReport", "verify", "ATOL", "RTOL", "FLIP_RTOL", "MAX_EXPLAINED"]

logger = logging.getLogger(__name__)

ATOL = 1e-5
RTOL = 1e-4
FLIP_RTOL = 1e-5
MAX_EXPLAINED = 0.5  # the most inputs, as a fraction (beyond the first), that may be explained


@dataclass
class VerifyReport:
    """Per input: whether argmax agreed, the largest logit difference, near-zero binarization inputs."""

    inputs: int = 0
    argmax_agree: int = 0
    max_abs_diff: float = 0.0
    max_ref: float = 0.0
    explained: int = 0  # inputs over tolerance or argmax apart, with near-threshold values in the reference
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
    session, input_name, checks = _reference_session(reference)
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n, *library.input_chw)).astype(np.float32)
    if len(images):
        data = np.concatenate([data, np.stack(images).astype(np.float32)])
    report = VerifyReport()
    for start in range(0, len(data), batch):
        x = data[start:start + batch]
        got = library(x)
        for i in range(len(x)):
            outs = session.run(None, {input_name: x[i:i + 1]})
            _compare(report, start + i, got[i], outs[0][0], outs, checks)
    _check_systematic(report)
    return report


@dataclass(frozen=True)
class _Check:
    """Counts the near-threshold values of one reference tensor (session output ``output``)."""

    output: int
    what: str
    count: Callable[[np.ndarray], int]


def _near_zero(x: np.ndarray) -> int:
    """BinaryConv input values within FLIP_RTOL * max|x| of 0 (the sign threshold)."""
    return int((np.abs(x) <= FLIP_RTOL * np.abs(x).max()).sum())


def _levels(bits: int, signed: bool) -> int:
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits


def _near_level(x: np.ndarray, bound: np.ndarray, bits: int, signed: bool) -> int:
    """Activation quantizer inputs x (N, C, ...) within FLIP_RTOL * max|x| of a level boundary that
    changes the quantized value (module docstring), per channel c with bound B_c (<= 0: none)."""
    x = np.asarray(x, np.float64)
    b = np.asarray(bound, np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))
    calibrated = b > 0
    m = _levels(bits, signed)
    s = m / np.where(calibrated, b, 1.0)
    t = x * s + (0.5 if signed else 0.0)
    k = np.round(t)
    moves = (k > -m) & (k <= m) if signed else (k >= 1) & (k <= m - 1)
    near = np.abs(t - k) <= FLIP_RTOL * float(np.abs(x).max()) * s
    return int((near & moves & calibrated).sum())


def _quantize_acts(x: np.ndarray, bound: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """QuantizeActs (bnncc/ops/quant.py) on (N, C) in float64: the level of a value near a boundary
    may be either; such a value is counted by ``_near_level`` anyway."""
    b = np.asarray(bound, np.float64)[None, :]
    m = _levels(bits, signed)
    s = m / np.where(b > 0, b, 1.0)
    q = np.clip(np.floor(x * s + 0.5), -m, m) if signed else np.clip(np.floor(x * s), 0, m - 1)
    return np.where(b > 0, q / s, x)


def _quantize_weights(w: np.ndarray, bits: int) -> np.ndarray:
    """QuantizeWeights (bnncc/ops/quant.py) on W (O, ...) flattened to (O, K), in float32 as the reference."""
    flat = np.asarray(w, np.float32).reshape(w.shape[0], -1)
    m = np.float32(2 ** (bits - 1) - 1)
    peak = np.abs(flat).max(axis=1, keepdims=True)
    s = m / np.where(peak > 0, peak, np.float32(1))
    return np.clip(np.floor(flat * s + np.float32(0.5)), -m, m) / s


def _se_counter(node) -> Callable[[np.ndarray], int]:
    """Near-boundary values of an SEGate's two quantizer inputs, recomputed from its input R
    (N, C, H, W): p = mean_HW(R) (signed), h = relu(QuantConv(p)) (unsigned), as spec.md."""
    w1, bound1, b1, w2, bound2, _ = (np.asarray(v.const_value.numpy()) for v in node.inputs[1:7])
    w_bits, a_bits = node.attributes.get_int("w_bits", 4), node.attributes.get_int("a_bits", 4)
    w1q = _quantize_weights(w1, w_bits).astype(np.float64)

    def count(r: np.ndarray) -> int:
        p = np.asarray(r, np.float64).mean(axis=(2, 3))
        h = np.maximum(_quantize_acts(p, bound1, a_bits, True) @ w1q.T + b1.astype(np.float64), 0.0)
        return _near_level(p, bound1, a_bits, True) + _near_level(h, bound2, a_bits, False)

    return count


def _reference_session(path: Path):
    """onnxruntime on the reference graph, with every tensor ``_Check`` reads as an extra output:
    BinaryConv inputs, QuantConv / QuantGemm inputs other than the graph input, SEGate inputs."""
    import onnx_ir as ir
    import onnxruntime as ort

    from bnncc.ops import attach_functions

    if not path.is_file():
        raise BnnccError(f"{path}: no such reference model")
    model = ir.load(path)
    attach_functions(model)
    graph = model.graph
    probes: list = []
    checks: list[_Check] = []

    def probe(value, what: str, count: Callable[[np.ndarray], int]) -> None:
        if value.is_graph_input() or value.const_value is not None:
            return
        if value.is_graph_output():
            output = list(graph.outputs).index(value)
        else:
            if value not in probes:
                probes.append(value)
            output = len(graph.outputs) + probes.index(value)
        checks.append(_Check(output, what, count))

    for node in graph:
        if node.domain != "ai.bnncc" or not node.inputs:
            continue
        x = node.inputs[0]
        if node.op_type == "BinaryConv":
            probe(x, "near-zero binarization inputs", _near_zero)
        elif node.op_type in ("QuantConv", "QuantGemm"):
            bound = np.asarray(_constant(node, 2))
            bits, signed = node.attributes.get_int("a_bits", 8), bool(node.attributes.get_int("a_signed", 1))
            probe(x, "near-boundary quantizer inputs",
                  lambda v, bound=bound, bits=bits, signed=signed: _near_level(v, bound, bits, signed))
        elif node.op_type == "SEGate":
            if all(v is not None and v.const_value is not None for v in node.inputs[1:7]):
                probe(x, "near-boundary quantizer inputs", _se_counter(node))
    graph.outputs.extend(probes)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session, graph.inputs[0].name, checks


def _constant(node, i: int) -> np.ndarray:
    value = node.inputs[i] if i < len(node.inputs) else None
    if value is None or value.const_value is None:
        raise BnnccError(f"node {node.name!r} ({node.op_type}): input {i} is not a constant initializer")
    return value.const_value.numpy()


def _compare(report: VerifyReport, index: int, got: np.ndarray, ref: np.ndarray, outs: list[np.ndarray],
             checks: list[_Check]) -> None:
    """One input: ``outs`` are the session's outputs (logits first), ``checks`` read the rest."""
    report.inputs += 1
    diff = float(np.abs(got - ref).max())
    report.max_abs_diff = max(report.max_abs_diff, diff)
    report.max_ref = max(report.max_ref, float(np.abs(ref).max()))
    tolerance = ATOL + RTOL * float(np.abs(ref).max())
    same = int(got.argmax()) == int(ref.argmax())
    report.argmax_agree += same
    if same and diff <= tolerance:
        return
    near: dict[str, int] = {}
    for check in checks:
        found = check.count(outs[check.output])
        if found:
            near[check.what] = near.get(check.what, 0) + found
    what = (f"argmax {int(got.argmax())} != reference {int(ref.argmax())}" if not same
            else f"logit difference {diff:.3g} over tolerance {tolerance:.3g}")
    if near:
        report.explained += 1
        logger.info("input %d: %s, explained by %s", index, what,
                    ", ".join(f"{count} {kind}" for kind, count in near.items()))
    else:
        report.failures.append(f"input {index}: {what} with no near-threshold input")


def _check_systematic(report: VerifyReport) -> None:
    """More explained inputs than rounding flips can account for (module docstring) is a failure."""
    allowed = max(1, int(MAX_EXPLAINED * report.inputs))
    if report.explained > allowed:
        report.failures.append(f"{report.explained} of {report.inputs} inputs differ beyond tolerance or in argmax: "
                               f"more than rounding at a threshold explains (at most {allowed}); a systematic "
                               f"difference")
