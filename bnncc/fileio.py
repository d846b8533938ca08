"""Atomic output (a file is either absent or complete, never partial) and the user cache folder."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from bnncc.errors import BnnccError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "cache_dir", "cache_entry_whole",
           "check_folder_writable", "check_writable", "file_sha256", "folder_id", "hash_file", "load_private_copy",
           "make_folders", "output_errors", "output_path", "output_target", "partial_writes", "record_cache_entry",
           "refuse_overwriting", "remove_made", "remove_partial", "require_file", "require_unchanged", "sync",
           "temporary_prefix", "umask", "writing_error"]

T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it onto ``dest``.

    The rename is atomic on POSIX, so a crash or kill leaves either the old file or the new one.
    The file's bytes reach the disk before the rename, and the rename after it: otherwise a machine
    that loses power may keep the rename and not the bytes (an empty checkpoint after hours of
    training). On an exception the temporary file is removed and ``dest`` is untouched.
    """
    dest = output_target(dest)
    with output_errors(dest):
        made = make_folders(dest.parent)
        try:
            suffix = _temporary_suffix(suffix or dest.suffix)
            fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(dest, suffix), suffix=suffix, dir=dest.parent)
        except BaseException:
            remove_made(made)
            raise
    tmp_path = Path(tmp)
    # from here on the temporary is removed whatever ends the run: a Ctrl-C or SIGTERM during the
    # chmod below (the moment the file appears) left a ".NAME.*" file beside the output
    try:
        os.close(fd)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 would keep the output from everyone else
        try:
            yield tmp_path
        except OSError as e:
            # a full disk or a quota while the body wrote (onnx.save) is the output's error, as in
            # targets.build.atomic_dir: it ended commands as an "unexpected OSError"; a file the body
            # failed to read is named as it is
            if not writing_error(e, tmp_path):
                raise
            raise BnnccError(f"{dest}: cannot write there ({e.strerror or e})") from None
        sync(tmp_path)
        os.replace(tmp_path, dest)
        with contextlib.suppress(OSError):  # (a file system that cannot sync a folder)
            sync(dest.parent)
    finally:
        tmp_path.unlink(missing_ok=True)
        remove_made(made)  # (once the output is there, the folder that holds it is not empty: none goes)


def make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and the folders above it that are missing; return those it made, deepest first,
    for ``remove_made`` to take back when the write fails (a full disk left the empty folders of a
    library or graph that was never written)."""
    made = [path for path in (folder, *folder.parents) if not os.path.lexists(path)]
    folder.mkdir(parents=True, exist_ok=True)
    return made


def remove_made(made: list[Path]) -> None:
    """Remove the folders ``make_folders`` made, deepest first, as far as they are empty (another run may
    have written into one meanwhile)."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            return


# the bytes of an output's name and suffix that its temporaries' names take where the whole name made them
# longer than a file name's 255 bytes (NAME_MAX): an output of a name the system takes (241 to 255 bytes) was
# refused as "File name too long"
_NAME_PART = 100


def temporary_prefix(dest: Path, suffix: str = "") -> str:
    """``.NAME.``, where the names of the temporaries written before ``dest`` (ending in ``suffix``) start:
    NAME whole, as earlier versions named them (whose stopped writes partial_writes finds), unless the longest
    of them (``.NAME.old.`` and mkstemp's 8 characters) would be over NAME_MAX, then cut to _NAME_PART bytes."""
    name = os.fsencode(dest.name)
    if len(name) + len(os.fsencode(suffix)) + len("..old.") + 8 > 255:
        name = name[:_NAME_PART]
    return f".{os.fsdecode(name)}."


def _temporary_suffix(suffix: str) -> str:
    """``suffix`` where a temporary's name ends (a writer may read the format from it), none if too long."""
    return suffix if len(os.fsencode(suffix)) <= _NAME_PART else ""


def partial_writes(dest: Path) -> list[Path]:
    """The temporaries beside ``dest`` that atomic_path (files ``.NAME.*SUFFIX``) and targets.build.atomic_dir
    (folders ``.NAME.*``) write before renaming, as a run stopped mid-write (kill -9, a power loss) left them."""
    suffix = _temporary_suffix(dest.suffix)
    files = dest.parent.glob(f"{glob.escape(temporary_prefix(dest, suffix))}*{glob.escape(suffix)}")
    folders = dest.parent.glob(f"{glob.escape(temporary_prefix(dest))}*")
    return [*(path for path in files if path.is_file()), *(path for path in folders
                                                             if path.is_dir() and not path.is_symlink())]


def remove_partial(paths: Iterable[Path]) -> None:
    """Remove ``paths``, temporaries of stopped writes (files, or folders whole): no run reads them, and each
    is as large as its output, one more for every stop. Only for a caller that no other process writes beside."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def writing_error(error: OSError, output: Path) -> bool:
    """Whether ``error`` came from writing ``output`` (a file, or a folder and what it holds): a write
    names no file, a copy (shutil.copyfile) its source first and ``output`` second. A copy onto a full
    disk, whose source alone was looked at, ended bundle and convert as an "unexpected OSError"."""
    named = [Path(name) for name in (error.filename, error.filename2) if name is not None]
    return not named or any(path.is_relative_to(output) for path in named)


def sync(path: Path) -> None:
    """Wait until the file or folder ``path`` is on the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_private_copy(library: str | os.PathLike, load: Callable[[Path], T], sha256: str | None = None) -> T:
    """``load`` (a dlopen) of a private copy of the shared library ``library``, removed afterwards
    (the loaded code stays mapped). dlopen hands back the library first loaded under a path for as
    long as the process lives: a library rebuilt in the same folder and loaded again ran the old
    code under the new manifest. Where the temporary folder takes no copy or maps none (full, or
    mounted noexec as on hardened hosts), the library is loaded where it is. With ``sha256`` (what
    its manifest records), the file loaded must have that digest: a library checked and then
    replaced before its copy was taken (a compile writing the folder meanwhile) was loaded unchecked."""
    try:
        with tempfile.TemporaryDirectory(prefix="bnncc-lib-") as tmp:
            copy = Path(tmp) / Path(library).name
            shutil.copyfile(library, copy)
            require_unchanged(copy, sha256, library)
            return load(copy)
    except (OSError, RuntimeError):  # (TVM's load errors are RuntimeErrors; a real one recurs below)
        require_unchanged(Path(library), sha256, library)
        return load(Path(library))


def require_unchanged(copy: Path, sha256: str | None, library: str | os.PathLike) -> None:
    """``copy``, taken of ``library`` after its manifest's digest ``sha256`` was checked (None:
    none recorded), still has that digest: a library replaced in between (a compile writing its
    folder) is not taken under the old manifest."""
    if sha256 is not None and file_sha256(copy) != sha256:
        raise BnnccError(f"{library}: changed since its manifest was checked (its SHA-256 differs); is a compile "
                         f"writing its folder? Try again")


def hash_file(digest, path: str | os.PathLike):
    """``digest`` (a hashlib object) updated with the bytes of the file at ``path``, a MiB at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of the file at ``path``, in hex."""
    return hash_file(hashlib.sha256(), path).hexdigest()


def folder_id(stat: os.stat_result) -> tuple[int, int]:
    """What tells a folder (by its ``stat``) from another, whatever the links that lead to it."""
    return stat.st_dev, stat.st_ino


def require_file(path: Path, expected: str) -> None:
    """Refuse a path that is no regular file, saying what it is instead: missing, a folder, or a
    FIFO or device (reading one would wait for ever, or never end)."""
    if not path.exists():
        raise BnnccError(f"{path}: no such file")
    if not path.is_file():
        raise BnnccError(f"{path}: {'a folder' if path.is_dir() else 'not a regular file'}, not {expected}")


def output_path(dest: str | os.PathLike) -> Path:
    """``dest`` with each ``..`` that follows a folder that does not exist taken away with it: ``a/../b``
    where there is no ``a`` is ``b``. The system reaches ``b`` through ``a`` only once ``a`` is made, and
    the output was written with ``a`` made and left behind, empty. A missing folder is no link, so
    there ``..`` has its plain meaning; after a folder that exists it stays the system's (a link's)."""
    parts: list[str] = []
    for part in Path(dest).parts:
        if part == ".." and parts and parts[-1] != ".." and not os.path.lexists(Path(*parts)):
            parts.pop()
        else:
            parts.append(part)
    return Path(*parts) if parts else Path(".")


def output_target(dest: str | os.PathLike) -> Path:
    """The file an output to ``dest`` replaces: ``dest`` (``output_path``'s), or the file a symbolic
    link there names (the rename put a file in place of the link). A folder, FIFO, device or socket is
    refused: the rename replaced /dev/null itself with a regular file when a root user wrote there."""
    dest = output_path(dest)
    # (a name over NAME_MAX, or a folder without search permission on the way, fails these looks: it ended
    # commands as an "unexpected OSError")
    with output_errors(dest):
        target = dest.resolve() if dest.is_symlink() else dest
        if target.is_dir():
            raise BnnccError(f"{dest}: is a folder; expected the path of a file to write")
        if target.exists() and not target.is_file():
            raise BnnccError(f"{dest}: not a regular file (a device, FIFO or socket); expected the path of a file "
                             f"to write")
    return target


def check_writable(dest: str | os.PathLike) -> None:
    """Refuse, before any work, an output path that cannot be written (a folder, a parent that is a
    file, no permission, a read-only file system)."""
    check_folder_writable(output_target(dest))


def check_folder_writable(dest: Path) -> None:
    """Refuse, before any work, an output ``dest`` (a file, or a folder written beside it and renamed)
    whose folder cannot be written (a parent that is a file, no permission, a read-only file system):
    a file is created in its folder, or in the nearest folder above it that exists (the write makes the
    others), and removed. Nothing is left behind, not even the folders."""
    with output_errors(dest):  # (walking up too: a folder without search permission is an OSError)
        folder = dest.parent
        while not os.path.lexists(folder) and folder != folder.parent:  # a dangling link exists, as no folder
            folder = folder.parent
        if not folder.is_dir():
            raise BnnccError(f"{dest}: cannot write there ({folder} is not a folder)")
        fd, probe = tempfile.mkstemp(prefix=temporary_prefix(dest), dir=folder)
        try:
            os.close(fd)
        finally:  # (an interrupt here left the probe behind)
            os.unlink(probe)


def refuse_overwriting(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike]) -> None:
    """Refuse, before any work, an output path that names an input or another output (keys say what
    each path is, e.g. "the teacher model"): the run would replace the teacher it distils from, or
    write its checkpoint over its result. Paths are compared resolved, so links and ../ count."""
    taken = {Path(path).resolve(): what for what, path in inputs.items()}
    for what, path in outputs.items():
        if path is None:
            continue
        target = Path(path).resolve()
        if target in taken:
            raise BnnccError(f"{path}: is {taken[target]}; write {what} to another path")
        taken[target] = what


def umask() -> int:
    """This process's umask, read without changing it (os.umask sets it, for every thread at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        return 0o022


@contextlib.contextmanager
def output_errors(dest: Path) -> Iterator[None]:
    """An OSError while making room for output ``dest`` (a parent that is a file, no permission, a
    read-only file system) as a BnnccError naming it."""
    try:
        yield
    except OSError as e:
        raise BnnccError(f"{dest}: cannot write there ({e.strerror or e})") from None


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))


def cache_dir() -> Path:
    """``$BNNCC_CACHE`` or ``~/.cache/bnncc``: built runners, kernels and downloaded runtimes."""
    if os.environ.get("BNNCC_CACHE"):
        return Path(os.environ["BNNCC_CACHE"])
    try:
        home = Path.home()
    except RuntimeError:  # no $HOME and no passwd entry (a container run as `-u 1000`): "unexpected RuntimeError"
        raise BnnccError("no folder for bnncc's cache: HOME is unset and this user has no home folder; "
                         "set HOME (or BNNCC_CACHE) to a folder") from None
    return home / ".cache" / "bnncc"


def _digest_path(entry: Path) -> Path:
    return entry.with_name(f"{entry.name}.sha256")


def record_cache_entry(entry: Path) -> None:
    """Write the SHA-256 of the cache file ``entry``, just built, beside it (``NAME.sha256``), for
    ``cache_entry_whole`` to check it against."""
    atomic_write_text(_digest_path(entry), file_sha256(entry))


def cache_entry_whole(entry: Path) -> bool:
    """Whether the cache file ``entry`` is a regular file with the SHA-256 that ``record_cache_entry`` wrote
    beside it. An entry that was cut short, emptied or overwritten (a full disk, a crash, a copy over it)
    was taken as it was: a bundle shipped an empty or truncated runner, and training died loading the
    kernels ("file too short"). One that is not whole is built again."""
    try:
        return entry.is_file() and _digest_path(entry).read_text(encoding="ascii") == file_sha256(entry)
    except (OSError, UnicodeDecodeError):
        return False
