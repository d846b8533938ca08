"""Recipes: TOML files that name the passes of a rewrite, their parameters and the training schedule.

A recipe is data. ``recipes/pokebnn_1x.toml`` (package ``bnncc.recipes``) looks like::

    name = "pokebnn_1x"
    description = "PokeBNN-1.0x: ..."
    blocks = "bottleneck"           # the ResNets it is written for: "bottleneck" or "basic"

    [[passes]]                      # run in this order
    name = "width_multiplier"       # a pass registered in bnncc.passmanager
    multiplier = 1.0                # keyword parameters of that pass

    [train]                         # read by bnncc.train
    lr = 2e-5
    ...

Validation: every pass must be registered and every parameter must be a keyword parameter of
the pass, of the annotated type (an int is accepted where a float is expected); the pass is then
built once so its own range checks run. ``[train]`` keys and types come from :data:`TRAIN_SCHEMA`,
and ``weight_quant_start`` must be below ``epochs``.
Each error names the file, the dotted key, the value and what was expected. ``blocks`` is optional;
``bnncc.rewrite`` refuses a model of the other kind of block, since a recipe's widths and ACE are
those of its own networks.

Overrides ``key=value`` use the same dotted keys (``passes.width_multiplier.multiplier=1.4``,
``train.lr=1e-4``); the value is read as a TOML value (a bare word is a string) and goes through
the same validation as the file.
"""

from __future__ import annotations

import copy
import math
import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from bnncc.errors import BnnccError, shown
from bnncc.passmanager import as_annotated, pass_arguments, pass_factory

__all__ = ["Recipe", "BLOCK_KINDS", "TRAIN_SCHEMA", "load_recipe", "apply_overrides", "available_recipes"]

# [train] keys, as bnncc.train reads them. lr is per 256 images (the paper's 2e-5 x batch/256);
# weight_quant_start is an epoch, act_calibration_step a step (pokebnn.md section 4).
TRAIN_SCHEMA: dict[str, type] = {
    "lr": float,
    "batch_size": int,
    "epochs": int,
    "weight_decay": float,
    "weight_quant_start": int,
    "act_calibration_step": int,
    "temperature": float,
}

# the least value of each [train] key, and whether it is allowed itself
TRAIN_RANGES: dict[str, tuple[float, bool]] = {
    "lr": (0, False),
    "batch_size": (1, True),
    "epochs": (1, True),
    "weight_decay": (0, True),
    "weight_quant_start": (0, True),
    "act_calibration_step": (0, True),
    "temperature": (0, False),
}

_TOP_LEVEL = ("name", "description", "blocks", "passes", "train")

# tomllib takes time quadratic in a dotted key's depth: a.a.a... = 1 8000 parts long took 4 s, and one line of
# 1 MiB would take hours. A run of more than MAX_KEY_DEPTH dotted parts, quoted or bare (in a string too: no recipe
# holds one), is refused before parsing
MAX_KEY_DEPTH = 16
_DEEP_KEY = re.compile(r"""(?:\.[ \t]*+(?:[\w-]++|"[^"\n]*+"|'[^'\n]*+')[ \t]*+){%d}""" % MAX_KEY_DEPTH)

# the shipped recipes are 2-3 kB; tomllib took some 15 s and 150 MB a 14 MB file (minutes for a 100 MB one given
# by mistake), all of it read before a word was said
MAX_RECIPE_BYTES = 1 << 20

# A recipe's steps count batches of its own batch_size over ImageNet's training split, or of the
# paper's 8192 (156 steps an epoch) where it sets none.
IMAGENET_TRAIN_IMAGES = 1_281_167
PAPER_BATCH_SIZE = 8192


def steps_per_epoch(train: dict[str, Any]) -> int:
    """The steps of an epoch as a recipe's [train] table counts them (act_calibration_step's unit)."""
    return max(IMAGENET_TRAIN_IMAGES // int(train.get("batch_size", PAPER_BATCH_SIZE)), 1)


# the values of ``blocks``: the kinds of ResNet block (bnncc.resnet.Bottleneck, BasicBlock)
BLOCK_KINDS = ("bottleneck", "basic")


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``passes`` is ``((name, params), ...)`` as ``PassManager`` takes it."""

    name: str
    description: str
    source: str
    passes: tuple[tuple[str, dict[str, Any]], ...]
    train: dict[str, Any]
    blocks: str | None = None  # a BLOCK_KINDS value: the ResNets the recipe is for; None: any

    def params(self, pass_name: str) -> dict[str, Any]:
        """The parameters given to ``pass_name`` (empty when the pass is not in the recipe)."""
        return next((dict(p) for n, p in self.passes if n == pass_name), {})


def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``bnncc.recipes``, numbers in their order (pokebnn_1x before
    pokebnn_1.4x)."""
    names = [f.name[: -len(".toml")] for f in resources.files("bnncc.recipes").iterdir() if f.name.endswith(".toml")]
    return sorted(names, key=lambda name: [float(part) if part[:1].isdigit() else part
                                           for part in re.split(r"(\d+(?:\.\d+)?)", name)])


def load_recipe(name_or_path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Load a recipe by shipped name (``pokebnn_1x``) or file path, apply ``key=value`` overrides, validate."""
    source, text = _read(name_or_path)
    if _DEEP_KEY.search(text):
        raise BnnccError(f"{source}: a dotted key more than {MAX_KEY_DEPTH} parts long (a.b.c...); a recipe's keys "
                         f"are at most 3 deep")
    try:
        raw = tomllib.loads(text)
    except ValueError as e:  # TOMLDecodeError, and int()'s of an integer of more than 4300 digits
        raise BnnccError(f"{source}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses once per level: a = [[[...]]] 400 deep was an "unexpected" error
        raise BnnccError(f"{source}: not valid TOML: arrays or inline tables nested too deeply") from None
    for override in _override_list(overrides):
        _apply_override(raw, override, source)
    return _validate(raw, source)


def apply_overrides(recipe: Recipe, overrides: Iterable[str]) -> Recipe:
    """``recipe`` with ``key=value`` overrides applied, validated as a file would be."""
    passes = recipe.passes
    if isinstance(passes, (list, tuple)):
        passes = [_pass_table(entry) for entry in passes]
    raw: dict[str, Any] = {
        "name": recipe.name,
        "description": recipe.description,
        "passes": passes,
        "train": copy.deepcopy(recipe.train),
    }
    if recipe.blocks is not None:
        raw["blocks"] = recipe.blocks
    for override in _override_list(overrides):
        _apply_override(raw, override, recipe.source)
    return _validate(raw, recipe.source)


def _pass_table(entry: Any) -> Any:
    """A Recipe's ``(name, params)`` pass as the [[passes]] table it came from. Anything else is kept for
    validation to refuse, naming it: a Recipe built with a bare pass name (as PassManager takes them) failed in
    unpacking, "too many values to unpack", and one with params None in "'NoneType' object is not a mapping"."""
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Mapping):
        return {"name": entry[0], **copy.deepcopy(entry[1])}
    return entry


def _read(name_or_path: str | Path) -> tuple[str, str]:
    if not isinstance(name_or_path, (str, os.PathLike)):  # a dict failed inside pathlib, naming bytes and os.PathLike
        raise TypeError(f"expected a recipe's shipped name or the path of its .toml file, not "
                        f"{type(name_or_path).__name__}")
    path = Path(name_or_path)
    # a bare shipped name is the shipped recipe even where the current folder holds something of
    # that name (an output folder named after its recipe made "pokebnn_1x: recipe file not found")
    if isinstance(name_or_path, str) and name_or_path == path.name and name_or_path in available_recipes():
        return f"{name_or_path}.toml", (resources.files("bnncc.recipes") / f"{name_or_path}.toml").read_text("utf-8")
    try:
        exists = path.exists()
    except OSError as e:  # a name too long for a path (a recipe's text given for its name) was an unexpected error
        raise BnnccError(f"unknown recipe {shown(str(name_or_path))}: not a shipped recipe's name, nor a path "
                         f"({e.strerror})") from None
    if path.suffix == ".toml" or exists:
        if not exists:
            raise BnnccError(f"{path}: recipe file not found")
        if not path.is_file():  # a folder, or a FIFO that reading would wait on forever
            raise BnnccError(f"{path}: not a regular file; a recipe is a .toml file")
        try:
            with path.open("rb") as file:
                data = file.read(MAX_RECIPE_BYTES + 1)
            if len(data) > MAX_RECIPE_BYTES:
                raise BnnccError(f"{path}: larger than {MAX_RECIPE_BYTES // 2**20} MiB; a recipe is a few kB of TOML")
            return str(path), data.decode("utf-8-sig")  # a BOM (Windows editors) is no TOML
        except UnicodeDecodeError as e:
            raise BnnccError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
        except OSError as e:  # no permission, an I/O error
            raise BnnccError(f"{path}: cannot read it ({e.strerror or e})") from None
    # a name is a shipped recipe's or none: "../x" was looked up beside them, and any x.toml that the package's
    # folder leads to was read as if shipped
    if str(name_or_path) not in available_recipes():
        raise BnnccError(f"unknown recipe {shown(str(name_or_path))}; shipped recipes: "
                         f"{', '.join(available_recipes())} (or give a path to a .toml file)")
    return f"{name_or_path}.toml", (resources.files("bnncc.recipes") / f"{name_or_path}.toml").read_text("utf-8")


# --- overrides -----------------------------------------------------------------------------------


def _override_list(overrides: Iterable[str]) -> list[str]:
    """``overrides`` as a list of strings; one string, a mapping or an item of another type is a TypeError.

    Iterated, a string is its letters ("--set 't'") and a dict its keys (``{"train.lr": 1e-4}`` was
    "--set 'train.lr': expected key=value"); an int failed inside, "'int' object has no attribute 'partition'".
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides are a list of key=value strings, not the string {overrides!r}; "
                        f"write [{overrides!r}]")
    if isinstance(overrides, Mapping):
        raise TypeError(f"overrides are a list of key=value strings, not a {type(overrides).__name__}; "
                        f"write {[f'{key}={value}' for key, value in overrides.items()]!r}")
    overrides = list(overrides)
    for override in overrides:
        if not isinstance(override, str):
            raise TypeError(f"overrides are key=value strings, not {type(override).__name__} {override!r}")
    return overrides


def _apply_override(raw: dict[str, Any], override: str, source: str) -> None:
    """Set the dotted key of ``key=value`` in the raw recipe; validation happens afterwards."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise BnnccError(f"--set {override!r}: expected key=value, e.g. passes.width_multiplier.multiplier=1.4")
    value = _parse_value(text.strip())
    parts = key.split(".")
    if parts[0] == "passes" and len(parts) == 3 and parts[2] == "name":  # it would swap the pass silently
        raise BnnccError(f"--set {key}: a pass's name is not a parameter; write a recipe file to change its passes")
    if parts[0] == "passes" and len(parts) == 3:
        _pass_entry(raw, parts[1], source, key)[parts[2]] = value
    elif parts[0] == "train" and len(parts) == 2:
        raw.setdefault("train", {})[parts[1]] = value
    elif len(parts) == 1 and parts[0] in ("name", "description", "blocks"):
        raw[parts[0]] = value
    else:
        raise BnnccError(f"--set {key}: unknown key; expected name, description, blocks, train.<key> "
                         "or passes.<pass name>.<parameter>")


def _parse_value(text: str) -> Any:
    """A TOML value (``1.4``, ``true``, ``"s"``, ``[1, 2]``); anything else is a bare string."""
    if _DEEP_KEY.search(text):  # {a.a.a... = 1}: as in a file, not parsed (it is then refused as a string)
        return text
    try:
        parsed = tomllib.loads(f"v = {text}")
    except (ValueError, RecursionError):  # TOMLDecodeError, int() of over 4300 digits, [[[...]]] nested too deeply
        return text
    # "2\nseed = 5" parses as v = 2 and another key, which was dropped without a word: one value or a string
    return parsed["v"] if len(parsed) == 1 else text


def _pass_entry(raw: dict[str, Any], pass_name: str, source: str, key: str) -> dict[str, Any]:
    # a file without a list of passes (empty, or a [passes] table) is refused as it is without --set: this said
    # "empty.toml names no such pass; its passes are ", naming none
    _check_pass_list(raw.get("passes"), source)
    entries = [p for p in raw.get("passes", []) if isinstance(p, dict) and p.get("name") == pass_name]
    if len(entries) != 1:
        names = [p.get("name") for p in raw.get("passes", []) if isinstance(p, dict)]
        why = "names no such pass" if not entries else "runs that pass more than once"
        raise BnnccError(f"--set {key}: {source} {why}; its passes are {', '.join(map(str, names))}")
    return entries[0]


# --- validation ----------------------------------------------------------------------------------


def _validate(raw: dict[str, Any], source: str) -> Recipe:
    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        raise BnnccError(f"{source}: unknown key {shown(unknown[0])}; expected {', '.join(_TOP_LEVEL)}")
    name = _check_type(raw.get("name", Path(source).stem), str, "name", source)
    description = _check_type(raw.get("description", ""), str, "description", source)
    blocks = raw.get("blocks")
    if blocks is not None and blocks not in BLOCK_KINDS:
        raise BnnccError(f"{source}: blocks = {shown(blocks)}: expected one of {', '.join(map(repr, BLOCK_KINDS))}")
    entries = raw.get("passes")
    _check_pass_list(entries, source)
    passes = tuple(_validate_pass(entry, i, source) for i, entry in enumerate(entries))
    train = _validate_train(raw.get("train", {}), source)
    return Recipe(name, description, source, passes, train, blocks)


def _check_pass_list(entries: Any, source: str) -> None:
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise BnnccError(f"{source}: passes = {shown(entries)}: expected a non-empty array of tables ([[passes]])")


def _validate_pass(entry: dict[str, Any], index: int, source: str) -> tuple[str, dict[str, Any]]:
    pass_name = entry.get("name")
    if not isinstance(pass_name, str):
        raise BnnccError(f"{source}: passes[{index}].name = {shown(pass_name)}: expected the name of a registered pass")
    try:
        factory = pass_factory(pass_name)
    except BnnccError as e:
        raise BnnccError(f"{source}: passes[{index}].name: {e}") from None
    given = {key: value for key, value in entry.items() if key != "name"}
    try:
        params = copy.deepcopy(pass_arguments(pass_name, given, f"passes.{pass_name}."))
    except BnnccError as e:
        raise BnnccError(f"{source}: {e}") from None
    try:
        factory(**params)  # the pass's own range checks
    except BnnccError as e:
        # the pass names itself ("poke_conv: clip_bound must be ..."): the recipe's key names it once
        message = str(e)
        if message.startswith(f"{pass_name}: "):
            raise BnnccError(f"{source}: passes.{pass_name}.{message.removeprefix(f'{pass_name}: ')}") from None
        raise BnnccError(f"{source}: passes.{pass_name}: {message}") from None
    return pass_name, params


def _validate_train(train: Any, source: str) -> dict[str, Any]:
    if not isinstance(train, dict):
        raise BnnccError(f"{source}: train = {shown(train)}: expected a table ([train])")
    out = {}
    for key, value in train.items():
        if key == "clip_bound":  # a [train] key once: B lives in the graph alone now
            raise BnnccError(f"{source}: train.clip_bound: B is not a training setting but the graph's: "
                             f"set passes.poke_conv.clip_bound (bnncc finetune --clip-bound overrides a graph's B)")
        if key not in TRAIN_SCHEMA:
            raise BnnccError(f"{source}: train.{key}: unknown key; expected {', '.join(TRAIN_SCHEMA)}")
        out[key] = _check_type(value, TRAIN_SCHEMA[key], f"train.{key}", source)
        low, inclusive = TRAIN_RANGES[key]
        # an integer is finite, and isfinite overflowed on one beyond a float's range ('unexpected OverflowError');
        # past int64 no tensor, seed or loader holds it
        count = isinstance(out[key], int)
        finite = out[key] < 2**63 if count else math.isfinite(out[key])
        if not (finite and (out[key] >= low if inclusive else out[key] > low)):
            raise BnnccError(f"{source}: train.{key} = {shown(value)}: expected a finite number "
                             f"{'>=' if inclusive else '>'} {low}{' (an integer below 2**63)' if count else ''}")
    # the run's share in float weights is weight_quant_start / epochs (bnncc.train.TrainConfig.from_recipe, which
    # takes 1 epoch where none is set): at 1 or more the weights never turned binary, and the trained float weights
    # were signed only in the deployed graph (a copy of pokebnn_1x with epochs = 40 kept its start at epoch 50)
    epochs = out.get("epochs", 1)
    if out.get("weight_quant_start", 0) >= epochs:
        raise BnnccError(f"{source}: train.weight_quant_start = {out['weight_quant_start']}: the epoch the weights "
                         f"turn binary must be below train.epochs = {epochs}{'' if 'epochs' in out else ' (unset)'}")
    # likewise the calibration step: at or past the run's last step the activation bounds were never calibrated,
    # which only compile's warning said, after the whole fine-tune
    run_steps = epochs * steps_per_epoch(out)
    if out.get("act_calibration_step", 0) >= run_steps:
        raise BnnccError(f"{source}: train.act_calibration_step = {out['act_calibration_step']}: the step the "
                         f"activation bounds are calibrated at must be below the run's {run_steps:,} steps "
                         f"(train.epochs = {epochs}{'' if 'epochs' in out else ' (unset)'} times "
                         f"{steps_per_epoch(out):,}: ImageNet's {IMAGENET_TRAIN_IMAGES:,} images in batches of "
                         f"train.batch_size = {out.get('batch_size', PAPER_BATCH_SIZE)}"
                         f"{'' if 'batch_size' in out else ' (unset, as in the paper)'})")
    return out


def _check_type(value: Any, expected: type, key: str, source: str) -> Any:
    """``value`` as ``expected`` (``passmanager.as_annotated``, which pass parameters go through too)."""
    try:
        return copy.deepcopy(as_annotated(value, expected, key))
    except BnnccError as e:
        raise BnnccError(f"{source}: {e}") from None
