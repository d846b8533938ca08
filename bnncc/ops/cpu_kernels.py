"""Fused CPU kernels for training (``cpu_kernels.c``), built with the system C compiler on first
use and cached (``$BNNCC_CACHE``, default ``~/.cache/bnncc``) under a hash of the source, the
compiler and this CPU's flags.

A torch composition of an elementwise op with per-channel parameters reads and writes the whole
activation once per op: DPReLU's forward and backward are 16 such passes, the fused kernels 2.
They run float32 CPU tensors whose channel axis is innermost (the trainer's channels-last
layout); ``kernels_for(x)`` returns None for anything else, under torch.compile (which fuses the
composition itself), when no C compiler is found, or when ``BNNCC_CPU_KERNELS=0``, and the op
then runs its torch composition. The kernels round every product and sum as the composition does,
but for the per-channel sums of a backward, which add up in another order, and for the batch
norms' statistics and the SE gate's mean, which are summed in double.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from bnncc.errors import BnnccError, tool_said
from bnncc.fileio import atomic_path, cache_dir, cache_entry_whole, record_cache_entry

__all__ = [
    "kernels_for", "weight_kernels_for", "channel_rows", "dprelu_forward", "dprelu_backward", "quantize_acts",
    "quantize_acts_backward", "mean_quantize_acts", "quantize_weights", "binarize_acts", "binarize_acts_backward",
    "binarize_weights", "batch_norm_stats", "batch_norm_forward", "batch_norm_backward", "group_mean",
    "group_mean_backward", "tile", "tile_backward",
]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-fPIC", "-shared"]
_F32 = ctypes.c_void_p  # a float32 buffer, passed as its address (tensor.data_ptr())
_I64 = ctypes.c_int64


def _cpu_flags() -> bytes:
    """This CPU's feature flags: -march=native code is only valid where they match."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return b""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "").encode()


class _BuildFailed(Exception):
    """The C compiler's error output."""


def _build(compiler: str, path: Path) -> None:
    """Compile SOURCE into the cache entry ``path`` and record its digest."""
    start = time.perf_counter()
    with atomic_path(path) as tmp:
        done = subprocess.run([compiler, *_FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            # raised inside, so that atomic_path drops the temporary file instead of caching it
            raise _BuildFailed(tool_said(done.stderr))
    record_cache_entry(path)
    logger.info("built %s (%.1f s)", path, time.perf_counter() - start)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built library, or None (and one log line) where it cannot be built."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        logger.warning("no C compiler (gcc/cc): training runs the bnncc ops as torch compositions, slower")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    except OSError as err:
        logger.warning("C compiler %s: %s: training runs the bnncc ops as torch compositions, slower", compiler, err)
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + version.encode() + " ".join(_FLAGS).encode() + _cpu_flags()).hexdigest()[:12]
    try:
        path = cache_dir() / "cpu-kernels" / f"libbnncc_cpu-{key}.so"
        if not cache_entry_whole(path):
            _build(compiler, path)
    except _BuildFailed as failed:
        logger.warning("%s: %s failed, training runs the bnncc ops as torch compositions: %s", SOURCE,
                       compiler, failed)
        return None
    except BnnccError as no_cache:  # a full or read-only cache folder, or none: no reason to stop the run
        logger.warning("%s; training runs the bnncc ops as torch compositions", no_cache)
        return None
    # torch has loaded its libgomp.so.1 already; the library's libgomp.so.1 resolves to that one,
    # so both share one OpenMP thread pool
    lib = ctypes.CDLL(str(path))
    lib.bnncc_dprelu_forward.argtypes = [_F32, *[_F32] * 3, _F32, _F32, _F32, _I64, _I64, _I64, _F32, _F32, _F32, _F32,
                                         _F32, _I64, ctypes.c_int]
    lib.bnncc_dprelu_backward.argtypes = [_F32, _F32, *[_F32] * 3, _F32, _F32, _F32, _I64, _I64, _I64, _F32, _F32, _F32,
                                          _F32, _F32, _I64, _F32, _F32, ctypes.c_void_p, ctypes.c_int]
    flags = [ctypes.c_int] * 4  # bits, is_signed, relu, threads
    lib.bnncc_quantize_acts.argtypes = [_F32, _F32, _I64, _I64, _F32, *flags]
    lib.bnncc_quantize_acts_backward.argtypes = [_F32, _F32, _F32, _I64, _I64, _F32, *flags[:3], ctypes.c_float,
                                                 ctypes.c_int]
    lib.bnncc_mean_quantize_acts.argtypes = [_F32, _F32, _F32, _I64, _I64, _I64, _F32, *flags[:2], ctypes.c_int]
    lib.bnncc_batch_norm_forward.argtypes = [_F32, _F32, _I64, _I64, _F32, _F32, ctypes.c_float, ctypes.c_float, _F32,
                                             _F32, _F32, _F32, ctypes.c_int]
    lib.bnncc_batch_norm_stats.argtypes = [_F32, _I64, _I64, _F32, ctypes.c_float, ctypes.c_float, _F32, _F32, _F32,
                                           _F32, _F32, ctypes.c_int]
    lib.bnncc_batch_norm_backward.argtypes = [_F32, _F32, _F32, _I64, _I64, _F32, _F32, _F32, ctypes.c_float,
                                              ctypes.c_void_p, _F32, _F32, ctypes.c_int]
    for name in ("bnncc_group_mean", "bnncc_group_mean_backward"):
        getattr(lib, name).argtypes = [_F32, _F32, _I64, _I64, _I64, _I64, ctypes.c_int]
    for name in ("bnncc_tile", "bnncc_tile_backward"):
        getattr(lib, name).argtypes = [_F32, _F32, _I64, _I64, _I64, ctypes.c_int]
    lib.bnncc_binarize_acts.argtypes = [_F32, _F32, _I64, ctypes.c_float, ctypes.c_int]
    lib.bnncc_binarize_acts_backward.argtypes = [_F32, _F32, _F32, _I64, ctypes.c_float, ctypes.c_int]
    lib.bnncc_binarize_weights.argtypes = [_F32, _F32, _I64, _I64, ctypes.c_int]
    lib.bnncc_quantize_weights.argtypes = [_F32, _F32, _I64, _I64, ctypes.c_int, ctypes.c_int]
    return lib


def channel_rows(x: torch.Tensor) -> tuple[int, int] | None:
    """(rows, channels) when ``x``'s memory is rows of its axis-1 channels, else None."""
    if x.dim() == 2 and x.is_contiguous():
        return x.shape[0], x.shape[1]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = x.shape
        return n * h * w, c
    return None


def _usable(x: torch.Tensor) -> bool:
    # called before every kernel: is_cpu and `is` cost a tenth of device.type and ==
    return (x.is_cpu and x.dtype is torch.float32 and not torch.compiler.is_compiling()
            and os.environ.get("BNNCC_CPU_KERNELS", "1") != "0")


def kernels_for(x: torch.Tensor) -> ctypes.CDLL | None:
    """The kernel library when it can run on activations ``x`` (see the module's docstring), else None."""
    return _library() if _usable(x) and channel_rows(x) is not None else None


def weight_kernels_for(w: torch.Tensor) -> ctypes.CDLL | None:
    """The kernel library when it can run on weights ``w``: each output channel (axis 0) dense in memory."""
    dense = w.is_contiguous() or (w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last))
    return _library() if _usable(w) and dense else None


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` (an incoming gradient) with its channels innermost, as the kernels read it."""
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.contiguous()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _vectors(*vs: torch.Tensor) -> list[torch.Tensor]:
    # the test first: .to() and .contiguous() cost a microsecond each even when they return v
    return [v if v.dtype is torch.float32 and v.is_contiguous() else v.to(torch.float32).contiguous() for v in vs]


def _gate_rows(x: torch.Tensor, gate: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The gate as (N, C) rows and the stride between images: ones and 0 for no gate."""
    if gate is None:
        return x.new_ones(x.shape[1]), 0
    return gate.reshape(x.shape[0], x.shape[1]).to(torch.float32).contiguous(), x.shape[1]


def _shortcuts(x: torch.Tensor, shortcuts) -> list[int | None]:
    """Addresses of up to two tensors added to x before the DPReLU (in x's layout), None for none."""
    if len(shortcuts) > 2 or any(r.shape != x.shape or r.stride() != x.stride() for r in shortcuts):
        raise ValueError("the DPReLU kernel adds up to two shortcuts of x's shape and layout")
    return [_ptr(r) for r in shortcuts] + [None] * (2 - len(shortcuts))


def _norm(norm) -> list[int | None]:
    """Addresses of a folded batch norm's (mean, scale, beta), None for none."""
    return [None] * 3 if norm is None else [_ptr(v) for v in _vectors(*norm)]


def dprelu_forward(lib: ctypes.CDLL, x: torch.Tensor, bias_x, bias_y, pos, neg, gate=None, shortcuts=(),
                   norm=None) -> torch.Tensor:
    """DPReLU(x + shortcuts...), times ``gate`` (N, C, 1, 1) when given; with ``norm`` = (mean,
    scale, beta) from ``batch_norm_stats``, x is batch-normalised first."""
    rows, channels = channel_rows(x)
    y = torch.empty_like(x)
    gate, stride = _gate_rows(x, gate)
    lib.bnncc_dprelu_forward(_ptr(x), *_norm(norm), *_shortcuts(x, shortcuts), _ptr(y), x.shape[0],
                             rows // x.shape[0], channels, *map(_ptr, _vectors(bias_x, bias_y, pos, neg)), _ptr(gate),
                             stride, torch.get_num_threads())
    return y


def dprelu_backward(lib: ctypes.CDLL, grad: torch.Tensor, x: torch.Tensor, bias_x, bias_y, pos, neg, gate=None,
                    shortcuts=(), norm=None):
    """(dx, d bias_x, d bias_y, d pos, d neg, d gate or None, the norm's sums or None). dx is the
    gradient of the DPReLU's input: of each shortcut, and of the norm's output when there is one;
    the norm's sums, sum dx and sum dx * (x - mean) in float64 (2, C), go to ``batch_norm_backward``.
    The sums over rows are taken in the kernel (per block in float, the blocks in double)."""
    rows, channels = channel_rows(x)
    images, pixels = x.shape[0], rows // x.shape[0]
    grad = _channels_last(grad)
    dx = torch.empty_like(x)
    d_params = x.new_empty(4, channels)
    d_gate = None if gate is None else x.new_empty(gate.shape)
    norm_sums = None if norm is None else torch.empty(2, channels, dtype=torch.float64)
    gate_rows, stride = _gate_rows(x, gate)
    lib.bnncc_dprelu_backward(_ptr(grad), _ptr(x), *_norm(norm), *_shortcuts(x, shortcuts), _ptr(dx), images, pixels,
                              channels, *map(_ptr, _vectors(bias_x, bias_y, pos, neg)), _ptr(gate_rows), stride,
                              _ptr(d_params), None if d_gate is None else _ptr(d_gate),
                              None if norm_sums is None else _ptr(norm_sums), torch.get_num_threads())
    return dx, *d_params, d_gate, norm_sums


def quantize_acts(lib: ctypes.CDLL, x: torch.Tensor, bound, bits: int, signed: int, relu: bool) -> torch.Tensor:
    """quant.py's activation quantizer of ``relu(x) if relu else x``."""
    rows, channels = channel_rows(x)
    q = torch.empty_like(x)
    (bound,) = _vectors(bound)
    lib.bnncc_quantize_acts(_ptr(x), _ptr(q), rows, channels, _ptr(bound), bits, int(signed), int(relu),
                            torch.get_num_threads())
    return q


def quantize_acts_backward(lib: ctypes.CDLL, grad: torch.Tensor, x: torch.Tensor, bound, bits: int, signed: int,
                           relu: bool, divisor: float = 1.0) -> torch.Tensor:
    rows, channels = channel_rows(x)
    grad = _channels_last(grad)
    dx = torch.empty_like(x)
    (bound,) = _vectors(bound)
    lib.bnncc_quantize_acts_backward(_ptr(grad), _ptr(x), _ptr(dx), rows, channels, _ptr(bound), bits, int(signed),
                                     int(relu), divisor, torch.get_num_threads())
    return dx


def mean_quantize_acts(lib: ctypes.CDLL, x: torch.Tensor, bound, bits: int, signed: int):
    """(m, quantize(m)) with m the mean of ``x`` (N, C, H, W) over H and W, as (N, C)."""
    rows, channels = channel_rows(x)
    images = x.shape[0]
    m, q = x.new_empty(images, channels), x.new_empty(images, channels)
    (bound,) = _vectors(bound)
    lib.bnncc_mean_quantize_acts(_ptr(x), _ptr(m), _ptr(q), images, rows // max(images, 1), channels, _ptr(bound),
                                 bits, int(signed), torch.get_num_threads())
    return m, q


def quantize_weights(lib: ctypes.CDLL, w: torch.Tensor, bits: int) -> torch.Tensor:
    """quant.py's per-output-channel weight quantizer; the result has ``w``'s layout."""
    q = torch.empty_like(w)
    rows = w.shape[0]
    lib.bnncc_quantize_weights(_ptr(w.detach()), _ptr(q), rows, w.numel() // max(rows, 1), bits,
                               torch.get_num_threads())
    return q


def binarize_acts(lib: ctypes.CDLL, x: torch.Tensor, clip_bound: float) -> torch.Tensor:
    """binarize.py's BinarizeAct; elementwise, so any dense layout runs."""
    y = torch.empty_like(x)
    lib.bnncc_binarize_acts(_ptr(x), _ptr(y), x.numel(), clip_bound, torch.get_num_threads())
    return y


def binarize_acts_backward(lib: ctypes.CDLL, grad: torch.Tensor, x: torch.Tensor, clip_bound: float) -> torch.Tensor:
    """Its clipped straight-through gradient, for ``x`` in a layout ``kernels_for`` accepts."""
    grad = _channels_last(grad)
    dx = torch.empty_like(x)
    lib.bnncc_binarize_acts_backward(_ptr(grad), _ptr(x), _ptr(dx), x.numel(), clip_bound, torch.get_num_threads())
    return dx


def binarize_weights(lib: ctypes.CDLL, w: torch.Tensor) -> torch.Tensor:
    """binarize.py's per-output-channel binary weights; the result has ``w``'s layout."""
    q = torch.empty_like(w)
    rows = w.shape[0]
    lib.bnncc_binarize_weights(_ptr(w.detach()), _ptr(q), rows, w.numel() // max(rows, 1), torch.get_num_threads())
    return q


def batch_norm_stats(lib: ctypes.CDLL, x: torch.Tensor, gamma, eps: float, momentum: float,
                     running_mean: torch.Tensor, running_var: torch.Tensor):
    """Training BatchNormalization's (batch mean, biased batch variance, gamma / sqrt(var + eps));
    updates the running statistics (float32, contiguous) in place."""
    rows, channels = channel_rows(x)
    mean, var, scale = (x.new_empty(channels) for _ in range(3))
    (gamma,) = _vectors(gamma)
    lib.bnncc_batch_norm_stats(_ptr(x), rows, channels, _ptr(gamma), eps, momentum, _ptr(running_mean),
                               _ptr(running_var), _ptr(mean), _ptr(var), _ptr(scale), torch.get_num_threads())
    return mean, var, scale


def batch_norm_forward(lib: ctypes.CDLL, x: torch.Tensor, gamma, beta, eps: float, momentum: float,
                       running_mean: torch.Tensor, running_var: torch.Tensor):
    """Training BatchNormalization: (y, batch mean, biased batch variance); updates the running
    statistics (float32, contiguous) in place."""
    rows, channels = channel_rows(x)
    y = torch.empty_like(x)
    mean, var = x.new_empty(channels), x.new_empty(channels)
    lib.bnncc_batch_norm_forward(_ptr(x), _ptr(y), rows, channels, *map(_ptr, _vectors(gamma, beta)), eps, momentum,
                                 _ptr(running_mean), _ptr(running_var), _ptr(mean), _ptr(var), torch.get_num_threads())
    return y, mean, var


def batch_norm_backward(lib: ctypes.CDLL, grad: torch.Tensor, x: torch.Tensor, gamma, mean, var, eps: float,
                        sums: torch.Tensor | None = None):
    """(dx, d gamma, d beta); ``sums`` (float64 (2, C): sum grad and sum grad * (x - mean)) when
    they were taken already, as ``dprelu_backward`` does."""
    rows, channels = channel_rows(x)
    grad = _channels_last(grad)
    dx = torch.empty_like(x)
    d_gamma, d_beta = x.new_empty(channels), x.new_empty(channels)
    given = None if sums is None else _ptr(sums.contiguous())
    lib.bnncc_batch_norm_backward(_ptr(grad), _ptr(x), _ptr(dx), rows, channels, *map(_ptr, _vectors(gamma, mean, var)),
                                  eps, given, _ptr(d_gamma), _ptr(d_beta), torch.get_num_threads())
    return dx, d_gamma, d_beta


# ReshapeAdd's channel steps: ``r`` has Ci channels, ``out`` Co (allocated by the caller in r's
# layout); the backwards take the gradient of ``out`` and fill that of ``r``.


def group_mean(lib: ctypes.CDLL, r: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    rows, ci = channel_rows(r)
    co = out.shape[1]
    lib.bnncc_group_mean(_ptr(r), _ptr(out), rows, ci, co, ci // co, torch.get_num_threads())
    return out


def group_mean_backward(lib: ctypes.CDLL, grad: torch.Tensor, dr: torch.Tensor) -> torch.Tensor:
    rows, co = channel_rows(dr)[0], grad.shape[1]
    ci = dr.shape[1]
    lib.bnncc_group_mean_backward(_ptr(_channels_last(grad)), _ptr(dr), rows, ci, co, ci // co, torch.get_num_threads())
    return dr


def tile(lib: ctypes.CDLL, r: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    rows, ci = channel_rows(r)
    lib.bnncc_tile(_ptr(r), _ptr(out), rows, ci, out.shape[1], torch.get_num_threads())
    return out


def tile_backward(lib: ctypes.CDLL, grad: torch.Tensor, dr: torch.Tensor) -> torch.Tensor:
    rows, ci = channel_rows(dr)
    lib.bnncc_tile_backward(_ptr(_channels_last(grad)), _ptr(dr), rows, ci, grad.shape[1], torch.get_num_threads())
    return dr
