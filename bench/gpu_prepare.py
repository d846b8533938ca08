"""GPU bench, first half (``bench/gpu.sh``): everything that needs bnncc and TVM's compiler but no GPU.

Writes into the stage folder (default ``.gpu/``, git-ignored; an earlier stage there is replaced, a
folder holding anything else refused):

    lib/model.so, lib/model.json   PokeBNN-1x (random-weight torchvision ResNet-50, ``bnncc.zoo``)
                                   compiled for CUDA ``--arch``, batch 1 and 64, device code inside,
                                   kernels replayed from CUDA graphs
    lib_nograph/                   the same without CUDA graphs (what the graphs gain)
    lib_mma/, lib_mma_nograph/     the same with the binary convs on the tensor cores (BNNCC_CUDA_MMA=1)
    reference.npz                  onnxruntime's logits of the PokeBNN graph on N seeded N(0, 1)
                                   inputs, optimized and unoptimized (``bnncc.verify``'s rule), the
                                   inputs' checksum and the network's binary MACs per image
    gpu_b1_peak, gpu_bconv         the 1-bit tensor-core peak probe and the tensor-core binary conv on
                                   its own (bench/*.cu), built by nvcc
    runtime/ (--portable)          TVM's runtime libraries and the tvm-ffi wheel for Python 3.12, so
                                   that a GPU machine without TVM (or network) can run the second half

The inputs themselves are not staged (64 x 3 x 224 x 224 float32 is 38 MB): the second half draws
them again from the seed and checks the checksum.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 64)
SEED = 0
# stage folder -> (CUDA graphs, tensor-core convs), in the order gpu_run.py runs them. lib_mma runs
# before lib_mma_nograph on purpose: its first call captures the graph while TVM's workspace pool is
# still empty, so the popcount buffers' first allocation happens inside the capture (whether CUDA
# allows that is what this shows; the libraries before it allocate no workspace).
LIBRARIES = {"lib": (True, False), "lib_nograph": (False, False), "lib_mma": (True, True),
             "lib_mma_nograph": (False, True)}
PROBES = ("gpu_b1_peak", "gpu_bconv")  # CUDA C programs of bench/, built for the arch
STAGE_FILES = frozenset({*LIBRARIES, "reference.npz", *PROBES, "runtime", "stage.json"})  # module docstring
TVM_FFI_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                     "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def inputs(n: int, seed: int = SEED) -> np.ndarray:
    """The bench's N(0, 1) inputs, (n, 3, 224, 224) float32 (``gpu_run.py`` draws the same)."""
    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)


def checksum(x: np.ndarray) -> list[float]:
    """Sum, sum of squares and first value of the inputs, to catch a different random stream."""
    return [float(x.sum(dtype=np.float64)), float(np.square(x, dtype=np.float64).sum()), float(x.flat[0])]


def binary_macs(model) -> int:
    """Binary multiply-accumulates of one image: Ho * Wo * Cout * Cin * k * k over the binary convs."""
    from bnncc.domain import DOMAIN

    total = 0
    for node in model.graph:
        if node.domain != DOMAIN or node.op_type not in ("BinaryConv", "PokeConv"):
            continue
        cout, cin, kh, kw = node.inputs[1].shape
        _, _, ho, wo = node.outputs[0].shape
        total += int(ho) * int(wo) * int(cout) * int(cin) * int(kh) * int(kw)
    return total


def build_libraries(work: Path, stage: Path, arch: str):
    """PokeBNN-1x from a random-weight ResNet-50, compiled for CUDA ``arch`` with and without CUDA
    graphs and tensor-core convs (LIBRARIES); returns the PokeBNN model."""
    import os

    import onnx_ir as ir

    from bnncc import zoo
    from bnncc.frontend import load
    from bnncc.rewriting import rewrite
    from bnncc.targets.build import compile as compile_library
    from bnncc.targets.cuda import ARCH_ENV, GRAPHS_ENV, MMA_ENV

    float_path = zoo.export_onnx(zoo.resnet50(), work / "resnet50.onnx", batch="symbolic")
    poke, _ = rewrite(load(float_path), "pokebnn_1x")
    ir.save(poke, work / "pokebnn_1x.onnx")
    os.environ[ARCH_ENV] = arch
    for name, (graphs, tensor_cores) in LIBRARIES.items():
        os.environ[GRAPHS_ENV] = "1" if graphs else "0"
        os.environ[MMA_ENV] = "1" if tensor_cores else "0"
        start = time.perf_counter()
        folder = compile_library(work / "pokebnn_1x.onnx", work / name, target="cuda", batches=BATCHES)
        print(f"compiled PokeBNN-1x for {arch} ({name}) in {time.perf_counter() - start:.0f} s", flush=True)
        (stage / name).mkdir(parents=True)
        for file in ("model.so", "model.json"):  # model.onnx (107 MB) stays here: the reference runs here
            shutil.copy2(folder / file, stage / name / file)
    return poke


def reference_logits(model, x: np.ndarray, chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's logits on ``x`` with all graph optimizations and with none (``bnncc.verify``)."""
    import onnx_ir as ir

    from bnncc.verification import _reference_sessions

    with tempfile.TemporaryDirectory(prefix="bnncc-gpu-") as tmp:
        ir.save(model, Path(tmp) / "model.onnx")
        optimized, unoptimized, name = _reference_sessions(Path(tmp) / "model.onnx")
    start = time.perf_counter()
    runs = [[session.run(None, {name: x[i:i + chunk]})[0] for i in range(0, len(x), chunk)]
            for session in (optimized, unoptimized)]
    print(f"onnxruntime reference on {len(x)} inputs in {time.perf_counter() - start:.0f} s", flush=True)
    return np.concatenate(runs[0]), np.concatenate(runs[1])


def build_probes(stage: Path, arch: str) -> None:
    """nvcc builds of the peak probe and the tensor-core conv (PROBES) into the stage."""
    from bnncc.targets.cuda import find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        raise SystemExit("nvcc not found: the CUDA build needs a CUDA toolkit")
    for name in PROBES:
        subprocess.run([nvcc, "-O3", f"-arch={arch}", "-o", str(stage / name), str(ROOT / "bench" / f"{name}.cu")],
                       check=True)


def stage_runtime(stage: Path) -> None:
    """TVM's runtime libraries and the tvm-ffi wheel for CPython 3.12 (pip download) under stage/runtime."""
    from bnncc.targets.cuda_runtime import RUNTIME_LIBRARIES, runtime_dir

    out = stage / "runtime"
    out.mkdir(parents=True, exist_ok=True)
    for name in RUNTIME_LIBRARIES:
        shutil.copy2(runtime_dir() / name, out / name)
    version = importlib.metadata.version("apache-tvm-ffi")
    platforms = [arg for platform in TVM_FFI_PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(out),
                    f"apache-tvm-ffi=={version}"], check=True)


def clear_stage(stage: Path) -> None:
    """Remove an earlier stage at ``stage``, and refuse a folder holding anything a stage does not:
    the whole folder was removed, whatever it held (``--stage ~/results`` took the user's files)."""
    if not stage.exists():
        return
    if not stage.is_dir():
        raise SystemExit(f"{stage}: is a file, not a stage folder; give another --stage")
    others = sorted({p.name for p in stage.iterdir()} - STAGE_FILES)
    if others:
        raise SystemExit(f"{stage}: holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}, which no "
                         f"stage holds; remove it or give another --stage")
    shutil.rmtree(stage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--arch", default="sm_90", help="CUDA arch to build for (sm_90: H100/H200)")
    parser.add_argument("-n", type=int, default=64, help=f"reference inputs, a multiple of {max(BATCHES)}")
    parser.add_argument("--portable", action="store_true",
                        help="also stage TVM's runtime and the tvm-ffi wheel for a GPU machine without TVM")
    args = parser.parse_args()
    # gpu_run.py checks each library on whole batches of the largest size: fewer inputs left it none,
    # and its correctness check failed on the GPU with numpy's "need at least one array"
    if args.n < max(BATCHES) or args.n % max(BATCHES):
        parser.error(f"-n {args.n}: the reference inputs must be a multiple of {max(BATCHES)}, the largest batch")
    # a link to the stage folder (`.gpu` -> a larger disk): the folder it names is the stage; rmtree refuses a
    # link ("OSError: Cannot call rmtree on a symbolic link"), and mkdir a link whose folder is gone
    stage = args.stage.resolve()
    clear_stage(stage)
    stage.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="bnncc-gpu-") as tmp:
        model = build_libraries(Path(tmp), stage, args.arch)
    x = inputs(args.n)
    optimized, unoptimized = reference_logits(model, x)
    np.savez(stage / "reference.npz", optimized=optimized, unoptimized=unoptimized, seed=SEED,
             checksum=np.array(checksum(x)), binary_macs=binary_macs(model))
    build_probes(stage, args.arch)
    if args.portable:
        stage_runtime(stage)
    (stage / "stage.json").write_text(json.dumps({"arch": args.arch, "inputs": args.n, "batches": BATCHES}) + "\n")
    size = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    print(f"staged {stage} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
