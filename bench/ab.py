"""Two bnncc library folders against each other, batch 1, in one process: is B faster than A?

Run: ``TVM_NUM_THREADS=2 .venv/bin/python bench/ab.py A B [--pairs 60] [--calls 8]`` (A, B: folders
written by ``bnncc compile`` from the same graph, e.g. by two commits).

Both libraries are loaded in one process and take turns: ``--pairs`` pairs of blocks of ``--calls``
calls, the order within a pair alternating. It prints whether their logits are bitwise equal, each
library's median and minimum ms a call, and the median (and quartiles) of the pairs' B/A ratios: a
pair's two blocks run milliseconds apart, so the VM's slow stretches (bench/RESULTS.md), which move
either median by more than a change is worth, slow both blocks of a pair alike.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bnncc.runtime import load


def block_ms(lib, x: np.ndarray, calls: int) -> float:
    """ms a call over one block of ``calls`` calls, after one untimed call."""
    lib(x)
    start = time.perf_counter()
    for _ in range(calls):
        lib(x)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--calls", type=int, default=8)
    args = parser.parse_args()
    libs = [load(args.a), load(args.b)]
    x = np.random.default_rng(0).standard_normal((1, *libs[0].input_chw)).astype(np.float32)
    outputs = [lib(x) for lib in libs]
    print(f"logits bitwise equal: {np.array_equal(*outputs)} "
          f"(largest difference {np.abs(outputs[0] - outputs[1]).max():.3g})")
    times = [[], []]
    for pair in range(args.pairs):
        for i in (0, 1) if pair % 2 == 0 else (1, 0):
            times[i].append(block_ms(libs[i], x, args.calls))
    a, b = (np.array(t) for t in times)
    ratios = b / a
    for name, t in ((args.a, a), (args.b, b)):
        print(f"{name}: median {np.median(t):.3f} ms, min {t.min():.3f}")
    print(f"B/A by pairs: median {np.median(ratios):.4f} (quartiles {np.percentile(ratios, 25):.4f}, "
          f"{np.percentile(ratios, 75):.4f})")


if __name__ == "__main__":
    main()
