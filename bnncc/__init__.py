"""bnncc: compile a float ResNet-50 (ONNX) into a PokeBNN binarized network.

Every stage is a function: ``load`` (import and canonicalize), ``ace`` (cost model),
``rewrite`` (recipe passes), ``finetune`` (QAT + distillation), ``compile`` (TVM lowering),
``bundle`` (a CPU library with what runs it without Python).
Names are imported lazily so that ``import bnncc`` does not pull in torch or TVM. No submodule
may share a public name: importing ``bnncc.X`` sets the package attribute ``X`` to the module,
which then hides the function (hence ``rewriting.py`` and ``verification.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "BnnccError": "bnncc.errors",
    "ace": "bnncc.cost",
    "compile": "bnncc.targets.build",
    "bundle": "bnncc.targets.bundle",
    "verify": "bnncc.verification",
    "load": "bnncc.frontend",
    "recognize": "bnncc.frontend",
    "load_recipe": "bnncc.recipe",
    "rewrite": "bnncc.rewriting",
    "to_torch": "bnncc.torchview",
    "write_back": "bnncc.torchview",
    "export_qonnx": "bnncc.qonnx",
    "finetune": "bnncc.train",
    "train_teacher": "bnncc.train",
    "TrainConfig": "bnncc.train",
    "read": "bnncc.frontend",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnncc' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    # the lazy names too: dir(bnncc), a notebook's completion and help(bnncc) showed none of the functions
    return sorted(set(globals()) | set(__all__))
