"""Do compiled libraries still give the same logits? Bit for bit, recipe by recipe.

    python bench/same_logits.py MODEL.onnx --out before.npz [--target x86-64] [--recipes ...]
    python bench/same_logits.py --compare before.npz after.npz

The first form rewrites the float MODEL with each recipe (``bnncc.rewrite``), compiles it for the
target (``bnncc.compile``), runs the same 8 seeded random images through each library
(``bnncc.runtime``) and saves the logits, one array per recipe. The second prints the largest
|difference| per recipe and exits 1 unless every recipe's logits are bitwise equal.

It uses only the public API as it stood at fdaf367, so that the same script measures an old
checkout (run it with that checkout's interpreter) and a new one. Use the same TVM_NUM_THREADS
for both runs (default here: 1); the threads are recorded beside the logits.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

import bnncc  # lazy: TVM is imported on the first compile, after main() has set its threads
from bnncc.runtime import load as load_library

RECIPES = ("pokebnn_0.5x", "pokebnn_0.75x", "pokebnn_1x", "pokebnn_1.4x", "pokebnn_2x")
IMAGES = 8
SEED = 0
_THREADS = "__threads__"  # npz key of the TVM_NUM_THREADS the logits were computed with


def _rewrite():
    """``bnncc.rewrite``, the function: at fdaf367 the lazy name can resolve to the module of the
    same name (issue 14), which holds the function."""
    rewrite = bnncc.rewrite
    return rewrite.rewrite if isinstance(rewrite, types.ModuleType) else rewrite


def logits(model: Path, recipes: list[str], target: str) -> dict[str, np.ndarray]:
    """Logits of the library that each recipe makes of ``model``, on IMAGES seeded random images."""
    rewrite = _rewrite()
    results = {}
    with tempfile.TemporaryDirectory(prefix="same-logits-") as work:
        for recipe in recipes:
            poke, _ = rewrite(bnncc.load(model), recipe, [])
            library = load_library(bnncc.compile(poke, Path(work) / recipe, target=target))
            images = np.random.default_rng(SEED).standard_normal((IMAGES, *library.input_chw)).astype(np.float32)
            results[recipe] = library(images)
            print(f"{recipe}: logits {results[recipe].shape}, first {results[recipe][0, :3]}", flush=True)
    return results


def compare(a_path: Path, b_path: Path) -> bool:
    """Print max |a - b| per recipe; True when every recipe of either file is in both and bitwise equal."""
    a, b = np.load(a_path), np.load(b_path)
    if a[_THREADS] != b[_THREADS]:
        print(f"note: computed with TVM_NUM_THREADS {a[_THREADS]} and {b[_THREADS]}")
    same = True
    for recipe in sorted((set(a.files) | set(b.files)) - {_THREADS}):
        if recipe not in a.files or recipe not in b.files:
            print(f"{recipe}: only in {a_path if recipe in a.files else b_path}")
            same = False
            continue
        x, y = a[recipe], b[recipe]
        if x.shape != y.shape or x.dtype != y.dtype:
            print(f"{recipe}: {x.shape} {x.dtype} against {y.shape} {y.dtype}")
            same = False
            continue
        bitwise = x.tobytes() == y.tobytes()
        diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
        print(f"{recipe}: max |diff| {np.nanmax(diff):.3g}  {'bitwise equal' if bitwise else 'DIFFERENT'}")
        same &= bitwise
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="float ResNet ONNX file")
    parser.add_argument("--out", type=Path, help="where to save the logits (.npz)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--target", default="x86-64")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A.npz", "B.npz"))
    args = parser.parse_args()
    if args.compare:
        return 0 if compare(*args.compare) else 1
    if args.model is None or args.out is None:
        parser.error("give MODEL and --out, or --compare A B")
    os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM is imported (by bnncc.compile)
    results = logits(args.model, args.recipes, args.target)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # into the file named, as --compare reads it: given a path, np.savez adds .npz to a name without it
    with open(args.out, "wb") as out:
        np.savez(out, **results, **{_THREADS: np.array(os.environ["TVM_NUM_THREADS"])})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
