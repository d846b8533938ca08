"""Whole-network bench (issue 5 parts b and c, issue 16 items 3 and 4), 2 threads:

(b) latency at batch 1 and 8 of bnncc PokeBNN-1x (random weights, 224x224), built for each popcount
    class this CPU runs (AVX-512 VPOPCNTDQ where it has it; AVX-512BW without VPOPCNTDQ where it has
    AVX-512, whose build's peers are onnxruntime as it runs here; and AVX2: an x86-64-v3 build, which
    runs on an AVX-512 CPU too), against onnxruntime float32 ResNet-50 and the fastest of onnxruntime's
    static int8 configurations (``INT8_CONFIGS``: U8S8 and S8S8, QDQ and QOperator, per-channel
    weights, random calibration images; each measured here, the fastest at batch 1 kept), as the
    median of each round's ratio of medians and the ratio of the minima (``_latencies_ms``, ``_ratio``).
    On an AVX-512 CPU the AVX2 build's peers are onnxruntime with AVX-512 hidden from CPUID
    (``_hide_avx512``), which then runs the AVX2 kernels it runs on the AVX2 CPUs the build is for;
    its own int8 search picks their fastest configuration;
(c) compile time and library size against the packed weight size;
``--noise``: bnncc batch 1 with and without a co-running noise process that the bench starts and
    stops itself (``_noise``: busy for a burst, asleep for nine), blocks interleaved;
and the same latency table for ResNet-18 (issue 19): bnncc ``resnet18_pokebnn`` against
onnxruntime float32 ResNet-18, the network Bi-Real Net 18 figures of other engines refer to.

Every figure is printed beside the CPU model and the build's class.

Run: ``TVM_NUM_THREADS=2 .venv/bin/python bench/network.py [--noise] [--workdir DIR]`` (prints
markdown tables; ``--workdir`` keeps the graphs, libraries and the quantized int8 models, which a
later run reuses); ``--profile`` adds the per-kernel profile at batch 1 (host build): each
PrimFunc's time inside whole inferences (the VM's instrument hook) and alone, compiled by itself
on random inputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from workdir import in_workdir  # noqa: E402  (bench/workdir.py)

THREADS = int(os.environ["TVM_NUM_THREADS"])
# Latency: each engine runs in a process of its own, and the engines take turns: ROUNDS rounds,
# each engine in turn warm-up calls for WARM_UP_S and then BLOCK[batch] timed calls, so that every
# engine sees the machine's load alike (on a shared 2-core machine a busy core stalls every
# 2-thread parallel region and one run differs from the next by up to 3x). One process held all
# three engines before: then TVM's worker and onnxruntime's pools (each spinning while it waits
# for work) shared the two cores, and in 2 of 5 runs bnncc ran at 10-11 ms a call at batch 1
# and 84-90 ms at batch 8 for the whole run, against 4.6 and 35 ms alone.
# Each round starts the engines' processes afresh (_latencies_ms).
# Reported: the median over all timed calls (typical) and the minimum (least disturbed).
ROUNDS = 5
BLOCK = {1: 20, 8: 3}
WARM_UP_S = 0.25
# onnxruntime int8: (quant_format, activation type, weight type) by name; all per-channel weights
INT8_CONFIGS = {
    "U8S8 QDQ": ("QDQ", "QUInt8", "QInt8"),
    "U8S8 QOperator": ("QOperator", "QUInt8", "QInt8"),
    "S8S8 QDQ": ("QDQ", "QInt8", "QInt8"),
    "S8S8 QOperator": ("QOperator", "QInt8", "QInt8"),
}
SEARCH_ROUNDS = 3  # the int8 search: rounds of BLOCK[1] calls at batch 1, engines taking turns
# --noise: a process busy for one burst in every NOISE_PERIOD bursts, ~10% of one core; each
# burst length is measured in NOISE_ROUNDS rounds of BLOCK[1] calls without and with it, interleaved
NOISE_BURSTS_US = (1000, 200)
NOISE_PERIOD = 10
NOISE_ROUNDS = 8
# name: ("bnncc", library folder), ("ort", model path) or ("ort-avx2", model path: onnxruntime with
# AVX-512 hidden from CPUID, ``_hide_avx512``), and environment variables for its process
Engines = dict[str, tuple[str, str] | tuple[str, str, dict[str, str]]]
# --noise also runs each build with TVM's pool workers sleeping as soon as they are idle (TVM's
# default: up to 300000 sched_yield calls first); see bench/RESULTS.md, "Noise"
NO_SPIN = {"TVM_THREAD_POOL_SPIN_COUNT": "0"}


def _engine_process(spec: tuple, conn) -> None:
    """Serve timing requests for one engine (``Engines``), then optionally environment variables to
    set first. Each request (batch, calls) answers the seconds of ``calls`` calls after the warm-up."""
    kind, path, *env = spec
    os.environ.update(*env)
    if kind == "ort-avx2":
        _hide_avx512()
    fn = _library(path) if kind == "bnncc" else _ort(Path(path))
    # The imports leave ~10^6 objects to Python's collector, which the calls' temporaries trigger:
    # 6-8% of a bnncc call went to gc_collect_main (perf). Frozen, they are skipped.
    gc.collect()
    gc.freeze()
    while (request := conn.recv()) is not None:
        batch, calls = request
        x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        warm_until = time.perf_counter() + WARM_UP_S
        fn(x)
        while time.perf_counter() < warm_until:
            fn(x)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
        conn.send(times)


@contextlib.contextmanager
def _serving(engines: Engines):
    """{engine: pipe} to one process per engine (``_engine_process``), stopped on exit."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    pipes, processes = {}, []
    for name, spec in engines.items():
        ours, theirs = context.Pipe()
        process = context.Process(target=_engine_process, args=(spec, theirs), daemon=True)
        process.start()
        # the engine's end is the child's alone: kept open here, an engine that died (a library
        # that would not load) left ``recv`` waiting for it for ever
        theirs.close()
        pipes[name] = ours
        processes.append(process)
    try:
        yield pipes
    finally:
        for pipe in pipes.values():
            with contextlib.suppress(OSError):  # (an engine that died: the others are stopped still)
                pipe.send(None)
        for process in processes:
            process.join()


def _timed_ms(pipe, batch: int, calls: int) -> list[float]:
    """ms of each of ``calls`` timed calls at ``batch`` of the engine served at ``pipe``."""
    try:
        pipe.send((batch, calls))
        return [1e3 * t for t in pipe.recv()]
    except (EOFError, OSError):
        raise RuntimeError("an engine's process ended; its error is printed above") from None


def _latencies_ms(engines: Engines, batches, rounds: int = ROUNDS) -> dict[int, dict[str, np.ndarray]]:
    """{batch: {engine: ms of each timed call, (rounds, BLOCK[batch])}}, the engines' processes
    taking turns; every round in fresh processes. On this project's 2-vCPU VMs there are stretches,
    seconds to minutes long, in which the two vCPUs slow each other down when both are busy, and
    2-thread bnncc runs 1.5x slower (bench/RESULTS.md, "Slow stretches"); a process that started in
    one could look slow for its whole life, and one process for all rounds made an engine's figure
    hang on that draw."""
    times = {batch: {name: [] for name in engines} for batch in batches}
    for _ in range(rounds):
        with _serving(engines) as pipes:
            for batch in batches:
                for name, pipe in pipes.items():
                    times[batch][name].append(_timed_ms(pipe, batch, BLOCK[batch]))
    return {batch: {name: np.array(t) for name, t in by_name.items()} for batch, by_name in times.items()}


def _noise(burst_s: float, period_s: float, on, stop, conn) -> None:
    """While ``on`` is set: spin for ``burst_s``, sleep for the rest of ``period_s``. At ``stop``,
    sends the share of one core it took while on (its CPU time / the wall time it was on)."""
    busy = wall = 0.0
    while not stop.is_set():
        if not on.wait(0.05):
            continue
        start, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - start < burst_s:
            pass
        time.sleep(period_s - burst_s)
        busy += time.process_time() - cpu
        wall += time.perf_counter() - start
    conn.send(busy / wall if wall else 0.0)


def _noise_ms(engines: Engines, burst_s: float) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """({engine: (batch-1 ms without noise, with noise), each (NOISE_ROUNDS, BLOCK[1])}, the noise's
    share of one core): for each engine in turn, blocks without and with the noise process running,
    NOISE_ROUNDS times."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    on, stop = context.Event(), context.Event()
    ours, theirs = context.Pipe()
    noise = context.Process(target=_noise, args=(burst_s, NOISE_PERIOD * burst_s, on, stop, theirs), daemon=True)
    noise.start()
    theirs.close()  # (as in _serving)
    try:
        with _serving(engines) as pipes:
            times = {name: ([], []) for name in engines}
            for _ in range(NOISE_ROUNDS):
                for name, pipe in pipes.items():
                    times[name][0].append(_timed_ms(pipe, 1, BLOCK[1]))
                    on.set()
                    times[name][1].append(_timed_ms(pipe, 1, BLOCK[1]))
                    on.clear()
    finally:
        stop.set()
        share = ours.recv()
        noise.join()
    return {name: (np.array(quiet), np.array(noisy)) for name, (quiet, noisy) in times.items()}, share


def _library(folder: str):
    from bnncc.runtime import load

    return load(folder)


def can_hide_avx512() -> bool:
    """Whether this CPU has AVX-512 that ``_hide_avx512`` can hide: Linux's CPUID faulting."""
    from bnncc.targets import x86_64

    return {"avx512f", "cpuid_fault"} <= x86_64.cpu_flags()


_CPUID_HELPER = []  # the loaded bench/cpuid_avx2.c: its signal handler must outlive the call


def _hide_avx512() -> None:
    """From now on, this process's CPUID reports no AVX-512 (bench/cpuid_avx2.c), so that
    onnxruntime, imported after, takes the AVX2 kernels it would take on an AVX2 CPU: the peers of
    bnncc's AVX2 build on an AVX-512 machine. Measured here (Zen 4, U8S8 QDQ): its int8 conv loop
    becomes vpmaddubsw on ymm where it was vpdpbusds on zmm."""
    import ctypes
    import subprocess
    import tempfile

    if "onnxruntime" in sys.modules:
        raise RuntimeError("hide AVX-512 before onnxruntime is imported: it reads CPUID when loaded")
    with tempfile.TemporaryDirectory() as tmp:
        helper = Path(tmp) / "cpuid_avx2.so"
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", str(Path(__file__).with_name("cpuid_avx2.c")),
                        "-o", str(helper)], check=True)
        _CPUID_HELPER.append(ctypes.CDLL(str(helper), use_errno=True))
    if _CPUID_HELPER[0].bnncc_hide_avx512() != 0:
        raise OSError(ctypes.get_errno(), "CPUID faulting (arch_prctl ARCH_SET_CPUID) refused")


def _ort(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})


def _quantize_int8(float_path: Path, out: Path, config: str) -> Path:
    """Static int8 ResNet-50 in the onnxruntime configuration ``config`` (``INT8_CONFIGS``),
    per-channel weights, calibrated on 8 random images (enough to time it, not to use it); kept
    when ``out`` exists (a --workdir of an earlier run)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if out.exists():
        return out

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
                                 for _ in range(8)])

        def get_next(self):
            return next(self.batches, None)

    quant_format, activations, weights = INT8_CONFIGS[config]
    partial = out.with_suffix(".partial.onnx")
    quantize_static(str(float_path), str(partial), Reader(), quant_format=QuantFormat[quant_format],
                    per_channel=True, activation_type=QuantType[activations], weight_type=QuantType[weights])
    partial.rename(out)
    return out


def _fastest_int8(float_path: Path, work: Path, kind: str) -> tuple[str, Path, dict[str, np.ndarray]]:
    """(name, path, {config: batch-1 ms of each call}) of the fastest int8 configuration for the
    onnxruntime engine ``kind`` (``Engines``) here, by the median."""
    paths = {config: _quantize_int8(float_path, work / f"resnet50_int8_{config.replace(' ', '_')}.onnx", config)
             for config in INT8_CONFIGS}
    times = _latencies_ms({config: (kind, str(path)) for config, path in paths.items()}, (1,), SEARCH_ROUNDS)[1]
    best = min(times, key=lambda config: np.median(times[config]))
    return best, paths[best], times


def _packed_weight_bytes(model) -> float:
    """Bytes of the weights at their own precision (the cost model's weight bits: binary convs 1 bit,
    QuantConv/QuantGemm/SEGate kernels at w_bits) plus every other parameter (BN, DPReLU, scales,
    biases, bounds) as float32."""
    from bnncc.cost import ace

    report = ace(model)
    return (report.weight_bits + 32 * (report.params - report.weight_params)) / 8


def _fastest_s(fn, args) -> float:
    fn(*args)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(10):
            fn(*args)
        times.append((time.perf_counter() - start) / 10)
    return min(times)


def kernel_profile(model, library: Path) -> list[tuple[float, float, float, int, str, str]]:
    """Per PrimFunc at batch 1, slowest first: (ms in the network, ms alone, ms per call alone, calls,
    kernel, first input shape).

    Alone: compiled by itself and timed on random inputs (fastest of 7 loops of 10), times its call
    count; its data stays in cache. In the network: the median over 30 inferences of the library, on
    one thread, of the time between the VM's calls before and after the kernel (its instrument hook),
    which includes reading its inputs from wherever the kernels before left them."""
    import tvm

    from bnncc.targets.lower import lower
    from bnncc.targets.tvm_compat import compile_func, load_vm, to_tensor
    from bnncc.targets.x86_64 import host_target

    target = host_target()
    module = lower(model, target, (1,)).module
    calls = collections.Counter(re.findall(r"call_tir(?:_inplace)?\(cls\.(\w+)", module.script()))
    image = (1, *(int(d) for d in model.graph.inputs[0].shape[1:]))
    in_network = _in_network_ms(load_vm(library / "model.so"), set(calls), image)
    rng = np.random.default_rng(0)
    rows = []
    for gvar, func in module.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        shapes = [_alone_shape(p) for p in func.params]
        # floats Gaussian, integers small and non-negative (valid bits, border rows, nibbles); the
        # stem's image index (a scalar) 0
        args = [0 if shape is None else
                to_tensor(rng.standard_normal(shape).astype(dtype) if dtype.startswith("float")
                          else rng.integers(0, 7, size=shape).astype(dtype)) for shape, dtype in shapes]
        ms = 1e3 * _fastest_s(compile_func(func, target), args)
        name = gvar.name_hint
        rows.append((in_network[name], ms * calls[name], ms, calls[name], name, "x".join(map(str, shapes[0][0]))))
    return sorted(rows, reverse=True)


def _alone_shape(param) -> tuple[tuple[int, ...] | None, str]:
    """(shape, dtype) of a kernel parameter for timing it alone: a symbolic size (the stem's batch
    of images, read in place) 1; a scalar (the stem's image index) has shape None."""
    import tvm

    if not hasattr(param.ty, "shape"):
        return None, str(param.ty.dtype)
    return tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else 1 for d in param.ty.shape), str(param.ty.dtype)


def _in_network_ms(vm, kernels: set[str], image: tuple[int, ...], runs: int = 30) -> dict[str, float]:
    """Median ms per inference of each kernel in ``kernels`` inside whole batch-1 inferences of one
    ``image`` (its (1, C, H, W)), on one thread: with more, the hook's Python call between two
    kernels lets TVM's workers fall asleep, and every kernel would be charged for waking them (2x to
    4x at 2 threads)."""
    import tvm

    from bnncc.targets.tvm_compat import to_tensor

    config_threadpool = tvm.get_global_func("runtime.config_threadpool")

    x = to_tensor(np.random.default_rng(0).standard_normal(image).astype(np.float32))
    per_run: dict[str, list[float]] = collections.defaultdict(list)
    current: dict[str, float] = collections.defaultdict(float)
    started = [0.0]

    def instrument(func, name, before, ret, *args):
        if name in kernels:
            if before:
                started[0] = time.perf_counter()
            else:
                current[name] += time.perf_counter() - started[0]
        return 0

    config_threadpool(1, 1)  # (big cores, 1 thread)
    vm["batch_1"](x)
    vm.set_instrument(instrument)
    for _ in range(runs):
        current.clear()
        vm["batch_1"](x)
        for name in kernels:
            per_run[name].append(current[name])
    vm.set_instrument(None)
    config_threadpool(1, THREADS)
    return {name: 1e3 * float(np.median(times)) for name, times in per_run.items()}


def _print_profile(rows) -> None:
    in_network, alone = sum(r[0] for r in rows), sum(r[1] for r in rows)
    print(f"\nper-kernel profile, batch 1: in the network (1 thread) {in_network:.2f} ms, alone ({THREADS} threads) "
          f"{alone:.2f} ms")
    print("| kernel | first input | calls | ms in the network, 1 thread | ms alone | ms per call alone "
          "| share in the network |")
    print("|---|---|---|---|---|---|---|")
    for net_ms, ms_total, ms, count, name, shape in rows:
        print(f"| {name} | {shape} | {count} | {net_ms:.3f} | {ms_total:.3f} | {ms:.3f} "
              f"| {100 * net_ms / in_network:.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="also time each kernel alone at batch 1")
    parser.add_argument("--noise", action="store_true",
                        help="also bnncc batch 1 beside a noise process taking ~10%% of a core")
    parser.add_argument("--workdir", help="keep the graphs, libraries and int8 models here (reused by later runs)")
    args = parser.parse_args()
    in_workdir(args.workdir, "bnncc-bench-", lambda work: run(args, work))


def _builds() -> dict[str, str]:
    """{popcount class: bnncc target to build for}: this CPU's class (``x86-64``), and each class below
    it that it runs (AVX-512BW without VPOPCNTDQ, AVX2: the targets of those classes)."""
    from kernels import AVX2, AVX512BW, cpu_class

    from bnncc.targets import x86_64

    flags = x86_64.cpu_flags()
    builds = {cpu_class(x86_64.host_target()): "x86-64"}
    for cls, target, needed in ((AVX512BW, "x86-64-avx512bw", x86_64.CLASS_FLAGS[x86_64.AVX512BW]),
                                (AVX2, "x86-64-avx2", x86_64.CLASS_FLAGS[x86_64.AVX2])):
        if cls not in builds and needed <= flags:
            builds[cls] = target
    return builds


def _compile(model_path: Path, folder: Path, target: str, cls: str) -> float:
    """Seconds to compile ``model_path`` into ``folder`` (batches 1 and 8) for bnncc target ``target``.
    Checks the library's target is of class ``cls``."""
    from kernels import cpu_class

    from bnncc.targets.build import compile as compile_library
    from bnncc.targets.tvm_compat import make_target

    start = time.perf_counter()
    compile_library(model_path, folder, target=target, batches=(1, 8))
    seconds = time.perf_counter() - start
    llvm = json.loads((folder / "model.json").read_text(encoding="utf-8"))["target"]["llvm"]
    if cpu_class(make_target(json.loads(llvm))) != cls:
        raise RuntimeError(f"{folder}: built for {llvm}, not for {cls}")
    return seconds


def _cell(t: np.ndarray) -> str:
    return f"{np.median(t):.2f} ({t.min():.2f})"


def _ratio(slow: np.ndarray, fast: np.ndarray) -> str:
    """slow / fast for two engines' (rounds, calls) times: the median over rounds of the ratio of the
    round's medians, and (the ratio of the minima). The engines of a round run seconds apart, so a
    slow stretch of the machine (_latencies_ms) slows both alike, where it can fall on one engine's
    calls more than the other's in the medians over all rounds."""
    paired = np.median(np.median(slow, axis=1) / np.median(fast, axis=1))
    return f"{paired:.1f}x ({slow.min() / fast.min():.1f}x)"


def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


# the onnxruntime engines (``Engines``) a build is measured against, in words
PEERS = {"ort": "onnxruntime", "ort-avx2": "onnxruntime with AVX-512 hidden from CPUID (its AVX2 kernels)"}


def _peer(cls: str) -> str:
    """The onnxruntime engine for a build of class ``cls``: on an AVX-512 CPU the AVX2 build's
    peer is onnxruntime's AVX2 path, as on the AVX2 CPUs the build is for, where the machine lets
    ``_hide_avx512`` hide AVX-512 (else onnxruntime as it runs here, and a note says so)."""
    from kernels import AVX2

    from bnncc.targets import x86_64

    if cls != AVX2 or "avx512f" not in x86_64.cpu_flags():
        return "ort"
    if can_hide_avx512():
        return "ort-avx2"
    print("note: no CPUID faulting here; the AVX2 build is compared with onnxruntime's AVX-512 kernels")
    return "ort"


def run(args: argparse.Namespace, work: Path) -> None:
    import onnx_ir as ir
    from kernels import cpu_model

    from bnncc import zoo
    from bnncc.frontend import load
    from bnncc.rewriting import rewrite

    cpu = cpu_model()
    print(f"CPU {cpu}, {THREADS} threads; {_load()}")
    float_path = work / "resnet50.onnx"
    if not float_path.exists():
        zoo.export_onnx(zoo.resnet50(), float_path, batch="symbolic")
    builds = _builds()
    peers = {cls: _peer(cls) for cls in builds}
    int8 = {kind: _fastest_int8(float_path, work, kind) for kind in dict.fromkeys(peers.values())}
    for kind, (int8_name, _, int8_times) in int8.items():
        print(f"\n{PEERS[kind]} int8 ResNet-50, batch 1, {SEARCH_ROUNDS} rounds of {BLOCK[1]} calls, interleaved; "
              "median (min) ms")
        print("| CPU | int8 configuration (per-channel weights) | batch 1 ms |")
        print("|---|---|---|")
        for config, times in int8_times.items():
            print(f"| {cpu} | {config}{' (fastest)' * (config == int8_name)} | {_cell(times)} |")

    poke, _ = rewrite(load(float_path), "pokebnn_1x")
    ir.save(poke, work / "pokebnn_1x.onnx")
    folders, compile_s = {}, {}
    for cls, target in builds.items():
        folders[cls] = work / f"lib_{cls.split()[0].lower()}"
        compile_s[cls] = _compile(work / "pokebnn_1x.onnx", folders[cls], target, cls)
    engines = {cls: ("bnncc", str(folder)) for cls, folder in folders.items()}
    for kind, (_, int8_path, _) in int8.items():
        engines |= {f"fp32 {kind}": (kind, str(float_path)), f"int8 {kind}": (kind, str(int8_path))}
    rows = _latencies_ms(engines, (1, 8))

    packed = _packed_weight_bytes(poke)
    print(f"\n{ROUNDS} rounds of {BLOCK} calls per engine, interleaved, a fresh process per engine each round; "
          "median (min) ms; speedups: the median of the rounds' ratios (the ratio of the minima)")
    for cls, folder in folders.items():
        kind = peers[cls]
        int8_name = int8[kind][0]
        print(f"\n{cls} build (PokeBNN-1x) on {cpu}, against {PEERS[kind]}")
        print(f"| CPU | class | batch | bnncc PokeBNN-1x | ORT fp32 | ORT int8 {int8_name} | speedup vs fp32 | "
              "speedup vs int8 |")
        print("|---|---|---|---|---|---|---|---|")
        for batch, times in rows.items():
            ours, fp32, int8_ms = times[cls], times[f"fp32 {kind}"], times[f"int8 {kind}"]
            print(f"| {cpu} | {cls} | {batch} | {_cell(ours)} | {_cell(fp32)} | {_cell(int8_ms)} | "
                  f"{_ratio(fp32, ours)} | {_ratio(int8_ms, ours)} |")
        so_bytes = (folder / "model.so").stat().st_size
        print(f"compile (lower + build + export, batch 1 and 8): {compile_s[cls]:.1f} s; library "
              f"{so_bytes / 2**20:.2f} MiB; packed weights {packed / 2**20:.2f} MiB; ratio {so_bytes / packed:.2f}")
    print(_load())
    if args.noise:
        run_noise(cpu, {name: spec for cls, folder in folders.items()
                        for name, spec in ((cls, ("bnncc", str(folder))),
                                           (f"{cls}, spin count 0", ("bnncc", str(folder), NO_SPIN)))})
    if args.profile:
        _print_profile(kernel_profile(poke, next(iter(folders.values()))))
    run_resnet18(work)


def run_noise(cpu: str, engines: Engines) -> None:
    """bnncc batch 1 without and with the noise process, for each burst length (``_noise_ms``); each
    build as bnncc.runtime runs it and with TVM's workers not spinning (``NO_SPIN``)."""
    print(f"\nbnncc batch 1 beside a noise process (busy a burst, asleep {NOISE_PERIOD - 1} bursts), {NOISE_ROUNDS} "
          f"rounds of {BLOCK[1]} calls without and with it, interleaved; median (min) ms")
    print("| CPU | class, setting | noise burst | without noise | with noise | ratio (target <= 1.3x) | "
          "noise's share of a core |")
    print("|---|---|---|---|---|---|---|")
    for burst_us in NOISE_BURSTS_US:
        times, share = _noise_ms(engines, burst_us * 1e-6)
        for cls, (quiet, noisy) in times.items():
            print(f"| {cpu} | {cls} | {burst_us} us | {_cell(quiet)} | {_cell(noisy)} | {_ratio(noisy, quiet)} | "
                  f"{share:.0%} |")
    print(_load())


def run_resnet18(work: Path) -> None:
    """bnncc resnet18_pokebnn (random weights, 224x224) against onnxruntime fp32 ResNet-18."""
    import onnx_ir as ir

    from bnncc import zoo
    from bnncc.frontend import load
    from bnncc.rewriting import rewrite
    from bnncc.targets.build import compile as compile_library

    float_path = work / "resnet18.onnx"
    if not float_path.exists():
        zoo.export_onnx(zoo.resnet18(), float_path, batch="symbolic")
    poke, _ = rewrite(load(float_path), "resnet18_pokebnn")
    ir.save(poke, work / "resnet18_pokebnn.onnx")
    folder = compile_library(work / "resnet18_pokebnn.onnx", work / "lib18", batches=(1, 8))
    engines = {"bnncc ResNet-18": ("bnncc", str(folder)), "ORT fp32 ResNet-18": ("ort", str(float_path))}
    print("\n| batch | bnncc resnet18_pokebnn | ORT fp32 ResNet-18 | speedup vs fp32 |")
    print("|---|---|---|---|")
    for batch, times in _latencies_ms(engines, (1, 8)).items():
        ours, fp32 = (times[name] for name in engines)
        print(f"| {batch} | {_cell(ours)} | {_cell(fp32)} | {_ratio(fp32, ours)} |")


if __name__ == "__main__":
    main()
