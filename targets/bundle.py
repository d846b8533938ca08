"""``bundle``: a CPU library folder -> a folder that runs it on another machine, with no Python.

A library (model.so) is a TVM Relax VM executable: running it takes TVM's runtime and a program
that loads it. The bundle holds both beside the library: libtvm_runtime.so and libtvm_ffi.so of
the library's architecture (the x86-64 ones bnncc runs with, or the aarch64 ones from the
wheels of the same versions), our runner (``runner/runner.cc``) linked to find them in its own
folder (and its source, an example of calling the library from C++), model.so and model.json as
compile wrote them, and a README.txt with the commands. Copy the folder anywhere on a Linux machine
of that architecture (glibc 2.34 or later, as Debian 12 and Ubuntu 22.04 have) and run ``./runner``.

A cuda library is not bundled: it runs with TVM's CUDA runtime, which the bundle would need in
its place, and bnncc's Python runs it on the GPU machine as it is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from importlib import metadata
from pathlib import Path

from bnncc.errors import BnnccError
from bnncc.fileio import output_path, require_unchanged
from bnncc.runtime import read_library
from bnncc.targets import registry, vmrunner
from bnncc.targets.build import atomic_dir, check_output_folder, write_manifest

__all__ = ["bundle", "bundles", "BUNDLE_FILES"]

logger = logging.getLogger(__name__)

BUNDLE_FILES = frozenset({"model.so", "model.json", "runner", "runner.cc", "libtvm_runtime.so", "libtvm_ffi.so",
                          "README.txt"})
# ELF machine of a library (TargetSpec.elf_machine) -> the runner's architecture
_RUNNER_ARCH = {"x86-64": vmrunner.HOST, "aarch64": vmrunner.AARCH64}


def bundles(target: str) -> bool:
    """Whether a library of the target called ``target`` can be bundled (a CPU one)."""
    return registry.get(target).elf_machine in _RUNNER_ARCH


def bundle(library: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the bundle of the library folder ``library`` (module docstring) to the folder
    ``output``, which must be new, empty or an earlier bundle. Returns its path."""
    library, output = Path(library), output_path(output)
    manifest, target = read_library(library)
    if not bundles(target.name):
        raise BnnccError(f"{library}: a {target.name} library runs with TVM's {target.name} runtime, which a bundle "
                         f"does not hold; bundles are for CPU libraries (x86-64, arm64)")
    if output.resolve() == library.resolve():
        raise BnnccError(f"{output}: is the library folder itself; choose another output path")
    # before the runner's build (and the aarch64 runtime's download): an unwritable output, or a folder of
    # the user's, was refused only after them
    check_output_folder(output, BUNDLE_FILES, "bundle")
    arch = _RUNNER_ARCH[target.elf_machine]
    runner = vmrunner.ensure_runner(arch, beside_runtime=True)
    runtime = vmrunner.runtime_libraries(arch)
    with atomic_dir(output, BUNDLE_FILES, "bundle") as tmp:
        for path in (library / "model.so", vmrunner.RUNNER_SOURCE, *runtime):
            shutil.copyfile(path, tmp / path.name)
        require_unchanged(tmp / "model.so", manifest.get("library_sha256"), library / "model.so")
        # the manifest checked, as compile writes it, not the file again: a compile replacing the
        # folder meanwhile would put a new manifest beside the model.so checked against the old
        write_manifest(tmp / "model.json", manifest)
        shutil.copyfile(runner, tmp / "runner")
        (tmp / "runner").chmod(0o755)
        (tmp / "README.txt").write_text(_readme(manifest, arch), encoding="utf-8")
    logger.info("bundled %s for %s in %s", library, arch, output)
    return output


def _resizing(preprocessing: dict) -> str:
    """How the fine-tune's evaluation, and so `bnncc run`, made an image the input's shape."""
    if "crop" in preprocessing:
        return f", of an image's centre box of this shape, {preprocessing['crop']:.6g} of the largest that fits"
    if "resize" in preprocessing:
        return ", of the whole image resized bilinearly (pixel centres, no antialiasing)"
    return ""


def _readme(manifest: dict, arch: str) -> str:
    """How to run the bundle: its files, the input each function takes, the commands."""
    _, channels, height, width = manifest["input"]["shape"]
    classes = manifest["output"]["shape"][1]
    functions = sorted(manifest["functions"].items(), key=lambda item: int(item[0]))
    first = functions[0][1]
    preprocessing = manifest.get("preprocessing")
    pixels = (f"pixel values in [0, 1] normalised per channel as (x - mean) / std, "
              f"mean {json.dumps(preprocessing['mean'])}, std {json.dumps(preprocessing['std'])}"
              f"{_resizing(preprocessing)}{', a colour image as the mean of its R, G and B' if channels == 1 else ''}"
              if preprocessing else "images as the float network took them (no preprocessing is recorded)")
    lines = [
        f"PokeBNN library for {arch} Linux (target {manifest['target']['name']}, recipe {manifest.get('recipe')}),",
        "bundled by bnncc with what runs it: no Python needed.",
        "",
        "Files: model.so (the network), model.json (its manifest), runner (loads and calls it),",
        "libtvm_runtime.so and libtvm_ffi.so (TVM's runtime, found by the runner in its own folder),",
        "runner.cc (the runner's source: how a C++ program loads and calls the library with tvm-ffi's API).",
        f"Needs {arch} Linux with glibc 2.34 or later and libstdc++ (Debian 12, Ubuntu 22.04 and later).",
        *_cpu_lines(manifest),
        "",
        f"Input: a .npy file of float32 (N, {channels}, {height}, {width}) (NCHW): {pixels}.",
        f"Output: logits, float32 (N, {classes}).",
        "Functions, one a batch size N (an input's N must be the function's):",
        *(f"  {name}: N = {size}" for size, name in functions),
        "",
        "Run (writes out0.npy):",
        f"  ./runner run model.so {first} out input.npy",
        "Time 100 calls after one warm-up (prints the mean ms a call):",
        f"  ./runner time 100 model.so {first} input.npy",
        "Threads: TVM_NUM_THREADS=N (default: the CPU's cores).",
        "",
        "A .npy file is a short text header and the raw little-endian float32 values in C order",
        "(numpy.save writes one). The runner refuses another layout (Fortran order, a cut-short file)",
        "and an input holding NaN (the kernels' clips would turn it into finite logits),",
        "and TVM's check another shape or type, naming what the function expects (\"expect Tensor with",
        "ndim 4 but get 3\", \"... dtype float32 but get float64\").",
        "It refuses a model.so whose SHA-256 is not the one model.json records (a damaged copy, another",
        "compile's library), and logits holding NaN or an infinity (an input far from what the network",
        "was trained on): it writes nothing then, and exits with status 1.",
        "Rebuilding the runner needs the C++ headers of the same TVM FFI, on any machine with Python:",
        f"  pip install apache-tvm-ffi=={metadata.version('apache-tvm-ffi')}",
        "  INCLUDE=$(python -c 'import os, tvm_ffi; print(os.path.dirname(tvm_ffi.__file__) + \"/include\")')",
        "  g++ -std=c++17 -O2 runner.cc -I$INCLUDE -L. -Wl,-rpath,'$ORIGIN' -ltvm_runtime -ltvm_ffi -o runner",
        "(for aarch64 from another machine: aarch64-linux-gnu-g++ in place of g++).",
        "",
    ]
    return "\n".join(lines)


def _cpu_lines(manifest: dict) -> list[str]:
    """The CPU features the library's code uses: those the runner checks (an x86 library's
    ``cpu_features``, as /proc/cpuinfo names them), else as its LLVM target names them."""
    checked = manifest["target"].get("cpu_features")
    if isinstance(checked, list) and checked:  # (a model.json edited by hand may hold anything)
        lines = [f"CPU: its code uses {', '.join(map(str, checked))} (flags of /proc/cpuinfo); the runner",
                 "refuses a CPU without them, naming those it lacks."]
    else:
        try:
            llvm = json.loads(manifest["target"].get("llvm", ""))
            features = [llvm.get("mcpu") or llvm.get("mtriple", "?"), *llvm.get("mattr", [])]
        except (ValueError, AttributeError, TypeError):
            features = ["?"]
        lines = [f"CPU: its code uses {' '.join(map(str, features))} (LLVM's names); on a CPU without them the",
                 "runner ends with an illegal instruction."]
    if manifest["target"]["name"] == "x86-64":  # this build machine's class
        lines.append("(`bnncc compile --target x86-64-avx2` builds a library for any CPU with AVX2.)")
    return lines
