"""Binary conv kernels of ResNet-50 PokeBNN-1x on this x86-64 CPU, against its popcount peak and float32 onnxruntime.

Run: ``.venv/bin/python bench/kernels.py [--avx2 | --avx512bw] [--cpu-time] [--results bench/RESULTS.md]``
(threads: TVM_NUM_THREADS, default all CPUs; onnxruntime and the peak loop use the same count). ``--avx2``
builds the kernels for x86-64-v3 (AVX2, no vector popcount), which runs on an AVX-512 CPU too;
``--avx512bw`` for an AVX-512 CPU without VPOPCNTDQ (Skylake-SP, Cascade Lake), which runs on an
AVX-512 VPOPCNTDQ CPU too. ``--cpu-time`` (one thread only) times by the CPU time of the calling thread and
of the peak loop rather than the wall clock: on a machine shared with other work, time spent
waiting for a core is then left out.

For every binary conv shape (shared/reference/pokebnn.md §2-3) and batch 1 and 8 it prints the
scheduled kernel's time, binary MACs/s (N*Ho*Wo*Cout*k*k*Cin / time), the fraction of the peak
of the build's class measured here by bench/popcount_peak.c, and the speed-up over a float32
onnxruntime Conv of the same shape. The peak of a class is the fastest method its CPUs run, measured
on this CPU (``PEAK_METHODS``: AVX2 has four, byte counters, Harley-Seal, the kernels' own nibble
agreements and lookups in tables of the weights' nibbles; AVX-512BW its 512-bit nibble agreements and
weight tables, and those of AVX2); every class the CPU runs is printed.
"""

from __future__ import annotations

import argparse
import datetime
import resource
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from rich.console import Console
from rich.table import Table

from bnncc.fileio import atomic_write_text
from bnncc.targets import tvm_compat as tc
from bnncc.targets import x86_64
from bnncc.targets.kernels import binary_conv as bc
from bnncc.targets.kernels import bitpack as bp

HERE = Path(__file__).resolve().parent
SECTION = "## Binary conv kernels (x86-64)"
# the CPU flags of the builds of a class below this CPU's (--avx2, --avx512bw)
AVX2_FLAGS = x86_64.CLASS_FLAGS[x86_64.AVX2]
AVX512BW_FLAGS = x86_64.CLASS_FLAGS[x86_64.AVX512BW]
PEAK_STEPS = 100_000_000  # of popcount_peak.c: each step counts 8 weights against the bits it prints
# bench/popcount_peak.c's methods, by the class of CPU (and of our x86-64 build) that runs them
AVX512 = "AVX-512 VPOPCNTDQ"
AVX512BW = "AVX-512BW (no VPOPCNTDQ)"
AVX2 = "AVX2"
SCALAR = "scalar popcnt"
_AVX2_METHODS = ("avx2-bytes", "avx2-harley-seal", "avx2-nibble-agreements", "avx2-weight-tables")
PEAK_METHODS = {AVX512: ("avx512-vpopcntdq",),
                AVX512BW: ("avx512bw-nibble-agreements", "avx512bw-weight-tables", *_AVX2_METHODS),
                AVX2: _AVX2_METHODS, SCALAR: ("scalar-popcnt",)}
# the class of each x86_64.popcount_class, and the build's section of RESULTS.md beside its flags
_CLASSES = {x86_64.AVX512_VPOPCNTDQ: AVX512, x86_64.AVX512BW: AVX512BW, x86_64.AVX2: AVX2}
SECTIONS = {AVX2: "## Binary conv kernels (x86-64, AVX2 build)",
            AVX512BW: "## Binary conv kernels (x86-64, AVX-512BW build)"}
_UNSUPPORTED = 3  # popcount_peak.c's exit status for a method this CPU cannot run


class Shape(NamedTuple):
    name: str
    count: int  # how many convs of this shape one forward pass runs
    cin: int
    cout: int
    size: int  # input height = width
    kernel: int
    stride: int


def resnet50_shapes() -> list[Shape]:
    """The binary convs of PokeBNN-1x: stages of 3-4-6-3 bottlenecks, f = 64..512, stride on the 3x3
    of each stage's first block (stages 2-4), inputs 56/56/28/14 for the first blocks."""
    shapes = []
    cin, size = 64, 56  # stem output
    for stage, (blocks, f) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], start=1):
        stride = 1 if stage == 1 else 2
        out = size // stride
        shapes += [
            Shape(f"s{stage} conv1 first", 1, cin, f, size, 1, 1),
            Shape(f"s{stage} conv1", blocks - 1, 4 * f, f, out, 1, 1),
        ]
        if stride == 2:
            shapes.append(Shape(f"s{stage} conv2 /2", 1, f, f, size, 3, 2))
        shapes += [
            Shape(f"s{stage} conv2", blocks - (stride == 2), f, f, out, 3, 1),
            Shape(f"s{stage} conv3", blocks, f, 4 * f, out, 1, 1),
        ]
        cin, size = 4 * f, out
    return shapes


def seconds_per_call(call, budget: float = 0.3, repeats: int = 5, timer=time.perf_counter) -> float:
    """Seconds a call: the fastest of ``repeats`` loops of about ``budget / repeats`` seconds each
    (``budget`` in all), the minimum, as other work on a shared machine only ever adds time (a plain
    loop, not time_evaluator, which misread parallel kernels: shared/reference/tvm.md §6.9).
    ``timer``: wall clock by default; CPU time (``time.process_time``, ``time.thread_time``) for one
    thread on a machine others share (bench/arm64.py, ``--cpu-time``)."""
    call()
    start = timer()
    call()
    number = max(1, int(budget / repeats / max(timer() - start, 1e-7)))
    samples = []
    for _ in range(repeats):
        start = timer()
        for _ in range(number):
            call()
        samples.append((timer() - start) / number)
    return min(samples)


def cpu_model() -> str:
    """This CPU's model name and its family and model numbers, as lscpu prints them (a VM may name
    only the vendor's product line: "AMD EPYC (family 25, model 17)" is a Zen 4)."""
    out = subprocess.run(["lscpu"], check=True, capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name, family, model = (fields[key].strip() for key in ("Model name", "CPU family", "Model"))
    return f"{name} (family {family}, model {model})"


def cpu_class(target) -> str:
    """The popcount class our x86-64 kernels use on ``target``: AVX-512 VPOPCNTDQ, AVX-512BW or AVX2."""
    return _CLASSES[x86_64.popcount_class(target)]


def build_popcount_peak(workdir: Path) -> Path:
    """bench/popcount_peak.c compiled into ``workdir`` (each method carries its own target attribute)."""
    binary = workdir / "popcount_peak"
    if not binary.exists():
        subprocess.run(["gcc", "-O3", "-fopenmp", str(HERE / "popcount_peak.c"), "-o", str(binary)], check=True)
    return binary


def method_rate(binary: Path, method: str, threads: int, cpu_time: bool) -> float | None:
    """Binary MACs/s of one popcount_peak.c method on ``threads`` threads, by the wall clock or
    (``cpu_time``) by its user CPU time, best of 3; None when this CPU lacks its instructions."""
    rates = []
    for _ in range(3):
        # its user CPU time: that of this process's waited-for children, after it less before (Popen
        # reaps it: an os.wait4 behind its back left Popen warning that the process still ran)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        done = subprocess.run([str(binary), method, str(threads), str(PEAK_STEPS)], stdout=subprocess.PIPE, text=True)
        user_s = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before
        if done.returncode == _UNSUPPORTED:
            return None
        if done.returncode != 0:
            raise RuntimeError(f"{binary} {method} failed: exit status {done.returncode}")
        rate, bits = done.stdout.split()[:2]
        rates.append(threads * PEAK_STEPS * 8 * int(bits) / user_s if cpu_time else float(rate))
    return max(rates)


def popcount_peaks(threads: int, workdir: Path, cpu_time: bool) -> dict[str, dict[str, tuple[float, float]]]:
    """{class: {method: (binary MACs/s on 1 thread, on ``threads``)}} for every method this CPU runs
    (a method of several classes measured once)."""
    binary = build_popcount_peak(workdir)
    rates = {}
    for method in dict.fromkeys(m for methods in PEAK_METHODS.values() for m in methods):
        one = method_rate(binary, method, 1, cpu_time)
        if one is not None:
            rates[method] = (one, method_rate(binary, method, threads, cpu_time) if threads > 1 else one)
    peaks = {}
    for name, methods in PEAK_METHODS.items():
        if methods[0] in rates:  # the class's own method: this CPU is of the class or above it
            peaks[name] = {method: rates[method] for method in methods if method in rates}
    return peaks


def best_of_class(peaks: dict[str, dict[str, tuple[float, float]]], name: str) -> tuple[str, float, float]:
    """(method, 1-thread rate, multi-thread rate) of the fastest method of class ``name`` (by the multi-thread rate)."""
    method, (one, many) = max(peaks[name].items(), key=lambda item: item[1][1])
    return method, one, many


def split_shapes(target) -> set[Shape]:
    """The shapes whose kernels ResNet-50's lowering for ``target`` gives weights split into nibbles
    ahead (x86_64.split_convs over all 48 convs; a shape counts if its first conv is split)."""
    convs = {(shape, i): (shape.cin, shape.cout, shape.kernel)
             for shape in resnet50_shapes() for i in range(shape.count)}
    return {shape for shape, i in x86_64.split_convs(target, convs) if i == 0}


def binary_conv_func(shape: Shape, batch: int, target):
    """The scheduled kernel of ``shape`` (packed activations in, int32 out) for ``target``, its
    weights laid out as the network's lowering lays them out."""
    func = bc.binary_conv2d_func(batch, shape.size, shape.size, shape.cin, shape.cout, shape.kernel, shape.stride,
                                 nibbles=x86_64.counts_nibbles(target, shape.cout),
                                 lanes=x86_64.weight_lanes(target, shape.cout), split=shape in split_shapes(target))
    return x86_64.schedule(func, target)


def binary_conv_seconds(shape: Shape, batch: int, target, rng, timer=time.perf_counter) -> float:
    """Time of the scheduled kernel (``binary_conv_func``) on random data."""
    lanes, split = x86_64.weight_lanes(target, shape.cout), shape in split_shapes(target)
    module = tc.compile_func(binary_conv_func(shape, batch, target), target)
    packed = bp.pack_weights(rng.standard_normal((shape.cout, shape.cin, shape.kernel, shape.kernel)))
    weights = packed.bits if lanes is None else bp.blocked_weights(packed.bits, lanes, split)
    x = rng.integers(0, 2**32, (batch, shape.size, shape.size, bp.words(shape.cin)), dtype=np.uint32)
    out_size = bc.out_size(shape.size, shape.stride)
    args = [tc.to_tensor(a) for a in (x, weights, packed.border)]
    args.append(tc.to_tensor(np.zeros((batch, out_size, out_size, shape.cout), np.int32)))
    return seconds_per_call(lambda: module(*args), timer=timer)


def float_conv_seconds(shape: Shape, batch: int, threads: int, rng, timer=time.perf_counter) -> float:
    """Time of a float32 NCHW Conv with the same SAME padding in onnxruntime."""
    before, after = bc.same_padding(shape.size, shape.kernel, shape.stride)
    weight = rng.standard_normal((shape.cout, shape.cin, shape.kernel, shape.kernel)).astype(np.float32)
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], kernel_shape=[shape.kernel] * 2, strides=[shape.stride] * 2,
        pads=[before, before, after, after],
    )
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, shape.cin, shape.size, shape.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((batch, shape.cin, shape.size, shape.size)).astype(np.float32)
    return seconds_per_call(lambda: session.run(None, {"x": x}), timer=timer)


def measure(threads: int, flags: set[str] | None, cpu_time: bool) -> tuple[dict, list[dict]]:
    """Every shape's kernel built for a CPU with ``flags`` (None: this one) and its peers'."""
    rng = np.random.default_rng(0)
    target = x86_64.host_target() if flags is None else x86_64.target_for_flags(flags, threads)
    with tempfile.TemporaryDirectory() as tmp:
        peaks = popcount_peaks(threads, Path(tmp), cpu_time)
    timer = time.thread_time if cpu_time else time.perf_counter
    name = cpu_class(target)
    method, peak1, peak = best_of_class(peaks, name)
    info = {"peaks": peaks, "class": name, "method": method, "peak1": peak1, "peak": peak, "threads": threads,
            "target": str(target), "clock": "CPU time" if cpu_time else "wall clock"}
    rows = []
    for batch in (1, 8):
        for shape in resnet50_shapes():
            out_size = bc.out_size(shape.size, shape.stride)
            macs = batch * out_size**2 * shape.cout * shape.kernel**2 * shape.cin
            ours = binary_conv_seconds(shape, batch, target, rng, timer)
            theirs = float_conv_seconds(shape, batch, threads, rng, timer)
            rows.append({"shape": shape, "batch": batch, "macs": macs, "ours": ours, "float": theirs})
    return info, rows


def table_lines(info: dict, rows: list[dict]) -> list[list[str]]:
    """One row per (batch, shape), then a per-batch total weighted by how often each shape runs."""
    lines = []
    for batch in (1, 8):
        chosen = [r for r in rows if r["batch"] == batch]
        for r in chosen:
            s = r["shape"]
            rate = r["macs"] / r["ours"]
            lines.append([
                str(batch), s.name, f"{s.cin}->{s.cout} {s.kernel}x{s.kernel}/{s.stride} @{s.size}", str(s.count),
                f"{r['ours'] * 1e6:.1f}", f"{rate / 1e12:.2f}", f"{rate / info['peak']:.0%}",
                f"{r['float'] * 1e6:.1f}", f"{r['float'] / r['ours']:.1f}x",
            ])
        ours = sum(r["ours"] * r["shape"].count for r in chosen)
        theirs = sum(r["float"] * r["shape"].count for r in chosen)
        macs = sum(r["macs"] * r["shape"].count for r in chosen)
        lines.append([
            str(batch), "all 48 binary convs", "", "48", f"{ours * 1e6:.0f}", f"{macs / ours / 1e12:.2f}",
            f"{macs / ours / info['peak']:.0%}", f"{theirs * 1e6:.0f}", f"{theirs / ours:.1f}x",
        ])
    return lines


HEADER = ["batch", "layer", "shape", "count", "ours µs", "T bMAC/s", "of peak", "ort fp32 µs", "speed-up"]


def peak_lines(info: dict) -> list[str]:
    """One line per popcount_peak.c method this CPU runs, its class's best in bold; the build's class marked."""
    lines = []
    for name, methods in info["peaks"].items():
        best = best_of_class(info["peaks"], name)[0]
        for method, (one, many) in methods.items():
            figures = f"{one / 1e12:.2f} T bMAC/s on 1 thread, {many / 1e12:.2f} T on {info['threads']}"
            lines.append(f"{name}, {method}: " + (f"**{figures}** (best of the class)" if method == best else figures)
                         + (" <- this build's class" if method == best and name == info["class"] else ""))
    return lines


def print_table(info: dict, lines: list[list[str]]) -> None:
    console = Console(width=200)
    console.print("popcount peak (bench/popcount_peak.c, xor+popcount+add in registers, gcc -O3):", markup=False)
    for line in peak_lines(info):
        console.print("  " + line.replace("**", ""), markup=False)
    table = Table(*HEADER, title=f"binary conv, {info['class']} build, {info['threads']} threads, "
                                 f"target {info['target']}; 'of peak': of {info['method']}")
    for line in lines:
        table.add_row(*line)
    console.print(table)


def markdown_section(info: dict, lines: list[list[str]], heading: str, flags: str) -> str:
    model = cpu_model()
    rows = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    rows += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join([
        heading, "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {model}; this build: {info['class']}; "
        f"{info['threads']} threads (`TVM_NUM_THREADS={info['threads']}`; "
        f"onnxruntime `intra_op_num_threads={info['threads']}`).",
        f"Command: `TVM_NUM_THREADS={info['threads']} .venv/bin/python bench/kernels.py{flags} "
        "--results bench/RESULTS.md`.",
        f"Target: `{info['target']}`.", "",
        "Popcount peak per method (bench/popcount_peak.c, xor+popcount+add in registers, gcc -O3), best of each class "
        "in bold:", "",
        *(f"- {line}" for line in peak_lines(info)), "",
        f"\"of peak\" is against the multi-thread figure of the {info['class']} class ({info['method']}). "
        "Our kernel: packed uint32 activations in, int32 out (SAME padding and border correction included); "
        "onnxruntime: float32 NCHW Conv of the same shape. "
        f"Times ({info['clock']}) are the fastest of 5 loops; on this VM the 56x56 layers vary up to 2x between runs. "
        "Layers with few input words and large int32 outputs (stage 1 at batch 8: 25 MB per call) are bound by "
        "memory traffic, not popcount.", "",
        *rows, "", "",  # a blank line before the next section's heading
    ])


def write_section(path: Path, section: str, heading: str = SECTION) -> None:
    """Replace the section of ``path`` under ``heading`` (up to the next '## ' heading; default: this
    benchmark's), or append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    atomic_write_text(path, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    build = parser.add_mutually_exclusive_group()
    build.add_argument("--avx2", action="store_true", help="kernels for x86-64-v3 (AVX2) instead of this CPU")
    build.add_argument("--avx512bw", action="store_true", help="kernels for AVX-512 without VPOPCNTDQ instead")
    parser.add_argument("--cpu-time", action="store_true", help="time by CPU time, not the wall clock (1 thread)")
    parser.add_argument("--results", type=Path, help="write the table into this markdown file's section")
    args = parser.parse_args()
    if args.cpu_time and tc.NUM_THREADS != 1:
        parser.error("--cpu-time needs TVM_NUM_THREADS=1")
    flags = AVX2_FLAGS if args.avx2 else AVX512BW_FLAGS if args.avx512bw else None
    if flags is not None and not flags <= x86_64.cpu_flags():
        parser.error("this CPU cannot run that build")
    info, rows = measure(tc.NUM_THREADS, flags, args.cpu_time)
    lines = table_lines(info, rows)
    print_table(info, lines)
    if args.results:
        heading = SECTIONS.get(info["class"], SECTION) if flags is not None else SECTION
        options = " --avx2" * args.avx2 + " --avx512bw" * args.avx512bw + " --cpu-time" * args.cpu_time
        write_section(args.results, markdown_section(info, lines, heading, options), heading)


if __name__ == "__main__":
    main()
