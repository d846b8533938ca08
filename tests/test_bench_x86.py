"""The x86 benches' own logic: bench/popcount_peak.c's methods against numpy popcounts, and the
classes bench/kernels.py states fractions against."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import kernels  # noqa: E402  (bench/kernels.py)

from bnncc.targets import x86_64  # noqa: E402

WEIGHT_OFFSETS = (1, 3, 5, 7, 11, 13, 17, 19)  # popcount_peak.c's weight words: seed + these


def reference_sum(seed: int, steps: int, bits: int) -> int:
    """sum over steps i and weights j of popcount(x_i xor w_j): x_i the i-th ``bits``-bit slice (cyclic)
    of popcount_peak.c's 256-word array, w_j the 32-bit word seed + offset_j in every lane."""
    index = np.arange(256, dtype=np.uint64)
    data = (((seed + 1) * 2654435761 + index * 40503) % 2**32).astype(np.uint32)
    per_step = bits // 32
    total = 0
    for j in WEIGHT_OFFSETS:
        counts = np.unpackbits((data ^ np.uint32(seed + j)).view(np.uint8)).reshape(256, 32).sum(axis=1)
        per_slice = counts.reshape(-1, per_step).sum(axis=1)  # one entry per slice of the array
        total += int(per_slice[np.arange(steps) % len(per_slice)].sum())
    return total


@pytest.fixture(scope="module")
def peak_binary(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    return kernels.build_popcount_peak(tmp_path_factory.mktemp("peak"))


@pytest.mark.parametrize("method", [m for methods in kernels.PEAK_METHODS.values() for m in methods])
@pytest.mark.parametrize("steps", [1, 62, 101])  # 62: two byte-counter flushes; 101: Harley-Seal's odd last step
def test_popcount_peak_methods_count_right(peak_binary, method, steps):
    done = subprocess.run([str(peak_binary), method, "2", str(steps)], capture_output=True, text=True)
    if done.returncode == 3:
        pytest.skip(f"this CPU cannot run {method}")
    assert done.returncode == 0, done.stderr
    rate, bits, checksum = done.stdout.split()
    assert float(rate) > 0
    assert int(checksum) == sum(reference_sum(seed, steps, int(bits)) for seed in (0, 1))  # threads 0 and 1


def test_popcount_peak_refuses_an_unknown_method(peak_binary):
    done = subprocess.run([str(peak_binary), "avx3", "1", "10"], capture_output=True, text=True)
    assert done.returncode == 2 and "avx2-harley-seal" in done.stderr


def test_fractions_are_of_the_best_method_of_the_builds_class():
    peaks = {kernels.AVX2: {"avx2-bytes": (4.0, 7.0), "avx2-harley-seal": (5.0, 9.0)},
             kernels.SCALAR: {"scalar-popcnt": (2.0, 4.0)}}
    assert kernels.best_of_class(peaks, kernels.AVX2) == ("avx2-harley-seal", 5.0, 9.0)
    avx2 = x86_64.target_for_flags(kernels.AVX2_FLAGS, cores=2)
    avx512 = x86_64.target_for_flags(kernels.AVX2_FLAGS | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",
                                                           "avx512_vpopcntdq"}, cores=2)
    assert kernels.cpu_class(avx2) == kernels.AVX2 and kernels.cpu_class(avx512) == kernels.AVX512
