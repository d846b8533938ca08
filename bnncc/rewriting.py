"""``rewrite``: run a recipe's passes over a canonical float model and measure ACE after each pass."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable

import onnx
import onnx_ir as ir

from bnncc.domain import RECIPE_KEY
from bnncc.errors import BnnccError, first_line
from bnncc.frontend import recognize
from bnncc.passes._util import initializer_bytes
from bnncc.passmanager import PassManager, PassRecord
from bnncc.recipe import Recipe, apply_overrides, available_recipes, load_recipe
from bnncc.resnet import Bottleneck, ResNet

__all__ = ["rewrite"]

logger = logging.getLogger(__name__)


def rewrite(model: ir.Model, recipe: Recipe | str | Path, overrides: Iterable[str] = ()) -> tuple[ir.Model, list[PassRecord]]:
    """Apply ``recipe`` (a Recipe, a shipped name or a path) with ``key=value`` overrides to ``model``.

    Returns the rewritten copy of ``model`` (which is left as it was: a user rewriting one loaded
    model with two recipes got the second applied to the first's output) and one record per pass
    (name, modified, node count, ACE as ``bnncc.cost.ace`` measures it), preceded by an ``input``
    record. The result carries the ai.bnncc functions it uses (onnxruntime runs it), has a shape on
    every value and passes ``onnx.checker``. ``model`` must be a float model as ``bnncc.load`` gives it: anything
    else is refused by ``recognize``'s checks before any pass runs.
    """
    from bnncc.cost import ace  # the cost model reads only the graph; imported when used

    resnet = recognize(model)
    if isinstance(recipe, Recipe):
        recipe = apply_overrides(recipe, overrides)
    else:
        recipe = load_recipe(recipe, overrides)
    _check_blocks(resnet, recipe)
    model = ir.from_proto(ir.to_proto(model))  # the passes work in place

    start = time.perf_counter()
    manager = PassManager(recipe.passes, measure=ace)
    rows = [PassRecord("input", False, len(model.graph), ace(model))]
    model = manager.run(model)
    model.metadata_props[RECIPE_KEY] = recipe.name
    rows.extend(manager.records)
    _check(model, recipe)
    logger.info("rewrote with %s in %.1f s", recipe.name, time.perf_counter() - start)
    return model, rows


def _check_blocks(resnet: ResNet, recipe: Recipe) -> None:
    """A recipe written for one kind of block is refused on the other: its passes would run (they
    take both kinds), but its name, widths and ACE describe other networks (resnet18_pokebnn on a
    ResNet-50 gave a 4.2e9 PokeBNN without the v1.5 stride fix)."""
    first = resnet.blocks[0]
    kind = "bottleneck" if isinstance(first, Bottleneck) else "basic"
    if recipe.blocks is None or recipe.blocks == kind:
        return
    shipped = [name for name in available_recipes() if load_recipe(name).blocks == kind]
    raise BnnccError(f"recipe {recipe.name} is for {recipe.blocks} ResNets, but this model has {kind} blocks "
                     f"(node {first.convs[0]!r}); use one of {', '.join(shipped)}, or --set blocks={kind} to apply it anyway")


def _check(model: ir.Model, recipe: Recipe) -> None:
    """The rewritten model must be valid ONNX; a failure here is a bug in a pass, named by the recipe."""
    # protobuf holds 2 GiB a file: the checker, and every writer after it, refused a larger model with an
    # unexpected ValueError (width_multiplier refuses most such widths up front; SE gates of a small se_ratio
    # can still pass it)
    size = initializer_bytes(model)
    if size > onnx.checker.MAXIMUM_PROTOBUF:
        raise BnnccError(f"recipe {recipe.name}: the rewritten model's weights take {size / 2**30:.1f} GiB, more "
                         f"than the 2 GiB one ONNX file holds; choose a smaller passes.width_multiplier.multiplier "
                         f"or a larger passes.poke_conv.se_ratio")
    try:
        onnx.checker.check_model(ir.to_proto(model))
    except onnx.checker.ValidationError as e:
        raise BnnccError(f"recipe {recipe.name}: the rewritten model is not valid ONNX: {first_line(e)}") from None
