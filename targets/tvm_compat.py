"""TVM's Python API as the kernels, schedules, builds and loaders call it.

TVM 0.27 renamed most of its modules (``tir`` -> ``tirx``/``s_tir``, string targets removed,
``tvm.nd`` -> ``tvm.runtime.tensor``); keeping those calls here means the next rename is fixed in
one place. Three modules call TVM themselves: ``lower`` builds its Relax module with ``tvm.relax``,
``cpu_schedule`` writes its tensor intrinsics in TVMScript and ``cuda_runtime`` loads CUDA libraries
with ``tvm_ffi`` alone (no TVM compiler on the GPU machine). Importing this module also fixes
the runtime thread count (see ``_configure_threads``), which must happen before TVM's thread pool
starts.
"""

from __future__ import annotations

import errno
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from bnncc.errors import BnnccError
from bnncc.fileio import atomic_path, load_private_copy


def _configure_threads() -> int:
    """Make TVM use every CPU this process may run on, unless TVM_NUM_THREADS says otherwise.

    TVM's default halves the logical CPU count (1 thread on a 2-core VM), and
    ``runtime.config_threadpool`` does not raise it, so the environment variable is the only
    reliable knob; it is read when the thread pool starts, i.e. after import.
    """
    cpus = len(os.sched_getaffinity(0))
    value = os.environ.setdefault("TVM_NUM_THREADS", str(cpus))
    if not value.strip().isdigit():
        raise BnnccError(f"TVM_NUM_THREADS={value!r}: expected a whole number of threads (0: TVM's default)")
    # TVM's workers spin while they wait: beyond the CPUs they take turns on them, and a process of 64
    # threads on 2 CPUs took a minute to exit, one of 256 never did
    if int(value) > cpus:
        raise BnnccError(f"TVM_NUM_THREADS={value.strip()}: more threads than the {cpus} CPUs this process may run on "
                         f"(they would only slow every call and the exit); give {cpus} or fewer")
    return int(value)


NUM_THREADS = _configure_threads()


def _require_home() -> None:
    """TVM's import reads the home folder (tvm.contrib.pickle_memoize's ~/.cache) unless XDG_CACHE_HOME is set:
    with no HOME and no passwd entry (a container run as `-u 1000`) every command that compiles or runs a
    library ended in "unexpected RuntimeError: Could not determine home directory."."""
    if "XDG_CACHE_HOME" not in os.environ:
        try:
            Path.home()
        except RuntimeError:
            raise BnnccError("no home folder: HOME is unset and this user has none, and TVM keeps a cache there; "
                             "set HOME to a folder") from None


_require_home()

import tvm  # noqa: E402  (must follow the thread configuration)
import tvm_ffi  # noqa: E402
from tvm import relax  # noqa: E402
from tvm import s_tir, te, tirx  # noqa: E402,F401  (re-exported for the kernels and schedules)
from tvm.support import cc  # noqa: E402
from tvm.target import Target  # noqa: E402
from tvm.target.codegen import target_has_features  # noqa: E402

__all__ = [
    "NUM_THREADS", "Target", "compile_func", "compile_module", "cross_compiler", "export_executable", "export_library",
    "has_block", "has_cpu_features", "link", "load_vm", "make_target", "mark_scheduled", "pool_threads",
    "runtime_include_dir", "runtime_library_dirs", "s_tir", "te", "tirx", "to_tensor", "versions",
]


def versions() -> str:
    """The installed TVM and tvm-ffi, as a folder name: what builds a library and what runs it."""
    return f"tvm-{metadata.version('apache-tvm')}-ffi-{metadata.version('apache-tvm-ffi')}"


def pool_threads() -> int:
    """The threads of TVM's pool, as it started them (``NUM_THREADS``, or TVM's default for 0).

    Starting a pool of one thread pins the calling thread to one CPU, for good: after convert's latency,
    torch ran on that CPU alone and the loader refused ``--workers 2`` ("more than the 1 cores"), so the
    thread's CPUs are given back."""
    cpus = os.sched_getaffinity(0)
    threads = tvm.runtime.num_threads()
    os.sched_setaffinity(0, cpus)
    return threads


def make_target(spec: dict[str, Any]) -> Target:
    """A Target from a dict such as ``{"kind": "llvm", "mcpu": "znver4"}`` (strings are rejected in 0.27)."""
    return Target(spec)


def has_cpu_features(target: Target, features: list[str]) -> bool:
    """Whether LLVM says ``target`` (its mcpu plus mattr) has every named feature, e.g. ``["avx512vpopcntdq"]``."""
    return bool(target_has_features(features, target))


def mark_scheduled(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Tag a hand-scheduled PrimFunc so that TVM's default passes (dlight, FuseOps) leave it alone."""
    return func.with_attr("tirx.is_scheduled", True)


def compile_func(func: tirx.PrimFunc, target: Target):
    """Compile one PrimFunc for ``target``; return the runtime module, called as ``mod(*tensors)``."""
    return tvm.compile(tvm.IRModule({"main": func}), target=target)["main"]


def export_library(func: tirx.PrimFunc, target: Target, path: str | os.PathLike) -> Path:
    """Compile ``func`` and write it atomically as a shared library loadable by the TVM runtime."""
    executable = tvm.compile(tvm.IRModule({"main": func}), target=target)
    with atomic_path(path, suffix=".so") as tmp:
        link(executable, tmp)
    return Path(path)


def compile_module(mod: tvm.IRModule, target: Target, config: dict[str, Any] | None = None):
    """Compile a Relax module (our PrimFuncs marked scheduled) with TVM's default pipeline -> Executable;
    ``config``: pass options, e.g. ``{"relax.backend.use_cuda_graph": True}``."""
    with tvm.transform.PassContext(config=config or {}):
        return tvm.compile(mod, target=target)


def export_executable(executable, path: str | os.PathLike) -> Path:
    """Write a compiled Relax executable as a shared library (weights embedded as constants)."""
    link(executable, path)
    return Path(path)


def link(executable, path: str | os.PathLike, **options) -> None:
    """``executable.export_library(path, **options)``. TVM raises a linker's failure as a RuntimeError
    holding its output: one that could not write ``path`` ("ld: final link failed: No space left on
    device") ended compile as an "unexpected RuntimeError"; it is raised as that OSError, of ``path``,
    which the atomic output around it reports as its own."""
    try:
        executable.export_library(str(path), **options)
    except RuntimeError as e:
        for code in (errno.ENOSPC, errno.EDQUOT):
            if f"final link failed: {os.strerror(code)}" in str(e):
                raise OSError(code, os.strerror(code), str(path)) from None
        raise


def load_vm(path: str | os.PathLike, sha256: str | None = None):
    """A Relax virtual machine on the CPU over the library at ``path`` (needs only TVM's runtime),
    whose SHA-256 must be ``sha256`` where given (``load_private_copy``). The library is unloaded when
    the last reference to the VM goes: ``tvm.runtime.load_module`` pins every module for the process's
    life, so a server that reloaded its model kept each copy mapped (200 reloads of a ResNet-18: 1.1 GiB)."""
    module = load_private_copy(path, lambda copy: tvm_ffi.load_module(str(copy), keep_module_alive=False), sha256)
    if not module.implements_function("vm_load_executable"):  # any other shared library
        raise BnnccError(f"{path}: holds no Relax VM executable; is it a library written by `bnncc compile`?")
    return relax.VirtualMachine(module, tvm.cpu(0))


def cross_compiler(cxx: str):
    """The ``fcompile`` of ``export_library`` that links with the cross compiler ``cxx``."""
    return cc.cross_compiler(cxx)


def runtime_library_dirs() -> list[Path]:
    """The folders of the installed libtvm_runtime.so and libtvm_ffi.so (for programs linked against them)."""
    return [Path(tvm.__file__).parent / "lib", Path(tvm_ffi.__file__).parent / "lib"]


def runtime_include_dir() -> Path:
    """The C++ headers of the installed TVM FFI (for programs that call the runtime)."""
    return Path(tvm_ffi.__file__).parent / "include"


def to_tensor(array: np.ndarray):
    """Copy a numpy array into a TVM CPU tensor."""
    return tvm.runtime.tensor(np.ascontiguousarray(array), tvm.cpu(0))


def has_block(sch: s_tir.Schedule, name: str) -> bool:
    """Whether the scheduled function has a block called ``name``."""
    try:
        sch.get_sblock(name)
    except s_tir.ScheduleError:
        return False
    return True
