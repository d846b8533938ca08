"""The x86 benches' own logic: bench/popcount_peak.c's methods against numpy popcounts, the classes
bench/kernels.py states fractions against, bench/network.py's AVX2 build and int8 configurations,
bench/glue_bound.py's instruction counts, bench/ab.py's comparison of two libraries, bench/data.py's
timed fine-tune, bench/gpu_train.py's arguments, bench/same_logits.py's files."""

from __future__ import annotations

import collections

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import ab  # noqa: E402  (bench/ab.py)
import glue_bound  # noqa: E402  (bench/glue_bound.py)
import kernels  # noqa: E402  (bench/kernels.py)
import network  # noqa: E402  (bench/network.py)
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from test_lower import CLASSES, _onnxruntime, tiny_pokebnn  # noqa: E402

from bnncc.runtime import load  # noqa: E402
from bnncc.targets import x86_64  # noqa: E402

WEIGHT_OFFSETS = (1, 3, 5, 7, 11, 13, 17, 19)  # popcount_peak.c's weight words: seed + these


def reference_sum(seed: int, steps: int, bits: int) -> int:
    """sum over steps i and weights j of popcount(x_i xor w_j): x_i the i-th ``bits``-bit slice (cyclic)
    of popcount_peak.c's 256-word array, w_j the 32-bit word seed + offset_j in every lane."""
    index = np.arange(256, dtype=np.uint64)
    data = (((seed + 1) * 2654435761 + index * 40503) % 2**32).astype(np.uint32)
    per_step = bits // 32
    total = 0
    for j in WEIGHT_OFFSETS:
        counts = np.unpackbits((data ^ np.uint32(seed + j)).view(np.uint8)).reshape(256, 32).sum(axis=1)
        per_slice = counts.reshape(-1, per_step).sum(axis=1)  # one entry per slice of the array
        total += int(per_slice[np.arange(steps) % len(per_slice)].sum())
    return total


@pytest.fixture(scope="module")
def peak_binary(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    return kernels.build_popcount_peak(tmp_path_factory.mktemp("peak"))


@pytest.mark.parametrize("method", [m for methods in kernels.PEAK_METHODS.values() for m in methods])
@pytest.mark.parametrize("steps", [1, 62, 101])  # 62: two byte-counter flushes; 101: Harley-Seal's odd last step
def test_popcount_peak_methods_count_right(peak_binary, method, steps):
    done = subprocess.run([str(peak_binary), method, "2", str(steps)], capture_output=True, text=True)
    if done.returncode == 3:
        pytest.skip(f"this CPU cannot run {method}")
    assert done.returncode == 0, done.stderr
    rate, bits, checksum = done.stdout.split()
    assert float(rate) > 0
    assert int(checksum) == sum(reference_sum(seed, steps, int(bits)) for seed in (0, 1))  # threads 0 and 1


def test_popcount_peak_refuses_an_unknown_method(peak_binary):
    done = subprocess.run([str(peak_binary), "avx3", "1", "10"], capture_output=True, text=True)
    assert done.returncode == 2 and "avx2-harley-seal" in done.stderr


def test_fractions_are_of_the_best_method_of_the_builds_class():
    peaks = {kernels.AVX2: {"avx2-bytes": (4.0, 7.0), "avx2-harley-seal": (5.0, 9.0)},
             kernels.SCALAR: {"scalar-popcnt": (2.0, 4.0)}}
    assert kernels.best_of_class(peaks, kernels.AVX2) == ("avx2-harley-seal", 5.0, 9.0)
    avx2 = x86_64.target_for_flags(kernels.AVX2_FLAGS, cores=2)
    avx512bw = x86_64.target_for_flags(kernels.AVX512BW_FLAGS, cores=2)
    avx512 = x86_64.target_for_flags(kernels.AVX512BW_FLAGS | {"avx512_vpopcntdq"}, cores=2)
    assert [kernels.cpu_class(t) for t in (avx2, avx512bw, avx512)] == [kernels.AVX2, kernels.AVX512BW, kernels.AVX512]
    # AVX-512BW's peak is the best of its own method and AVX2's, which its CPUs run too
    assert set(kernels._AVX2_METHODS) < set(kernels.PEAK_METHODS[kernels.AVX512BW])


BUILDS = {kernels.AVX2: (kernels.AVX2_FLAGS, "x86-64-avx2", "x86-64-v3"),
          kernels.AVX512BW: (kernels.AVX512BW_FLAGS, "x86-64-avx512bw", "x86-64-v4")}


@pytest.fixture(scope="module", params=list(BUILDS))
def class_library(request, tmp_path_factory):
    """The tiny network built by network._compile for a CPU of a class below the host's (AVX2, and
    AVX-512 without VPOPCNTDQ), its graph and the build's mcpu."""
    flags, target, mcpu = BUILDS[request.param]
    if not flags <= x86_64.cpu_flags():
        pytest.skip(f"the {request.param} build runs only on a CPU with its instructions")
    folder = tmp_path_factory.mktemp("build")
    model = tiny_pokebnn()
    ir.save(model, folder / "tiny.onnx")
    network._compile(folder / "tiny.onnx", folder / "lib", target, request.param)
    return folder / "lib", model, mcpu


def test_class_build_is_of_its_class_and_matches_onnxruntime(class_library):
    """network._compile builds for a CPU of the class whatever the host (the class's target in the
    manifest: x86-64-v3, or x86-64-v4 without VPOPCNTDQ)."""
    folder, model, mcpu = class_library
    manifest = json.loads((folder / "model.json").read_text())
    llvm = json.loads(manifest["target"]["llvm"])
    assert llvm["mcpu"] == mcpu and "+avx512vpopcntdq" not in llvm.get("mattr", [])
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    got, ref = load(folder)(x), _onnxruntime(model, x)
    assert got.shape == (8, CLASSES) and np.array_equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_compile_refuses_a_build_of_another_class(tmp_path):
    ir.save(tiny_pokebnn(), tmp_path / "tiny.onnx")
    with pytest.raises(RuntimeError, match="not for AVX-512 VPOPCNTDQ"):
        network._compile(tmp_path / "tiny.onnx", tmp_path / "lib", "x86-64-avx2", kernels.AVX512)


@pytest.mark.parametrize("config", list(network.INT8_CONFIGS))
def test_int8_configurations_quantize_as_named(tmp_path, config):
    """Each configuration's model: QLinearConv (QOperator) or Q/DQ around a float Conv (QDQ), activations
    uint8 (U8S8) or int8 (S8S8), int8 weights with a scale per output channel; onnxruntime runs it
    close to the float model."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 224, 224])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    float_path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), float_path)
    quantized = onnx.load(network._quantize_int8(float_path, tmp_path / "int8.onnx", config))
    ops = [node.op_type for node in quantized.graph.node]
    if config.endswith("QOperator"):
        assert "QLinearConv" in ops and "Conv" not in ops
    else:
        assert "Conv" in ops and "QuantizeLinear" in ops and "DequantizeLinear" in ops
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    weights = [a for a in initializers.values() if a.shape == weight.shape]
    assert len(weights) == 1 and weights[0].dtype == np.int8
    first = next(node for node in quantized.graph.node if node.op_type == "QuantizeLinear")
    assert initializers[first.input[2]].dtype == (np.uint8 if config.startswith("U8") else np.int8)
    assert any(a.shape == (8,) and a.dtype == np.float32 for name, a in initializers.items() if "scale" in name)
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    got = ort.InferenceSession(str(tmp_path / "int8.onnx"), options).run(None, {"input": x})[0]
    ref = ort.InferenceSession(str(float_path), options).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


HIDDEN_AVX512 = """
import sys
sys.path.insert(0, sys.argv[1])
import network
import numpy as np
network._hide_avx512()
import torch
x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
np.save(sys.argv[3], network._ort(network.Path(sys.argv[2]))(x)[0])
print(torch.backends.cpu.get_cpu_capability())
"""


def test_hiding_avx512_gives_the_avx2_paths_and_the_same_results(tmp_path):
    """network._hide_avx512 (bench/cpuid_avx2.c): torch, which reads CPUID when imported, then finds
    AVX2 and no AVX-512, and onnxruntime's AVX2 int8 kernels give what its AVX-512 kernels give.
    S8S8 QOperator: with uint8 activations (and S8S8 QDQ, which onnxruntime runs as uint8) the AVX2
    kernels' 16-bit pair sums (vpmaddubsw) saturate, and 2% of this conv's outputs differ."""
    if not network.can_hide_avx512():
        pytest.skip("no AVX-512, or no CPUID faulting, on this machine")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 224, 224])],
        [onnx.numpy_helper.from_array(np.random.default_rng(1).standard_normal((16, 3, 3, 3)).astype(np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "conv.onnx")
    int8_path = network._quantize_int8(tmp_path / "conv.onnx", tmp_path / "int8.onnx", "S8S8 QOperator")
    done = subprocess.run([sys.executable, "-c", HIDDEN_AVX512, str(BENCH), str(int8_path), str(tmp_path / "y.npy")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "AVX2"
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), network._ort(int8_path)(x)[0])


def test_hiding_avx512_refuses_after_onnxruntime_is_loaded():
    with pytest.raises(RuntimeError, match="before onnxruntime is imported"):
        network._hide_avx512()


def test_glue_bound_counts_by_hand():
    """Per 16-channel output vector: a 3x3 512 -> 512 conv is 512 * 9 / 32 words of 3 instructions, its
    epilogue 10.5 + the identity shortcut; stage 1's 64 -> 256 expand is 2 words, its epilogue 9.5 +
    a quarter of a zero-pad add + the block shortcut; a 256 -> 64 shrink's mean of 4 costs 3 adds, a
    multiply and 6 permutes."""
    shapes = {shape.name: shape for shape in kernels.resnet50_shapes()}
    assert glue_bound.conv_instructions(shapes["s4 conv2"]) == 432
    assert glue_bound.epilogue_instructions(shapes["s4 conv2"]) == 11.5
    assert glue_bound.conv_instructions(shapes["s1 conv3"]) == 6
    assert glue_bound.epilogue_instructions(shapes["s1 conv3"]) == 9.5 + 0.25 + 1
    assert glue_bound.epilogue_instructions(shapes["s1 conv1"]) == 9.5 + 10 + 1
    assert glue_bound.epilogue_instructions(shapes["s1 conv1 first"]) == 9.5 + 1


def test_speedups_pair_the_engines_round_by_round():
    """network._ratio: a slow stretch in one round slows both engines of that round, and the paired
    ratio (median over rounds of the round's ratio) stays 2x where the ratio of the overall medians
    would not; the minima's ratio beside it."""
    # a slow stretch (3x) from round 3 on, which began after the slow engine's block of round 3
    fast = np.array([[1.0, 1.0], [1.0, 1.0], [3.0, 3.0], [3.0, 3.0], [3.0, 3.0]])
    slow = np.array([[2.0, 2.0], [2.0, 2.0], [2.0, 2.0], [6.0, 6.0], [6.0, 6.0]])
    assert np.median(slow) / np.median(fast) < 1
    assert network._ratio(slow, fast) == "2.0x (2.0x)"


def test_ab_compares_two_libraries_pair_by_pair(class_library, capsys, monkeypatch):
    """bench/ab.py on one library against itself: logits bitwise equal, and the pairs' ratio printed
    with its quartiles."""
    folder, _, _ = class_library
    monkeypatch.setattr(sys, "argv", ["ab.py", str(folder), str(folder), "--pairs", "4", "--calls", "2"])
    ab.main()
    out = capsys.readouterr().out
    assert "logits bitwise equal: True (largest difference 0)" in out
    ratio = float(out.split("B/A by pairs: median ")[1].split()[0])
    assert 0.2 < ratio < 5


def test_x86_estimates_report_weighs_each_shape_by_its_count():
    """bench/x86_estimates.py's totals: each shape's cycles times how often it runs, for the estimates
    and for this CPU's measured calibration alike."""
    import x86_estimates  # bench/x86_estimates.py

    shapes = kernels.resnet50_shapes()
    counts = [shape.count for shape in shapes]
    assert x86_estimates.weighted([1.0] * len(shapes)) == sum(counts) == 48
    model = x86_estimates.MODELS[0][1]
    rows = {kernels.AVX2: {model: [3.0] * len(shapes)}, kernels.AVX512BW: {model: [2.0] * len(shapes)}}
    calibration = {name: [{"measured": m, "estimated": 1.0} for _ in shapes]
                   for name, m in ((kernels.AVX2, 5.0), (kernels.AVX512BW, 4.0))}
    text = x86_estimates.report(rows, calibration)
    total = next(line for line in text.splitlines() if line.startswith("| all 48 binary convs"))
    assert "144 / 96" in total and "**1.50x**" in total and total.endswith("| 1.25x |")
    assert "measured / estimated 5.00 per shape" in text and "where this CPU measures 1.25x" in text
    # an AVX2 CPU calibrates the AVX2 build alone
    text = x86_estimates.report(rows, {kernels.AVX2: calibration[kernels.AVX2]})
    total = next(line for line in text.splitlines() if line.startswith("| all 48 binary convs"))
    assert "**1.50x**" in total and total.endswith("| - |") and "cannot run the AVX-512BW build" in text


def test_kernel_profile_times_every_kernel_of_the_network(class_library):
    """bench/network.py --profile: every kernel of the tiny network timed in the network and alone
    (the stem's batch read in place is given one image and its index), as often as the graph has
    its op."""
    folder, model, _ = class_library
    rows = network.kernel_profile(model, folder)
    calls = collections.Counter()
    for row in rows:
        calls[row[4].rsplit("_", 1)[0]] += row[3]
    ops = collections.Counter(node.op_type for node in model.graph)
    assert calls["poke_conv"] == ops["PokeConv"] == 6 and calls["quant_conv2d"] == ops["QuantConv"]
    assert calls["quant_head"] == 1
    assert all(row[0] > 0 and row[1] > 0 for row in rows)


def test_data_bench_reads_a_long_finetune_log_without_waiting_for_ever(tmp_path):
    """bench/data.py's timed fine-tune: its stderr (200 kB here) went to a pipe read only once the
    process had ended, and the process, the pipe full, never ended."""
    import threading

    import data  # bench/data.py

    fake = tmp_path / "python"  # stands for the interpreter: a long log, then the first loss's line
    fake.write_text(f"#!{sys.executable}\nimport sys, time\nsys.stderr.write('log line\\n' * 20000)\n"
                    "print(f'first-loss-at {time.time()}', file=sys.stderr)\n")
    fake.chmod(0o755)
    result = {}
    timed = threading.Thread(target=lambda: result.update(data.timed_finetune(str(fake), tmp_path, tmp_path,
                                                                              tmp_path, tmp_path)), daemon=True)
    timed.start()
    timed.join(60)
    assert not timed.is_alive(), "the fine-tune's log filled the pipe"
    assert 0 < result["first_step_s"] <= result["total_s"]


def test_data_bench_states_memory_in_the_unit_it_divides_by(tmp_path, monkeypatch, capsys):
    """bench/data.py printed the fine-tune's peak RSS in MiB (bytes / 2**20) labelled MB, beside the
    JPEGs' size in MB (bytes / 10**6) on the same output: 1.5 GiB read as 1536 MB."""
    import argparse

    import data  # bench/data.py

    import bnncc.train.data

    for name in ("build", "loader_throughput", "cpu_ms_per_image"):
        monkeypatch.setattr(data, name, lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(bnncc.train.data, "open_splits", lambda folder: None)
    monkeypatch.setattr(data, "models", lambda work: (work / "teacher.onnx", work / "student.onnx"))
    monkeypatch.setattr(data, "timed_finetune", lambda *args: {"first_step_s": 1.0, "total_s": 2.0,
                                                               "peak_rss_main": 3 * 2**29, "peak_rss_tree": 2**32})
    data.run(argparse.Namespace(images=1, classes=1, shards=False, finetune=True, python=sys.executable), tmp_path)
    assert "peak RSS 1536 MiB (main process), 4096 MiB (process tree)" in capsys.readouterr().out


def test_network_bench_stops_when_an_engine_cannot_start(tmp_path):
    """bench/network.py: an engine's process that failed (here a library folder that is not there)
    printed its error, and the bench then waited for its answer for ever: the parent held the
    engine's end of the pipe open too."""
    import threading

    engines = {"missing": ("bnncc", str(tmp_path / "no-library"))}
    raised = []

    def measure():
        try:
            network._latencies_ms(engines, (1,), rounds=1)
        except RuntimeError as error:
            raised.append(str(error))

    timed = threading.Thread(target=measure, daemon=True)
    timed.start()
    timed.join(120)
    assert not timed.is_alive(), "the bench waited for an engine that had ended"
    assert raised == ["an engine's process ended; its error is printed above"]


def test_gpu_train_bench_refuses_steps_that_leave_none_to_time(monkeypatch, capsys):
    """bench/gpu_train.py --steps 10 (below the 20 warm-up steps) trained both networks and then
    ended in a StopIteration, finding no logged step after the warm-up to time; it is refused first."""
    import gpu_train  # bench/gpu_train.py

    monkeypatch.setattr(sys, "argv", ["gpu_train.py", "--steps", "10"])
    with pytest.raises(SystemExit) as exit_info:
        gpu_train.main()
    assert exit_info.value.code == 2
    assert "--steps 10 leaves no step after the --warmup 20 to time" in capsys.readouterr().err


@pytest.mark.parametrize("cpu_time", [False, True])
def test_popcount_peak_rate_reaps_its_process(peak_binary, cpu_time, monkeypatch):
    """kernels.method_rate reaped popcount_peak with os.wait4 behind Popen's back: Popen then warned
    that the finished process was "still running". A rate comes back by either clock."""
    import gc
    import warnings

    monkeypatch.setattr(kernels, "PEAK_STEPS", 2_000_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rate = kernels.method_rate(peak_binary, "avx2-bytes", 1, cpu_time)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    if rate is None:
        pytest.skip("this CPU cannot run avx2-bytes")
    assert rate > 0


def test_same_logits_compares_the_files_it_says_it_wrote(tmp_path, monkeypatch, capsys):
    """bench/same_logits.py --out before: np.savez wrote before.npz, the script said "wrote before",
    and --compare before after found no such file."""
    import same_logits  # bench/same_logits.py

    monkeypatch.setattr(same_logits, "logits", lambda model, recipes, target: {"pokebnn_1x": np.eye(2)})
    for name in ("before", "after"):
        monkeypatch.setattr(sys, "argv", ["same_logits.py", str(tmp_path / "model.onnx"),
                                          "--out", str(tmp_path / name)])
        assert same_logits.main() == 0
        assert f"wrote {tmp_path / name}" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["same_logits.py", "--compare", str(tmp_path / "before"), str(tmp_path / "after")])
    assert same_logits.main() == 0
    assert "pokebnn_1x: max |diff| 0  bitwise equal" in capsys.readouterr().out
