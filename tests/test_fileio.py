"""Atomic outputs: whole or absent, and readable as any file the user writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from bnncc.errors import BnnccError
from bnncc.fileio import (atomic_path, atomic_write_text, cache_dir, cache_entry_whole, output_path, record_cache_entry,
                          umask)


def test_an_output_file_gets_the_modes_of_the_users_umask(tmp_path):
    """mkstemp makes its file 0600; the output should be what open() gives (0644 under umask 022)."""
    old = os.umask(0o027)
    try:
        assert umask() == 0o027
        atomic_write_text(tmp_path / "out.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o640


def test_an_output_through_a_missing_folder_and_back_makes_no_folder(tmp_path, monkeypatch):
    """`-o a/../b.onnx` with no `a` wrote b.onnx and left an empty `a` (made to walk through, as
    mkdir -p does). Past a folder that exists, ".." stays the system's: through a link, its target's parent."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep")
    assert output_path("a/../b.onnx") == Path("b.onnx")
    assert output_path("x/y/../../c/d.onnx") == Path("c/d.onnx")
    assert output_path("a/../../b.onnx") == Path("../b.onnx")
    assert output_path("link/../e.onnx") == Path("link/../e.onnx")  # real/e.onnx, as the system reads it
    assert output_path("a/..") == Path(".")
    for dest in ("a/../b.onnx", "x/y/../../c/d.onnx", "link/../e.onnx"):
        atomic_write_text(dest, "x")
    assert sorted(os.listdir(tmp_path)) == ["b.onnx", "c", "link", "real"]
    assert os.listdir("c") == ["d.onnx"] and sorted(os.listdir("real")) == ["deep", "e.onnx"]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.onnx") as tmp:
            tmp.write_text("half")
            raise RuntimeError("stopped")
    assert os.listdir(tmp_path) == []


def test_a_full_disk_while_writing_is_one_error_naming_the_output(tmp_path):
    """A full disk while the trained graph was written (onnx.save) ended finetune as an "unexpected
    OSError", exit 1. /dev/full fails every write with ENOSPC, as a full disk does."""
    with pytest.raises(BnnccError, match=r"out.onnx: cannot write there \(No space left on device\)"):
        with atomic_path(tmp_path / "out.onnx") as tmp:
            with open(tmp, "wb") as f, open("/dev/full", "wb") as full:
                f.write(b"half")
                full.write(b"the rest")
                full.flush()
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="missing.txt"):  # a file the body failed to read is its own error
        with atomic_path(tmp_path / "out.onnx"):
            (tmp_path / "missing.txt").read_text()


def test_an_interrupt_as_the_temporary_appears_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (bnncc.cli raises them as exceptions) in the moment after mkstemp made the
    temporary, while its modes were set, left ".out.onnx.*.onnx" beside the output of `bnncc rewrite`;
    the same moment in the writability check left its probe."""
    from bnncc import fileio
    from bnncc.fileio import check_writable

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio, "umask", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "new" / "out.onnx"):
            pass
    assert os.listdir(tmp_path) == []
    close = os.close

    def close_interrupted(fd):
        monkeypatch.setattr(os, "close", close)
        close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "close", close_interrupted)
    with pytest.raises(KeyboardInterrupt):
        check_writable(tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == []


def test_a_failed_write_takes_back_the_folders_it_made(tmp_path):
    """A full disk while rewrite or export wrote new/deep/out.onnx left the empty folders new/deep; those
    that were there before stay, as does a folder the output went into."""
    (tmp_path / "mine").mkdir()
    with pytest.raises(BnnccError, match="cannot write there"):
        with atomic_path(tmp_path / "mine" / "new" / "deep" / "out.onnx") as tmp:
            with open(tmp, "wb") as f, open("/dev/full", "wb") as full:
                f.write(b"half")
                full.write(b"the rest")
                full.flush()
    assert os.listdir(tmp_path) == ["mine"] and os.listdir(tmp_path / "mine") == []
    atomic_write_text(tmp_path / "mine" / "new" / "out.txt", "x")
    assert os.listdir(tmp_path / "mine" / "new") == ["out.txt"]


@pytest.mark.parametrize(("dest", "message"), [("folder", "is a folder"), ("file/out.onnx", "cannot write there")])
def test_an_output_path_that_cannot_be_a_file_is_one_error(tmp_path, dest, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(BnnccError, match=message):
        atomic_write_text(tmp_path / dest, "x")
    assert (tmp_path / "file").read_text() == "mine"


def test_an_output_onto_a_fifo_is_refused_and_one_through_a_link_writes_its_file(tmp_path):
    """The rename replaced a FIFO or device at the output path (as root, /dev/null itself) by a
    regular file, and a symbolic link by a file in its place."""
    from bnncc.fileio import check_writable

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for write in (lambda: atomic_write_text(fifo, "x"), lambda: check_writable(fifo)):
        with pytest.raises(BnnccError, match="fifo: not a regular file .*; expected the path of a file to write"):
            write()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    (tmp_path / "link").symlink_to("target.txt")
    atomic_write_text(tmp_path / "link", "written")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target.txt").read_text() == "written"


def test_a_library_is_loaded_where_it_is_when_no_private_copy_loads(tmp_path, monkeypatch):
    """A private copy first (dlopen caches by path); where the temporary folder is mounted noexec
    (dlopen fails on the copy) or full (the copy fails), the library itself: load() ended in an
    'unexpected InternalError' or OSError on such hosts."""
    from bnncc.fileio import load_private_copy

    library = tmp_path / "model.so"
    library.write_bytes(b"library")
    loaded = []

    def noexec(path):
        loaded.append(path)
        if path != library:
            raise RuntimeError("failed to map segment from shared object")
        return path.read_bytes()

    assert load_private_copy(library, noexec) == b"library" and loaded[0] != library and loaded[1] == library
    import shutil

    def full(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    assert load_private_copy(library, lambda path: path) == library


def test_an_output_reaches_the_disk_before_its_rename(tmp_path, monkeypatch):
    """Without a sync, a machine that lost power could keep the rename and not the bytes: an empty
    checkpoint after hours of training."""
    from bnncc.fileio import atomic_write_bytes

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))), replace(a, b)))
    atomic_write_bytes(tmp_path / "out.bin", b"data")
    assert [kind for kind, _ in events] == ["sync", "rename", "sync"]
    assert events[0][1].startswith(str(tmp_path / ".out.bin.")) and events[2][1] == str(tmp_path)


def test_the_library_loaded_is_the_one_its_digest_names(tmp_path, monkeypatch):
    """The digest was checked on the folder's file and the copy taken after it loaded unchecked: a
    file replaced in between (a compile writing the folder) ran under the old manifest."""
    import hashlib
    import shutil

    from bnncc.fileio import load_private_copy

    library = tmp_path / "model.so"
    library.write_bytes(b"library")
    digest = hashlib.sha256(b"library").hexdigest()
    assert load_private_copy(library, lambda path: path.read_bytes(), digest) == b"library"
    copyfile = shutil.copyfile

    def replaced_first(source, destination):
        library.write_bytes(b"another")
        return copyfile(source, destination)

    monkeypatch.setattr(shutil, "copyfile", replaced_first)
    with pytest.raises(BnnccError, match="model.so: changed since its manifest was checked"):
        load_private_copy(library, lambda path: path.read_bytes(), digest)


def test_the_writability_check_makes_nothing_and_walks_up_to_a_folder_that_exists(tmp_path, monkeypatch):
    from bnncc.fileio import check_writable

    monkeypatch.chdir(tmp_path)
    check_writable("out.onnx")  # a relative path: its folder is "."
    check_writable(tmp_path / "a" / "b" / "out.onnx")
    assert os.listdir(tmp_path) == []  # no folder made, no probe left
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for parent in ("dangling", "loop"):  # accepted before, and the write then failed with EEXIST
        with pytest.raises(BnnccError, match=f"{parent}/out.onnx: cannot write there"):
            check_writable(tmp_path / parent / "out.onnx")


def test_a_cache_entry_is_whole_only_with_the_bytes_it_was_recorded_with(tmp_path):
    """A cache entry cut short, emptied, overwritten or made a folder was reused as it was."""
    entry = tmp_path / "runner-abc"
    entry.write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
    assert not cache_entry_whole(entry)  # (no digest recorded: an entry of an older bnncc, or a copy)
    record_cache_entry(entry)
    assert cache_entry_whole(entry)
    whole = entry.read_bytes()
    for damaged in (whole[:5000], b"", b"garbage", whole[::-1]):
        entry.write_bytes(damaged)
        assert not cache_entry_whole(entry)
    entry.unlink()
    entry.mkdir()
    assert not cache_entry_whole(entry)


def test_no_home_folder_for_the_cache_is_one_line_naming_bnncc_cache(tmp_path, monkeypatch):
    """With HOME unset and no passwd entry (a container run as `-u 1000`), bundle and arm64 runs ended in
    "unexpected RuntimeError: Could not determine home directory."."""
    import pwd

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    for unset in (None, ""):  # (an empty BNNCC_CACHE is unset)
        if unset is None:
            monkeypatch.delenv("BNNCC_CACHE", raising=False)
        else:
            monkeypatch.setenv("BNNCC_CACHE", unset)
        with pytest.raises(BnnccError, match=r"^no folder for bnncc's cache: HOME is unset .*; "
                                             r"set HOME \(or BNNCC_CACHE\) to a folder$"):
            cache_dir()
    monkeypatch.setenv("BNNCC_CACHE", str(tmp_path / "my cache"))
    assert cache_dir() == tmp_path / "my cache"


def test_an_output_name_over_name_max_is_one_error_naming_it(tmp_path):
    """The first look at an output path (is it a link, a folder?) failed with ENAMETOOLONG for a name longer
    than the file system allows, as with EACCES under a folder without search permission: every command that
    writes ended with "unexpected OSError" and a hint at a traceback."""
    from bnncc.fileio import check_writable
    from bnncc.pipeline import check_outdir
    from bnncc.targets.build import check_output_folder

    dest = tmp_path / ("a" * 300)
    for check in (check_writable, lambda path: atomic_write_text(path, "x"), check_output_folder, check_outdir):
        with pytest.raises(BnnccError, match=r"^/.*/a{300}: cannot write there \(File name too long\)$"):
            check(dest)
    assert os.listdir(tmp_path) == []


def test_an_output_named_up_to_name_max_is_written(tmp_path):
    """The temporaries were named `.NAME.` + 8 characters + the suffix, over a file name's 255 bytes for an
    output named from 241 bytes up: a name the system takes was refused as "File name too long"."""
    from bnncc.fileio import check_writable, partial_writes
    from bnncc.targets.build import MANIFEST_FORMAT, atomic_dir

    for name in ("a" * 250 + ".onnx", "界" * 80 + ".onnx"):  # 255 and 245 bytes (a character cut in its middle)
        dest = tmp_path / name
        check_writable(dest)
        atomic_write_text(dest, "x")
        assert dest.read_text() == "x" and os.listdir(tmp_path) == [name]
        dest.unlink()
    stopped = tmp_path / ".stopped.onnx"  # what a write stopped by kill -9 leaves
    with atomic_path(dest) as tmp:
        os.link(tmp, stopped)
    os.rename(stopped, tmp)
    assert partial_writes(dest) == [tmp]
    os.unlink(tmp)
    folder = tmp_path / ("b" * 255)
    for build in (1, 2):  # (the second moves the first aside under another temporary name)
        with atomic_dir(folder) as tmp:
            (tmp / "model.json").write_text(json.dumps({"format": MANIFEST_FORMAT, "build": build}))
        assert json.loads((folder / "model.json").read_text())["build"] == build
    assert sorted(os.listdir(tmp_path)) == sorted([dest.name, folder.name])


def test_the_stopped_writes_of_an_earlier_version_are_found_under_a_long_name(tmp_path):
    """Temporaries took at most 100 bytes of an output's name, also where the whole name fitted, as bnncc had
    always named them: a checkpoint or output of 101 to 240 bytes whose write an earlier version's run had
    stopped (kill -9) kept its temporary, as large as the output, which partial_writes no longer found."""
    from bnncc.fileio import partial_writes
    from bnncc.targets.build import atomic_dir

    dest = tmp_path / ("c" * 150 + ".pt")
    left = [tmp_path / f".{dest.name}.k3j_x9a2.pt", tmp_path / f".{dest.name}.p0q1r2s3",
            tmp_path / f".{dest.name}.old.t4u5v6w7"]  # as atomic_path and atomic_dir named them
    left[0].write_bytes(b"checkpoint")
    for folder in left[1:]:
        folder.mkdir()
    assert sorted(partial_writes(dest)) == sorted(left)
    with atomic_path(dest) as tmp:  # and a write now names its temporary as they did
        assert tmp.name.startswith(f".{dest.name}.") and tmp.suffix == ".pt"
    with atomic_dir(tmp_path / dest.stem) as tmp:
        assert tmp.name.startswith(f".{dest.stem}.")
