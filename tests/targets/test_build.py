"""``targets.build.atomic_dir``: which failures inside it are the output folder's."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnncc.errors import BnnccError
from bnncc.targets.build import MANIFEST_FORMAT, atomic_dir


def test_a_failed_write_is_the_folders_and_leaves_nothing(tmp_path):
    with pytest.raises(BnnccError, match=r"lib: cannot write there \(No space left on device\)"):
        with atomic_dir(tmp_path / "lib") as tmp:
            (tmp / "model.so").write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []


def test_a_failed_write_takes_back_the_folders_it_made(tmp_path):
    """A full disk while compile wrote new/lib left the empty folder new."""
    with pytest.raises(BnnccError, match=r"lib: cannot write there \(No space left on device\)"):
        with atomic_dir(tmp_path / "new" / "lib") as tmp:
            (tmp / "model.so").write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []
    with atomic_dir(tmp_path / "new" / "lib") as tmp:
        (tmp / "model.so").write_bytes(b"whole")
    assert os.listdir(tmp_path / "new") == ["lib"]


def test_an_interrupt_while_the_folder_is_set_up_or_renamed_leaves_the_earlier_library(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (exceptions in bnncc.cli) as the temporary folder got its modes left ".lib.*" beside
    the library; between the renames that put an earlier library aside and the new one in place, it left no
    library at all (the earlier one was removed with its temporary), as it did just after the first rename."""
    from bnncc.targets import build

    earlier = '{"format": "%s", "build": "earlier"}' % build.MANIFEST_FORMAT
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "model.json").write_text(earlier)

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(build, "umask", interrupted)
        with pytest.raises(KeyboardInterrupt):
            with atomic_dir(tmp_path / "new" / "lib"):
                pass
    assert sorted(os.listdir(tmp_path)) == ["lib"]
    replace = os.replace

    def replace_but_the_new_folder(source, dest):  # the new folder is renamed from ".lib.*"
        return interrupted() if Path(source).name.startswith(".lib.") else replace(source, dest)

    monkeypatch.setattr(os, "replace", replace_but_the_new_folder)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "lib") as tmp:
            (tmp / "model.json").write_text("new")
    assert os.listdir(tmp_path) == ["lib"] and (tmp_path / "lib" / "model.json").read_text() == earlier

    def replace_then_interrupted(source, dest):  # the earlier folder is put aside, then the signal comes
        replace(source, dest)
        if Path(dest).name == "dir":
            interrupted()

    monkeypatch.setattr(os, "replace", replace_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "lib") as tmp:
            (tmp / "model.json").write_text("new")
    assert os.listdir(tmp_path) == ["lib"] and (tmp_path / "lib" / "model.json").read_text() == earlier


def test_a_file_that_cannot_be_read_is_named_not_called_unwritable(tmp_path):
    """A kernel source missing from an install (the wheel lacked bmma_conv.cuh), read while the
    library was written, came out as "lib: cannot write there (No such file or directory)"."""
    with pytest.raises(FileNotFoundError, match="bmma_conv.cuh"):
        with atomic_dir(tmp_path / "lib"):
            (tmp_path / "bmma_conv.cuh").read_text()
    assert os.listdir(tmp_path) == []


def test_the_host_flags_on_a_cpu_without_an_x86_flags_line_are_one_line(monkeypatch):
    """aarch64's /proc/cpuinfo names its features on a "Features" line: an empty StopIteration."""
    import io

    from bnncc.targets import x86_64

    monkeypatch.setattr(x86_64, "open", lambda *a, **k: io.StringIO("processor\t: 0\nFeatures\t: fp asimd\n"),
                        raising=False)
    with pytest.raises(BnnccError, match="this host is no x86-64 CPU"):
        x86_64.host_target()


def test_the_runner_names_a_missing_library_whatever_it_is_asked(tmp_path):
    """time_library's failures named its run count ("3: the runner failed")."""
    import numpy as np

    from bnncc.targets import vmrunner

    for call in (vmrunner.run_library, vmrunner.time_library):
        with pytest.raises(BnnccError, match=rf"{tmp_path}/none.so: no such library"):
            call(tmp_path / "none.so", [np.zeros(1, np.float32)])


def test_a_runner_killed_without_a_word_is_said_so(tmp_path, monkeypatch):
    """A runner the kernel killed (out of memory) prints nothing: the line read "failed (exit -9): "."""
    from bnncc.targets import vmrunner

    monkeypatch.setattr(vmrunner, "_command", lambda arch: (["sh", "-c", "kill -KILL $$", "sh"], dict(os.environ)))
    with pytest.raises(BnnccError, match=r"m.so: the x86-64 runner failed \(killed by signal 9\): no output$"):
        vmrunner._invoke("x86-64", tmp_path / "m.so", [])


def test_the_files_reach_the_disk_before_the_folder_is_renamed(tmp_path, monkeypatch):
    """atomic_path synced its file before the rename, atomic_dir did not: a power loss could keep a
    library folder's rename and not its model.json or model.onnx."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))), replace(a, b)))
    with atomic_dir(tmp_path / "lib") as tmp:
        (tmp / "model.json").write_text("{}")
        (tmp / "model.onnx").write_bytes(b"graph")
    synced = [path.rsplit("/", 1)[-1] for kind, path in events[:3] if kind == "sync"]
    assert sorted(synced[:2]) == ["model.json", "model.onnx"] and synced[2] == tmp.name
    assert events[3:] == [("rename", str(tmp_path / "lib")), ("sync", str(tmp_path))]


def test_compile_shows_its_steps_on_a_terminal(tmp_path, monkeypatch):
    """Compiling was silent for its seconds (minutes for arm64's estimates): a bar now names each step,
    counting to the last, on a terminal; on none (a pipe, a CI log) nothing is drawn."""
    import io

    from rich.console import Console
    from test_lower import tiny_pokebnn

    import bnncc.targets.build as build

    screen = io.StringIO()
    monkeypatch.setattr(build, "bar_console", lambda: Console(file=screen, force_terminal=True, width=120))
    build.compile(tiny_pokebnn(), tmp_path / "lib", show_progress=True)
    drawn = screen.getvalue()
    assert all(step in drawn for step in ("lower to TVM Relax", "build with TVM", "write the library")), drawn
    assert "compile x86-64" in drawn and "3/3" in drawn
    screen.truncate(0)
    build.compile(tiny_pokebnn(), tmp_path / "quiet")
    assert screen.getvalue() == ""  # show_progress is the caller's choice: the API is quiet by default
    monkeypatch.setattr(build, "bar_console", lambda: None)  # no terminal
    build.compile(tiny_pokebnn(), tmp_path / "piped", show_progress=True)


def test_an_output_folder_that_cannot_be_written_is_refused_before_compiling(tmp_path, monkeypatch):
    """`bnncc compile -o FILE/lib` (or onto a read-only file system) lowered and built for minutes and then
    failed to write the library; a bundle's folder is checked alike."""
    from test_lower import tiny_pokebnn

    import bnncc.targets.build as build

    (tmp_path / "afile").write_text("a file, not a folder")
    monkeypatch.setattr(build, "lower", lambda *args, **kwargs: pytest.fail("compiled before checking the output"))
    with pytest.raises(BnnccError, match=rf"afile/lib: cannot write there \({tmp_path}/afile is not a folder\)$"):
        build.compile(tiny_pokebnn(), tmp_path / "afile" / "lib")
    assert os.listdir(tmp_path) == ["afile"]


@pytest.mark.parametrize("source", ["tmpfs", "bind"])
def test_an_output_folder_that_is_a_mount_point_is_refused_before_compiling(tmp_path, monkeypatch, source):
    """The new folder is renamed onto the output, which a mount point refuses (EBUSY): `bnncc compile -o
    /media/usb` (an empty stick) compiled for minutes and then failed, "cannot write there (Device or resource
    busy)"; a bundle's folder alike. A bind mount within the file system (a container's volume) has its
    parent's device, by which os.path.ismount told it from an ordinary folder, and was missed."""
    from test_lower import tiny_pokebnn

    import bnncc.targets.build as build

    mount = tmp_path / "usb stick"  # (a space: mountinfo writes it octal-escaped)
    mount.mkdir()
    (tmp_path / "folder").mkdir()
    options = ["-t", "tmpfs", "tmpfs"] if source == "tmpfs" else ["--bind", tmp_path / "folder"]
    if subprocess.run(["mount", *options, mount], capture_output=True).returncode != 0:
        pytest.skip("mounting needs root")
    try:
        with pytest.raises(OSError, match="Device or resource busy"):  # what the compile met at its end
            os.rename(mount, tmp_path / "moved")
        monkeypatch.setattr(build, "lower", lambda *args, **kwargs: pytest.fail("compiled before checking the output"))
        with pytest.raises(BnnccError, match=rf"^{mount}: is a mount point, which bnncc cannot replace with the "
                                             rf"library folder; give a new folder inside it$"):
            build.compile(tiny_pokebnn(), mount)
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", mount], check=True)
    build.check_output_folder(mount)  # the folder, no longer a mount point, is an ordinary one


@pytest.mark.parametrize("target", ["arm64", "cuda"])
@pytest.mark.parametrize("command", ["compile", "convert"])
def test_a_missing_build_tool_is_said_before_any_work(tmp_path, cli, monkeypatch, target, command):
    """The cross linker and nvcc run last: without them, compile lowered and built for minutes (convert also
    fine-tuned) before its one line. Said before the model is even read (none here), nothing written."""
    from bnncc.targets import cuda

    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no aarch64-linux-gnu-g++
    monkeypatch.setattr(cuda, "find_nvcc", lambda: None)
    code, out, err = cli(command, tmp_path / "none.onnx", "--target", target, "-o", tmp_path / "out")
    tool = {"arm64": "aarch64-linux-gnu-g++ not found", "cuda": "nvcc not found"}[target]
    assert code == 2 and err.startswith(f"error: {tool}; install ") and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == []


def test_compile_says_when_activation_bounds_are_uncalibrated(tmp_path, caplog):
    """A graph straight from rewrite (bounds -1) compiled without a word, though its library runs the
    stem, SE gates and head in float; a calibrated one, as fine-tune writes it, compiles quietly."""
    import numpy as np
    import onnx_ir as ir
    from test_lower import tiny_pokebnn

    import bnncc.targets.build as build
    from bnncc.ops.registry import op_def

    model = tiny_pokebnn()
    def said():
        return [r.getMessage() for r in caplog.records if r.name == "bnncc.targets.build"]

    with caplog.at_level("WARNING", logger="bnncc.targets.build"):
        build.compile(model, tmp_path / "calibrated")
    assert said() == []
    bounds = [node.inputs[i] for node in model.graph if (op := op_def(node)) for i, _ in op.bounds]
    assert all((bound.const_value.numpy() > 0).any() for bound in bounds)
    first = bounds[0]
    first.const_value = ir.tensor(np.full(first.const_value.shape.numpy(), -1, np.float32), name=first.name)
    with caplog.at_level("WARNING", logger="bnncc.targets.build"):
        build.compile(model, tmp_path / "zeros")
    # calibration leaves -1 where a bound's channels all saw zeros: the demo's fine-tuned graph was told to fine-tune
    assert said() == [f"1 of {len(bounds)} activation bounds saw only zeros in calibration: those quantizers run "
                      f"in float"]
    caplog.clear()
    for bound in bounds:
        bound.const_value = ir.tensor(np.full(bound.const_value.shape.numpy(), -1, np.float32), name=bound.name)
    with caplog.at_level("WARNING", logger="bnncc.targets.build"):
        build.compile(model, tmp_path / "uncalibrated")
    assert said() == [
        f"{len(bounds)} of {len(bounds)} activation bounds are uncalibrated: those quantizers run in float; "
        f"fine-tune the graph first (bnncc finetune calibrates them)"]


def test_a_library_the_disk_cannot_hold_is_one_error_naming_the_folder(tmp_path, monkeypatch):
    """The linker writing model.so onto a full disk failed inside TVM's export as a RuntimeError
    ("Compilation error: ... ld: final link failed: No space left on device"), which ended compile as an
    "unexpected RuntimeError", exit 1. The linker here prints what ld printed on a full tmpfs."""
    from bnncc.targets.build import compile
    from test_lower import tiny_pokebnn

    linker = tmp_path / "cxx"
    linker.write_text("#!/bin/sh\necho '/usr/bin/ld: final link failed: No space left on device'\nexit 1\n")
    linker.chmod(0o755)
    monkeypatch.setenv("CXX", str(linker))
    with pytest.raises(BnnccError, match=r"lib: cannot write there \(No space left on device\)"):
        compile(tiny_pokebnn(), tmp_path / "out" / "lib")
    assert os.listdir(tmp_path) == ["cxx"]  # not even the folder out, which compile made


_FILES = frozenset({"model.json", "writer"})
# another bnncc run writing the same folder: its own process, its own atomic_dir
_OTHER_RUN = f"""
import sys
from pathlib import Path
from bnncc.targets.build import atomic_dir
with atomic_dir(Path(sys.argv[1]), {sorted(_FILES)!r}, "bundle") as tmp:
    (tmp / "model.json").write_text('{{"format": "{MANIFEST_FORMAT}"}}')
    (tmp / "writer").write_text("other")
"""


def test_another_run_writing_the_folder_between_the_renames_is_named(tmp_path, monkeypatch):
    """Two bundles (or compiles) into one folder at once: where the other run's folder took the place between
    this run's two renames, this one ended "cannot write there (Directory not empty)", as if the disk failed."""
    dest = tmp_path / "bundle"

    def write(tmp, who):
        (tmp / "model.json").write_text(json.dumps({"format": MANIFEST_FORMAT}))
        (tmp / "writer").write_text(who)

    with atomic_dir(dest, _FILES, "bundle") as tmp:
        write(tmp, "earlier")
    replace = os.replace

    def other_run_between(src, dst):
        replace(src, dst)
        if Path(src) == dest:  # this run's first rename, the earlier bundle put aside: the other run writes now
            done = subprocess.run([sys.executable, "-c", _OTHER_RUN, str(dest)], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr

    monkeypatch.setattr(os, "replace", other_run_between)
    with pytest.raises(BnnccError, match=f"^{dest}: another run wrote this folder at the same time, and its bundle "
                                         "is there, not this one's; run again"):
        with atomic_dir(dest, _FILES, "bundle") as tmp:
            write(tmp, "this")
    assert (dest / "writer").read_text() == "other" and os.listdir(tmp_path) == ["bundle"]
