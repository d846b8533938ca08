"""``bnncc verify``: the comparison rule (bnncc.verification.judge) on synthetic logits, and the
command on a one-PokeConv library (tests/tiny_poke.py): the references it refuses, its inputs
drawn batch by batch, its cap on inputs and its progress bar."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest
from tiny_poke import tiny_poke_model

from bnncc import verification as v
from bnncc.errors import BnnccError


def _logits(top: int) -> np.ndarray:
    out = np.linspace(0, 0.1, 10).astype(np.float32)
    out[[top, 9]] = out[[9, top]]
    return out


def test_inputs_within_tolerance_pass_and_are_not_explained():
    ref = _logits(9)
    report = v.judge([(ref + 1e-6, ref, ref)])
    assert report.ok and report.explained == 0 and report.argmax_agree == 1 and report.inputs == 1


def _close_top(swapped: bool) -> np.ndarray:
    """1000 logits whose two largest, classes 7 and 8, are 0.01 apart; ``swapped``: 8 on top."""
    out = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    out[[7, 8]] = (4.99, 5.0) if swapped else (5.0, 4.99)
    return out


def test_an_argmax_change_inside_the_networks_rounding_spread_is_explained():
    """Optimized and unoptimized onnxruntime disagree on input 1 (argmax 7 vs 8), so the network is
    that sensitive to rounding: the library's argmax change on input 0, where the two happen to
    agree, is no larger than that and is explained."""
    ref, flipped = _close_top(False), _close_top(True)
    report = v.judge([(flipped, ref, ref), (ref, ref, flipped)])
    assert report.ok and report.explained == 1 and report.argmax_agree == 1 and report.max_spread > 0


def test_unrelated_logits_fail_however_large_the_spread():
    """An untrained ResNet-50 at 64 px moves its logits by as much as they spread (one run here sets
    a spread of 5 in logits of standard deviation 1): 4x that took any logits of the reference's
    scale, and a library compiled from another network passed. The reference's own logits with the
    classes shuffled are as unrelated as another network's; logits near the reference still pass."""
    rng = np.random.default_rng(1)
    ref = rng.standard_normal(1000).astype(np.float32)
    jump = ref.copy()
    jump[0] += 5
    near = ref + 0.2 * rng.standard_normal(1000).astype(np.float32)
    report = v.judge([(rng.permutation(ref), ref, ref), (near, ref, jump)])
    assert len(report.failures) == 1 and report.failures[0].startswith("input 0: argmax")
    assert "from the reference in root mean square, over half the" in report.failures[0]
    assert report.explained == 1


@pytest.mark.parametrize("ref, flipped", [([1.0], [1.001]), ([1.0, 0.99], [0.99, 1.0])])
def test_a_network_of_one_or_two_classes_is_judged_by_its_own_runs(ref, flipped):
    """One logit has no spread across classes, and two logits swap their order only as far apart as
    unrelated logits: the library's change is explained when onnxruntime's own runs make it too."""
    ref, flipped = np.float32(ref), np.float32(flipped)
    report = v.judge([(flipped, ref, ref), (ref, ref, flipped)])
    assert report.ok and report.explained == 1
    assert not v.judge([(flipped + 1, ref, ref), (ref, ref, flipped)]).ok


def test_an_argmax_change_where_the_references_always_agree_fails():
    ref = _logits(9)
    report = v.judge([(_logits(3), ref, ref + 1e-7), (ref, ref, ref)])
    assert not report.ok and "argmax 3 != reference 9" in report.failures[0]


def test_a_difference_far_beyond_the_spread_fails():
    ref = _logits(9)
    spread = 1e-3  # over the tolerance (~2e-5): the network is rounding-sensitive
    report = v.judge([(ref + 5 * spread, ref, ref + spread), (ref + 3 * spread, ref, ref)])
    assert len(report.failures) == 1 and "input 0" in report.failures[0] and report.explained == 1


def test_an_input_on_which_the_reference_overflows_fails_saying_so_and_leaves_the_figures_finite():
    """onnxruntime's logits NaN on input 1 (a graph whose float32 arithmetic overflows there, whatever
    the library computes): that input fails as such; input 0's figures stay numbers."""
    ref = _logits(9)
    nan = np.full_like(ref, np.nan)
    report = v.judge([(ref + 1e-6, ref, ref), (ref, nan, np.stack([nan, ref]))])
    assert report.failures == ["input 1: onnxruntime's logits are NaN or infinite (the graph's float32 arithmetic "
                               "overflows on it): no reference to compare with"]
    assert report.argmax_agree == 1 and np.isfinite([report.max_abs_diff, report.max_ref, report.max_spread]).all()


def test_nan_logits_of_the_library_show_in_the_largest_difference():
    """max() skipped a NaN difference: a library answering NaN reported a largest difference of 0."""
    ref = _logits(9)
    report = v.judge([(np.full_like(ref, np.nan), ref, ref)])
    assert len(report.failures) == 1 and report.max_abs_diff == np.inf
    # nan_to_num also turned an infinite difference into the largest float32, 3.4e38
    report = v.judge([(np.full_like(ref, np.inf), ref, ref)])
    assert len(report.failures) == 1 and report.max_abs_diff == np.inf and "difference inf" in report.failures[0]


def test_a_moved_input_run_far_off_makes_the_spread():
    """The other runs stacked (unoptimized, then the moved inputs): one moved run that jumps, as on
    an input on a knife edge, sets the network's spread, and the library's difference on another
    input, where every run agreed, is explained by it."""
    ref = _logits(9)
    others = np.stack([ref, ref + 1e-7, ref + 2e-3, ref])
    report = v.judge([(ref + 5e-3, ref, np.stack([ref] * 4)), (ref, ref, others)])
    assert report.ok and report.explained == 1 and abs(report.max_spread - 2e-3) < 1e-6
    assert not v.judge([(ref + 5e-3, ref, np.stack([ref] * 4)), (ref, ref, np.stack([ref] * 4))]).ok


def _edge_model(quantized: bool):
    """x (1, 64) -> a batch norm giving bias - mean = -1 ulp of 0.1 per channel (scale 1, variance 1 - eps) ->
    BinarizeAct, or (``quantized``) -> QuantGemm whose act bound puts x + 0.1 on an int8 rounding point."""
    import onnx_ir as ir
    from onnx import helper

    from bnncc.ops import DOMAIN

    c1 = (0.1 + np.arange(64) * 1e-3).astype(np.float32)
    c2 = np.nextafter(c1, np.float32(1))
    tensors = {"scale": np.ones(64, np.float32), "bias": c1, "mean": c2, "var": np.full(64, 1 - 1e-5, np.float32),
               "w": np.eye(64, dtype=np.float32), "bound": np.full(64, 127 / 2, np.float32), "b": np.zeros(64, np.float32)}
    if quantized:  # x = 0.25 on the boundary between levels 0 and 1 of a scale of 127 / bound = 2
        nodes = [helper.make_node("QuantGemm", ["x", "w", "bound", "b"], ["y"], domain=DOMAIN, w_bits=8, a_bits=8,
                                  a_signed=1)]
    else:
        nodes = [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["t"]),
                 helper.make_node("BinarizeAct", ["t"], ["y"], domain=DOMAIN)]
    graph = helper.make_graph(nodes, "edge", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, (1, 64))],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, (1, 64))],
                              [onnx.numpy_helper.from_array(v, k) for k, v in tensors.items()])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_a_value_that_cancels_to_within_a_rounding_of_zero_makes_the_spread():
    """A binarized value that is bias - mean = -1 ulp (of 0.1) takes either sign when the batch norm is
    folded otherwise, as the library folds it; no moved input moves it (x = 0 here, as a binary conv's count
    is exact), so only the run on moved parameters shows that spread."""
    optimized, *others = v._sessions(_edge_model(quantized=False))
    ref, alternatives = v._reference_runs(optimized, others, "x", np.zeros((1, 64), np.float32),
                                          np.random.default_rng(0))
    np.testing.assert_array_equal(ref, -1.5)
    assert np.abs(alternatives - ref).max() == 3.0


def test_a_quantizers_rounding_points_are_not_moved():
    """The library quantizes weights and activations to the reference's levels: moving the act bound put
    values on a rounding point on either side (a small network's spread went from 2.3e-5 to 0.051)."""
    optimized, *others = v._sessions(_edge_model(quantized=True))
    x = np.full((1, 64), 0.25, np.float32)
    ref, alternatives = v._reference_runs(optimized, others, "x", x, np.random.default_rng(0))
    np.testing.assert_array_equal(alternatives[:2], np.stack([ref, ref]))  # unoptimized, moved parameters


# ---------------------------------------------------------------------------------------------
# The command on a real library: 3x16x16 inputs, 10 classes, compiled for batch 1 (0.4 s).


@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory):
    """The library folder of tests/tiny_poke.py's network, its bounds calibrated on random inputs."""
    import onnx_ir as ir
    import torch

    from bnncc.targets.build import compile as compile_library
    from bnncc.torchview import to_torch, write_back

    model = tiny_poke_model()
    module = to_torch(model)
    generator = torch.Generator().manual_seed(0)
    module.calibrate_bounds([torch.randn(2, 3, 16, 16, generator=generator) for _ in range(2)])
    folder = tmp_path_factory.mktemp("tiny")
    ir.save(write_back(module, model), folder / "tiny.onnx")
    return compile_library(folder / "tiny.onnx", folder / "lib", target="x86-64", batches=(1,))


def _variant(library, path, *, hw=None, classes=None, batch=None, declare_classes=True):
    """The library's own reference graph edited: another input size, fewer classes (the head's
    first rows), a fixed batch, a symbolic number of classes."""
    proto = onnx.load(library / "model.onnx")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if hw is not None:
        dims[2].dim_value = dims[3].dim_value = hw
    if batch is not None:
        dims[0].dim_value = batch
    if classes is not None:
        head = {t.name: t for t in proto.graph.initializer if t.name in ("fc.w", "fc.b")}
        for name, tensor in head.items():
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor)[:classes], name))
        proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = classes
    if not declare_classes:
        proto.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"
    del proto.graph.value_info[:]
    onnx.save(proto, path)
    return path


def test_the_library_agrees_with_its_reference_whatever_the_batch(tiny_library):
    """The same seed gives the same inputs and moved copies at any batch: batch 3 (chunks of 1 in
    a batch-1 library) reports exactly what batch 1 does."""
    one, three = v.verify(tiny_library, n=7), v.verify(tiny_library, n=7, batch=3)
    assert one.ok and one.inputs == 7 and one.argmax_agree == 7
    assert one == three


def test_inputs_are_drawn_batch_by_batch_as_all_at_once():
    """Each batch draws only its own inputs (memory of one batch whatever n is), the values those of
    one draw of all n; the given images follow, in the batch where they fall."""
    images = [np.full((3, 2, 2), 7.0), np.full((3, 2, 2), 8.0)]
    batches = v._batches(np.random.default_rng(5), 5, (3, 2, 2), images, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    at_once = np.random.default_rng(5).standard_normal((5, 3, 2, 2)).astype(np.float32)
    expected = np.concatenate([at_once, np.stack(images).astype(np.float32)])
    got = np.concatenate(list(v._batches(np.random.default_rng(5), 5, (3, 2, 2), images, 3)))
    assert got.dtype == np.float32 and np.array_equal(got, expected)


@pytest.mark.parametrize("edit, shapes", [
    ({"hw": 32}, ["(N, 3, 32, 32) and gives 10 logits", "(N, 3, 16, 16) and 10"]),
    ({"classes": 4}, ["(N, 3, 16, 16) and gives 4 logits", "(N, 3, 16, 16) and 10"]),
    ({"batch": 4}, ["(4, 3, 16, 16) and gives 10 logits", "(N, 3, 16, 16) and 10"]),
], ids=["input-size", "classes", "fixed-batch"])
def test_a_reference_of_another_shape_is_refused_in_one_line(cli, tiny_library, tmp_path, edit, shapes):
    other = _variant(tiny_library, tmp_path / "other.onnx", **edit)
    code, out, err = cli("verify", tiny_library, "--reference", other)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert f"{other} does not fit the library {tiny_library}: it takes inputs " in err
    assert all(shape in err for shape in shapes) and f"({tiny_library / 'model.onnx'})" in err


def test_a_reference_that_declares_no_classes_is_refused_at_its_first_logits(cli, tiny_library, tmp_path):
    other = _variant(tiny_library, tmp_path / "other.onnx", classes=4, declare_classes=False)
    code, _, err = cli("verify", tiny_library, "--reference", other)
    assert code == 2 and f"{other} gives 4 logits, the library {tiny_library} 10;" in err


def test_a_graph_of_a_fixed_batch_compiles_into_a_library_it_verifies(cli, tiny_library, tmp_path):
    """A PokeBNN graph whose batch is fixed (4) compiled, but its reference graph kept batch 4, so that
    verify refused compile's own folder; the reference now takes any batch, as the library does."""
    fixed = _variant(tiny_library, tmp_path / "fixed.onnx", batch=4)
    code, _, err = cli("compile", fixed, "-o", tmp_path / "lib")
    assert code == 0, err
    reference = onnx.load(tmp_path / "lib" / "model.onnx").graph
    assert reference.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert reference.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    code, out, err = cli("verify", tmp_path / "lib", "--n", "3")
    assert code == 0 and "argmax agreement 3/3" in out, out + err


def test_compile_leaves_the_model_it_is_given_as_it_was(tiny_library, tmp_path):
    """compile made the batch of the caller's own model of a fixed batch symbolic, in place."""
    import onnx_ir as ir

    from bnncc.targets.build import compile as compile_library

    model = ir.load(_variant(tiny_library, tmp_path / "fixed.onnx", batch=4))
    before = ir.to_proto(model).SerializeToString()
    compile_library(model, tmp_path / "lib", target="x86-64")
    assert ir.to_proto(model).SerializeToString() == before
    assert model.graph.inputs[0].shape[0] == 4
    assert onnx.load(tmp_path / "lib" / "model.onnx").graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_a_float_reference_is_refused_in_one_line(cli, tiny_library):
    """A float ResNet (the onnx wheel's light ResNet-50): no comparison with it checks the library."""
    float_model = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_resnet50.onnx")
    code, out, err = cli("verify", tiny_library, "--reference", float_model)
    assert code == 2 and out == ""
    assert err.strip() == (f"error: {float_model}: no ai.bnncc op; verify takes a PokeBNN graph "
                           f"(run `bnncc rewrite` first)")


def test_more_inputs_than_the_cap_are_refused_saying_why(cli, tiny_library):
    code, out, err = cli("verify", tiny_library, "--n", str(v.MAX_INPUTS + 1))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert f"{v.MAX_INPUTS + 1} random inputs: at most {v.MAX_INPUTS}; each takes 6 onnxruntime runs" in err
    code, out, _ = cli("verify", "--help")
    assert f"at most {v.MAX_INPUTS}" in " ".join(out.replace("│", " ").split())


def test_a_longer_run_shows_its_progress_on_a_terminal_s_stderr(cli, tiny_library, monkeypatch):
    """As training's bars: on stderr, and only where it is a terminal (in a pipe or CI log the last
    frame was printed at the end)."""
    import rich.console

    import bnncc.progress
    from bnncc.cli.verify_cmd import QUIET_UP_TO

    code, out, err = cli("verify", tiny_library, "--n", str(QUIET_UP_TO + 1))
    assert code == 0 and f"argmax agreement {QUIET_UP_TO + 1}/{QUIET_UP_TO + 1}" in out and err == ""
    monkeypatch.setattr(bnncc.progress, "Console",
                        lambda stderr: rich.console.Console(stderr=stderr, force_terminal=True))
    code, out, err = cli("verify", tiny_library, "--n", str(QUIET_UP_TO + 1))
    assert "verify" in err and f"{QUIET_UP_TO + 1}/{QUIET_UP_TO + 1}" in err and "verify" not in out
    code, out, err = cli("verify", tiny_library, "--n", str(QUIET_UP_TO))
    assert code == 0 and err == ""
    # the summary is one line (it was wrapped at 80 columns in a pipe): a CI log greps it
    assert len(out.splitlines()) == 1 and out.startswith("argmax agreement") and "explained by that spread" in out


def test_images_and_arrays_given_are_verified_beside_the_random_inputs(cli, tiny_library, tmp_path):
    """`verify -i` reads inputs as `bnncc run` does: an image (resized to the network's 16x16) and a
    .npy of two; a file that is neither is one line before anything runs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", rng.standard_normal((2, 3, 16, 16)).astype(np.float32))
    code, out, _ = cli("verify", tiny_library, "--n", "2", "-i", tmp_path / "a.png", "-i", tmp_path / "b.npy")
    assert code == 0 and "argmax agreement 5/5" in out
    (tmp_path / "c.png").write_bytes(b"not an image")
    code, out, err = cli("verify", tiny_library, "-i", tmp_path / "c.png")
    assert code == 2 and out == "" and f"{tmp_path / 'c.png'}: not a readable image" in err


@pytest.mark.parametrize("n, batch, images", [(0, 1, []), (-3, 1, []), (2, -1, []), (2, 0, []), (-1, 1, [None])])
def test_from_python_no_input_or_a_batch_below_one_is_refused(tiny_library, n, batch, images):
    """The command's options refuse these; bnncc.verify compared no input and reported ok (or failed in
    range() at batch 0)."""
    images = [np.zeros((3, 16, 16), np.float32) for _ in images]
    with pytest.raises(BnnccError, match=rf"^n = {n}, batch = {batch}, {len(images)} images: verify needs n >= 0, "
                                         r"batch >= 1 and at least one input$"):
        v.verify(tiny_library, n=n, batch=batch, images=images)
    report = v.verify(tiny_library, n=0, images=[np.zeros((3, 16, 16), np.float32)])  # the given images alone
    assert report.ok and report.inputs == 1


@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (16, 16, 3), (3, 8, 8)])
def test_from_python_an_image_of_another_shape_is_refused_naming_it(tiny_library, shape):
    """bnncc.verify takes each image as (C, H, W): a batch (1, C, H, W), an HWC image or another size
    failed inside numpy, "all the input arrays must have same number of dimensions"."""
    image = np.zeros((3, 16, 16), np.float32)
    with pytest.raises(BnnccError, match=rf"^image 1 of shape {re.escape(str(shape))}; verify takes each image "
                                         r"as \(C, H, W\) = \(3, 16, 16\)$"):
        v.verify(tiny_library, n=1, images=[image, np.zeros(shape, np.float32)])
    assert v.verify(tiny_library, n=0, images=[image, image]).inputs == 2
