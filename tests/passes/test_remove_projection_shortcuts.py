"""remove_projection_shortcuts: projection Conv + Add -> ReshapeAdd(tile) from the block input."""

from __future__ import annotations

from _support import ace_total, conv_macs, op_counts, random_input, run_ort

from bnncc.frontend import recognize
from bnncc.passes.remove_projection_shortcuts import RemoveProjectionShortcutsPass


def test_projections_become_tile_shortcuts(small_model):
    resnet = recognize(small_model)
    projected = [b for b in resnet.blocks if b.shortcut is not None]
    assert len(projected) == 4  # the first block of each stage
    removed_macs = sum(conv_macs(small_model, b.shortcut) for b in projected)
    weights = {small_model.graph.node(b.shortcut).inputs[1].name for b in projected}
    before, ace_before = op_counts(small_model), ace_total(small_model)

    result = RemoveProjectionShortcutsPass()(small_model)

    assert result.modified
    after = op_counts(small_model)
    assert after["Conv"] == before["Conv"] - 4 and after["Add"] == before["Add"] - 4 and after["ReshapeAdd"] == 4
    for block in projected:
        merge = small_model.graph.node(block.add)
        assert (merge.op_type, merge.domain, merge.attributes.get_string("method")) == ("ReshapeAdd", "ai.bnncc", "tile")
        # y from the third conv, the shortcut straight from the block input
        assert merge.inputs[0].producer().name == block.convs[2]
        assert merge.inputs[1] is small_model.graph.node(block.convs[0]).inputs[0]
    assert not weights & set(small_model.graph.initializers)
    assert ace_total(small_model) == ace_before - 256 * removed_macs  # float MACs count 256


def test_result_runs_with_a_free_batch(small_model):
    RemoveProjectionShortcutsPass()(small_model)
    assert run_ort(small_model, random_input(batch=3)).shape == (3, 10)


def test_does_not_fire_without_projections(small_model):
    RemoveProjectionShortcutsPass()(small_model)
    nodes = len(small_model.graph)
    assert not RemoveProjectionShortcutsPass()(small_model).modified
    assert len(small_model.graph) == nodes
