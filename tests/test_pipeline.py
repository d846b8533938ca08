"""``bnncc convert`` end to end on a narrow ResNet-50 export: artifacts, the report's ACE per stage,
stage reuse, byte-identical outputs, fine-tuning, other targets and atomic outputs under failure."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from idx_files import brightness_idx

from bnncc import zoo
from bnncc.cost import ace
from bnncc.domain import MAX_BATCH
from bnncc.errors import BnnccError
from bnncc.frontend import load
from bnncc.pipeline import ConvertOptions, convert
from bnncc.targets import cuda, registry

# width 1/8: a stem of 8 channels, so PokeInit's middle width must be 8 too
STEM = ("passes.poke_stem.mid_channels=8",)


@pytest.fixture(scope="module")
def narrow_resnet(tmp_path_factory):
    """torchvision's ResNet-50 at width 1/8, 4 classes, 32x32 inputs (legacy export, BN folded)."""
    folder = tmp_path_factory.mktemp("pipeline")
    return zoo.export_onnx(zoo.resnet50(width=0.125, num_classes=4), folder / "r50.onnx", input_size=32)


@pytest.fixture(scope="module")
def converted(narrow_resnet, tmp_path_factory):
    """One untrained x86-64 conversion, shared by the tests that only read it."""
    outdir = tmp_path_factory.mktemp("converted") / "out"
    return convert(narrow_resnet, outdir, ConvertOptions(overrides=STEM, latency_runs=3, show_progress=False))


def test_convert_writes_every_artifact(converted):
    names = {p.name for p in converted.outdir.iterdir()}
    assert {"model.so", "model.json", "model.onnx", "report.json", "report.md", "latency.json", "ace_stages.png",
            "ace_layers.png", "stages"} <= names
    assert not [p for p in converted.outdir.rglob(".*")], "temporary files left behind"
    manifest = json.loads((converted.outdir / "model.json").read_text())
    assert manifest["target"]["name"] == "x86-64" and manifest["input"]["shape"] == ["N", 3, 32, 32]
    onnx.checker.check_model(str(converted.outdir / "model.onnx"))


@pytest.mark.parametrize("shape,dtype", [((1, 3, 28, 28), np.float32), ((2, 3, 32, 32), np.float32),
                                         ((1, 3, 32, 32), np.float64)])
def test_library_functions_reject_inputs_not_of_their_signature(converted, shape, dtype):
    """The kernels are built without argument checks (registry._cpu_pass_config): the library's
    Relax function must still refuse what does not match its parameter, before any kernel runs."""
    from bnncc.targets.tvm_compat import load_vm, to_tensor

    vm = load_vm(converted.outdir / "model.so")
    with pytest.raises(Exception, match="Check failed"):
        vm["batch_1"](to_tensor(np.zeros(shape, dtype)))
    assert vm["batch_1"](to_tensor(np.zeros((1, 3, 32, 32), np.float32))).numpy().shape == (1, 4)


def test_report_shows_ace_at_each_stage(converted, narrow_resnet):
    report = json.loads((converted.outdir / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["float import", "rewrite", "compiled"]
    float_ace, pokebnn_ace = ace(load(narrow_resnet)).total, ace(converted.outdir / "model.onnx").total
    assert [s["ace"] for s in report["stages"]] == [float_ace, pokebnn_ace, pokebnn_ace]
    assert report["ace_reduction"] == pytest.approx(float_ace / pokebnn_ace) and float_ace > 20 * pokebnn_ace
    assert report["stages"][-1]["file_bytes"] == (converted.outdir / "model.so").stat().st_size
    assert report["trained"] is False and report["accuracy"] is None
    assert len(report["layers"]) == len(ace(converted.outdir / "model.onnx").layers)
    md = (converted.outdir / "report.md").read_text()
    assert "Not fine-tuned" in md and f"{pokebnn_ace / 1e9:.4f}" in md


def test_second_run_reuses_every_stage_and_gives_the_same_bytes(converted, narrow_resnet):
    before = {name: (converted.outdir / name).read_bytes() for name in ("report.json", "model.onnx", "model.so")}
    again = convert(narrow_resnet, converted.outdir, ConvertOptions(overrides=STEM, latency_runs=3,
                                                                     show_progress=False))
    assert again.cached == {"rewrite": True, "compile": True}
    for name, data in before.items():
        assert (converted.outdir / name).read_bytes() == data, name


def test_the_same_model_from_another_folder_gives_the_same_report(converted, narrow_resnet, tmp_path):
    """report.json held the model's path as given: the same model converted from another folder (an absolute
    path, a CI job's own workspace) gave another report.json, which the README calls reproducible."""
    elsewhere = tmp_path / "job-1234" / narrow_resnet.name
    elsewhere.parent.mkdir()
    shutil.copyfile(narrow_resnet, elsewhere)
    again = convert(elsewhere, tmp_path / "out", ConvertOptions(overrides=STEM, latency_runs=1, show_progress=False))
    for name in ("report.json", "model.onnx", "model.so"):
        assert (again.outdir / name).read_bytes() == (converted.outdir / name).read_bytes(), name
    assert json.loads((again.outdir / "report.json").read_text())["model"] == "r50.onnx"


@pytest.mark.parametrize("target, largest", [("x86-64", MAX_BATCH), ("cuda", cuda.MAX_BATCH)])
def test_convert_refuses_a_batch_its_target_cannot_build_before_any_work(narrow_resnet, tmp_path, monkeypatch,
                                                                         target, largest):
    """Only compile checked the batches, last: a batch beyond the target's largest was refused after the import,
    the rewrite (and a fine-tune's hours with --data), leaving the output folder's stages behind."""
    # without nvcc too: the batch is refused before any tool would run
    monkeypatch.setitem(registry.TARGETS, target, dataclasses.replace(registry.TARGETS[target], check_build=None))
    options = ConvertOptions(overrides=STEM, target=target, batches=(4, largest + 1), show_progress=False)
    said = f"^batch sizes must be 1 to {largest} for {target}, got \\[4, {largest + 1}\\] \\(a library takes any"
    with pytest.raises(BnnccError, match=said):
        convert(narrow_resnet, tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


def test_convert_takes_numpy_batch_sizes(narrow_resnet, tmp_path):
    """The compile stage's key held the batches as given: numpy integers (np.arange's) failed its JSON after the
    rewrite, in a TypeError. The library holds them and batch 1, and gives onnxruntime's logits."""
    import onnxruntime as ort

    from bnncc.runtime import load as load_library

    options = ConvertOptions(overrides=STEM, batches=tuple(np.arange(3, 4)), latency_runs=1, show_progress=False)
    result = convert(narrow_resnet, tmp_path / "out", options)
    library = load_library(result.outdir)
    assert sorted(library.functions) == [1, 3]
    x = np.random.default_rng(3).standard_normal((3, *library.input_chw)).astype(np.float32)
    session = ort.InferenceSession(str(result.outdir / "model.onnx"))
    ref = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(library(x), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_cli_says_the_network_is_untrained_and_how_to_train_it(cli, converted, narrow_resnet):
    code, out, err = cli("convert", narrow_resnet, "--set", STEM[0], "-o", converted.outdir)
    assert code == 0, err
    text = " ".join(out.split())
    assert "The network is untrained" in text and "--data DIR --epochs N --set train.lr=3e-2" in text
    assert f"report {converted.outdir}/report.md" in text
    assert f"to run it without Python (on the device): bnncc bundle {converted.outdir} -o DIR" in text


def test_cli_stage_table_of_a_full_resnet50_keeps_its_numbers_at_80_columns(capsys, monkeypatch):
    """rich narrowed every column to fit 80 and cut a ResNet-50's 25,557,032 params to "25,557,0…"."""
    from types import SimpleNamespace

    from bnncc.cli._app import MIN_WIDTH, console
    from bnncc.cli.convert_cmd import print_result

    def stage(name, ace, cpu64, params, size):
        return SimpleNamespace(name=name, file_bytes=size, cost=SimpleNamespace(total=ace, cpu64=cpu64,
                                                                               trainable_params=params))

    stages = (stage("float import", 1_046_831_169_536, 4_089_184_256, 25_557_032, 102_442_450),
              stage("rewrite", 4_222_541_824, 216_417_792, 27_182_112, 109_000_000),
              stage("fine-tune", 4_222_541_824, 216_417_792, 27_182_112, 109_000_000),
              stage("compiled", 4_222_541_824, 216_417_792, 27_182_112, 285_000_000))
    report = SimpleNamespace(stages=stages, accuracy=None, latency=None)
    monkeypatch.setattr(console, "width", MIN_WIDTH)
    print_result(SimpleNamespace(outdir="out", report=report, cached={"rewrite": True},
                                 seconds={"import": 3.2, "rewrite": 40.5, "finetune": 12345.6, "compile": 95.0}))
    out = capsys.readouterr().out
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= MIN_WIDTH, out
    for cells in (["1046.8312", "4089.18", "25,557,032", "97.70 MiB"], ["4.2225", "216.42", "27,182,112", "12345.6"],
                  ["271.80 MiB", "95.0"]):
        assert any(all(f" {cell} " in line for cell in cells) for line in out.splitlines()), (cells, out)


def test_fine_tuning_options_without_data_are_an_error(cli, narrow_resnet, tmp_path):
    """They were taken and ignored: the run compiled an untrained network, exit 0."""
    code, _, err = cli("convert", narrow_resnet, "--epochs", "5", "--max-steps", "3", "-o", tmp_path / "out")
    assert code == 2 and "--epochs, --max-steps: set the fine-tune, which runs only with --data DIR" in err, err
    assert not (tmp_path / "out").exists()


def test_a_changed_option_redoes_only_the_stages_it_feeds(converted, narrow_resnet):
    """A new batch list changes the compile stage's key but not the rewrite's."""
    again = convert(narrow_resnet, converted.outdir, ConvertOptions(overrides=STEM, batches=(1, 2), latency_runs=3,
                                                                     show_progress=False))
    assert again.cached == {"rewrite": True, "compile": False}
    assert json.loads((converted.outdir / "model.json").read_text())["functions"].keys() == {"1", "2"}


def test_a_library_built_for_another_cpu_class_is_not_reused(converted, narrow_resnet, tmp_path, monkeypatch):
    """The compile stage was keyed on the target's name: a folder converted again on a CPU of another class
    (a stage folder on a shared disk) reused the library built for the first CPU, which the second may not run."""
    from bnncc.targets import x86_64

    host = x86_64.popcount_class(x86_64.host_target())
    if host is None or host == x86_64.AVX2:
        pytest.skip("this CPU has no AVX-512: no other class of CPU to stand in for")
    outdir, options = tmp_path / "out", ConvertOptions(overrides=STEM, latency_runs=1, show_progress=False)
    shutil.copytree(converted.outdir, outdir)
    assert convert(narrow_resnet, outdir, options).cached["rewrite"]  # (the stages of these options, built here)
    monkeypatch.setattr(x86_64, "cpu_flags", lambda: set(x86_64.CLASS_FLAGS[x86_64.AVX2]))
    assert convert(narrow_resnet, outdir, options).cached == {"rewrite": True, "compile": False}
    llvm = json.loads(json.loads((outdir / "model.json").read_text())["target"]["llvm"])
    assert llvm["mcpu"] == "x86-64-v3" and "avx512" not in str(llvm.get("mattr"))


def test_a_library_built_by_another_tvm_is_not_reused(converted, narrow_resnet, tmp_path, monkeypatch):
    """The compile stage's key held bnncc's version but not TVM's: after an upgrade of TVM a convert again
    reused the library the old TVM had built."""
    from bnncc.targets import tvm_compat

    outdir, options = tmp_path / "out", ConvertOptions(overrides=STEM, latency_runs=1, show_progress=False)
    shutil.copytree(converted.outdir, outdir)
    assert convert(narrow_resnet, outdir, options).cached["rewrite"]  # (the stages of these options, built here)
    monkeypatch.setattr(tvm_compat, "versions", lambda: "tvm-9.9.9-ffi-9.9.9")
    assert convert(narrow_resnet, outdir, options).cached == {"rewrite": True, "compile": False}


@pytest.mark.skipif(cuda.find_nvcc() is None, reason="needs nvcc (a CUDA toolkit)")
def test_a_cuda_library_of_other_convs_is_not_reused(narrow_resnet, tmp_path, monkeypatch):
    """The compile stage's key held the CUDA arch and graphs but not BNNCC_CUDA_MMA: a convert again with the
    tensor cores on reused the library of popc convs, its model.json saying "tensor_cores": false."""
    outdir = tmp_path / "out"
    options = ConvertOptions(target="cuda", overrides=STEM, latency_runs=1, show_progress=False)
    convert(narrow_resnet, outdir, options)
    monkeypatch.setenv(cuda.MMA_ENV, "1")
    assert convert(narrow_resnet, outdir, options).cached == {"rewrite": True, "compile": False}
    assert json.loads((outdir / "model.json").read_text())["cuda"]["tensor_cores"] is True


def test_a_renamed_recipe_is_the_name_the_library_records(converted, narrow_resnet, tmp_path):
    """The rewrite stage's key held the recipe's passes alone, but its graph carries the recipe's name,
    which model.json records: after `--set name=mine` report.json said "mine" and model.json "pokebnn_1x"."""
    outdir = tmp_path / "out"
    shutil.copytree(converted.outdir, outdir)
    again = convert(narrow_resnet, outdir, ConvertOptions(overrides=(*STEM, "name=mine"), latency_runs=3,
                                                          show_progress=False))
    assert again.cached["rewrite"] is False
    for name in ("model.json", "report.json"):
        assert json.loads((outdir / name).read_text())["recipe"] == "mine", name


def test_a_recipe_for_other_blocks_is_refused_whatever_the_folder_holds(narrow_resnet, tmp_path):
    """A rewrite stage reused from a run with --set blocks=bottleneck let the basic-block recipe through
    without it, where a fresh folder refuses it."""
    stem = ("passes.poke_stem.mid_channels=8",)
    options = ConvertOptions(recipe="resnet18_pokebnn", overrides=(*stem, "blocks=bottleneck"), latency_runs=1,
                             show_progress=False)
    convert(narrow_resnet, tmp_path / "out", options)
    with pytest.raises(BnnccError, match="recipe resnet18_pokebnn is for basic ResNets, but this model has bottleneck"):
        convert(narrow_resnet, tmp_path / "out", dataclasses.replace(options, overrides=stem))


def test_a_library_rebuilt_in_its_folder_is_loaded_anew(converted, narrow_resnet):
    """dlopen hands back the library first loaded under a path: in one process, a library rebuilt
    in the same folder ran the old code under the new model.json."""
    from bnncc.runtime import load as load_library

    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    load_library(converted.outdir)(x[:1])
    convert(narrow_resnet, converted.outdir, ConvertOptions(overrides=STEM, batches=(1, 3), latency_runs=3,
                                                            show_progress=False))
    library = load_library(converted.outdir)
    assert library.functions == {1: "batch_1", 3: "batch_3"}
    np.testing.assert_allclose(library(x), np.concatenate([library(x[i:i + 1]) for i in range(3)]), rtol=1e-5,
                               atol=1e-5)


def test_an_output_folder_through_a_missing_folder_and_back_makes_only_itself(cli, narrow_resnet, tmp_path,
                                                                              monkeypatch):
    """`-o a/../out` with no `a` left an empty `a` beside out/ (made to walk through, as mkdir -p does), and
    the bundle command convert prints named a/../out, which no longer reads once `a` is gone."""
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("convert", narrow_resnet, *[a for o in STEM for a in ("--set", o)], "-o", "a/../out")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out" / "model.so").is_file()
    assert "bnncc bundle out -o DIR" in " ".join(out.split())


def test_unknown_target_is_a_one_line_error(cli, narrow_resnet, tmp_path):
    code, _, err = cli("convert", narrow_resnet, "--target", "riscv", "-o", tmp_path / "out")
    assert code == 2 and "unknown target 'riscv'" in err and not (tmp_path / "out").exists()


def test_failed_compile_leaves_no_library_and_no_stage_record(narrow_resnet, tmp_path, monkeypatch):
    """A failure while the library is written (injected into its export, after half a file) leaves no
    model.so anywhere and no compile record, so the next run compiles again."""
    spec = registry.get("x86-64")

    def broken_export(executable, path):
        path.write_bytes(b"\x7fELF half a library")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(registry, "TARGETS", {**registry.TARGETS, "x86-64": dataclasses.replace(spec,
                                                                                                export=broken_export)})
    outdir = tmp_path / "out"
    with pytest.raises(BnnccError, match=r"library: cannot write there \(disk full \(injected\)\)"):
        convert(narrow_resnet, outdir, ConvertOptions(overrides=STEM, show_progress=False))
    assert not list(outdir.rglob("*.so")) and not (outdir / "stages" / "compile.json").exists()
    assert (outdir / "stages" / "rewrite.json").exists()  # the stage before it is complete and kept
    assert sorted(p.name for p in outdir.rglob("*") if p.is_file()) == ["lock", "rewrite.json", "rewrite.onnx"]


def test_an_interrupt_after_compile_leaves_no_library_without_its_report(narrow_resnet, tmp_path, monkeypatch):
    """Stopped while the library is measured (after it was copied out), convert left model.so,
    model.json and model.onnx but no report; now only the stage cache stays, and the next run
    publishes everything from it."""
    import bnncc.pipeline as pipeline

    measure = pipeline.measure_latency

    def interrupted(lib, runs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "measure_latency", interrupted)
    outdir = tmp_path / "out"
    options = ConvertOptions(overrides=STEM, latency_runs=1, show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        convert(narrow_resnet, outdir, options)
    assert sorted(p.name for p in outdir.iterdir()) == ["stages"]
    monkeypatch.setattr(pipeline, "measure_latency", measure)
    again = convert(narrow_resnet, outdir, options)
    assert again.cached == {"rewrite": True, "compile": True}
    assert {"model.so", "model.json", "model.onnx", "report.md", "report.json"} <= {p.name for p in outdir.iterdir()}


def test_latency_counts_the_threads_of_tvms_default_pool():
    """TVM_NUM_THREADS=0 asks for TVM's default pool, half the logical CPUs on x86-64 (at least one);
    the latency was reported as measured on "0 threads"."""
    code = ("from bnncc.pipeline import measure_latency\n"
            "Identity = type('Identity', (), {'input_chw': (1, 2, 2), '__call__': lambda self, x: x})\n"
            "print(measure_latency(Identity(), 2)['threads'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"TVM_NUM_THREADS": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(done.stdout.split()[-1]) == max(1, os.cpu_count() // 2)



def test_latency_leaves_the_process_its_cpus():
    """With TVM_NUM_THREADS=1, the pool that measure_latency asks for its threads pinned the process to one CPU:
    a fine-tune after a convert in one process ran torch on it alone and refused --workers 2."""
    code = ("import os\n"
            "from bnncc.pipeline import measure_latency\n"
            "Identity = type('Identity', (), {'input_chw': (1, 2, 2), '__call__': lambda self, x: x})\n"
            "cpus = os.sched_getaffinity(0)\n"
            "print(measure_latency(Identity(), 2)['threads'], os.sched_getaffinity(0) == cpus)")
    done = subprocess.run([sys.executable, "-c", code], env=os.environ | {"TVM_NUM_THREADS": "1"},
                          capture_output=True, text=True, check=True)
    assert done.stdout.split()[-2:] == ["1", "True"]

def test_a_full_disk_while_the_library_is_copied_out_is_one_error(narrow_resnet, tmp_path, monkeypatch):
    """Copying the library out of stages/ onto a full disk ended convert in an "unexpected OSError",
    exit 1: copyfile's error names its source, the stage's file, first. It now names the output,
    leaves the stage cache alone, and the next run publishes from it. The disk fills in copyfile's
    sendfile, so the error is the one shutil itself makes."""
    import errno

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    outdir = tmp_path / "out"
    options = ConvertOptions(overrides=STEM, latency_runs=1, show_progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(os, "sendfile", full)
        with pytest.raises(BnnccError, match=r"out/model.so: cannot write there \(No space left on device\)"):
            convert(narrow_resnet, outdir, options)
    assert sorted(p.name for p in outdir.iterdir()) == ["stages"]
    assert convert(narrow_resnet, outdir, options).cached == {"rewrite": True, "compile": True}
    assert (outdir / "report.json").is_file()


def test_a_run_removes_the_partial_outputs_a_killed_run_left(narrow_resnet, tmp_path):
    """A kill -9 while a stage graph, the library or a published file was written left its temporary
    file or folder (.rewrite.onnx.x1y2z3.onnx, .library.x1y2z3/, .model.so.x1y2z3.so), as large as the
    output, and every later run kept it; the user's own hidden files are not bnncc's temporaries."""
    outdir = tmp_path / "out"
    partial = [outdir / "stages" / ".rewrite.onnx.x1y2z3.onnx", outdir / "stages" / ".library.x1y2z3" / "model.so",
               outdir / ".model.so.x1y2z3.so"]
    mine = [outdir / ".notes", outdir / ".model.so"]
    for path in (*partial, *mine):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    (outdir / "stages" / "lock").touch()
    convert(narrow_resnet, outdir, ConvertOptions(overrides=STEM, latency_runs=1, show_progress=False))
    assert not any(path.exists() for path in partial) and not (outdir / "stages" / ".library.x1y2z3").exists()
    assert all(path.read_bytes() == b"half" for path in mine)


def test_a_run_killed_while_it_publishes_leaves_no_earlier_runs_files(narrow_resnet, tmp_path):
    """A kill -9 after the new model.so was copied out left it beside the earlier run's model.onnx and
    report, which describe another network: `bnncc verify` of the folder failed. The process here
    ends as a kill does (os._exit, no cleanup) as it begins the copy after model.so's."""
    outdir = tmp_path / "out"
    convert(narrow_resnet, outdir, ConvertOptions(overrides=STEM, latency_runs=1, show_progress=False))
    killed = f"""
import os, shutil
from bnncc.pipeline import ConvertOptions, convert
copyfile = shutil.copyfile
def die_after_model_so(source, dest):
    if os.path.basename(source) != "model.so":
        os._exit(137)
    return copyfile(source, dest)
shutil.copyfile = die_after_model_so
convert({str(narrow_resnet)!r}, {str(outdir)!r}, ConvertOptions(overrides=("passes.poke_stem.mid_channels=4",),
        latency_runs=1, show_progress=False))
"""
    assert subprocess.run([sys.executable, "-c", killed]).returncode == 137
    assert (outdir / "model.so").is_file()
    assert not any((outdir / name).exists() for name in ("model.onnx", "report.json", "report.md", "latency.json"))


def test_a_folder_another_convert_is_writing_is_refused(narrow_resnet, tmp_path):
    """Two converts into one folder replaced each other's stage files; the second now stops at once,
    before any stage, and its lock goes with the first's end (here, the file's closing)."""
    import fcntl

    outdir = tmp_path / "out"
    (outdir / "stages").mkdir(parents=True)
    options = ConvertOptions(overrides=STEM, latency_runs=1, show_progress=False)
    with open(outdir / "stages" / "lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BnnccError, match=r"out: another bnncc convert or demo is writing this folder"):
            convert(narrow_resnet, outdir, options)
        assert sorted(p.name for p in (outdir / "stages").iterdir()) == ["lock"]
    assert convert(narrow_resnet, outdir, options).cached == {"rewrite": False, "compile": False}


def test_a_demo_trains_its_teacher_under_the_folders_lock(tmp_path):
    """The demo trained and wrote its teacher.onnx outside the lock its convert takes: a second demo into
    the folder replaced the teacher that the first one's convert was distilling from."""
    import fcntl

    from bnncc.pipeline import DemoOptions, demo

    data = brightness_idx(tmp_path / "data", 64, 16)
    outdir = tmp_path / "out"
    (outdir / "stages").mkdir(parents=True)
    with open(outdir / "stages" / "lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BnnccError, match=r"out: another bnncc convert or demo is writing this folder"):
            demo(outdir, data, DemoOptions(teacher_epochs=1, epochs=1, batch_size=16), show_progress=False)
    assert sorted(p.name for p in outdir.rglob("*")) == ["lock", "stages"]


def test_an_output_folder_that_cannot_be_made_is_a_one_line_error(cli, narrow_resnet, tmp_path):
    """Taking the run's lock made the folder with a bare mkdir: an output folder under a file (or on
    a read-only file system) ended convert in an 'unexpected NotADirectoryError', exit status 1."""
    (tmp_path / "file").write_text("mine")
    code, _, err = cli("convert", narrow_resnet, "--set", STEM[0], "-o", tmp_path / "file" / "out")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'file' / 'out'}: cannot write there (Not a directory)", err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_folder_that_cannot_be_locked_is_written_with_a_warning(narrow_resnet, tmp_path, monkeypatch, caplog):
    """flock's ENOLCK (an NFS mount without locks) had ended convert in an unexpected OSError."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    result = convert(narrow_resnet, tmp_path / "out", ConvertOptions(overrides=STEM, latency_runs=1,
                                                                     show_progress=False))
    assert (result.outdir / "model.so").is_file()
    assert "stages/lock: cannot be locked (No locks available)" in caplog.text


def test_a_run_refused_in_its_first_stage_leaves_nothing(narrow_resnet, tmp_path):
    """A rewrite refused by the recipe wrote nothing, and leaves no folder; a folder whose stages/
    holds only a lock (a run killed before its first stage ended) is bnncc's, and taken."""
    outdir = tmp_path / "new" / "out"
    with pytest.raises(BnnccError, match="mid_channels"):
        convert(narrow_resnet, outdir, ConvertOptions(overrides=("passes.poke_stem.mid_channels=7",), latency_runs=1,
                                                      show_progress=False))
    assert not (tmp_path / "new").exists()
    (outdir / "stages").mkdir(parents=True)
    (outdir / "stages" / "lock").touch()
    convert(narrow_resnet, outdir, ConvertOptions(overrides=STEM, latency_runs=1, show_progress=False))


@pytest.mark.parametrize("runs", [0, -1])
def test_no_latency_run_is_refused_before_any_work(narrow_resnet, tmp_path, runs):
    """From Python only (the command has no such option): latency_runs=0 rewrote and compiled, and then
    failed measuring with "StatisticsError: no median for empty data"."""
    with pytest.raises(BnnccError, match=rf"^latency_runs = {runs}: the latency is the median of at least one run$"):
        convert(narrow_resnet, tmp_path / "out", ConvertOptions(overrides=STEM, latency_runs=runs, show_progress=False))
    assert not (tmp_path / "out").exists()


def test_killed_rewrite_leaves_no_partial_onnx(narrow_resnet, tmp_path):
    """SIGKILL `bnncc rewrite` at several points: out.onnx is either absent or a complete model."""
    output = tmp_path / "out.onnx"
    for delay in (1.0, 3.0, 5.0):
        process = subprocess.Popen([sys.executable, "-c", "from bnncc.cli import main; main()", "rewrite", str(narrow_resnet), "--set", STEM[0],
                                    "-o", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if output.exists():
            onnx.checker.check_model(str(output))
            output.unlink()
    assert not output.exists()


def test_terminated_compile_leaves_no_temporary_folder(narrow_resnet, tmp_path):
    """SIGTERM while `bnncc compile` writes its library under a temporary name: exit status 143,
    and neither the library, nor its temporary folder, nor the folder it made to hold them is left."""
    convert(narrow_resnet, tmp_path / "out", ConvertOptions(overrides=STEM, latency_runs=1, show_progress=False))
    graph, folder = tmp_path / "out" / "stages" / "rewrite.onnx", tmp_path / "lib"
    process = subprocess.Popen([sys.executable, "-m", "bnncc", "compile", str(graph), "-o", str(folder / "lib")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (folder.exists() and any(folder.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait() == 128 + signal.SIGTERM
    assert not folder.exists()


def test_convert_refuses_an_output_folder_of_other_files_before_any_work(cli, narrow_resnet, tmp_path):
    """A file, a folder holding a user's model.onnx, and a data folder that holds no data set are
    refused in one line before the rewrite, and nothing is written or replaced; a folder of the
    user's other files takes the outputs beside them."""
    (tmp_path / "file").write_text("keep")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "model.onnx").write_text("the user's")
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "a.png").write_bytes(b"")
    cases = [("-o", tmp_path / "file", "exists and is not a folder"),
             ("-o", tmp_path / "theirs", "holds model.onnx, which bnncc did not write"),
             ("--data", tmp_path / "pictures", "neither an IDX folder")]
    for option, path, message in cases:
        out = tmp_path / "out" if option == "--data" else path
        data = ["--data", path] if option == "--data" else []
        code, _, err = cli("convert", narrow_resnet, "--set", STEM[0], "-o", out, *data)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "file").read_text() == "keep" and not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["model.onnx"]
    assert (tmp_path / "theirs" / "model.onnx").read_text() == "the user's"


def test_a_stages_folder_of_the_users_is_no_earlier_run(tmp_path):
    """A user's own `stages` folder holding a `plan.json` was taken for an earlier run's: convert wrote into it
    and removed what was hidden there (`.ipynb_checkpoints`) as its stopped writes. A stage record is one
    `cached_stage` wrote."""
    from bnncc.pipeline import cached_stage, check_outdir

    stages = tmp_path / "stages"
    (stages / ".ipynb_checkpoints").mkdir(parents=True)
    (stages / "plan.json").write_text('{"stage": "plan"')  # (not JSON)
    (stages / "rewrite.json").write_text('{"stage": "plan"}')
    message = f"{tmp_path}: holds stages, which bnncc did not write; remove it or choose another output folder"
    with pytest.raises(BnnccError, match=f"^{re.escape(message)}$"):
        check_outdir(tmp_path)
    cached_stage(stages, "rewrite", {"k": 1}, [], lambda: {})
    check_outdir(tmp_path)


def test_library_accuracy_is_counted_batch_by_batch(converted, tmp_path, monkeypatch):
    """The library's top-1/top-5 on the test split, in batches of 256: the same as numpy's count
    over the whole split at once, without holding the whole split (30 GB for ImageNet's)."""
    import torch

    from bnncc import pipeline
    from bnncc.runtime import load as load_library
    from bnncc.train.data import open_dataset

    data = brightness_idx(tmp_path / "data", 64, 300)
    lib = load_library(converted.outdir)
    test = open_dataset(data, "val")
    images, labels = test.batch(torch.arange(len(test)), lib.input_chw, augment=False)
    best = np.argsort(-lib(images.numpy()), axis=1, kind="stable")[:, :5]
    labels = labels.numpy()
    expected = {"library_top1": 100 * np.mean(best[:, 0] == labels)}
    sizes = []
    library = lib.__class__.__call__
    monkeypatch.setattr(lib.__class__, "__call__", lambda self, x: sizes.append(len(x)) or library(self, x))
    got = pipeline._library_accuracy(lib, data, show_progress=False)
    assert got.pop("library_top5") is None  # (4 classes: no top-5)
    assert got == pytest.approx(expected)
    assert sizes == [256, 44]


def test_library_accuracy_indexes_the_test_split_alone(converted, tmp_path, monkeypatch):
    """A small validation split of shards may lack the last classes: its own count (3 of 4) had left
    the library's accuracy out; then the training split was indexed again only to count its classes
    (some 95 s of CPU for ImageNet's shards). The fine-tune decides, and only val is read."""
    import io
    import tarfile

    from PIL import Image

    from bnncc import pipeline
    from bnncc.runtime import load as load_library
    from bnncc.train import data as train_data

    def shard(path, classes):
        with tarfile.open(path, "w") as tar:
            for i, label in enumerate(classes):
                image = io.BytesIO()
                Image.new("RGB", (16, 16), (60 * label,) * 3).save(image, "JPEG")
                for name, payload in ((f"{i}.jpg", image.getvalue()), (f"{i}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))

    (tmp_path / "shards").mkdir()
    shard(tmp_path / "shards" / "train-000000.tar", [0, 1, 2, 3])
    shard(tmp_path / "shards" / "val-000000.tar", [0, 1, 2])
    opened = []
    open_dataset = train_data.open_dataset
    monkeypatch.setattr(train_data, "open_dataset",
                        lambda path, split: opened.append(split) or open_dataset(path, split))
    got = pipeline._library_accuracy(load_library(converted.outdir), tmp_path / "shards", show_progress=False)
    assert got.keys() == {"library_top1", "library_top5"} and opened == ["val"]


@pytest.mark.parametrize("student_top1, measured", [(None, False), (50.0, True)])
def test_the_library_is_measured_where_the_fine_tune_measured_the_student(converted, tmp_path, monkeypatch,
                                                                         student_top1, measured):
    """The fine-tune measures the student only on a test split of the network's classes; the
    library follows it (an ImageNet network distilled on Fashion-MNIST: no accuracy of either)."""
    from bnncc import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "_library_accuracy",
                        lambda lib, data, show: calls.append(data) or {"library_top1": 1})
    accuracy = {"teacher_top1": None, "student_top1": student_top1}
    stages = [dataclasses.replace(s, file_bytes=0) for s in converted.report.stages[:-1]]
    options = ConvertOptions(data=tmp_path, latency_runs=1, show_progress=False)
    report = pipeline._publish(tmp_path / "out", converted.outdir / "stages" / "library", converted.outdir / "m.onnx",
                               "pokebnn_1x", stages, accuracy, options)
    assert calls == ([tmp_path] if measured else []) and ("library_top1" in report.accuracy) == measured


def test_a_class_target_this_cpu_runs_is_measured(narrow_resnet, tmp_path, monkeypatch):
    """An x86-64-avx2 library on a CPU with AVX2 runs here as the host target's does, but convert's
    report gave it no latency and no accuracy row ("not run on this machine")."""
    from bnncc import pipeline
    from bnncc.targets import x86_64

    if not set(x86_64.CLASS_FLAGS[x86_64.AVX2]) <= x86_64.cpu_flags():
        pytest.skip("this CPU has no AVX2")
    result = convert(narrow_resnet, tmp_path / "out", ConvertOptions(overrides=STEM, target="x86-64-avx2",
                                                                      latency_runs=1, show_progress=False))
    assert result.report.latency is not None and (result.outdir / "latency.json").exists()
    calls = []
    monkeypatch.setattr(pipeline, "_library_accuracy",
                        lambda lib, data, show: calls.append(data) or {"library_top1": 1})
    stages = [dataclasses.replace(s, file_bytes=0) for s in result.report.stages[:-1]]
    options = ConvertOptions(target="x86-64-avx2", data=tmp_path, latency_runs=1, show_progress=False)
    report = pipeline._publish(tmp_path / "again", result.outdir / "stages" / "library", tmp_path / "m.onnx",
                               "pokebnn_1x", stages, {"teacher_top1": None, "student_top1": 50.0}, options)
    assert calls == [tmp_path] and report.accuracy["library_top1"] == 1


def test_convert_refuses_an_output_folder_inside_the_data_folder(cli, narrow_resnet, tmp_path):
    """The stages' key takes every file of the data folder: a run's own outputs there changed it, and
    the fine-tune ran again at every run."""
    data = brightness_idx(tmp_path / "data", 64, 16)
    code, _, err = cli("convert", narrow_resnet, "--set", STEM[0], "--data", data, "-o", data / "out")
    assert code == 2 and err.strip() == f"error: {data / 'out'}: inside the data folder {data}; choose an output " \
                                       f"folder outside it" and not (data / "out").exists(), err


@pytest.mark.slow
def test_convert_with_data_fine_tunes_and_reports_accuracy(narrow_resnet, tmp_path):
    data = brightness_idx(tmp_path / "data", 64, 16)
    options = ConvertOptions(overrides=STEM, data=data, max_steps=2, batch_size=16, latency_runs=3,
                             show_progress=False)
    result = convert(narrow_resnet, tmp_path / "out", options)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["float import", "rewrite", "fine-tune", "compiled"]
    assert report["trained"] is True
    assert {"teacher_top1", "student_top1", "library_top1"} <= report["accuracy"].keys()
    again = convert(narrow_resnet, tmp_path / "out", options)
    assert again.cached == {"rewrite": True, "finetune": True, "compile": True}
    assert again.report.accuracy == result.report.accuracy


@pytest.mark.slow
def test_a_stopped_fine_tune_continues_from_its_checkpoint(narrow_resnet, tmp_path, monkeypatch, caplog):
    """Stopped after its checkpoint, convert's fine-tune keeps it in stages/; the same command then
    resumes from it, and removes it when the stage completes."""
    import bnncc.train.trainer as trainer

    data = brightness_idx(tmp_path / "data", 64, 16)
    options = ConvertOptions(overrides=STEM, data=data, max_steps=2, batch_size=16, latency_runs=1,
                             show_progress=False)
    saved = trainer._save_checkpoint

    def save_then_stop(path, step, *args):
        saved(path, step, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        convert(narrow_resnet, tmp_path / "out", options)
    checkpoints = list((tmp_path / "out" / "stages").glob("finetune-*.ckpt"))
    assert len(checkpoints) == 1
    monkeypatch.setattr(trainer, "_save_checkpoint", saved)
    with caplog.at_level("INFO", logger="bnncc.train.trainer"):
        result = convert(narrow_resnet, tmp_path / "out", options)
    assert f"resumed from {checkpoints[0]} at step 2" in caplog.text
    assert result.trained and not checkpoints[0].exists()


def test_a_model_exported_at_batch_4_converts_to_one_of_any_batch(narrow_resnet, tmp_path):
    """An export for a fixed batch of 4: the library and its reference graph take any batch, and
    the library agrees with onnxruntime on that reference, image by image and 4 at a time."""
    from bnncc.runtime import load as load_library
    from bnncc.verification import verify

    proto = onnx.load(narrow_resnet)
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 4
    del proto.graph.value_info[:]
    onnx.save(proto, tmp_path / "b4.onnx")
    result = convert(tmp_path / "b4.onnx", tmp_path / "out", ConvertOptions(overrides=STEM, latency_runs=1,
                                                                            show_progress=False))
    reference = onnx.load(result.outdir / "model.onnx")
    assert reference.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert verify(result.outdir).ok and verify(result.outdir, n=8, batch=4).ok
    assert load_library(result.outdir)(np.zeros((3, 3, 32, 32), np.float32)).shape == (3, 4)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["arm64"])
def test_convert_for_another_target(narrow_resnet, tmp_path, target):
    missing = [r.what for r in registry.get(target).requirements() if r.found is None and r.needed_for == "build"]
    if missing:
        pytest.skip(f"{target}: missing {', '.join(missing)}")
    result = convert(narrow_resnet, tmp_path / "out", ConvertOptions(overrides=STEM, target=target,
                                                                      show_progress=False))
    assert {"model.so", "model.json", "model.onnx", "report.json"} <= {p.name for p in result.outdir.iterdir()}
    assert result.report.latency is None and not (result.outdir / "latency.json").exists()
    assert json.loads((result.outdir / "model.json").read_text())["target"]["name"] == target


def test_data_that_is_a_file_is_named_as_such(cli, narrow_resnet, tmp_path):
    """--data naming a file said "no such data directory" of a file that exists."""
    from bnncc.pipeline import demo

    (tmp_path / "images.tar").write_bytes(b"")
    message = ("images.tar: not a folder; --data takes the folder of a data set (IDX files, an ImageFolder tree or "
               "tar shards)")
    code, _, err = cli("convert", narrow_resnet, "--data", tmp_path / "images.tar", "-o", tmp_path / "out")
    assert code == 2 and message in err, err
    with pytest.raises(BnnccError, match=re.escape(message)):
        demo(tmp_path / "demo", tmp_path / "images.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.tar"]


@pytest.mark.parametrize("damage", [lambda text: text[:20], lambda text: "[]", lambda text: '{"key": 1}',
                                    lambda text: text.replace('"outputs"', '"other"'),
                                    lambda text: re.sub(r'"results": \{[^}]*\}', '"results": []', text),
                                    # a result edited by hand was served, and the report failed on it
                                    lambda text: text.replace('"n": 1', '"n": "x"')])
def test_a_damaged_stage_record_runs_the_stage_again(tmp_path, damage):
    """A cut or edited stages/S.json ended convert in a JSONDecodeError or KeyError."""
    from bnncc.pipeline import cached_stage

    out, runs = tmp_path / "out.bin", []

    def run():
        runs.append(1)
        out.write_bytes(b"x")
        return {"n": len(runs)}

    assert cached_stage(tmp_path, "s", {"k": 1}, [out], run) == (False, {"n": 1})
    assert cached_stage(tmp_path, "s", {"k": 1}, [out], run) == (True, {"n": 1})
    record = tmp_path / "s.json"
    record.write_text(damage(record.read_text()))
    assert cached_stage(tmp_path, "s", {"k": 1}, [out], run) == (False, {"n": 2})


def test_a_stage_record_that_is_a_folder_is_one_line_naming_it(tmp_path):
    """A folder in place of stages/S.json ended convert in "unexpected IsADirectoryError"."""
    from bnncc.pipeline import cached_stage

    (tmp_path / "s.json").mkdir()
    message = f"{tmp_path}/s.json: cannot write there (Is a directory)"
    with pytest.raises(BnnccError, match=f"^{re.escape(message)}$"):
        cached_stage(tmp_path, "s", {"k": 1}, [tmp_path / "out.bin"], lambda: {})


def test_convert_without_an_output_folder_writes_one_named_by_model_recipe_and_target(cli, narrow_resnet, tmp_path,
                                                                                       monkeypatch):
    """The mission's own line, `bnncc convert resnet50.onnx --recipe pokebnn_1x --target arm64`, stopped at
    "Missing option '--output'"."""
    monkeypatch.chdir(tmp_path)
    from bnncc.cli.convert_cmd import default_output

    code, out, err = cli("convert", narrow_resnet, "--recipe", "pokebnn_1x", "--set", STEM[0])
    assert code == 0, err
    outdir = tmp_path / "r50-pokebnn_1x-x86-64"
    assert {"model.so", "model.json", "model.onnx", "report.md"} <= {p.name for p in outdir.iterdir()}
    assert "outputs: r50-pokebnn_1x-x86-64/model.so" in " ".join(out.split())
    assert default_output(tmp_path / "resnet50.onnx", "pokebnn_0.5x", "arm64") == Path("resnet50-pokebnn_0.5x-arm64")
    assert default_output(tmp_path / "m.onnx", "../mine/wide.toml", "cuda") == Path("m-wide-cuda")
