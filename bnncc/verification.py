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

So each input is also run by onnxruntime unoptimized, on a copy of the graph whose folded
parameters (FOLDED) are moved by PARAMETER_MOVE relative noise, and on PERTURBATIONS copies of the
input moved by MOVE (8 float32 roundings: a sum in another order, as the library's are, differs by
a few): the largest distance of these runs from the reference, the *rounding spread*, measures how
sensitive this network is. The moved parameters stand for the library's folding of batch norms,
slopes and the binary weights' scales into other constants: a value after a binary conv is an
exact count times such constants, which no moved input changes, and one that cancels to within a
rounding of 0 (8.4e-9 from terms of 0.1, in an untrained PokeBNN-0.5x) took the other sign in the
library and moved its logits by 0.019, where the spread of the unoptimized and moved-input runs was
2e-8. The library folds a batch norm into a scale and a shift, a rounding or two each, so the
parameters move by 2 roundings, and the int-k quantizers' weights and bounds not at all: the library
quantizes to the same levels, so a level flipped by moving them is one it never flips. (Every float
parameter moved by 8 roundings widened a small network's spread from 2.3e-5 to 0.051, where the
library agreed with the reference to 3.8e-5 on 30 inputs; 2 roundings of the folded ones alone left
it at 2.3e-5 and still explained the PokeBNN-0.5x input.) The moved copies find the inputs near
a threshold that the two orders of evaluation happen to agree on: an untrained ResNet-18 cut after
its third stage agreed with the library to 2e-6 on 63 of 64 inputs, and on the 64th by 6.2e-3,
as far as onnxruntime moves its own logits there when the input moves by 1e-7 (in 5 of 30 tries;
by 1e-6, 21 of 30). A single input's spread is a noisy measure (a flip is a chance event: every
run may happen to agree on an input where the library flips one bit), so the network's spread is
the largest over all inputs. An input passes when the library's argmax equals the reference's and

    max |logits - reference| <= ATOL + RTOL * max |reference|  (RTOL = 1e-4: ~1000x the rounding);

otherwise it is *explained* (counted and reported, not failed) when the network's spread itself
exceeds that tolerance, the library is within SPREAD_FACTOR (4) times it, and the library's logits
are related to the reference's: the library then differs from the reference no more than two
float32 evaluations of the same graph differ from each other. Related means a root-mean-square
distance from the reference of at most half that of unrelated logits, or at most RMS_FACTOR (2)
times the largest root-mean-square distance of onnxruntime's other runs from theirs, whichever is
larger (so a network of one or two classes, whose every argmax change is as far as unrelated
logits, is judged by its own runs). Unrelated logits of the same values, the reference's with the
classes shuffled, lie sqrt(2) x its standard deviation away (the root of the mean square over all
shuffles). That condition is for the networks whose spread is as large as their logits (untrained
ResNets of 50 layers and more at 64 px: spread 0.45-0.72 in logits up to 1.7), where 4x the spread
let a library compiled from another network pass: measured at 16 inputs, the right library lay
0.12-0.45 standard deviations from the reference (onnxruntime's other runs up to 0.46), and at most
1.02 times the largest distance of those runs; another network's 1.40-1.49 standard deviations and
3.1-4.5 times. Anything else fails: a wrong kernel gives differences on a network whose spread is
small, or far beyond it. A bug small enough to hide inside a large spread is the per-kernel
tests' to find (tests/targets), which compare each kernel with numpy exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnncc.domain import DEFAULT_DOMAINS, DOMAIN
from bnncc.errors import BnnccError
from bnncc.ops import poke_conv as poke

__all__ = ["VerifyReport", "verify", "judge", "ATOL", "RTOL", "SPREAD_FACTOR", "RMS_FACTOR", "UNRELATED",
           "PERTURBATIONS", "MOVE", "PARAMETER_MOVE", "FOLDED", "MAX_INPUTS"]

logger = logging.getLogger(__name__)

ATOL = 1e-5
RTOL = 1e-4
SPREAD_FACTOR = 4.0
RMS_FACTOR = 2.0
# the root mean square distance between logits and the same logits with the classes shuffled, in
# their standard deviations (the root of the mean square over all shuffles)
UNRELATED = float(np.sqrt(2))
PERTURBATIONS = 3
MOVE = 8 * float(np.finfo(np.float32).eps)
PARAMETER_MOVE = 2 * float(np.finfo(np.float32).eps)
# The float parameters the library folds into other constants (bnncc.targets.lower), by (domain, op) and input
# position: batch norms, DPReLU, the binary weights (their scale max|W|/2), the biases after an int-k product
FOLDED = {
    ("", "BatchNormalization"): range(1, 5), (DOMAIN, "DPReLU"): range(1, 5), (DOMAIN, "BinaryConv"): (1,),
    (DOMAIN, "PokeConv"): (1, *range(poke.BN.start, poke.DPRELU.stop), poke.SE[3], poke.SE[6],
                           *range(poke.SPLIT.start, poke.SPLIT.stop)),
    (DOMAIN, "QuantConv"): (3,), (DOMAIN, "QuantGemm"): (3,), (DOMAIN, "SEGate"): (3, 6),
}
# Each input costs 3 + PERTURBATIONS onnxruntime runs besides the library's: 0.7-1.1 s on a 224 px
# ResNet-50 PokeBNN (onnxruntime 0.15-0.25 s a run, the library 0.04 s; 2 cores), so this many take
# some 18 minutes there, under a progress bar; --n 10000 on a 64 px network ran for over 15 minutes
# without a word, holding every input in memory.
MAX_INPUTS = 1000
SECONDS_PER_INPUT_R50 = 1.1


@dataclass
class VerifyReport:
    """Argmax agreement and the largest logit differences over all inputs."""

    inputs: int = 0
    argmax_agree: int = 0
    max_abs_diff: float = 0.0
    max_ref: float = 0.0
    # largest distance of onnxruntime's other runs (unoptimized, moved parameters, moved inputs) from its reference
    max_spread: float = 0.0
    explained: int = 0  # inputs over tolerance or argmax apart, but within the spread and related (module docstring)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def verify(folder: str | os.PathLike, reference: str | os.PathLike | None = None, *, n: int = 8, batch: int = 1,
           images: list[np.ndarray] = (), seed: int = 0, show_progress: bool = False) -> VerifyReport:
    """Run the library in ``folder`` on ``n`` random N(0, 1) inputs (plus ``images``, each CHW) in batches of
    ``batch`` and compare each with onnxruntime on ``reference`` (default: folder/model.onnx), which
    must be the PokeBNN graph the library was compiled from. ``show_progress``: a progress bar on stderr.

    Each batch's random inputs are drawn when it is due, so memory does not grow with ``n``; they
    are the same inputs for the same seed whatever ``batch`` is. The moved copies of the inputs
    come from a second stream seeded from ``seed``."""
    from bnncc.runtime import load

    # the command's options refuse these; from Python, a negative n or batch drew no input and the
    # report of nothing compared said ok, and batch 0 failed in range()
    if n < 0 or batch < 1 or n + len(images) == 0:
        raise BnnccError(f"n = {n}, batch = {batch}, {len(images)} images: verify needs n >= 0, batch >= 1 and "
                         f"at least one input")
    if n > MAX_INPUTS:
        raise BnnccError(f"{n} random inputs: at most {MAX_INPUTS}; each takes {3 + PERTURBATIONS} onnxruntime runs "
                         f"(the reference and its rounding spread), ~{SECONDS_PER_INPUT_R50:g} s on a 224 px ResNet-50, "
                         f"so {MAX_INPUTS} already take ~{MAX_INPUTS * SECONDS_PER_INPUT_R50 / 60:.0f} minutes")
    library = load(folder)
    for i, image in enumerate(images):  # another shape failed inside numpy, joining it to the batch
        if tuple(np.shape(image)) != library.input_chw:
            raise BnnccError(f"image {i} of shape {tuple(np.shape(image))}; verify takes each image as "
                             f"(C, H, W) = {library.input_chw}")
    reference = Path(reference) if reference is not None else Path(folder) / "model.onnx"
    model = _read_reference(reference)
    _check_fits(model, reference, library)
    optimized, *others = _sessions(model)
    input_name = model.graph.inputs[0].name
    input_rng, move_rng = np.random.default_rng(seed), np.random.default_rng((seed, 1))
    runs = []
    with _progress(show_progress) as progress:
        task = progress.add_task("verify", total=n + len(images))
        for x in _batches(input_rng, n, library.input_chw, images, batch):
            got = library(x)
            for i in range(len(x)):
                ref, alternatives = _reference_runs(optimized, others, input_name, x[i:i + 1], move_rng)
                if ref.shape != got[i].shape:  # a reference that declares no number of logits (_check_fits)
                    raise BnnccError(f"{reference} gives {ref.size} logits, the library {library.folder} "
                                     f"{got[i].size}; the reference must be the PokeBNN graph the library was "
                                     f"compiled from ({library.folder / 'model.onnx'})")
                runs.append((got[i], ref, alternatives))
                progress.advance(task)
    return judge(runs)


def _reference_runs(optimized, others: list, name: str, image: np.ndarray, moves: np.random.Generator):
    """onnxruntime's logits for one input (1, C, H, W): the reference, and the other runs stacked
    (the ``others`` sessions of ``_sessions``, then the reference's on PERTURBATIONS copies moved by
    MOVE relative noise)."""
    moved = [(image * (1 + MOVE * moves.standard_normal(image.shape))).astype(np.float32)
             for _ in range(PERTURBATIONS)]
    runs = [*(session.run(None, {name: image})[0][0] for session in others),
            *(optimized.run(None, {name: m})[0][0] for m in moved)]
    return optimized.run(None, {name: image})[0][0], np.stack(runs)


def _batches(rng: np.random.Generator, n: int, chw: tuple[int, ...], images, batch: int):
    """The ``n`` random inputs, then ``images``, ``batch`` at a time (float32 NCHW); the random ones
    drawn batch by batch, which gives the same values as drawing all ``n`` at once."""
    total = n + len(images)
    for start in range(0, total, batch):
        stop = min(start + batch, total)
        drawn = rng.standard_normal((max(0, min(stop, n) - start), *chw)).astype(np.float32)
        given = [np.asarray(images[i - n], np.float32) for i in range(max(start, n), stop)]
        yield np.concatenate([drawn, np.stack(given)]) if given else drawn


def _progress(show: bool):
    """A bar on a terminal's stderr, as training draws one (stdout keeps the result lines)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from bnncc.progress import bar_console

    console = bar_console()
    return Progress(TextColumn("[bold]verify"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=console is None or not show, transient=False)


def _read_reference(path: Path):
    """The reference graph at ``path``: a PokeBNN graph, as the library was compiled from one. A
    float model is refused: a binarized network differs from its float original by far more than
    any kernel bug, so comparing with it checks nothing."""
    from bnncc.frontend import read_pokebnn

    return read_pokebnn(path, "verify")


def _check_fits(model, path: Path, library) -> None:
    """The reference takes the library's input (C, H, W), one image at a time as verify runs it, and
    gives its number of logits: another graph would fail inside onnxruntime or the comparison."""
    shape = model.graph.inputs[0].shape
    dims = tuple(d if isinstance(d, int) else "N" for d in shape)
    classes = model.graph.outputs[0].shape[-1] if model.graph.outputs[0].shape is not None else None
    classes = classes if isinstance(classes, int) else None  # not declared: the comparison checks it
    library_classes = library.manifest["output"]["shape"][-1]
    if dims[1:] == library.input_chw and dims[0] in ("N", 1) and classes in (None, library_classes):
        return
    raise BnnccError(f"{path} does not fit the library {library.folder}: it takes inputs "
                     f"({', '.join(map(str, dims))}) and gives {classes if classes is not None else '?'} logits, "
                     f"the library (N, {', '.join(map(str, library.input_chw))}) and {library_classes}; the reference "
                     f"must be the PokeBNN graph the library was compiled from ({library.folder / 'model.onnx'})")


def _sessions(model):
    """onnxruntime on the reference graph with all graph optimizations, with none, and with all on the
    graph's folded parameters (FOLDED) moved by PARAMETER_MOVE relative noise (a fixed draw)."""
    import onnx
    import onnx_ir as ir

    from bnncc.frontend import reference_session
    from bnncc.ops import attach_functions

    folded = {node.inputs[i].name for node in model.graph
              for i in FOLDED.get(("" if node.domain in DEFAULT_DOMAINS else node.domain, node.op_type), ())
              if i < len(node.inputs) and node.inputs[i] is not None}
    attach_functions(model)
    proto = ir.to_proto(model)
    serialized = proto.SerializeToString()
    moves = np.random.default_rng(0)
    for tensor in (t for t in proto.graph.initializer if t.name in folded):
        values = onnx.numpy_helper.to_array(tensor)
        if values.dtype.kind == "f":  # (a zero stays 0 and a sign stays: the binary weights keep their bits)
            moved = values * (1 + PARAMETER_MOVE * moves.standard_normal(values.shape))
            tensor.CopyFrom(onnx.numpy_helper.from_array(moved.astype(values.dtype), tensor.name))
    return (reference_session(serialized, optimize=True), reference_session(serialized, optimize=False),
            reference_session(proto.SerializeToString(), optimize=True))


def _reference_sessions(path: Path):
    """(optimized, unoptimized, input name) for the reference graph at ``path`` (bench/gpu_prepare.py)."""
    model = _read_reference(path)
    return (*_sessions(model)[:2], model.graph.inputs[0].name)


def judge(runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> VerifyReport:
    """The rule (module docstring) over (library, reference, other reference runs) logits per input:
    the other runs one array of logits, or several stacked."""
    report = VerifyReport(inputs=len(runs))
    # an input on which onnxruntime's own runs overflow (NaN or infinite logits) has no reference to
    # compare with; it fails, and stays out of the figures, which it would make NaN
    overflows = {index for index, (_, ref, alt) in enumerate(runs) if not (np.isfinite(ref).all() and np.isfinite(alt).all())}
    report.max_spread = max((float(np.abs(alt - ref).max()) for index, (_, ref, alt) in enumerate(runs)
                             if index not in overflows), default=0.0)
    rms_spread = max((_rms(other - ref) for index, (_, ref, alt) in enumerate(runs) if index not in overflows
                      for other in np.reshape(alt, (-1, ref.size))), default=0.0)
    for index, (got, ref, _) in enumerate(runs):
        if index in overflows:
            report.failures.append(f"input {index}: onnxruntime's logits are NaN or infinite (the graph's float32 "
                                   f"arithmetic overflows on it): no reference to compare with")
            continue
        # NaN logits: max() would skip them (and nan_to_num's default makes inf the largest float)
        diff = float(np.nan_to_num(np.abs(got - ref), nan=np.inf, posinf=np.inf).max())
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
            distance, unrelated = _rms(got - ref), UNRELATED * float(np.std(ref.astype(np.float64)))
            if distance <= max(unrelated / 2, RMS_FACTOR * rms_spread):
                report.explained += 1
                logger.info("input %d: %s, within %g x the rounding spread %.3g and related to the reference", index,
                            what, SPREAD_FACTOR, report.max_spread)
                continue
            what += (f"; {distance:.3g} from the reference in root mean square, over half the {unrelated:.3g} "
                     f"of unrelated logits (the reference's, classes shuffled) and over {RMS_FACTOR:g} x the "
                     f"{rms_spread:.3g} of onnxruntime's other runs")
        report.failures.append(f"input {index}: {what}; difference {diff:.3g}, rounding spread "
                               f"{report.max_spread:.3g} (tolerance {tolerance:.3g})")
    return report


def _rms(difference: np.ndarray) -> float:
    """The root mean square of ``difference``, in float64 (logits near float32's range square past it)."""
    return float(np.sqrt(np.mean(np.square(difference.astype(np.float64)))))
