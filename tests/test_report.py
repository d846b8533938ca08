"""The conversion report: numbers against hand-counted costs, files, determinism, the untrained notice."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from bnncc.cost import ace
from bnncc.report import Report, Stage, write_report


def _conv_model(cout: int) -> onnx.ModelProto:
    """x (1,2,4,4) -> 1x1 Conv to ``cout`` channels -> GlobalAveragePool -> Flatten -> Gemm to 3 classes."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1,2,4,4] x) => (float[1,3] y) <float[{cout},2,1,1] w, float[{cout}] b, float[3,{cout}] fw, float[3] fb> {{
        c = Conv <kernel_shape = [1, 1]> (x, w, b)
        p = GlobalAveragePool (c)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, fw, fb)
    }}
    """
    model = onnx.parser.parse_model(text)
    shapes = {"w": (cout, 2, 1, 1), "b": (cout,), "fw": (3, cout), "fb": (3,)}
    model.graph.initializer.extend(onnx.numpy_helper.from_array(np.full(shape, 0.5, np.float32), name)
                                   for name, shape in shapes.items())
    return model


@pytest.fixture
def report():
    wide, narrow = ace(_conv_model(8)), ace(_conv_model(2))
    stages = (Stage("float import", "float.onnx", 4000, wide), Stage("rewrite", "rewrite.onnx", 1000, narrow),
              Stage("compiled", "model.so", 50_000, narrow))
    return Report("models/float.onnx", "pokebnn_1x", "x86-64", False, stages,
                  accuracy={"teacher_top1": 81.5, "teacher_top5": 99.0, "student_top1": 70.25, "student_top5": None},
                  latency={"batch": 1, "runs": 5, "threads": 2, "median_ms": 1.5, "min_ms": 1.25})


def test_stage_numbers_are_the_hand_counted_costs(report):
    data = report.to_dict()
    # conv: 16 positions x 2 inputs x cout outputs MACs; gemm: cout x 3; float MACs count 16 x 16 bits
    wide_macs, narrow_macs = 16 * 2 * 8 + 8 * 3, 16 * 2 * 2 + 2 * 3
    assert [s["macs"] for s in data["stages"]] == [wide_macs, narrow_macs, narrow_macs]
    assert [s["ace"] for s in data["stages"]] == [256 * wide_macs, 256 * narrow_macs, 256 * narrow_macs]
    assert [s["cpu64"] for s in data["stages"]] == [wide_macs, narrow_macs, narrow_macs]
    # weights at 32 bits; trainable params = weights + biases
    assert data["stages"][0]["weight_bytes"] == 4 * (8 * 2 + 3 * 8)
    assert data["stages"][0]["trainable_params"] == 8 * 2 + 8 + 3 * 8 + 3
    assert [s["file_bytes"] for s in data["stages"]] == [4000, 1000, 50_000]
    assert data["ace_reduction"] == pytest.approx(wide_macs / narrow_macs)
    assert [(layer["op"], layer["macs"]) for layer in data["layers"]] == [("Conv", 64), ("Gemm", 6)]


def test_a_stage_names_its_figures_as_ace_json_does():
    # report.json's "params" were the trainable ones where `bnncc ace --json`'s are every initializer
    # element, BN statistics included: one key, two numbers for the same graph
    model = _conv_model(2)
    graph = model.graph
    graph.node[0].output[0] = "c0"
    graph.node.insert(1, onnx.helper.make_node("BatchNormalization", ["c0", "s", "t", "m", "v"], ["c"]))
    graph.initializer.extend(onnx.numpy_helper.from_array(np.ones(2, np.float32), name) for name in "stmv")
    cost = ace(model)
    stage = Stage("rewrite", "rewrite.onnx", 1000, cost).to_dict()
    shared = stage.keys() & cost.to_dict().keys()
    assert {"ace", "macs", "trainable_params"} <= shared
    assert {key: stage[key] for key in shared} == {key: cost.to_dict()[key] for key in shared}
    assert cost.params > cost.trainable_params  # the running statistics are no trainable params


def test_writes_json_markdown_plots_and_keeps_latency_out_of_json(report, tmp_path):
    written = write_report(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written) == [
        "ace_layers.png", "ace_stages.png", "latency.json", "report.json", "report.md"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert "latency" not in json.dumps(data) and data["trained"] is False
    assert json.loads((tmp_path / "latency.json").read_text())["median_ms"] == 1.5
    for png in ("ace_stages.png", "ace_layers.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "Not fine-tuned" in md
    stage_rows = [line for line in md.splitlines() if line.startswith("| float import") or line.startswith("| rewrite")
                  or line.startswith("| compiled")]
    assert len(stage_rows) == 3
    assert f"{256 * (16 * 2 * 8 + 8 * 3) / 1e9:.4f}" in stage_rows[0]
    assert "| 70.25% | - |" in md and "1.50 ms" in md


def test_ace_reduction_is_written_in_bit_macs(report, tmp_path):
    """A float import of 1.28e13 ACE (a ResNet-152 at 448 px is 1.18e13) read "1.28e+04e9"."""
    from bnncc.ops.counting import Layer

    big = Layer("big", "Conv", "conv", 16, 16, 50_000_000_000, 1, 32)  # 5e10 MACs at 16 x 16 bits
    first = report.stages[0]
    stages = (dataclasses.replace(first, cost=dataclasses.replace(first.cost, layers=(big,))), *report.stages[1:])
    write_report(dataclasses.replace(report, stages=stages), tmp_path)
    # deployed: the narrow conv model's 70 MACs at 16 x 16 bits, 17,920; 1.28e13 / 17,920 = 714,285,714.3
    assert ("ACE falls from 1.28e+13 (float import) to 1.792e+04 (deployed): 714285714.3x less."
            in (tmp_path / "report.md").read_text())


def test_same_report_gives_the_same_bytes(report, tmp_path):
    write_report(report, tmp_path / "a")
    write_report(report, tmp_path / "b")
    for name in ("report.json", "report.md", "ace_stages.png", "ace_layers.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_without_latency_there_is_no_latency_file(report, tmp_path):
    """Not even an earlier report's: convert for arm64 into a folder of an x86-64 run kept its
    latency.json beside the arm64 library."""
    write_report(report, tmp_path)
    write_report(dataclasses.replace(report, latency=None, trained=True), tmp_path)
    assert not (tmp_path / "latency.json").exists()
    assert "Not fine-tuned" not in (tmp_path / "report.md").read_text()


def test_latency_on_a_busy_machine_says_so(report, tmp_path):
    busy = {**report.latency, "load_average": 6.5, "cpus": 2}
    write_report(dataclasses.replace(report, latency=busy), tmp_path / "busy")
    write_report(dataclasses.replace(report, latency={**busy, "load_average": 0.2}), tmp_path / "quiet")
    assert "machine was busy (load average 6.5 on 2 CPUs)" in (tmp_path / "busy" / "report.md").read_text()
    assert "busy" not in (tmp_path / "quiet" / "report.md").read_text()
    assert "Batch 1, 2 threads, median of 5 runs" in (tmp_path / "quiet" / "report.md").read_text()
    write_report(dataclasses.replace(report, latency={**busy, "threads": 1}), tmp_path / "one")
    assert "Batch 1, 1 thread, median of 5 runs" in (tmp_path / "one" / "report.md").read_text()  # not "1 threads"


def test_a_pipe_in_a_file_name_stays_inside_its_table_cell(report, tmp_path):
    """"we|ird.onnx" split its stage row into one cell more than the header has."""
    odd = dataclasses.replace(report, stages=(dataclasses.replace(report.stages[0], artifact="we|ird\nname.onnx"),
                                              *report.stages[1:]))
    write_report(odd, tmp_path)
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| float import"))
    assert "`we\\|ird name.onnx`" in row and row.replace("\\|", "").count("|") == 8


HOSTILE_NAMES = ["<img src=x onerror=alert(1)>", "[x](javascript:alert(1))", "a`b``c", "`edge`", "a\\|b", "*b* _i_",
                 "a$\\badcmd{x}$"]  # (matplotlib read the last as math in the plot's title, and failed)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_names_from_the_users_graph_render_as_text(report, tmp_path, name):
    """Node, file and recipe names went into report.md as Markdown: a node named "<img onerror=...>"
    rendered as HTML, "[x](javascript:...)" as a link. Rendered by markdown-it (tables on, HTML on, as
    many viewers render), each shows as itself and nothing else."""
    from markdown_it import MarkdownIt

    layer = dataclasses.replace(report.deployed.cost.layers[0], name=name)
    cost = dataclasses.replace(report.deployed.cost, layers=(layer, *report.deployed.cost.layers[1:]))
    stages = (dataclasses.replace(report.stages[0], artifact=name), *report.stages[1:-1],
              dataclasses.replace(report.deployed, cost=cost))
    odd = dataclasses.replace(report, model=f"models/{name}.onnx", recipe=name, stages=stages)
    write_report(odd, tmp_path)
    html = MarkdownIt("commonmark", {"html": True}).enable("table").render((tmp_path / "report.md").read_text())
    assert "<img src=x" not in html and "<a " not in html and "<em>" not in html
    escaped = name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    shown = [s.strip() for s in re.findall(r"<code>(.*?)</code>", html)]
    assert shown.count(escaped) == 3 and shown.count(escaped + ".onnx") == 1, shown  # artifact, layer, recipe; title
    # every row has its table's cells (stages 7, accuracy 3, layers 8): no name split a row
    assert [row.count("<td") for row in html.split("<tr>") if "<td" in row] == [7, 7, 7, 3, 3, 8, 8], html


def test_accuracy_that_could_not_be_measured_is_said_so(report, tmp_path):
    """Data of other classes than the network's (Fashion-MNIST's 10 for an ImageNet ResNet): the
    section was an empty table."""
    none = {f"{who}_top{k}": None for who in ("teacher", "student") for k in (1, 5)}
    write_report(dataclasses.replace(report, accuracy=none, trained=True), tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "## Accuracy (test split)\n\nNot measured: the test split's labels are of other classes" in text
    assert "| model | top-1 | top-5 |" not in text
    write_report(report, tmp_path / "measured")
    assert "| float teacher (import) | 81.50% | 99.00% |" in (tmp_path / "measured" / "report.md").read_text()


def test_a_library_not_run_here_says_why_its_accuracy_is_missing(report, tmp_path):
    """An arm64 convert with data showed the teacher's and the student's accuracy and no word on the library's,
    which the README lists "when data was given": convert runs the host target's library only."""
    arm64 = dataclasses.replace(report, target="arm64", trained=True, latency=None)
    write_report(arm64, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| 70.25% |" in text
    assert ("The `arm64` library is not run on this machine: `bnncc verify` compares it with the fine-tuned "
            "graph") in text
    measured = dataclasses.replace(report, accuracy={**report.accuracy, "library_top1": 70.0, "library_top5": 99.0})
    write_report(measured, tmp_path / "measured")
    assert "is not run on this machine" not in (tmp_path / "measured" / "report.md").read_text()
