"""Run a TVM Relax library without Python: our C++ runner (``runner/runner.cc``), built for this
host or for aarch64, the latter executed under ``qemu-aarch64`` (Debian qemu-user).

The runner links only TVM's runtime (libtvm_runtime.so + libtvm_ffi.so). For x86-64 those come
from the installed apache-tvm / apache-tvm-ffi packages; for aarch64 from the aarch64 wheels of
the same versions, which ``ensure_arm64_runtime`` downloads with pip once into the cache
(``$BNNCC_CACHE``, default ``~/.cache/bnncc``). Binaries are cached under a hash of runner.cc, the
compiler, its flags and the TVM versions, so an edit or an upgrade rebuilds them; each cached file is
taken only with the SHA-256 recorded beside it when it was written (``fileio.cache_entry_whole``), else
written again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np

from bnncc.errors import BnnccError, tool_said
from bnncc.fileio import atomic_path, cache_dir, cache_entry_whole, output_errors, record_cache_entry
from bnncc.targets.arm64 import CROSS_CXX, CROSS_INSTALL
from bnncc.targets.tvm_compat import runtime_include_dir, runtime_library_dirs, versions

__all__ = [
    "HOST", "AARCH64", "arm64_runtime_folder", "cached_arm64_runner", "ensure_arm64_runtime", "ensure_runner",
    "has_aarch64_sysroot", "has_arm64_runtime", "run_arm64", "run_library", "runtime_libraries", "time_library",
]

logger = logging.getLogger(__name__)

HOST = "x86_64"
AARCH64 = "aarch64"
QEMU = "qemu-aarch64"
QEMU_INSTALL = "apt-get install qemu-user"
QEMU_LD_PREFIX = Path("/usr/aarch64-linux-gnu")  # Debian's aarch64 sysroot (libc6-arm64-cross)
RUNNER_SOURCE = Path(__file__).parent / "runner" / "runner.cc"
_COMPILERS = {HOST: "g++", AARCH64: CROSS_CXX}
_COMPILER_INSTALLS = {HOST: "apt-get install g++", AARCH64: CROSS_INSTALL}
_RUNTIME_LIBS = {"apache-tvm": "tvm/lib/libtvm_runtime.so", "apache-tvm-ffi": "tvm_ffi/lib/libtvm_ffi.so"}


def _pip_command(dest: Path) -> list[str]:
    pins = [f"{name}=={metadata.version(name)}" for name in _RUNTIME_LIBS]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--platform", "manylinux_2_28_aarch64", "--python-version",
            f"{sys.version_info.major}.{sys.version_info.minor}", "-d", str(dest), *pins]


def arm64_runtime_folder() -> Path:
    """The cache folder of the aarch64 libtvm_runtime.so and libtvm_ffi.so of the installed versions."""
    return cache_dir() / "arm64-runtime" / versions()


def has_arm64_runtime() -> bool:
    """Whether ``arm64_runtime_folder`` holds both libraries: the arm64 runner needs no download."""
    folder = arm64_runtime_folder()
    return all(cache_entry_whole(folder / Path(member).name) for member in _RUNTIME_LIBS.values())


def has_aarch64_sysroot() -> bool:
    """Whether ``QEMU_LD_PREFIX`` holds the aarch64 dynamic loader, which qemu-aarch64 runs the runner with."""
    return (QEMU_LD_PREFIX / "lib" / "ld-linux-aarch64.so.1").is_file()


def ensure_arm64_runtime() -> Path:
    """``arm64_runtime_folder``, its two libraries extracted the first time from the aarch64 wheels
    (same versions as installed): those in ``<folder>/wheels`` if present (the offline path: the
    command in the error puts them there), else downloaded with pip."""
    folder = arm64_runtime_folder()
    if has_arm64_runtime():
        return folder
    start = time.perf_counter()
    with output_errors(folder):  # a cache that cannot be written ($BNNCC_CACHE a file, read-only) was "unexpected"
        folder.mkdir(parents=True, exist_ok=True)
    if len(list((folder / "wheels").glob("*.whl"))) >= len(_RUNTIME_LIBS):
        _extract_runtime(folder / "wheels", folder)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(_pip_command(Path(tmp)), capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["pip said nothing"])[-1]
                raise BnnccError(f"could not download the aarch64 TVM runtime ({last}); "
                                 f"run: {' '.join(_pip_command(folder / 'wheels'))}")
            _extract_runtime(Path(tmp), folder)
    missing = [name for name in _RUNTIME_LIBS.values() if not cache_entry_whole(folder / Path(name).name)]
    if missing:
        raise BnnccError(f"the aarch64 wheels held no {', '.join(missing)}; is the installed TVM a manylinux build?")
    logger.info("aarch64 TVM runtime in %s (%.1f s)", folder, time.perf_counter() - start)
    return folder


def _extract_runtime(wheels: Path, folder: Path) -> None:
    """Copy libtvm_runtime.so and libtvm_ffi.so out of the wheels in ``wheels`` into ``folder``
    (readable by all: a cache may be shared by CI users)."""
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            for member in set(archive.namelist()) & set(_RUNTIME_LIBS.values()):
                with atomic_path(folder / Path(member).name) as dest:
                    dest.write_bytes(archive.read(member))
                    dest.chmod(0o644)
                record_cache_entry(folder / Path(member).name)


def _library_dirs(arch: str) -> list[Path]:
    if arch == AARCH64:
        return [ensure_arm64_runtime()]
    return runtime_library_dirs()


def runtime_libraries(arch: str = HOST) -> list[Path]:
    """libtvm_runtime.so and libtvm_ffi.so for ``arch``: what the runner links."""
    dirs = _library_dirs(arch)
    return [next(d / Path(member).name for d in dirs if (d / Path(member).name).is_file())
            for member in _RUNTIME_LIBS.values()]


def ensure_runner(arch: str = HOST, *, beside_runtime: bool = False) -> Path:
    """The runner binary for ``arch`` (x86_64 or aarch64), compiled into the cache on first use.

    It finds TVM's runtime where this host keeps it, or (``beside_runtime``) in its own folder,
    wherever that is: a bundle (``bundle.bundle``) copied to another machine."""
    libs = _library_dirs(arch)
    rpath = "$ORIGIN" if beside_runtime else ":".join(map(str, libs))
    binary = _runner_path(arch, libs, rpath)
    if cache_entry_whole(binary):  # (one built by `bnncc targets --prepare` runs on a host without the compiler)
        return binary
    compiler = _COMPILERS[arch]
    if shutil.which(compiler) is None:
        raise BnnccError(f"{compiler} not found; install it: {_COMPILER_INSTALLS[arch]}")
    start = time.perf_counter()
    with output_errors(binary):  # (as the runtime's folder)
        binary.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(binary) as tmp:
        command = [compiler, *_compile_flags(), "-o", str(tmp), *(f"-L{d}" for d in libs), f"-Wl,-rpath,{rpath}",
                   "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise BnnccError(f"{RUNNER_SOURCE}: {compiler} failed: {tool_said(done.stderr)}")
        tmp.chmod(0o755)
    record_cache_entry(binary)
    logger.info("built the %s runner %s (%.1f s)", arch, binary, time.perf_counter() - start)
    return binary


def _compile_flags() -> list[str]:
    """The runner's source, headers and flags. The folders of the source and of tvm-ffi's headers, whose
    asserts hold their ``__FILE__``, are written as relative paths: a bundle's runner held the build
    machine's site-packages folder, so its bytes changed with where bnncc was installed."""
    include = runtime_include_dir()
    return ["-std=c++17", "-O2", f"-ffile-prefix-map={include}=tvm_ffi/include",
            f"-ffile-prefix-map={RUNNER_SOURCE.parent}=runner", str(RUNNER_SOURCE), f"-I{include}"]


def _runner_path(arch: str, libs: list[Path], rpath: str) -> Path:
    """Where ``ensure_runner`` caches the runner linked against ``libs``: a hash of its source, the
    compiler and its flags, where it finds the runtime and the TVM versions whose headers and libraries
    it is built against, so an edit or another runtime builds another. (The host's runtime folders keep
    their paths across an upgrade of TVM: the runner built against the old headers was reused, and bundled
    beside the new libraries.)"""
    key = hashlib.sha256(RUNNER_SOURCE.read_bytes() + _COMPILERS[arch].encode() + " ".join(_compile_flags()).encode()
                         + str(libs).encode() + rpath.encode() + versions().encode()).hexdigest()[:12]
    return cache_dir() / "runner" / arch / f"runner-{key}"


def cached_arm64_runner() -> Path | None:
    """The aarch64 runner ``run_arm64`` takes if it is built already (no download, no compiler), else None."""
    folder = arm64_runtime_folder()  # what ensure_arm64_runtime returns, here without downloading
    binary = _runner_path(AARCH64, [folder], str(folder))
    return binary if cache_entry_whole(binary) else None


def _command(arch: str) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment that execute the ``arch`` runner on this host."""
    runner = ensure_runner(arch)
    env = dict(os.environ)
    if arch == HOST:
        return [str(runner)], env
    if shutil.which(QEMU) is None:
        raise BnnccError(f"{QEMU} not found; install it: {QEMU_INSTALL}")
    if not has_aarch64_sysroot():
        raise BnnccError(f"{QEMU_LD_PREFIX}: no aarch64 sysroot; install it: {CROSS_INSTALL}")
    env["QEMU_LD_PREFIX"] = str(QEMU_LD_PREFIX)
    return [QEMU, str(runner)], env


def _library_file(library: str | os.PathLike) -> Path:
    library = Path(library).resolve()
    if not library.is_file():
        raise BnnccError(f"{library}: no such library")
    return library


def _invoke(arch: str, library: Path, args: list[str]) -> str:
    """The runner's output for ``args`` (which name ``library``); its failure names the library."""
    prefix, env = _command(arch)
    done = subprocess.run([*prefix, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        # a runner the kernel killed (out of memory) prints nothing: the line ended in ": " with "exit -9"
        how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        raise BnnccError(f"{library}: the {arch} runner failed ({how}): "
                         f"{tool_said(done.stderr or done.stdout) or 'no output'}")
    return done.stdout


def _write_inputs(folder: Path, inputs: list[np.ndarray]) -> list[str]:
    paths = []
    for i, array in enumerate(inputs):
        path = folder / f"in{i}.npy"
        np.save(path, np.ascontiguousarray(array))
        paths.append(str(path))
    return paths


def run_library(library: str | os.PathLike, inputs: list[np.ndarray], *, function: str = "main",
                arch: str = HOST) -> list[np.ndarray]:
    """Call ``function`` of the Relax library at ``library`` (built for ``arch``) on ``inputs``; its outputs."""
    library = _library_file(library)
    with tempfile.TemporaryDirectory(prefix="bnncc-run-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        # (call: NaN logits come back, as from the CPU caller, for run and verify to judge)
        _invoke(arch, library, ["call", str(library), function, str(folder / "out"),
                                *_write_inputs(folder, inputs)])
        logger.info("ran %s:%s with the %s runner in %.2f s", library.name, function, arch, time.perf_counter() - start)
        outputs = sorted(folder.glob("out*.npy"), key=lambda p: int(p.stem[3:]))
        return [np.load(path) for path in outputs]


def run_arm64(library: str | os.PathLike, inputs: list[np.ndarray], *, function: str = "main") -> list[np.ndarray]:
    """``run_library`` for an aarch64 library, under qemu-aarch64."""
    return run_library(library, inputs, function=function, arch=AARCH64)


def time_library(library: str | os.PathLike, inputs: list[np.ndarray], *, runs: int = 10, function: str = "main",
                 arch: str = HOST) -> float:
    """Mean milliseconds of ``runs`` calls of ``function`` after one warm-up call (under qemu for aarch64:
    emulation time, not the time on an ARM CPU)."""
    library = _library_file(library)
    with tempfile.TemporaryDirectory(prefix="bnncc-time-") as tmp:
        stdout = _invoke(arch, library, ["time", str(runs), str(library), function,
                                         *_write_inputs(Path(tmp), inputs)])
    return float(stdout.split()[-1])
