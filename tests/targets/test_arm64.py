"""arm64: instruction counting, the C++ runner on this host and under qemu-aarch64 (Relax module of
an ONNX graph + our popcount kernels vs numpy), and a whole PokeBNN network vs onnxruntime."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tvm

from bnncc.errors import BnnccError
from bnncc.fileio import record_cache_entry
from bnncc.targets import arm64, vmrunner, x86_64
from bnncc.targets.tvm_compat import compile_module, export_executable

import relax_sample as sample

needs_cross = pytest.mark.skipif(
    shutil.which(arm64.CROSS_CXX) is None or shutil.which(vmrunner.QEMU) is None,
    reason="needs g++-aarch64-linux-gnu and qemu-user (apt)")

ASM = """\t.type\t__tvm_ffi_k,@function
__tvm_ffi_k:
\tstp\tx29, x30, [sp, #-16]!
\tbl\tk_compute_
\tret
.Lfunc_end0:
\t.size\t__tvm_ffi_k, .Lfunc_end0-__tvm_ffi_k
\t.type\tk_compute_,@function
k_compute_:
\tmov\tx0, xzr
\tret
.Lfunc_end1:
\t.size\tk_compute_, .Lfunc_end1-k_compute_
\t.type\t.L__tvm_parallel_lambda,@function
.L__tvm_parallel_lambda:
// %bb.0:
\teor\tv0.16b, v1.16b, v2.16b
\tcnt\tv0.16b, v0.16b
\tuaddlp\tv0.8h, v0.16b
\tuadalp\tv3.4s, v0.8h
\tb.ne\t.L__tvm_parallel_lambda
\tret
.Lfunc_end2:
\t.size\t.L__tvm_parallel_lambda, .Lfunc_end2-.L__tvm_parallel_lambda
\t.type\tother_compute_,@function
other_compute_:
\tcnt\tv0.16b, v0.16b
\tret
.Lfunc_end3:
\t.size\tother_compute_, .Lfunc_end3-other_compute_
"""


def test_count_instructions_by_hand():
    counts = arm64.count_instructions(arm64.kernel_assembly(ASM, "k"))
    # k: wrapper (stp, bl, ret) + compute (mov, ret) + its parallel lambda (eor, cnt, uaddlp, uadalp, b.ne, ret)
    assert counts == {"cnt": 1, "uaddlp": 1, "uadalp": 1, "addp": 0, "eor": 1, "udot": 0, "sdot": 0, "total": 11}
    assert arm64.count_instructions(arm64.kernel_assembly(ASM, "other"))["total"] == 2
    with pytest.raises(BnnccError, match="no function 'missing'"):
        arm64.kernel_assembly(ASM, "missing")


def test_target_and_schedule_rules():
    target = arm64.arm64_target(dotprod=True)
    assert arm64.is_arm64(target) and list(target.attrs["mattr"]) == ["+neon", "+dotprod"]
    assert not arm64.is_arm64(x86_64.host_target())
    from bnncc.targets.kernels import bitpack

    func = bitpack.sign_bitpack_func(1, 2, 2, 40)
    assert arm64.schedule(func, x86_64.host_target()) is None
    assert arm64.schedule(func, target).attrs["tirx.is_scheduled"]


def test_register_tiles_by_hand():
    """(pixels, channels) of the binary conv's register tile: NEON takes the most channels a broadcast
    word meets (one pixel x 64 channels, 16 accumulators); the x86 units keep theirs."""
    from bnncc.targets.cpu_schedule import _register_tile

    assert _register_tile(14, 256, arm64.NEON) == (1, 64)
    # 48 channels (PokeBNN-0.75x): 64 outputs at most, as 4 px x 16 or 8 px x 8: the more channels
    assert _register_tile(56, 48, arm64.NEON) == (4, 16)
    avx2, avx512 = x86_64.UNITS[x86_64.AVX2], x86_64.UNITS[x86_64.AVX512_VPOPCNTDQ]
    assert _register_tile(14, 256, avx2) == (7, 8)  # 16 channels take 2 ymm a pixel: 4 px fit, 2 divide 14
    assert _register_tile(14, 256, avx512) == (7, 32)  # 7 px x 2 zmm = 14 accumulators, 896 bytes


def test_neon_inner_loop_form():
    """The NEON binary conv: one ld1r broadcast per 16 cnt (64 channels), the byte counters widened
    by uaddlp/uadalp, two per counter vector at the end of each chunk, and no shift-and-mask."""
    from bnncc.targets.kernels import binary_conv as bc

    target = arm64.arm64_target(cores=1)
    func = arm64.schedule(bc.binary_conv2d_func(1, 8, 8, 64, 64, 3, 1), target)
    asm = arm64.kernel_assembly(arm64.assembly(compile_module(tvm.IRModule({"main": func}), target)), "main")
    counts = arm64.count_instructions(asm)
    mnemonics = [line.split()[0] for line in asm.splitlines() if line.startswith("\t") and not line.startswith("\t.")]
    assert counts["cnt"] > 0 and counts["cnt"] == 16 * mnemonics.count("ld1r")
    widening = counts["uaddlp"] + counts["uadalp"]
    assert widening > 0 and widening % (2 * 16) == 0
    assert not {"ushr", "usra"} & set(mnemonics)


def _input():
    return np.random.default_rng(7).standard_normal((sample.ROWS, 16)).astype(np.float32)


def test_host_runner_runs_relax_module(tmp_path):
    """The C++ runner built for x86-64 (no Python in the loop) on the ONNX + popcount module."""
    target = x86_64.host_target()
    mod, expect = sample.build(target, x86_64.schedule)
    library = export_executable(compile_module(mod, target), tmp_path / "sample.so")
    x = _input()
    (out,) = vmrunner.run_library(library, [x], function=sample.FUNCTION)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, expect(x))
    assert vmrunner.time_library(library, [x], runs=3, function=sample.FUNCTION) > 0


def test_runner_reports_missing_function(tmp_path):
    target = x86_64.host_target()
    mod, _ = sample.build(target, x86_64.schedule)
    library = export_executable(compile_module(mod, target), tmp_path / "sample.so")
    with pytest.raises(BnnccError, match="no function nope"):
        vmrunner.run_library(library, [_input()], function="nope")


@needs_cross
def test_arm64_library_runs_under_qemu(tmp_path):
    target = arm64.arm64_target()
    mod, expect = sample.build(target, arm64.schedule)
    executable = compile_module(mod, target)
    library = arm64.export_arm64(executable, tmp_path / "sample_arm64.so")
    assert library.read_bytes()[:4] == b"\x7fELF" and library.read_bytes()[18] == 183  # e_machine = EM_AARCH64
    x = _input()
    (out,) = vmrunner.run_arm64(library, [x], function=sample.FUNCTION)
    np.testing.assert_array_equal(out, expect(x))
    counts = arm64.count_instructions(arm64.kernel_assembly(arm64.assembly(executable), "binary_conv2d"))
    assert counts["cnt"] > 0 and counts["eor"] > 0 and counts["uadalp"] + counts["uaddlp"] > 0


@needs_cross
def test_pokebnn_network_on_arm64_agrees_with_onnxruntime(tmp_path):
    """The tiny PokeBNN of test_lower compiled for arm64, run under qemu by `verify` (via bnncc.runtime)."""
    import json

    from bnncc.targets.build import compile
    from bnncc.verification import verify
    from test_lower import tiny_pokebnn

    folder = compile(tiny_pokebnn(), tmp_path / "tiny_arm64", target="arm64", batches=(2,))
    manifest = json.loads((folder / "model.json").read_text())
    assert manifest["target"]["name"] == "arm64"
    counts = manifest["instructions"]  # one entry per PokeConv layer, in graph order
    layers = [node.name for node in tiny_pokebnn().graph if node.op_type == "PokeConv"]
    assert list(counts) == layers and all(c["cnt"] > 0 and c["kernel"].startswith("poke_conv") for c in counts.values())
    report = verify(folder, n=4, batch=2)
    assert report.ok, report.failures
    assert report.argmax_agree == 4


@needs_cross
def test_an_arm64_librarys_nan_logits_come_back_for_verify_to_report(tmp_path):
    """The runner refuses NaN logits, which a bundle's user must not take for logits; bnncc ran arm64
    libraries with that refusal too: verify stopped at an input on which the network overflows, with
    "the aarch64 runner failed", where for an x86-64 library it reports that input's failure and
    compares the others."""
    import onnx
    from test_fuzz import base_model

    import bnncc
    from bnncc.runtime import load
    from bnncc.targets.build import compile
    from bnncc.verification import verify

    onnx.save(base_model(), tmp_path / "small.onnx")
    # uncalibrated: its quantizers run in float, so an input of 3e38 overflows to NaN logits (test_bundle)
    poke, _ = bnncc.rewrite(bnncc.load(tmp_path / "small.onnx"), "pokebnn_1x", ["passes.poke_stem.mid_channels=8"])
    folder = compile(poke, tmp_path / "lib", target="arm64", batches=(1,))
    chw = load(folder).input_chw
    huge, zeros = np.full(chw, 3e38, np.float32), np.zeros(chw, np.float32)
    assert np.isnan(load(folder)(huge[None])).all()
    report = verify(folder, n=0, images=[huge, zeros])
    assert report.inputs == 2 and report.argmax_agree == 1, report.failures
    assert len(report.failures) == 1 and report.failures[0].startswith("input 0: "), report.failures


@needs_cross
def test_an_arm64_library_keeps_running_what_was_loaded_when_its_folder_is_compiled_again(tmp_path):
    """Under qemu each call starts the runner on model.so: it ran the file in place, so a folder
    compiled again after ``load`` (another network) gave that network's logits under the loaded
    manifest. A loaded library runs its own copy, as the x86-64 one (dlopen) does; its errors
    still name the folder's file."""
    from bnncc.runtime import load
    from bnncc.targets.build import compile
    from test_lower import _Net, tiny_pokebnn

    folder = compile(tiny_pokebnn(), tmp_path / "lib", target="arm64", batches=(1,))
    lib = load(folder)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    before = lib(x)
    other = _Net(32, seed=9)  # tiny_pokebnn's shapes, other weights
    other.head(other.poke_conv(other.stem(8, 16), 16, 40, 1, 1), 40)
    compile(other.model(), folder, target="arm64", batches=(1,))
    assert not np.allclose(load(folder)(x), before)  # the folder now holds another network
    np.testing.assert_array_equal(lib(x), before)
    with pytest.raises(BnnccError, match=f"^{folder / 'model.so'}: the aarch64 runner failed"):
        lib._call("no_such_function", x)
    # a forked child that exits normally runs the finalizers it inherited: it must leave the copy alone
    script = (f"import os, sys, numpy as np\nfrom bnncc.runtime import load\nlib = load({str(folder)!r})\n"
              f"if os.fork() == 0:\n    sys.exit(0)\nos.wait()\nprint(lib(np.zeros((1, 3, 32, 32), np.float32)).shape)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "(1, 10)", done.stderr


def test_arm64_runtime_offline_from_the_printed_command(tmp_path, monkeypatch):
    """Without an index, ensure_arm64_runtime names the exact pip command; wheels put where that
    command says (stand-ins here, holding the two libraries) are then used without pip."""
    import zipfile
    from importlib import metadata

    monkeypatch.setenv("BNNCC_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(BnnccError) as failure:
        vmrunner.ensure_arm64_runtime()
    command = str(failure.value).split("run: ")[1].split()
    for name in ("apache-tvm", "apache-tvm-ffi"):
        assert f"{name}=={metadata.version(name)}" in command
    assert command.count("-d") == 1 and "manylinux_2_28_aarch64" in command
    wheels = tmp_path.joinpath(command[command.index("-d") + 1])
    wheels.mkdir(parents=True)
    for member in ("tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so"):
        with zipfile.ZipFile(wheels / f"{member.split('/')[0]}.whl", "w") as archive:
            archive.writestr(member, member.encode())
    folder = vmrunner.ensure_arm64_runtime()
    assert folder == wheels.parent
    assert (folder / "libtvm_ffi.so").read_bytes() == b"tvm_ffi/lib/libtvm_ffi.so"
    assert (folder / "libtvm_runtime.so").stat().st_mode & 0o777 == 0o644
    assert vmrunner.ensure_arm64_runtime() == folder


@needs_cross
@pytest.mark.slow
def test_resnet50_pokebnn_05x_on_arm64_agrees_with_onnxruntime(resnet50_onnx, tmp_path, cli):
    """Issue 6's acceptance run: `bnncc convert resnet50.onnx --recipe pokebnn_0.5x --target arm64`,
    then `bnncc verify` runs the aarch64 library under qemu against onnxruntime (about 2 minutes)."""
    out = tmp_path / "r50_arm64"
    code, _, err = cli("convert", resnet50_onnx["legacy"], "--recipe", "pokebnn_0.5x", "--target", "arm64", "-o", out)
    assert code == 0, err
    code, stdout, err = cli("verify", out, "--n", "8")
    assert code == 0, stdout + err


def test_targets_finds_the_arm64_runtime_of_the_installed_versions_only(tmp_path, monkeypatch):
    """`bnncc targets` counted any version's runtime in the cache as found (and only its
    libtvm_runtime.so), where the runner takes the installed versions' pair: after an upgrade the
    table said "found" and the next arm64 run downloaded anew."""
    from bnncc.targets import registry

    monkeypatch.setenv("BNNCC_CACHE", str(tmp_path))

    def runtime_found():
        (req,) = [r for r in registry.check()["arm64"] if r.what == "aarch64 TVM runtime"]
        return req.found

    def cache(path):  # a stand-in library, recorded as the cache records what it writes
        path.write_bytes(b"")
        record_cache_entry(path)

    old = tmp_path / "arm64-runtime" / "tvm-0.26.0-ffi-0.1.0"
    old.mkdir(parents=True)
    for name in ("libtvm_runtime.so", "libtvm_ffi.so"):
        cache(old / name)
    assert runtime_found() is None
    current = vmrunner.arm64_runtime_folder()
    current.mkdir(parents=True)
    cache(current / "libtvm_runtime.so")
    assert runtime_found() is None  # the runner links libtvm_ffi.so too
    cache(current / "libtvm_ffi.so")
    assert runtime_found() == str(current) == str(vmrunner.ensure_arm64_runtime())


@needs_cross
def test_a_prepared_arm64_runner_runs_and_bundles_without_the_cross_compiler(tmp_path, monkeypatch, cli):
    """run and verify of an arm64 library execute our runner, which the cross compiler builds. The
    runner that `bnncc targets --prepare` built was looked up only once the compiler was found: on
    a host without it `bnncc run` said "aarch64-linux-gnu-g++ not found" where `bnncc targets` had
    listed it as needed to build only, and every arm64 row for run as found."""
    from bnncc.targets import registry

    def runner_found():
        (req,) = [r for r in registry.check()["arm64"] if r.what == "aarch64 runner"]
        return req.found

    target = arm64.arm64_target()
    mod, expect = sample.build(target, arm64.schedule)
    library = arm64.export_arm64(compile_module(mod, target), tmp_path / "sample_arm64.so")
    x = _input()
    # a fresh cache holding the installed versions' aarch64 runtime, but no runner yet
    runtime = vmrunner.ensure_arm64_runtime()
    monkeypatch.setenv("BNNCC_CACHE", str(tmp_path / "cache"))
    vmrunner.arm64_runtime_folder().parent.mkdir(parents=True)
    vmrunner.arm64_runtime_folder().symlink_to(runtime)
    no_cross = tmp_path / "bin"  # a PATH with qemu but without the cross compiler
    no_cross.mkdir()
    (no_cross / vmrunner.QEMU).symlink_to(shutil.which(vmrunner.QEMU))
    with monkeypatch.context() as without:
        without.setenv("PATH", str(no_cross))
        assert runner_found() is None
        with pytest.raises(BnnccError, match=f"^{re.escape(arm64.CROSS_CXX)} not found; install it: "):
            vmrunner.run_arm64(library, [x], function=sample.FUNCTION)
    assert runner_found().startswith("built on first use by ")
    code, stdout, err = cli("targets", "--prepare")
    assert code == 0, err
    with monkeypatch.context() as without:
        without.setenv("PATH", str(no_cross))
        assert runner_found() == str(vmrunner.cached_arm64_runner()) and f"aarch64 runner: {runner_found()}" in stdout
        (out,) = vmrunner.run_arm64(library, [x], function=sample.FUNCTION)
        np.testing.assert_array_equal(out, expect(x))
        assert vmrunner.ensure_runner(vmrunner.AARCH64, beside_runtime=True).is_file()  # what bundle takes
