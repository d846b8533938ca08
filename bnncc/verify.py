"""``verify``: a compiled library against onnxruntime running the reference PokeBNN graph.

What may differ, and the rule. The binary convolutions are exact integers in both, but every
float part (BN, shortcuts, pooling, SE, the int8 stem and head on quantized values) sums in a
different order, so values differ by float32 rounding: about 1e-7 relative, seen as ~1e-6 on
logits. A rounding difference only becomes large when a value sits within that rounding of a
quantizer threshold, above all a BinaryConv input within ~1e-6 of 0, whose sign then flips one
bit and moves everything after it by a whole quantization step. So each input passes when

1. the argmax agrees, and
2. max |logits - reference| <= ATOL + RTOL * max |reference|  (RTOL = 1e-4: ~1000x the rounding),
   or, failing that, the reference has BinaryConv inputs with |x| <= FLIP_RTOL * max|x| of their
   tensor (FLIP_RTOL = 1e-5), i.e. a sign flip explains the difference; these inputs are counted
   and reported ("explained") rather than failed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnncc.errors import BnnccError

__all__ = ["VerifyReport", "verify", "ATOL", "RTOL", "FLIP_RTOL"]

logger = logging.getLogger(__name__)

ATOL = 1e-5
RTOL = 1e-4
FLIP_RTOL = 1e-5


@dataclass
class VerifyReport:
    """Per input: whether argmax agreed, the largest logit difference, near-zero binarization inputs."""

    inputs: int = 0
    argmax_agree: int = 0
    max_abs_diff: float = 0.0
    max_ref: float = 0.0
    explained: int = 0  # inputs over tolerance with near-threshold BinaryConv inputs in the reference
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
    session, input_name, probes = _reference_session(reference)
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
            _compare(report, start + i, got[i], outs[0][0], outs[1:])
    return report


def _reference_session(path: Path):
    """onnxruntime on the reference graph, with every BinaryConv input as an extra output (probes)."""
    import onnx_ir as ir
    import onnxruntime as ort

    from bnncc.ops import attach_functions

    if not path.is_file():
        raise BnnccError(f"{path}: no such reference model")
    model = ir.load(path)
    attach_functions(model)
    graph = model.graph
    probes = []
    for node in graph:
        value = node.inputs[0] if node.op_type == "BinaryConv" else None
        if value is not None and value not in probes and not value.is_graph_output():
            probes.append(value)
    graph.outputs.extend(probes)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session, graph.inputs[0].name, probes


def _compare(report: VerifyReport, index: int, got: np.ndarray, ref: np.ndarray, probes: list[np.ndarray]) -> None:
    report.inputs += 1
    diff = float(np.abs(got - ref).max())
    report.max_abs_diff = max(report.max_abs_diff, diff)
    report.max_ref = max(report.max_ref, float(np.abs(ref).max()))
    same = int(got.argmax()) == int(ref.argmax())
    report.argmax_agree += same
    if not same:
        report.failures.append(f"input {index}: argmax {int(got.argmax())} != reference {int(ref.argmax())}")
        return
    if diff <= ATOL + RTOL * float(np.abs(ref).max()):
        return
    near = sum(int((np.abs(p) <= FLIP_RTOL * np.abs(p).max()).sum()) for p in probes)
    if near:
        report.explained += 1
        logger.info("input %d: logit difference %.3g explained by %d near-zero binarization inputs", index, diff, near)
    else:
        report.failures.append(f"input {index}: logit difference {diff:.3g} over tolerance "
                               f"{ATOL + RTOL * float(np.abs(ref).max()):.3g} with no near-threshold input")
