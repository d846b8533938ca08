"""GPU bench, second half (``bench/gpu.sh``): runs on the GPU machine over what ``gpu_prepare.py`` staged.

Needs numpy, torch (CUDA) and torchvision, tvm_ffi and TVM's runtime libraries (installed TVM, or
the staged ones through $BNNCC_TVM_RUNTIME), and the bnncc sources of this checkout; not TVM's
compiler, onnxruntime or a network. In one run, printing one table:

1. correctness of each staged library (with and without CUDA graphs): its logits on the reference's
   inputs at batch 64 and (first 8 inputs) at batch 1, judged by ``bnncc.verification.judge`` (same argmax,
   logits within its tolerance, or within 4x the network's rounding spread);
2. latency at batch 1 and 64: the libraries, and torch fp16 channels-last ResNet-50 (random weights:
   timing only) replayed from a CUDA graph; each the median of ROUNDS rounds of back-to-back calls;
3. the 1-bit tensor-core peak (``gpu_b1_peak``) and the binary MACs per second each library reaches
   over the whole network, a lower bound on its binary convs' rate;
4. the tensor-core binary conv on its own (``gpu_bconv``, not yet in the library): exact against
   the host, and its rate against the peak, for ResNet-50 layer shapes at batch 1 and 64.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_prepare import LIBRARIES, checksum, inputs  # noqa: E402  (numpy only at import)
ROUNDS = 5
ROUND_S = 0.25  # each round: back-to-back calls for at least this long (and MIN_CALLS)
MIN_CALLS = 3
WARM_UP_S = 0.5


def _import_bnncc() -> None:
    """Make ``bnncc`` and ``bnncc.targets`` importable from this checkout when bnncc is not installed."""
    sys.path.insert(0, str(ROOT))
    import bnncc

    try:
        import bnncc.targets  # noqa: F401
    except ModuleNotFoundError:  # not installed: targets/ lives beside bnncc/ (pyproject's package-dir)
        bnncc.__path__.append(str(ROOT))


def _median_ms(fn) -> float:
    """Median over ROUNDS of the mean ms per call of back-to-back calls (ROUND_S, MIN_CALLS), after
    WARM_UP_S of calls (the first call of a CUDA-graph library captures the graph)."""
    import torch

    until = time.perf_counter() + WARM_UP_S
    while time.perf_counter() < until:
        fn()
        torch.cuda.synchronize()
    rounds = []
    for _ in range(ROUNDS):
        calls, start = 0, time.perf_counter()
        while calls < MIN_CALLS or time.perf_counter() - start < ROUND_S:
            fn()
            calls += 1
            if calls % 16 == 0:  # keep the queue bounded without timing each call's sync
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        rounds.append(1e3 * (time.perf_counter() - start) / calls)
    return float(np.median(rounds))


def _inputs(stage: Path, reference) -> np.ndarray:
    x = inputs(len(reference["optimized"]), int(reference["seed"]))
    if not np.allclose(checksum(x), reference["checksum"], rtol=1e-12, atol=0):
        raise SystemExit(f"{stage}: this numpy draws other inputs from seed {int(reference['seed'])} "
                         f"(checksum {checksum(x)} != {list(reference['checksum'])})")
    return x


def check_library(vm, x: np.ndarray, reference) -> tuple[object, object]:
    """``judge`` over the library at batch 64 (all inputs) and at batch 1 (the first 8)."""
    from bnncc.verification import judge

    got64 = np.concatenate([vm("batch_64", x[i:i + 64]) for i in range(0, len(x) - len(x) % 64, 64)])
    runs64 = list(zip(got64, reference["optimized"], reference["unoptimized"]))
    got1 = np.concatenate([vm("batch_1", x[i:i + 1]) for i in range(8)])
    runs1 = list(zip(got1, reference["optimized"][:8], reference["unoptimized"][:8]))
    return judge(runs64), judge(runs1)


def time_library(vm, batch: int) -> float:
    import torch
    import tvm_ffi

    x = tvm_ffi.from_dlpack(torch.randn(batch, 3, 224, 224, device="cuda"))
    function = vm[f"batch_{batch}"]
    return _median_ms(lambda: function(x))


def time_torch_fp16(batch: int) -> float:
    """torchvision ResNet-50 (random weights), fp16, channels-last, replayed from a CUDA graph."""
    import torch
    import torchvision

    model = torchvision.models.resnet50().cuda().half().eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.half).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture wants
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(x)
    return _median_ms(graph.replay)


def b1_peak(stage: Path) -> tuple[float, list[str]]:
    """(binary MACs per second, the probe's description lines) from the staged gpu_b1_peak, which
    also checks the mma fragment layout that the tensor-core conv relies on."""
    done = subprocess.run([str(stage / "gpu_b1_peak")], capture_output=True, text=True)
    lines = done.stdout.splitlines()
    if done.returncode != 0:
        raise RuntimeError(f"gpu_b1_peak failed ({done.returncode}): {done.stdout} {done.stderr}")
    return float(re.search(r"b1_peak_macs_per_s (\S+)", done.stdout).group(1)), lines[:-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=Path, default=ROOT / ".gpu")
    args = parser.parse_args()
    stage = args.stage
    _import_bnncc()
    import torch

    start = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}; stage {json.loads((stage / 'stage.json').read_text())}", flush=True)
    rows, errors = [], []

    def section(name: str, body) -> None:
        """Run one part; a failure is printed and counted, and the other parts still run."""
        try:
            body()
        except Exception as error:  # noqa: BLE001 (one run on a lent GPU: report everything it can)
            errors.append(name)
            print(f"FAILED {name}: {type(error).__name__}: {error}", flush=True)
            traceback.print_exc()

    peak = [float("nan")]

    def probe() -> None:
        peak[0], lines = b1_peak(stage)
        rows.append(("1-bit tensor-core peak (mma m16n8k256 and.popc)",
                     f"{peak[0]:.3g} binary MAC/s; {'; '.join(lines)}"))
        print(rows[-1], flush=True)

    torch_ms = {}

    def torch_fp16() -> None:
        for batch in (1, 64):
            torch_ms[batch] = time_torch_fp16(batch)
            rows.append((f"batch {batch}: torch fp16 channels-last, CUDA graph",
                         f"{torch_ms[batch]:.3f} ms ({batch / torch_ms[batch] * 1e3:.0f} img/s)"))
            print(rows[-1], flush=True)

    def library(name: str) -> None:
        from bnncc.targets.cuda_runtime import CudaVM

        reference = np.load(stage / "reference.npz")
        x = _inputs(stage, reference)
        loaded = time.perf_counter()
        vm = CudaVM(stage / name / "model.so")
        print(f"{name}: loaded in {time.perf_counter() - loaded:.2f} s", flush=True)
        for batch, report in zip((64, 1), check_library(vm, x, reference)):
            rows.append((f"{name}: correctness, batch {batch}", f"argmax {report.argmax_agree}/{report.inputs}, "
                         f"max abs diff {report.max_abs_diff:.3g} (rounding spread {report.max_spread:.3g}), "
                         f"{len(report.failures)} failures, {report.explained} explained"))
            print(rows[-1], *report.failures[:5], sep="\n  ", flush=True)
            if report.failures:
                errors.append(f"{name} batch {batch} correctness")
        macs = int(reference["binary_macs"])
        for batch in (1, 64):
            ours = time_library(vm, batch)
            rate = macs * batch / (ours * 1e-3)
            versus = f", {ours / torch_ms[batch]:.2f}x torch's time" if batch in torch_ms else ""
            rows.append((f"batch {batch}: bnncc PokeBNN-1x, {name}", f"{ours:.3f} ms ({batch / ours * 1e3:.0f} img/s)"
                         f"{versus}; binary MAC/s over the network {rate:.3g} "
                         f"({100 * rate / peak[0]:.2f}% of the b1 peak)"))
            print(rows[-1], flush=True)

    def bconv() -> None:
        done = subprocess.run([str(stage / "gpu_bconv")], capture_output=True, text=True)
        print(done.stdout, done.stderr, flush=True)
        for line in done.stdout.splitlines():
            timed = re.match(r"bconv (\S+) batch (\d+): (\S+) ms, (\S+) binary MAC/s", line)
            if timed:
                layer, batch, ms, rate = timed.groups()
                rows.append((f"tensor-core binary conv {layer}, batch {batch} (alone)",
                             f"{float(ms):.4f} ms, {float(rate):.3g} binary MAC/s "
                             f"({100 * float(rate) / peak[0]:.1f}% of the b1 peak)"))
            elif line.startswith("bconv"):
                rows.append((f"tensor-core binary conv {line.split()[1]}: exact vs host", line.split("check ")[1]))
        if done.returncode != 0 or "WRONG" in done.stdout:
            raise RuntimeError("gpu_bconv failed or disagreed with the host")

    section("b1 peak probe", probe)
    section("tensor-core binary conv", bconv)
    section("torch fp16", torch_fp16)
    for name in LIBRARIES:
        section(name, lambda name=name: library(name))
    print("\n| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; failed: {', '.join(errors) or 'none'}")
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
