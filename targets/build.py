"""``compile``: a PokeBNN ONNX graph -> a standalone library folder (model.so, model.json, model.onnx).

The folder appears atomically: it is written under a temporary name beside OUTDIR and renamed
onto it at the end (an existing OUTDIR is replaced only then). ``model.json`` holds what a
caller needs without TVM's compiler: the input and output names and shapes, the batch sizes
and the Relax function of each, preprocessing, the recipe, ACE and the target.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import operator
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import onnx_ir as ir
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from bnncc.cost import ace
from bnncc.domain import LIBRARY_FILES, PREPROCESSING_KEY, RECIPE_KEY
from bnncc.errors import BnnccError
from bnncc.fileio import (check_folder_writable, file_sha256, make_folders, output_errors, output_path, remove_made,
                          sync, temporary_prefix, umask, writing_error)
from bnncc.frontend import read_pokebnn, source_name
from bnncc.ops.registry import op_def
from bnncc.passes.symbolic_batch import BATCH, SymbolicBatchPass
from bnncc.progress import bar_console
from bnncc.targets import registry
from bnncc.targets.lower import function_name, lower
from bnncc.targets.tvm_compat import NUM_THREADS, compile_module

__all__ = ["check_batches", "compile", "MANIFEST_FORMAT", "write_manifest"]

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "bnncc-library/1"


def compile(model: str | os.PathLike | ir.Model, output: str | os.PathLike, *, target: str = "x86-64",
            batches: tuple[int, ...] = (1,), show_progress: bool = False) -> Path:  # noqa: A001 (the CLI's name)
    """Lower ``model`` (a PokeBNN graph or its path) for ``target`` and write the library folder ``output``.

    One Relax function per entry of ``batches``, and batch 1 in any case (``lower`` builds it), so
    that every batch size runs; model.json lists them all. Returns the folder's path. With
    ``show_progress``, a bar of its steps on a terminal's stderr.
    """
    spec = registry.get(target, build=True)
    batches = check_batches(spec, batches)
    output = output_path(output)
    check_output_folder(output)  # before the minutes of compiling
    source = source_name(model)
    # the front end's checks: a whole ONNX file, external data from its folder
    caller_owned = isinstance(model, ir.Model)
    model = read_pokebnn(model, "compile")
    if caller_owned:  # the pass below works in place: the caller's model of a fixed batch came back with batch N
        model = ir.from_proto(ir.to_proto(model))
    # the library takes any batch, and so must its reference graph, which verify runs one image at a time
    SymbolicBatchPass()(model)
    _warn_uncalibrated(model)
    llvm_target = spec.tvm_target()
    start = time.perf_counter()
    with _steps(show_progress, target) as step:
        step("lower to TVM Relax")
        try:
            lowered = lower(model, llvm_target, batches, schedule=spec.schedule)
        except BnnccError as error:  # the lowering names the node; the user also needs the file
            raise BnnccError(f"{source}: {error}") from None
        step("build with TVM")
        executable = compile_module(lowered.module, llvm_target, spec.pass_config() if spec.pass_config else None)
        compile_s = time.perf_counter() - start
        step("write the library")
        manifest = {
            "format": MANIFEST_FORMAT,
            "input": {"name": lowered.input_name, "shape": [BATCH, *lowered.input_chw], "layout": "NCHW",
                      "dtype": "float32"},
            "output": {"name": lowered.output_name, "shape": [BATCH, lowered.classes], "dtype": "float32"},
            "functions": {str(b): function_name(b) for b in batches},
            "preprocessing": _metadata_json(model, PREPROCESSING_KEY),
            "recipe": model.metadata_props.get(RECIPE_KEY),
            "ace": float(ace(model)),
            "target": {"name": target, "llvm": str(llvm_target), "threads": NUM_THREADS,
                       **({"cpu_features": spec.cpu_features(llvm_target)} if spec.cpu_features else {})},
            "compile_seconds": round(compile_s, 2),
            **(spec.report(executable, lowered, model) if spec.report else {}),
        }
        with atomic_dir(output) as tmp:
            spec.export(executable, tmp / "model.so")
            manifest["library_sha256"] = file_sha256(tmp / "model.so")
            write_manifest(tmp / "model.json", manifest)
            ir.save(model, tmp / "model.onnx")
    logger.info("compiled %s for %s (batches %s) in %.1f s", output, target, list(batches), compile_s)
    return output


def _warn_uncalibrated(model: ir.Model) -> None:
    """Say when activation bounds are uncalibrated (all <= 0: their quantizers pass floats, spec.md), as in a
    graph straight from rewrite: the library then runs those layers in float, where its ACE counts them at
    their bits, and nothing else said so."""
    bounds = [node.inputs[position] for node in model.graph if (op := op_def(node)) is not None
              for position, _ in op.bounds if position < len(node.inputs) and node.inputs[position] is not None]
    arrays = [bound.const_value.numpy() for bound in bounds if bound.const_value is not None]
    uncalibrated = sum(int((array <= 0).all()) for array in arrays)
    if not uncalibrated:
        return
    # calibration leaves a bound whose channels all saw only zeros at -1: in a fine-tuned graph (the demo's
    # too) "fine-tune the graph first" sent the user back to a step already done
    if any((array > 0).any() for array in arrays):
        logger.warning("%d of %d activation bounds saw only zeros in calibration: those quantizers run in float",
                       uncalibrated, len(arrays))
    else:
        logger.warning("%d of %d activation bounds are uncalibrated: those quantizers run in float; fine-tune "
                       "the graph first (bnncc finetune calibrates them)", uncalibrated, len(arrays))


# compile's steps, in order, as its progress bar counts them
_STEPS = ("lower to TVM Relax", "build with TVM", "write the library")


@contextlib.contextmanager
def _steps(show: bool, target: str):
    """A progress bar of compile's steps (the build, one opaque call, takes most of the time: the bar
    shows the step and the time elapsed); yields ``step(name)``, called as each begins."""
    console = bar_console()
    progress = Progress(SpinnerColumn(), TextColumn(f"[bold]compile {target}[/]: {{task.description}}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                        disable=console is None or not show, transient=True)
    with progress:
        task = progress.add_task("", total=len(_STEPS))
        yield lambda name: progress.update(task, description=name, completed=_STEPS.index(name))
        progress.update(task, completed=len(_STEPS))


def write_manifest(path: Path, manifest: dict) -> None:
    """Write a library's model.json (into a folder that ``atomic_dir`` renames into place)."""
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _metadata_json(model: ir.Model, key: str):
    """A JSON value recorded in the model's metadata under ``key``, or None."""
    text = model.metadata_props.get(key)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise BnnccError(f"model metadata {key!r}: not JSON: {text[:60]!r}") from None


# what a library folder holds: an existing folder of these only may be replaced by a new build
_LIBRARY_FOLDER = frozenset(LIBRARY_FILES)


def check_batches(spec: registry.TargetSpec, batches: tuple[int, ...]) -> tuple[int, ...]:
    """The batch sizes ``compile`` builds for target ``spec``: ``batches`` and 1, sorted, refused in one line
    unless each is 1 to the target's largest (convert asks before its stages, which may fine-tune for hours)."""
    try:  # (the Python API's) a float reached TVM's lowering, which failed in an InternalError of many lines
        asked = sorted({operator.index(batch) for batch in batches})
    except TypeError:
        raise BnnccError(f"batch sizes {batches!r}: expected whole numbers, e.g. (1, 8)") from None
    if not asked or asked[0] < 1 or asked[-1] > spec.max_batch:
        raise BnnccError(f"batch sizes must be 1 to {spec.max_batch} for {spec.name}, got {asked} (a library "
                         f"takes any batch in calls of its compiled sizes)")
    return tuple(sorted(set(asked) | {1}))


def check_output_folder(dest: Path, files: frozenset[str] = _LIBRARY_FOLDER, kind: str = "library") -> None:
    """Refuse an output folder path that holds something a build must not replace: a file, or a
    folder with more than an earlier build's ``files``, or with some of them but no manifest of
    ours (a user's own model.onnx). ``kind`` names such a folder in the refusal."""
    # (a name over NAME_MAX, or a folder without search permission on the way, fails these looks: it ended
    # commands as an "unexpected OSError")
    with output_errors(dest):
        if dest.is_symlink():  # renaming a new folder onto it would replace the link, not its target
            raise BnnccError(f"{dest}: is a symbolic link; give the folder's own path or a new one")
        if dest.resolve() == Path.cwd().resolve():  # a folder in use cannot be renamed away
            raise BnnccError(f"{dest}: is the current folder; give a new or earlier output folder's path")
        # a read-only file system or a parent that is a file failed the write after the minutes of compiling
        check_folder_writable(dest)
        if not dest.exists():
            return
        # the new folder is renamed onto this one, which a mount point refuses (EBUSY): an empty USB stick given
        # as the output failed after the minutes of compiling, "cannot write there (Device or resource busy)"
        if _is_mount_point(dest):
            raise BnnccError(f"{dest}: is a mount point, which bnncc cannot replace with the {kind} folder; give a "
                             f"new folder inside it")
        names = {p.name for p in dest.iterdir()} if dest.is_dir() else None
    if names is None or not names <= files or (names and not holds_manifest(dest)):
        others = sorted(names - files) if names else []
        held = f" (it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})" if others else ""
        raise BnnccError(f"{dest}: exists and is not a {kind} folder of bnncc{held}; remove it or choose another "
                         f"output path")


def _is_mount_point(folder: Path) -> bool:
    """Whether a file system is mounted on ``folder``. os.path.ismount looks for another device than its
    parent's, which a bind mount within one file system (`mount --bind`, a container's volume) does not have:
    such an output folder was taken for an ordinary one and the rename failed after the compile. Linux lists
    every mount point, as the process sees them, in /proc/self/mountinfo (the fifth field, octal-escaped)."""
    try:
        with open("/proc/self/mountinfo", "rb") as table:
            points = {re.sub(rb"\\([0-7]{3})", lambda code: bytes([int(code[1], 8)]), line.split()[4])
                      for line in table}
    except OSError:  # no /proc (not Linux)
        return os.path.ismount(folder)
    return os.fsencode(folder.resolve()) in points


def holds_manifest(folder: Path) -> bool:
    """Whether ``folder/model.json`` is a library manifest that bnncc wrote."""
    try:
        manifest = json.loads((folder / "model.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT


class atomic_dir:
    """Write a folder under a temporary name beside ``dest``, then rename it onto ``dest``, which may
    be an earlier folder of ``files`` or an empty one; anything else there is the user's and is kept
    (``check_output_folder``, which ``kind`` is for)."""

    def __init__(self, dest: Path, files: frozenset[str] = _LIBRARY_FOLDER, kind: str = "library") -> None:
        self.dest, self.files, self.kind = dest, files, kind

    def __enter__(self) -> Path:
        check_output_folder(self.dest, self.files, self.kind)
        with output_errors(self.dest):
            self.made = make_folders(self.dest.parent)
            try:
                self.tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(self.dest), dir=self.dest.parent))
            except BaseException:
                remove_made(self.made)
                raise
        try:
            self.tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700 would keep the library from everyone else
        except BaseException:  # (no __exit__ follows a failed __enter__: a Ctrl-C here left the folder)
            shutil.rmtree(self.tmp, ignore_errors=True)
            remove_made(self.made)
            raise
        return self.tmp

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            remove_made(self.made)
            # a full disk, a quota; a file the body failed to read (a kernel source missing from an
            # install) is named as it is
            if issubclass(kind, OSError) and writing_error(value, self.tmp):
                raise BnnccError(f"{self.dest}: cannot write there ({value.strerror or value})") from None
            return
        old = None
        try:
            with output_errors(self.dest):
                # the files' bytes on the disk before the rename, as atomic_path does: otherwise a
                # power loss may keep the rename and not the bytes (a torn model.json or model.onnx)
                for path in self.tmp.iterdir():
                    sync(path)
                sync(self.tmp)
                if self.dest.exists():
                    old = Path(tempfile.mkdtemp(prefix=f"{temporary_prefix(self.dest)}old.", dir=self.dest.parent))
                # a failed rename or a Ctrl-C during or between the two (the finally removes `old`): the
                # earlier folder back in its place
                try:
                    if old is not None:
                        os.replace(self.dest, old / "dir")
                    os.replace(self.tmp, self.dest)
                except BaseException as error:
                    if old is not None and (old / "dir").exists() and not self.dest.exists():
                        os.replace(old / "dir", self.dest)
                    # the folder went (ENOENT) or came back (ENOTEMPTY) between the two renames: another run
                    # writing it at once; "cannot write there (Directory not empty)" did not say so
                    if isinstance(error, OSError) and error.errno in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                        raise BnnccError(f"{self.dest}: another run wrote this folder at the same time, and its "
                                         f"{self.kind} is there, not this one's; run again, or write to another "
                                         f"folder") from None
                    raise
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            remove_made(self.made)  # (once the folder is there, the one that holds it is not empty: none goes)
        with contextlib.suppress(OSError):  # (a file system that cannot sync a folder)
            sync(self.dest.parent)
