"""bundle: a library folder with TVM's runtime and the runner, run from elsewhere with no Python
and no environment, against the library as bnncc.runtime runs it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnncc.errors import BnnccError
from bnncc.runtime import load
from bnncc.targets import arm64, vmrunner
from bnncc.targets.build import compile
from bnncc.targets.bundle import BUNDLE_FILES, bundle
from test_lower import tiny_pokebnn


@pytest.fixture(scope="module")
def x86_library(tmp_path_factory):
    return compile(tiny_pokebnn(), tmp_path_factory.mktemp("lib") / "tiny", target="x86-64", batches=(2,))


def _run_moved(folder, tmp_path, x, prefix=()):
    """Move the bundle ``folder`` elsewhere and run its runner there on ``x`` (function batch_N) with
    only PATH (and ``prefix``'s needs) in the environment; the logits."""
    # on this host the runtime is also where bnncc's is: the runner must not look there
    dynamic = subprocess.run(["readelf", "-d", str(folder / "runner")], capture_output=True, text=True).stdout
    assert "Library runpath: [$ORIGIN]" in dynamic
    moved = tmp_path / "device"
    os.rename(folder, moved)
    np.save(tmp_path / "x.npy", x)
    env = {"PATH": os.environ["PATH"], **({"QEMU_LD_PREFIX": str(vmrunner.QEMU_LD_PREFIX)} if prefix else {})}
    done = subprocess.run([*prefix, str(moved / "runner"), "run", str(moved / "model.so"), f"batch_{len(x)}",
                           str(tmp_path / "out"), str(tmp_path / "x.npy")], env=env, cwd="/", capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return np.load(tmp_path / "out0.npy")


def test_an_x86_bundle_runs_the_library_anywhere_without_python(x86_library, tmp_path):
    folder = bundle(x86_library, tmp_path / "bundle")
    assert {p.name for p in folder.iterdir()} == BUNDLE_FILES
    assert "batch_2: N = 2" in (folder / "README.txt").read_text()
    x = np.random.default_rng(0).random((2, *load(x86_library).input_chw), dtype=np.float32)
    np.testing.assert_array_equal(_run_moved(folder, tmp_path, x), load(x86_library)(x))


def test_the_readme_commands_run_as_written_in_the_bundle(x86_library, tmp_path):
    """`./runner run model.so ...` in the bundle's folder: dlopen looked a bare model.so up in the
    library path, not the folder, and the README's own commands failed."""
    folder = bundle(x86_library, tmp_path / "bundle")
    x = np.random.default_rng(2).random((1, *load(x86_library).input_chw), dtype=np.float32)
    np.save(folder / "input.npy", x)
    commands = [line.split() for line in (folder / "README.txt").read_text().splitlines()
                if line.startswith("  ./runner ")]
    assert [c[:2] for c in commands] == [["./runner", "run"], ["./runner", "time"]]
    for command in commands:
        done = subprocess.run(command, cwd=folder, env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(folder / "out0.npy"), load(x86_library)(x))


def _npy(path, header_shape: str, data: bytes) -> str:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {header_shape}, }}".encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data)
    return str(path)


def _bytes(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _array(path, array) -> str:
    np.save(path, array)
    return str(path)


def test_the_runner_refuses_bad_inputs_in_one_line(x86_library, tmp_path):
    """A shape of 10^11 images segfaulted the runner (its allocation unchecked), bad counts said only
    'stoi', and bytes after the data were taken."""
    folder = bundle(x86_library, tmp_path / "bundle")
    c, h, w = load(x86_library).input_chw
    one = np.zeros((1, c, h, w), np.float32).tobytes()
    cases = [
        (["run", "model.so", "batch_1", "o", _npy(tmp_path / "huge.npy", f"(100000000000, {c}, {h}, {w})", one)],
         "needs more data than the file's"),
        (["run", "model.so", "batch_1", "o", _npy(tmp_path / "tail.npy", f"(1, {c}, {h}, {w})", one + b"x")],
         "(truncated or with trailing bytes)"),
        (["run", "model.so", "batch_1", "o", _npy(tmp_path / "neg.npy", f"(-1, {c}, {h}, {w})", one)],
         "'-1' is not a whole number of at least 0"),
        # a 4 GiB header length in a 77-byte file took 4.2 GB of memory before the file was checked
        (["run", "model.so", "batch_1", "o",
          _bytes(tmp_path / "long.npy", b"\x93NUMPY\x02\x00\xf0\xff\xff\xff" + b" " * 65)],
         ".npy header of 4294967280 bytes in a file of 77"),
        (["run", "model.so", "batch_1", "o", _bytes(tmp_path / "v9.npy", b"\x93NUMPY\x09\x00" + b" " * 70)],
         ".npy format version 9"),
        (["time", "0", "model.so", "batch_1", _npy(tmp_path / "ok.npy", f"(1, {c}, {h}, {w})", one)],
         "time N: '0' is not a whole number of at least 1"),
        (["time", "abc", "model.so", "batch_1", str(tmp_path / "ok.npy")], "time N: 'abc' is not a whole number"),
        # README.txt quotes TVM's checks of the function's input
        (["run", "model.so", "batch_1", "o", _array(tmp_path / "chw.npy", np.zeros((c, h, w), np.float32))],
         "expect Tensor with ndim 4 but get 3"),
        (["run", "model.so", "batch_1", "o", _array(tmp_path / "f8.npy", np.zeros((1, c, h, w)))],
         "expect Tensor with dtype float32 but get float64"),
        # the kernels' clips had turned a NaN pixel into finite logits
        (["run", "model.so", "batch_1", "o", _array(tmp_path / "nan.npy", _with_nan((1, c, h, w), 5))],
         "nan.npy: NaN at flat index 5"),
        # a raw newline from the header had split the error over two lines
        (["run", "model.so", "batch_1", "o", _npy(tmp_path / "nl.npy", f"(100000000000,\n{c}, {h}, {w})", one)],
         f"shape (100000000000,\\x0a{c}, {h}, {w}) needs more data"),
    ]
    for args, message in cases:
        done = subprocess.run(["./runner", *args], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and message in done.stderr, (args, done.stderr)
    assert not list(folder.glob("o*")), "a refused run left an output"


def _with_nan(shape, index: int) -> np.ndarray:
    x = np.zeros(shape, np.float32)
    x.flat[index] = np.nan
    return x


def test_the_runner_leaves_no_partial_output(x86_library, tmp_path):
    """The runner wrote its outputs in place: a write that failed left part of one behind."""
    import resource
    import signal

    def small_files_only():  # a write past 100 bytes fails (EFBIG) instead of killing the runner
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    folder = bundle(x86_library, tmp_path / "bundle")
    x = _array(tmp_path / "x.npy", np.zeros((1, *load(x86_library).input_chw), np.float32))
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(["./runner", "run", "model.so", "batch_1", str(out / "o"), x], cwd=folder,
                          capture_output=True, text=True, preexec_fn=small_files_only)
    assert done.returncode == 1 and "o0.npy: write failed (File too large)" in done.stderr, done.stderr
    assert list(out.iterdir()) == [], "a failed write left a file"
    # a file or link already at a fixed temporary name (o0.npy.part) was written through
    victim = tmp_path / "victim"
    victim.write_bytes(b"mine")
    (out / "o0.npy.part").symlink_to(victim)
    done = subprocess.run(["./runner", "run", "model.so", "batch_1", str(out / "o"), x], cwd=folder,
                          capture_output=True, text=True)
    assert done.returncode == 0 and victim.read_bytes() == b"mine", done.stderr
    np.testing.assert_array_equal(np.load(out / "o0.npy"), load(x86_library)(np.load(x)))


def test_the_runner_refuses_a_library_its_manifest_does_not_describe_and_logits_that_overflowed(x86_library,
                                                                                                 tmp_path):
    """The runner ran whatever model.so it was given: a damaged copy, or another compile's library under a
    model.json of other shapes and classes (bnncc.runtime refuses both: the digest differs). And it wrote
    NaN logits, which bnncc run refuses, as the outputs of an input far beyond what the network saw."""
    import onnx
    from test_fuzz import base_model

    import bnncc

    onnx.save(base_model(), tmp_path / "small.onnx")
    # uncalibrated: its quantizers run in float, so an input of 3e38 overflows to NaN logits
    poke, _ = bnncc.rewrite(bnncc.load(tmp_path / "small.onnx"), "pokebnn_1x", ["passes.poke_stem.mid_channels=8"])
    library = compile(poke, tmp_path / "lib", target="x86-64")
    folder = bundle(library, tmp_path / "bundle")
    shape = (1, *load(library).input_chw)
    assert np.isnan(load(library)(np.full(shape, 3e38, np.float32))).all()  # what the runner must not write

    def run(name):
        done = subprocess.run(["./runner", "run", "model.so", "batch_1", "o", name], cwd=folder,
                              capture_output=True, text=True)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        return done.stderr

    assert "output 0: NaN at flat index 0: the network's outputs overflow on this input" in run(
        _array(folder / "huge.npy", np.full(shape, 3e38, np.float32)))
    x = _array(folder / "x.npy", np.zeros(shape, np.float32))
    refused = "model.so: its SHA-256 is not the one model.json records"
    shutil.copyfile(x86_library / "model.so", folder / "model.so")  # another compile's library
    assert refused in run(x)
    shutil.copyfile(library / "model.so", folder / "model.so")
    with open(folder / "model.so", "r+b") as damaged:  # one byte changed in place
        damaged.seek(1000)
        byte = damaged.read(1)
        damaged.seek(1000)
        damaged.write(bytes([byte[0] ^ 1]))
    assert refused in run(x)
    assert not list(folder.glob("o*")), "a refused run left an output"


def test_an_output_that_cannot_be_written_is_refused_before_the_runner_is_built(x86_library, tmp_path, monkeypatch):
    """The output folder was checked only once the runner was built (and, for arm64, the runtime
    downloaded): `bnncc bundle lib -o FILE/b` did that work first, then said it cannot write there."""
    (tmp_path / "afile").write_text("a file, not a folder")
    monkeypatch.setattr(vmrunner, "ensure_runner", lambda *args, **kwargs: pytest.fail("built before the check"))
    with pytest.raises(BnnccError, match=rf"afile/bundle: cannot write there \({tmp_path}/afile is not a folder\)$"):
        bundle(x86_library, tmp_path / "afile" / "bundle")
    assert os.listdir(tmp_path) == ["afile"]


def test_a_cache_that_cannot_be_written_is_named(x86_library, tmp_path, monkeypatch):
    """With $BNNCC_CACHE a file (or read-only), bundling, and running an arm64 library, ended in
    "unexpected NotADirectoryError", which says that bnncc hit a bug."""
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("BNNCC_CACHE", str(tmp_path / "cache"))
    unwritable = r".*: cannot write there \(Not a directory\)$"
    with pytest.raises(BnnccError, match=rf"^{tmp_path}/cache/runner/{unwritable}"):
        bundle(x86_library, tmp_path / "bundle")
    with pytest.raises(BnnccError, match=rf"^{tmp_path}/cache/arm64-runtime/{unwritable}"):
        vmrunner.ensure_arm64_runtime()
    assert sorted(os.listdir(tmp_path)) == ["cache"]


def test_a_damaged_runner_in_the_cache_is_built_again(x86_library, tmp_path, monkeypatch):
    """A runner cut short in the cache (a full disk, a crash) was copied into every bundle, where it crashed
    (or, emptied, did nothing and exited 0)."""
    monkeypatch.setenv("BNNCC_CACHE", str(tmp_path / "cache"))
    cached = vmrunner._runner_path(vmrunner.HOST, vmrunner.runtime_library_dirs(), "$ORIGIN")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(4000))
    folder = bundle(x86_library, tmp_path / "bundle")
    x = np.random.default_rng(4).random((2, *load(x86_library).input_chw), dtype=np.float32)
    np.testing.assert_array_equal(_run_moved(folder, tmp_path, x), load(x86_library)(x))


def test_no_home_folder_is_one_line_saying_to_set_home(x86_library, tmp_path):
    """With HOME unset and no passwd entry (a container run as `-u 1000`), TVM's import and bnncc's cache
    ended bundle, compile and run in "unexpected RuntimeError: Could not determine home directory."."""
    script = ("import pwd, runpy, sys\n"
              "def no_entry(uid):\n    raise KeyError(uid)\n"
              "pwd.getpwuid = no_entry\n"
              "sys.argv = ['bnncc', *sys.argv[1:]]\n"
              "runpy.run_module('bnncc', run_name='__main__')\n")
    env = {name: value for name, value in os.environ.items() if name not in ("HOME", "BNNCC_CACHE", "XDG_CACHE_HOME")}
    done = subprocess.run([sys.executable, "-c", script, "bundle", str(x86_library), "-o", str(tmp_path / "bundle")],
                          env=env, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, "error: no home folder: HOME is unset and this user has none, and "
                                                 "TVM keeps a cache there; set HOME to a folder\n")
    assert os.listdir(tmp_path) == []


def test_the_runner_finds_the_digest_under_its_key_not_a_value_that_reads_the_same(x86_library, tmp_path):
    """The runner took the first "library_sha256" in model.json for the key: a model whose input is named
    so (the manifest records it before the digest) had its own bundle refused as another compile's."""
    folder = bundle(x86_library, tmp_path / "bundle")
    manifest = json.loads((folder / "model.json").read_text())
    manifest["input"]["name"] = "library_sha256"
    (folder / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    x = np.random.default_rng(3).random((2, *load(x86_library).input_chw), dtype=np.float32)
    np.testing.assert_array_equal(_run_moved(folder, tmp_path, x), load(x86_library)(x))


def test_the_runner_refuses_cpu_features_that_are_no_list_in_one_line(x86_library, tmp_path):
    """A model.json whose cpu_features was no list (null, after an edit by hand) had its value read up to the
    next ']' of the file: the runner refused every CPU for lacking "compile_seconds" and the library's digest."""
    folder = bundle(x86_library, tmp_path / "bundle")
    manifest = json.loads((folder / "model.json").read_text())
    manifest["target"]["cpu_features"] = None
    (folder / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    np.save(tmp_path / "x.npy", np.zeros((2, *load(x86_library).input_chw), np.float32))
    done = subprocess.run(["./runner", "run", "model.so", "batch_2", str(tmp_path / "out"), str(tmp_path / "x.npy")],
                          cwd=folder, env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (1, "runner: model.json: its cpu_features is not a list of "
                                                 "/proc/cpuinfo names; copy the bundle or library folder again\n")
    assert not list(tmp_path.glob("out*")), "a refused run left an output"


@pytest.mark.skipif(shutil.which(arm64.CROSS_CXX) is None or shutil.which(vmrunner.QEMU) is None,
                    reason="needs g++-aarch64-linux-gnu and qemu-user (apt)")
def test_an_arm64_bundle_runs_the_library_anywhere_without_python(tmp_path):
    library = compile(tiny_pokebnn(), tmp_path / "arm64", target="arm64")
    folder = bundle(library, tmp_path / "bundle")
    assert (folder / "libtvm_runtime.so").read_bytes()[18] == 183  # e_machine = EM_AARCH64
    x = np.random.default_rng(1).random((1, *load(library).input_chw), dtype=np.float32)
    np.testing.assert_array_equal(_run_moved(folder, tmp_path, x, prefix=(vmrunner.QEMU,)), load(library)(x))


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="needs qemu-user (apt)")
def test_a_bundle_refuses_a_cpu_without_its_features_in_one_line(tmp_path):
    """Under qemu-x86_64 as a Haswell (AVX2, no AVX-512): the runner of an AVX-512BW class library
    ended with an illegal instruction (SIGILL); it now names the features this CPU lacks, in one line,
    and writes nothing. The AVX2 class's bundle runs there, as bnncc.runtime runs it here."""
    x = np.random.default_rng(4).random((1, 3, 32, 32), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    for target in ("x86-64-avx512bw", "x86-64-avx2"):
        library = compile(tiny_pokebnn(), tmp_path / target, target=target)
        folder = bundle(library, tmp_path / f"{target}-bundle")
        features = ", ".join(json.loads((folder / "model.json").read_text())["target"]["cpu_features"])
        assert f"CPU: its code uses {features} (flags of /proc/cpuinfo)" in (folder / "README.txt").read_text()
        done = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", "./runner", "run", "model.so", "batch_1",
                               str(tmp_path / target), str(tmp_path / "x.npy")], cwd=folder,
                              env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
        # (qemu warns of each CPUID feature of a Haswell its emulation lacks)
        said = [line for line in done.stderr.splitlines() if not line.startswith("qemu-x86_64: warning:")]
        if target == "x86-64-avx2":
            assert done.returncode == 0, done.stderr
            np.testing.assert_array_equal(np.load(tmp_path / f"{target}0.npy"), load(library)(x))
        else:
            assert done.returncode == 1 and said == [
                "runner: model.so: built for a CPU with avx512bw, avx512cd, avx512dq, avx512f, avx512vl, which this "
                "CPU lacks (model.json's cpu_features); compile the library for this CPU's class"], done.stderr
            assert not list(tmp_path.glob(f"{target}0*")), "a refused run left an output"


def test_a_bundle_replaces_only_an_earlier_bundle(x86_library, tmp_path, cli, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, _, err = cli("bundle", str(x86_library), "-o", str(tmp_path / "mine"))
    assert code == 2 and err.count("\n") == 1 and "exists and is not a bundle folder of bnncc (it holds notes.txt)" in err
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    code, out, _ = cli("bundle", str(x86_library), "-o", str(tmp_path / "b"))
    assert code == 0 and "README.txt" in out
    assert cli("bundle", str(x86_library), "-o", str(tmp_path / "b"))[0] == 0
    with pytest.raises(BnnccError, match="is the library folder itself"):
        bundle(x86_library, x86_library)
    # the current folder cannot be renamed away, and a new folder renamed onto a link replaced the link
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(BnnccError, match="is the current folder"):
        bundle(x86_library, ".")
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    with pytest.raises(BnnccError, match="is a symbolic link"):
        bundle(x86_library, tmp_path / "link")
    assert sorted(os.listdir(tmp_path)) == ["b", "here", "link", "mine"]
    # through a folder that does not exist and back: it was made and left behind, empty
    assert bundle(x86_library, tmp_path / "a" / ".." / "c") == tmp_path / "c"
    assert sorted(os.listdir(tmp_path)) == ["b", "c", "here", "link", "mine"]


def test_a_compiler_that_fails_on_the_runner_is_one_line(x86_library, tmp_path, cli, monkeypatch):
    """g++'s messages were put into the error as they were: the CLI's one line showed each line break
    as a "\\n" escape between them."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "g++").write_text("#!/bin/sh\necho 'runner.cc:1: error: first' >&2\n"
                                          "echo 'runner.cc:2: error: second' >&2\nexit 1\n")
    (tmp_path / "bin" / "g++").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("BNNCC_CACHE", str(tmp_path / "cache"))  # no runner built before
    code, _, err = cli("bundle", str(x86_library), "-o", str(tmp_path / "b"))
    assert code == 2 and err.count("\n") == 1, err
    assert "g++ failed: runner.cc:1: error: first runner.cc:2: error: second\n" in err, err
    assert not (tmp_path / "b").exists()


def test_the_bundle_holds_the_manifest_its_library_was_checked_against(x86_library, tmp_path, monkeypatch):
    """model.so was checked against the manifest read first, but model.json was copied again after
    it: a compile replacing the folder between the two copies bundled the old model.so beside a new
    manifest that does not describe it."""
    library = shutil.copytree(x86_library, tmp_path / "lib")
    checked = json.loads((library / "model.json").read_text())
    copyfile = shutil.copyfile

    def rebuilt_after_model_so(source, dest):
        copyfile(source, dest)
        if Path(source) == library / "model.so":  # a compile writes another library there meanwhile
            (library / "model.json").write_text(json.dumps({**checked, "library_sha256": "0" * 64}))
        return dest

    monkeypatch.setattr(shutil, "copyfile", rebuilt_after_model_so)
    folder = bundle(library, tmp_path / "b")
    assert (folder / "model.json").read_text() == (x86_library / "model.json").read_text()


def test_a_full_disk_is_one_line_and_leaves_nothing(x86_library, tmp_path, monkeypatch):
    """shutil.copyfile's error on a full disk names its source first and its target second: bundle
    took it for a library file it failed to read, an "unexpected OSError" (exit 1). The disk fills
    in copyfile's sendfile here, so the error is the one shutil itself makes."""
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "sendfile", full)
    with pytest.raises(BnnccError, match=r"b: cannot write there \(No space left on device\)"):
        bundle(x86_library, tmp_path / "b")
    assert os.listdir(tmp_path) == []


def test_a_cuda_library_is_not_bundled(x86_library, tmp_path):
    folder = shutil.copytree(x86_library, tmp_path / "cuda")
    manifest = json.loads((folder / "model.json").read_text())
    manifest["target"]["name"] = "cuda"
    (folder / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(BnnccError, match="a cuda library runs with TVM's cuda runtime, which a bundle does not hold"):
        bundle(folder, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("target", "libm"), [
    ("x86-64", Path("/usr/lib/x86_64-linux-gnu/libm.so.6")),
    ("arm64", vmrunner.QEMU_LD_PREFIX / "lib" / "libm.so.6"),
])
def test_a_library_that_holds_no_relax_vm_is_not_bundled(x86_library, tmp_path, cli, target, libm):
    """Another shared library of the target's machine (the C math library) as model.so, beside a
    manifest of before the digest: `bnncc run` refused it, but bundle wrote a bundle whose runner then
    failed on the device ("not a Relax VM library")."""
    if not libm.is_file():
        pytest.skip(f"no {libm}")
    folder = shutil.copytree(x86_library, tmp_path / "lib")
    manifest = json.loads((folder / "model.json").read_text())
    del manifest["library_sha256"]
    manifest["target"]["name"] = target
    (folder / "model.json").write_text(json.dumps(manifest))
    shutil.copyfile(libm, folder / "model.so")
    code, _, err = cli("bundle", str(folder), "-o", str(tmp_path / "b"))
    assert code == 2 and err == f"error: {folder / 'model.so'}: holds no Relax VM executable; is it a library " \
                                "written by `bnncc compile`?\n", err
    assert sorted(os.listdir(tmp_path)) == ["lib"]


@pytest.mark.parametrize("channels, said", [(1, True), (3, False)])
def test_the_readme_says_how_an_image_becomes_the_input(channels, said):
    """As `bnncc run` reads it: resized as the fine-tune resized its data, and for a one-channel network
    the mean of R, G and B, which the README left unsaid."""
    from bnncc.targets.bundle import _readme

    manifest = {"input": {"shape": ["N", channels, 28, 28]}, "output": {"shape": ["N", 10]},
                "functions": {"1": "batch_1"}, "target": {"name": "arm64"}, "recipe": "r",
                "preprocessing": {"mean": [0.5] * channels, "std": [0.25] * channels, "resize": "bilinear"}}
    [line] = [line for line in _readme(manifest, "aarch64").splitlines() if line.startswith("Input:")]
    assert "of the whole image resized bilinearly (pixel centres, no antialiasing)" in line
    assert ("a colour image as the mean of its R, G and B" in line) == said


def test_a_runner_cached_for_another_tvm_is_not_bundled(x86_library, tmp_path, monkeypatch):
    """The runner's cache key held its source, the compiler and the runtime's folders, which keep their paths
    when TVM is upgraded: the runner built against the old TVM's headers was bundled beside the new libraries."""
    monkeypatch.setenv("BNNCC_CACHE", str(tmp_path / "cache"))
    old = vmrunner.ensure_runner(vmrunner.HOST, beside_runtime=True)
    monkeypatch.setattr(vmrunner, "versions", lambda: "tvm-99.0-ffi-99.0")  # an upgrade
    folder = bundle(x86_library, tmp_path / "bundle")
    assert vmrunner.ensure_runner(vmrunner.HOST, beside_runtime=True) != old  # built again, for the new one
    x = np.random.default_rng(5).random((2, *load(x86_library).input_chw), dtype=np.float32)
    np.testing.assert_array_equal(_run_moved(folder, tmp_path, x), load(x86_library)(x))


def test_a_bundles_runner_holds_no_folder_of_the_build_machine(x86_library, tmp_path, monkeypatch):
    """The runner held the absolute paths of tvm-ffi's headers (their asserts' __FILE__), under the build
    machine's site-packages: a bundle's bytes changed with where bnncc was installed, and showed that folder."""
    monkeypatch.setenv("BNNCC_CACHE", str(tmp_path / "cache"))
    runner = (bundle(x86_library, tmp_path / "bundle") / "runner").read_bytes()
    assert b"tvm_ffi/include/tvm/ffi/" in runner  # (the asserts' paths are there, relative)
    for folder in (vmrunner.runtime_include_dir(), vmrunner.RUNNER_SOURCE.parent):
        assert str(folder).encode() not in runner
