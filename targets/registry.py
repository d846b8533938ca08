"""The targets bnncc builds for, what each needs on this host, and how each is built and run.

A ``TargetSpec`` is what ``bnncc.targets.build.compile`` needs to produce a library for a target
(the TVM target, the schedule rules given to ``lower``, the export) and what
``bnncc.runtime.load`` needs to run one (a ``caller``: function name, NCHW array -> logits).
``check()`` lists, per target, each host requirement and whether it is met.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnncc.domain import MAX_BATCH
from bnncc.errors import BnnccError, first_line
from bnncc.fileio import require_unchanged
from bnncc.targets import arm64, cuda, tvm_compat, vmrunner, x86_64
from bnncc.targets.lower import IMAGE_FUNCTION

__all__ = ["Requirement", "TargetSpec", "TARGETS", "check", "get", "names", "pool_threads", "runs_natively"]

Caller = Callable[[str, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Requirement:
    """One thing a target needs on this host; ``found`` is the path or version found, or None."""

    what: str
    needed_for: str  # "build" or "run"
    found: str | None
    install: str


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    tvm_target: Callable[[], object]
    schedule: Callable
    export: Callable[[object, Path], Path]
    caller: Callable[[Path, str | None], Caller]  # (model.so, the SHA-256 model.json records) -> Caller
    requirements: Callable[[], list[Requirement]]
    report: Callable[..., dict] | None = None  # (executable, lowered, model) -> extra manifest entries
    pass_config: Callable[[], dict] | None = None  # TVM pass options for tvm.compile
    # the machine its model.so's code is for (bnncc.runtime checks its ELF header): "x86-64" or
    # "aarch64"; None: not checked
    elf_machine: str | None = None
    # (manifest, its path) -> None; raises a BnnccError for what this host cannot run, before loading
    check_host: Callable[[dict, Path], None] | None = None
    # () -> raises a BnnccError naming a tool the build needs that this host lacks (``get(..., build=True)``);
    # None: the build needs nothing beyond TVM
    check_build: Callable[[], object] | None = None
    # (its TVM target) -> the CPU features its code may use, as /proc/cpuinfo names them: model.json records
    # them for a bundle's runner, which has no TVM to read the target with and refuses a CPU without them
    cpu_features: Callable[[object], list[str]] | None = None
    # the largest batch its libraries are built for
    max_batch: int = MAX_BATCH


def _cpu_pass_config() -> dict:
    """TVM pass options of a CPU build: no argument checks inside the kernels. Only the library's
    own Relax functions call them, on buffers they allocate; the VM still checks what a caller
    passes in (shape, dtype: "Check failed: input_shape[i] == reg (200 vs. 224)"). The checks were
    an eighth of PokeBNN-1x's library, most of its size beyond the packed weights (bench/RESULTS.md)."""
    return {"tirx.disable_assert": True}


class _CallLocks:
    """The locks of the loaded libraries' callers, all taken around a fork, so that a fork waits
    for the calls under way: a child forked while another thread was inside a call inherited its
    lock held (and the VM mid-call), and the child's first call waited for ever."""

    locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # caller -> its lock
    held: list = []

    @classmethod
    def new(cls, caller: Caller) -> threading.Lock:
        lock = cls.locks[caller] = threading.Lock()
        return lock

    @classmethod
    def before_fork(cls) -> None:
        cls.held = list(cls.locks.values())
        for lock in cls.held:
            lock.acquire()

    @classmethod
    def after_fork(cls) -> None:
        for lock in cls.held:
            lock.release()
        cls.held = []


os.register_at_fork(before=_CallLocks.before_fork, after_in_parent=_CallLocks.after_fork,
                    after_in_child=_CallLocks.after_fork)


class _Runner:
    """The one thread of this process that runs CPU libraries. TVM gives each thread that runs a
    parallel kernel a pool of TVM_NUM_THREADS workers of its own, which outlives the thread: a server
    that ran each request on a new thread (``ThreadingHTTPServer``) kept the spinning workers of every
    one (200 requests: 400 threads, each call 500 times slower). The VM runs one call at a time anyway.
    A forked child makes a thread of its own, whose pool starts afresh: the parent's workers, which a
    fork does not copy, are no longer waited for (multiprocessing's "fork", a server that forks workers)."""

    executor: ThreadPoolExecutor | None = None
    starting = threading.Lock()

    @classmethod
    def run(cls, work: Callable[[], np.ndarray]) -> np.ndarray:
        with cls.starting:
            if cls.executor is None:
                cls.executor = ThreadPoolExecutor(1, thread_name_prefix="bnncc-runner")
        try:
            future = cls.executor.submit(work)
        except RuntimeError:  # the interpreter is exiting: the runner takes no more work
            if threading.current_thread().daemon:
                # a daemon thread's call (a ThreadingHTTPServer's request) ran TVM's code while the process
                # exited and aborted it ("terminate called without an active exception", exit 134); it waits
                # for the end instead, where Python stops daemon threads anyway
                threading.Event().wait()
            return work()  # (a call from an atexit handler)
        return future.result()

    @classmethod
    def after_fork_in_child(cls) -> None:
        cls.executor = None  # a fork does not copy its thread
        cls.starting = threading.Lock()


os.register_at_fork(after_in_child=_Runner.after_fork_in_child)


def pool_threads() -> int:
    """The threads of the TVM pool that runs the libraries, the runner thread's (``tvm_compat.pool_threads``)."""
    return _Runner.run(tvm_compat.pool_threads)


def _cpu_caller(path: Path, sha256: str | None) -> Caller:
    """The Relax VM in this process, one call at a time: the VM keeps state of its own per call,
    and two threads calling it at once crashed the process. Each function keeps one input tensor
    and copies each batch into it, through a numpy view of the tensor: a tensor allocated per call
    is fresh memory from the system, whose page faults cost PokeBNN-1x 0.07 ms more than the copy,
    and the view's copy takes 17 us where the tensor's ``copyfrom`` took 25 (bench/RESULTS.md).
    The kernels need the tensor's 64-byte alignment, which a caller's array may lack. The VM
    never writes its input (the lowering overwrites only intermediate tensors). Every call runs on
    the process's one runner thread (``_Runner``), whichever thread makes it."""
    vm = tvm_compat.load_vm(path, sha256)
    inputs: dict[str, tuple[object, np.ndarray]] = {}

    def call(function: str, x: np.ndarray) -> np.ndarray:
        return _Runner.run(lambda: run_on_runner(function, x))

    def run_on_runner(function: str, x: np.ndarray) -> np.ndarray:
        with lock:
            if function not in inputs or inputs[function][1].shape != x.shape:
                tensor = tvm_compat.to_tensor(x)
                inputs[function] = tensor, np.from_dlpack(tensor)
            tensor, view = inputs[function]
            np.copyto(view, x)
            try:
                run = vm[function]
            except AttributeError:
                raise BnnccError(f"{path}: has no function {function!r}; is model.json the one written "
                                 f"with it?") from None
            try:
                logits = run(tensor)
            except RuntimeError as e:  # the VM's checks of its input against the function's signature
                raise BnnccError(f"{path}: {function} refused an input of shape {x.shape} "
                                 f"({first_line(e)}); is model.json the one written with it?") from None
            # a copy through a numpy view: Tensor.numpy() took 6 us for 1000 logits, this 0.7
            return np.from_dlpack(logits).copy()

    lock = _CallLocks.new(call)
    return call


def _check_x86_features(manifest: dict, path: Path) -> None:
    """This CPU has what the library's code may use (its target in model.json): a library built on
    a CPU of a higher class (AVX-512 VPOPCNTDQ, run on an AVX2 or Skylake-SP machine) would end the
    process at the first instruction this one lacks."""
    import json

    llvm = manifest["target"].get("llvm")
    if not isinstance(llvm, str):  # compile always records it: without it this check passed, and a library
        # of a higher class than this CPU ended the process with SIGILL at its first call
        raise BnnccError(f"{path}: target llvm {llvm!r}; expected the LLVM target that compile records")
    try:
        target = tvm_compat.make_target(json.loads(llvm))
    except (ValueError, RuntimeError) as e:
        raise BnnccError(f"{path}: target {llvm!r} is not an LLVM target ({e})") from None
    if target.kind.name != "llvm":  # a CUDA target has no CPU features: the check passed, and TVM ran the library
        raise BnnccError(f"{path}: target {llvm!r} is not an LLVM target (kind {target.kind.name})")
    missing = x86_64.missing_flags(target, x86_64.cpu_flags())
    if missing:
        raise BnnccError(f"{path}: built for a CPU with {', '.join(missing)}, which this CPU lacks; compile it "
                         "with --target x86-64 here, or the target of this CPU's class (bnncc targets)")


def _x86_requirements(flags: frozenset[str] = frozenset()) -> list[Requirement]:
    """An x86-64 machine to run on, with ``flags`` (a class target's: /proc/cpuinfo names)."""
    x86 = platform.machine() == "x86_64"
    needs = [Requirement("x86-64 CPU", "run", platform.machine() if x86 else None, "an x86-64 machine")]
    if flags:
        has = x86 and flags <= x86_64.cpu_flags()
        needs.append(Requirement("CPU features", "run", "yes" if has else None,
                                 "a CPU with " + ", ".join(sorted(flags - x86_64.cpu_flags() if x86 else flags))))
    return needs


def _arm64_caller(path: Path, sha256: str | None) -> Caller:
    """Native on an aarch64 host, else our runner under qemu-aarch64: one process per call, on a
    private copy of the file taken now and checked against ``sha256``, removed with the caller. Run
    in place, a folder compiled again after ``load`` ran the new network under the old manifest (the
    CPU caller's dlopen holds its own copy). Where no copy can be taken, the file in place."""
    if platform.machine() == "aarch64":
        return _cpu_caller(path, sha256)
    folder = Path(tempfile.mkdtemp(prefix="bnncc-lib-"))
    try:
        copy = folder / path.name
        shutil.copyfile(path, copy)
    except OSError:  # (a full temporary folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder, copy = None, path
    try:
        require_unchanged(copy, sha256, path)
    except BnnccError:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise

    def call(function: str, x: np.ndarray) -> np.ndarray:
        try:
            return vmrunner.run_arm64(copy, [x], function=function)[0]
        except BnnccError as e:  # named by the user's file, not the private copy
            raise BnnccError(str(e).replace(str(copy.resolve()), str(path))) from None

    if folder is not None:
        weakref.finalize(call, _remove_own, folder, os.getpid())
    return call


def _remove_own(folder: Path, owner: int) -> None:
    """Remove ``folder`` in the process ``owner`` only: a forked child that exits normally runs the
    finalizers it inherited, and would take its parent's private copy away."""
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


def _arm64_report(executable, lowered, model) -> dict:
    """Static instruction counts of each binary layer's kernel (``arm64.binary_layer_counts``)."""
    layers = [node.name for node in model.graph if node.op_type == "PokeConv"]
    # the per-image function calls the kernels; every batch size calls it (lower.lower)
    return {"instructions": arm64.binary_layer_counts(executable, lowered.module, IMAGE_FUNCTION, layers)}


def _arm64_requirements() -> list[Requirement]:
    cross = shutil.which(arm64.CROSS_CXX)
    # run and verify execute our runner, which the cross compiler builds on first use unless `--prepare`
    # built it: without either, the table said arm64 runs and run said the cross compiler was missing
    runner = vmrunner.cached_arm64_runner()
    if runner is not None:
        runner = str(runner)
    elif cross is not None:
        runner = f"built on first use by {cross}"
    return [
        Requirement(arm64.CROSS_CXX, "build", cross, arm64.CROSS_INSTALL),
        Requirement("aarch64 runner", "run", runner, arm64.CROSS_INSTALL),
        Requirement(vmrunner.QEMU, "run", shutil.which(vmrunner.QEMU), vmrunner.QEMU_INSTALL),
        Requirement("aarch64 sysroot", "run", str(vmrunner.QEMU_LD_PREFIX) if vmrunner.has_aarch64_sysroot() else None,
                    arm64.CROSS_INSTALL),
        # the installed versions' runtime, which the runner links: another version's does not count
        Requirement("aarch64 TVM runtime", "run",
                    str(vmrunner.arm64_runtime_folder()) if vmrunner.has_arm64_runtime() else None,
                    "bnncc targets --prepare (pip download)"),
    ]


def _cuda_report(executable, lowered, model) -> dict:
    """The arch, CUDA graphs and tensor cores the library was built with (``cuda.report``)."""
    return cuda.report()


def _cuda_requirements() -> list[Requirement]:
    return [
        Requirement("nvcc", "build", cuda.find_nvcc(), "a CUDA toolkit (nvcc on PATH or CUDA_HOME/bin)"),
        Requirement("CUDA device", "run", "yes" if cuda.has_cuda_device() else None, "an NVIDIA GPU and driver"),
    ]


def _host_class_missing() -> list[str]:
    """The features of the lowest class (AVX2) this CPU lacks, as /proc/cpuinfo names them."""
    return sorted(x86_64.CLASS_FLAGS[x86_64.AVX2] - x86_64.cpu_flags())


def _check_host_class() -> None:
    """``--target x86-64`` builds for this CPU's class: a CPU without AVX2 has none, and compile ended
    after the lowering (convert after its fine-tune) with "no schedule for kernel 'quant_conv2d'"."""
    missing = _host_class_missing()
    if missing:
        raise BnnccError(f"--target x86-64 builds for this CPU's class, and this CPU has no AVX2 (it lacks "
                         f"{', '.join(missing)}); build for the CPUs that will run the library: --target "
                         f"x86-64-avx2, x86-64-avx512bw or x86-64-avx512")


def _host_requirements() -> list[Requirement]:
    """An x86-64 machine to run on, of a class to build for (one with AVX2)."""
    needs = _x86_requirements()
    if needs[0].found:
        missing = _host_class_missing()
        needs.append(Requirement("CPU of an AVX2 class", "build", None if missing else "yes",
                                 f"a CPU with {', '.join(missing)}, or a class target (x86-64-avx2)"))
    return needs


def _x86(name: str, description: str, popcount_class: str | None = None) -> TargetSpec:
    """This machine's x86-64 target, or (``popcount_class``) that of any CPU of the class: a build
    server's library for machines of another class."""
    if popcount_class is None:
        tvm_target, requirements, check_build = x86_64.host_target, _host_requirements, _check_host_class
    else:
        flags = frozenset(x86_64.CLASS_FLAGS[popcount_class])
        tvm_target, requirements = (lambda: x86_64.class_target(popcount_class)), (lambda: _x86_requirements(flags))
        check_build = None  # (any host builds for a class)
    return TargetSpec(name, description, tvm_target, x86_64.schedule, tvm_compat.export_executable, _cpu_caller,
                      requirements, pass_config=_cpu_pass_config, elf_machine="x86-64",
                      check_host=_check_x86_features, check_build=check_build,
                      cpu_features=lambda target: x86_64.missing_flags(target, set()))


TARGETS = {
    "x86-64": _x86("x86-64", "this machine's x86-64 CPU (AVX2 / AVX-512BW / AVX-512 VPOPCNTDQ)"),
    "x86-64-avx2": _x86("x86-64-avx2", "any x86-64 CPU with AVX2 (x86-64-v3)", x86_64.AVX2),
    "x86-64-avx512bw": _x86("x86-64-avx512bw", "x86-64 CPUs with AVX-512 but no VPOPCNTDQ (Skylake-SP, Cascade Lake)",
                            x86_64.AVX512BW),
    "x86-64-avx512": _x86("x86-64-avx512", "x86-64 CPUs with AVX-512 VPOPCNTDQ (Ice Lake, Zen 4 and later)",
                          x86_64.AVX512_VPOPCNTDQ),
    "arm64": TargetSpec("arm64", "aarch64 Linux, NEON (runs under qemu-aarch64 on x86-64)", arm64.arm64_target,
                        arm64.schedule, arm64.export_arm64, _arm64_caller, _arm64_requirements, _arm64_report,
                        _cpu_pass_config, elf_machine="aarch64", check_build=arm64.require_cross_compiler),
    "cuda": TargetSpec("cuda", "NVIDIA GPU, sm_90 by default (nvcc builds the kernels into model.so)",
                       cuda.cuda_target, cuda.schedule, cuda.export_cuda, cuda.load_vm, _cuda_requirements,
                       _cuda_report, cuda.pass_config, check_build=cuda.require_nvcc, max_batch=cuda.MAX_BATCH),
}


def names() -> tuple[str, ...]:
    return tuple(TARGETS)


def get(name: str, *, build: bool = False) -> TargetSpec:
    """The target called ``name``; BnnccError naming the known ones otherwise. With ``build``, also one
    naming a tool its build needs that this host lacks: compile and convert ask before any work, as the
    linker or nvcc runs last, after the minutes of lowering (and in convert after the fine-tune)."""
    if name not in TARGETS:
        raise BnnccError(f"unknown target {name!r}; expected one of {', '.join(TARGETS)}")
    if build and TARGETS[name].check_build is not None:
        TARGETS[name].check_build()
    return TARGETS[name]


def runs_natively(name: str) -> bool:
    """Whether this machine's CPU runs the libraries of target ``name`` itself: an x86 target whose CPU
    features it has (not an arm64 library under qemu, whose time says nothing of an ARM core, nor a cuda
    one). convert measures such a library's latency and accuracy."""
    spec = get(name)
    return spec.elf_machine == "x86-64" and all(r.found for r in spec.requirements() if r.needed_for == "run")


def check() -> dict[str, list[Requirement]]:
    """For every target, its host requirements and whether each is met (``found`` not None)."""
    return {name: spec.requirements() for name, spec in TARGETS.items()}
