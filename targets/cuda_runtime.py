"""Run a CUDA library written by ``bnncc compile --target cuda`` with TVM's runtime alone.

No ``import tvm`` here: loading needs ``tvm_ffi`` (the Python package), TVM's runtime libraries
(``libtvm_runtime.so`` and its CUDA sidecar ``libtvm_runtime_cuda.so``), the CUDA runtime library
``libcudart.so.13`` that the sidecar links against, and the driver. The device code is inside
model.so (``cuda.export_cuda``), so nothing is compiled at load time. A GPU machine without TVM's
compiler (259 MB) gets the runtime libraries from a folder named by ``BNNCC_TVM_RUNTIME`` (what
``bench/gpu_prepare.py`` stages); with TVM installed they come from its package.

Why ctypes: TVM's own loader imports the compiler library, and in runtime-only mode it neither
loads the CUDA sidecar nor reports a failure to load it (shared/reference/tvm.md, pitfall 8).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import numpy as np

from bnncc.errors import BnnccError
from bnncc.fileio import load_private_copy

__all__ = ["RUNTIME_ENV", "RUNTIME_LIBRARIES", "CudaVM", "cuda_device_exists", "load_runtime", "runtime_dir"]

RUNTIME_ENV = "BNNCC_TVM_RUNTIME"
RUNTIME_LIBRARIES = ("libtvm_runtime.so", "libtvm_runtime_cuda.so")
_CUDA, _CPU = 2, 1  # DLPack device types
_POOLED_ALLOCATOR = 2  # the Relax VM's allocator kinds: 1 naive, 2 pooled
_loaded: list[Path] = []


def runtime_dir() -> Path:
    """The folder holding TVM's runtime libraries: $BNNCC_TVM_RUNTIME, else the installed tvm package's lib/."""
    if os.environ.get(RUNTIME_ENV):
        return Path(os.environ[RUNTIME_ENV])
    spec = importlib.util.find_spec("tvm")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise BnnccError(f"no TVM runtime: install apache-tvm or set {RUNTIME_ENV} to a folder holding "
                         f"{', '.join(RUNTIME_LIBRARIES)}")
    return Path(spec.submodule_search_locations[0]) / "lib"


def _load_cudart() -> None:
    """libcudart.so.13 into the process, so that the sidecar's dependency on it resolves (it is
    not on the loader's path where it came with a pip package, e.g. torch's nvidia-cuda-runtime)."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        load_nvidia_dynamic_lib("cudart")
    except Exception:  # noqa: BLE001 (no cuda-pathfinder, or it found none: try the loader's own path)
        try:
            ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            raise BnnccError(f"CUDA runtime library libcudart.so.13 not found ({error}); install "
                             f"nvidia-cuda-runtime or put a CUDA 13 toolkit's lib on LD_LIBRARY_PATH") from None


def load_runtime() -> Path:
    """Load TVM's runtime and its CUDA sidecar into this process once; return their folder."""
    if _loaded:
        return _loaded[0]
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which libtvm_runtime.so links against)

    folder = runtime_dir()
    missing = [name for name in RUNTIME_LIBRARIES if not (folder / name).is_file()]
    if missing:
        raise BnnccError(f"{folder}: no {', '.join(missing)} (TVM's runtime; see ${RUNTIME_ENV})")
    ctypes.CDLL(str(folder / RUNTIME_LIBRARIES[0]), mode=ctypes.RTLD_GLOBAL)
    _load_cudart()
    try:
        ctypes.CDLL(str(folder / RUNTIME_LIBRARIES[1]), mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        if "libcuda" in str(error):  # the driver's library
            raise BnnccError(f"a cuda library needs an NVIDIA GPU and its driver; this machine has no driver "
                             f"({error})") from None
        raise BnnccError(f"{folder / RUNTIME_LIBRARIES[1]}: cannot load TVM's CUDA runtime: {error}") from None
    _loaded.append(folder)
    return folder


def cuda_device_exists(device_id: int = 0) -> bool:
    """Whether the CUDA driver reports device ``device_id`` (False when the runtime cannot load)."""
    try:
        load_runtime()
    except BnnccError:
        return False
    import tvm_ffi

    return bool(tvm_ffi.get_global_func("runtime.GetDeviceAttr")(_CUDA, device_id, 0))  # 0: kExist


class CudaVM:
    """The Relax VM of the library ``path`` on CUDA device ``device_id``: ``vm[name]`` is a function
    over tvm_ffi tensors on that device (``tvm_ffi.from_dlpack`` of a torch CUDA tensor, say);
    ``vm(name, x)`` runs it on a numpy array and returns numpy."""

    def __init__(self, path: str | os.PathLike, device_id: int = 0, sha256: str | None = None) -> None:
        load_runtime()
        import tvm_ffi

        if not cuda_device_exists(device_id):
            raise BnnccError(f"{path}: no CUDA device {device_id} on this machine")
        self.device_id = device_id
        self._vm = load_private_copy(path, lambda copy: tvm_ffi.load_module(str(copy)), sha256)["vm_load_executable"]()
        # the CPU as well: the VM computes shapes there
        self._vm["vm_initialization"](_CUDA, device_id, _POOLED_ALLOCATOR, _CPU, 0, _POOLED_ALLOCATOR)

    def __getitem__(self, name: str):
        return self._vm[name]

    def __call__(self, name: str, x: np.ndarray) -> np.ndarray:
        import torch
        import tvm_ffi

        device = torch.device("cuda", self.device_id)
        out = self._vm[name](tvm_ffi.from_dlpack(torch.from_numpy(np.ascontiguousarray(x)).to(device)))
        torch.cuda.synchronize(device)  # the VM may have replayed a CUDA graph on a stream of its own
        return torch.from_dlpack(out).cpu().numpy()
