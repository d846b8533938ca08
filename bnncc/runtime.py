"""Load a library folder written by ``bnncc compile`` and run it: NCHW float32 images -> logits.

Needs only TVM's runtime (the Relax VM over model.so) and model.json; no ONNX, no compiler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bnncc.errors import BnnccError

__all__ = ["Library", "load"]


class Library:
    """A compiled PokeBNN network: ``lib(x)`` with x float32 (N, C, H, W) returns logits (N, classes).

    A batch of a size compiled in is one call; any other size is cut into chunks of compiled
    sizes, largest first (a library compiled with batch 1 runs every size).
    """

    def __init__(self, folder: Path, manifest: dict, call) -> None:
        self.folder = folder
        self.manifest = manifest
        self._call = call  # (function name, NCHW float32 array) -> logits array; per target (targets/registry.py)
        self.functions = {int(b): name for b, name in manifest["functions"].items()}
        self.input_chw = tuple(manifest["input"]["shape"][1:])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_chw:
            raise BnnccError(f"{self.folder}: input of shape {x.shape}; expected (N, {', '.join(map(str, self.input_chw))})")
        x = np.ascontiguousarray(x, dtype=np.float32)
        outputs, start = [], 0
        for size in self._chunks(x.shape[0]):
            outputs.append(self._call(self.functions[size], x[start:start + size]))
            start += size
        return np.concatenate(outputs)

    def _chunks(self, n: int) -> list[int]:
        """Compiled batch sizes summing to ``n``, largest first."""
        chunks = []
        for size in sorted(self.functions, reverse=True):
            while n >= size:
                chunks.append(size)
                n -= size
        if n:
            raise BnnccError(f"{self.folder}: a batch of {sum(chunks) + n} cannot be made of the compiled batch "
                             f"sizes {sorted(self.functions)}; compile with --batch 1 as well")
        return chunks


def load(folder: str | os.PathLike) -> Library:
    """Open the library folder ``folder`` (model.so + model.json)."""
    from bnncc.targets.build import MANIFEST_FORMAT
    from bnncc.targets.registry import get as get_target

    folder = Path(folder)
    manifest_path, library_path = folder / "model.json", folder / "model.so"
    for path in (manifest_path, library_path):
        if not path.is_file():
            raise BnnccError(f"{folder}: no {path.name}; is it a folder written by `bnncc compile`?")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise BnnccError(f"{manifest_path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return Library(folder, manifest, get_target(manifest["target"]["name"]).caller(library_path))
