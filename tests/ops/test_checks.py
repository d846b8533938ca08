"""Constants outside their op's domain (bnncc.ops.checks): every command that reads a PokeBNN graph
refuses them alike, in one line naming the node and the input, before writing anything."""

import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from bnncc.errors import BnnccError
from bnncc.ops import attach_functions, check_graph
from tiny_poke import tiny_poke_model


def _set(model: ir.Model, name: str, value) -> None:
    """Initializer ``name`` filled with ``value``."""
    initializer = model.graph.initializers[name]
    array = np.full(initializer.const_value.shape, value, np.float32)
    initializer.const_value = ir.tensor(array, name=name)


def _set_row(model: ir.Model, name: str, peak: float) -> None:
    """Output channel 0 of weight ``name`` holds ``peak`` and zeros."""
    initializer = model.graph.initializers[name]
    array = initializer.const_value.numpy().copy()
    array[0] = 0
    array[0].reshape(-1)[0] = peak
    initializer.const_value = ir.tensor(array, name=name)


def _attribute(model: ir.Model, node_name: str, name: str, value: float) -> None:
    next(n for n in model.graph if n.name == node_name).attributes[name] = ir.Attr(name, ir.AttributeType.FLOAT, value)


def _int_attribute(model: ir.Model, node_name: str, name: str, value: int) -> None:
    next(n for n in model.graph if n.name == node_name).attributes[name] = ir.Attr(name, ir.AttributeType.INT, value)


def _retype(model: ir.Model, name: str, dtype) -> None:
    initializer = model.graph.initializers[name]
    initializer.const_value = ir.tensor(initializer.const_value.numpy().astype(dtype), name=name)


# (change, the node named, what the line says)
CASES = {
    # 127 / 1e-38 overflows float32: the reference's quantizer would compute 0 * inf = NaN
    "stem bound": (lambda m: _set(m, "stem.bound", 1e-38), "stem", r"input 'stem.bound': bound 1e-38 of channel 0 "
                   r"makes the 8-bit quantizer's scale \(127 / bound\) overflow float32"),
    "se bound2": (lambda m: _set(m, "se.bound2", 1e-38), "poke", r"input 'se.bound2': bound 1e-38 .* 4-bit quantizer's "
                  r"scale \(16 / bound\)"),
    "head bound": (lambda m: _set(m, "fc.bound", 3e-37), "fc", r"input 'fc.bound': bound 3e-37"),
    # 127 / 1e-40 and 7 / 1.5e-38 overflow float32: the reference's zero weights become 0 * inf = NaN
    "stem weights": (lambda m: _set_row(m, "stem.w", 1e-40), "stem", r"input 'stem.w': max \|W\| 1e-40 of output "
                     r"channel 0 makes the 8-bit quantizer's scale \(127 / max \|W\|\) overflow float32"),
    "se w2": (lambda m: _set_row(m, "se.w2", 1.5e-38), "poke", r"input 'se.w2': max \|W\| 1.5e-38 of output channel 0 "
              r"makes the 4-bit quantizer's scale \(7 / max \|W\|\)"),
    "split var": (lambda m: _set(m, "poke.bn_split.var", -1.0), "poke", r"input 'poke.bn_split.var': variance -1 of "
                  r"channel 0 plus epsilon 1e-05 is not positive"),
    "stem var": (lambda m: _set(m, "stem.bn.var", -2.0), "stem.bn", r"input 'stem.bn.var': variance -2"),
    # var + eps exactly 0: the reference's 1 / sqrt(0) is infinite
    "split var -eps": (lambda m: _set(m, "poke.bn_split.var", -1e-5), "poke", r"input 'poke.bn_split.var': variance "
                       r"-1e-05 of channel 0 plus epsilon 1e-05 is not positive"),
    "clip inf": (lambda m: _attribute(m, "poke", "clip_bound", float("inf")), "poke",
                 r"clip_bound = inf; expected a positive number \(finite\)"),
    "epsilon nan": (lambda m: _attribute(m, "poke", "epsilon", float("nan")), "poke",
                    r"epsilon = nan; expected a finite number"),
    # at 1 bit a signed quantizer's scale is 0 / max|W|: the reference divides by 0
    "w_bits 1": (lambda m: _int_attribute(m, "fc", "w_bits", 1), "fc", "w_bits = 1; a quantizer takes 2 to 24 bits"),
    "se_a_bits 64": (lambda m: _int_attribute(m, "poke", "se_a_bits", 64), "poke", "se_a_bits = 64"),
    # onnx_ir's typed getter raised a TypeError: an 'unexpected' error of exit status 1
    "clip int": (lambda m: _int_attribute(m, "poke", "clip_bound", 3), "poke",
                 "Attribute 'clip_bound' is not of type FLOAT"),
    # onnxruntime refuses a float16 weight beside float32 activations ("W has inconsistent type")
    "float16 weight": (lambda m: _retype(m, "poke.w", np.float16), "poke", "input 'poke.w' is float16; the graph's "
                       "constants are float32"),
    "double stem var": (lambda m: _retype(m, "stem.bn.var", np.float64), "stem.bn", "input 'stem.bn.var' is double"),
}


@pytest.mark.parametrize("case", CASES)
def test_check_graph_names_the_node_and_input(case):
    change, node, message = CASES[case]
    model = tiny_poke_model()
    check_graph(model)  # the graph as built is in every op's domain
    change(model)
    with pytest.raises(BnnccError, match=rf"^node '{node}' \(\w+\): {message}"):
        check_graph(model)


@pytest.mark.parametrize("op_type, inputs", [("BinaryConv", ["x", "w"]), ("BinarizeAct", ["x"])])
@pytest.mark.parametrize("bound", [0.0, -3.0, float("inf")])
def test_a_standalone_binary_op_of_no_positive_clip_bound_is_refused(op_type, inputs, bound):
    """BinaryConv and BinarizeAct outside a PokeConv: a clip bound of 0, < 0 or inf is outside spec.md's
    domain (a finite positive number), refused naming the node as the PokeConv's is."""
    attributes = {"kernel_shape": [3, 3], "strides": [1, 1]} if op_type == "BinaryConv" else {}
    node = onnx.helper.make_node(op_type, inputs, ["y"], name="binary", domain="ai.bnncc", clip_bound=bound,
                                 **attributes)
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 5, 5])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.ones((2, 4, 3, 3), np.float32), "w")])
    model = ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                                       onnx.helper.make_opsetid("ai.bnncc", 1)]))
    with pytest.raises(BnnccError, match=rf"^node 'binary' \({op_type}\): clip_bound = {bound}; expected a "
                                         rf"positive number \(finite\)$"):
        check_graph(model)


@pytest.mark.parametrize("case", ["stem weights", "se w2"])
def test_weights_refused_are_those_the_reference_makes_nan(case):
    """onnxruntime gives NaN logits for the graphs refused for their weights (the library gave numbers)."""
    import onnxruntime as ort

    model = tiny_poke_model()
    CASES[case][0](model)
    session = ort.InferenceSession(ir.to_proto(attach_functions(model)).SerializeToString())
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert np.isnan(session.run(None, {"x": x})[0]).all()


def test_weights_at_the_edge_and_all_zero_channels_pass():
    """The smallest max |W| whose 8-bit scale is finite passes, and so does a channel of zeros (scale 1)."""
    model = tiny_poke_model()
    _set_row(model, "stem.w", 127 / float(np.finfo(np.float32).max) * 1.001)
    _set_row(model, "fc.w", 0.0)
    check_graph(model)


@pytest.mark.parametrize("weight", [np.float32(1.0), np.zeros((0, 32), np.float32)])
def test_weights_of_no_output_channels_are_left_to_the_shape_checks(weight):
    """A scalar or empty weight has no channel to scale: the check passes it on (no numpy error)."""
    model = tiny_poke_model()
    model.graph.initializers["fc.w"].const_value = ir.tensor(weight, name="fc.w")
    check_graph(model)


def test_bounds_at_the_edge_and_uncalibrated_ones_pass():
    """A bound <= 0 leaves its channel float; the smallest bound whose scale is finite passes."""
    model = tiny_poke_model()
    _set(model, "stem.bound", 127 / float(np.finfo(np.float32).max) * 1.001)
    _set(model, "se.bound1", 0.0)
    check_graph(model)


@pytest.mark.parametrize("case", ["stem bound", "stem weights", "split var", "clip inf"])
def test_every_command_refuses_alike(cli, tmp_path, case):
    change, node, message = CASES[case]
    model = tiny_poke_model()
    change(model)
    path = tmp_path / "bad.onnx"
    ir.save(attach_functions(model), path)
    commands = [("ace", path), ("export", path, "--format", "qonnx", "-o", tmp_path / "q.onnx"),
                ("compile", path, "--target", "x86-64", "-o", tmp_path / "lib")]
    for args in commands:
        code, _, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)
        assert f"{path}: node '{node}'" in err and not (tmp_path / "q.onnx").exists(), (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def _without_attribute(model: ir.Model, node_name: str, name: str) -> None:
    del next(n for n in model.graph if n.name == node_name).attributes[name]


def _weight_from_a_constant_node(model: ir.Model) -> None:
    """poke.w computed by a Constant node instead of stored (onnxruntime runs that)."""
    node = next(n for n in model.graph if n.name == "poke")
    constant = ir.node("Constant", [], attributes={"value": model.graph.initializers["poke.w"].const_value},
                       name="wconst")
    model.graph.insert_before(node, constant)
    node.replace_input_with(1, constant.outputs[0])


@pytest.mark.parametrize("change, message", [
    (lambda m: _without_attribute(m, "poke", "kernel_shape"), r"node 'poke' \(PokeConv\): missing the attribute\(s\) "
     r"kernel_shape"),
    (lambda m: _without_attribute(m, "stem", "pads"), r"node 'stem' \(QuantConv\): missing the attribute\(s\) pads"),
    (_weight_from_a_constant_node, r"node 'poke' \(PokeConv\): input '.*' is computed by node 'wconst'; the op's "
     r"parameters are stored initializers"),
])
def test_what_every_face_reads_must_be_there(change, message):
    """Attributes the torch view and the QONNX export read (onnxruntime infers a kernel shape from
    the weights, so it ran such a graph, and the export ended in a KeyError), parameters stored."""
    model = tiny_poke_model()
    change(model)
    with pytest.raises(BnnccError, match=message):
        check_graph(model)


def _unknown_domain_head(model: ir.Model) -> None:
    next(n for n in model.graph if n.name == "fc").domain = "com.example"
    model.opset_imports["com.example"] = 1


def _duplicate_node_names(model: ir.Model) -> None:
    next(n for n in model.graph if n.name == "pool").name = "flatten"


def _output_is_the_input(model: ir.Model) -> None:
    model.graph.outputs[0] = model.graph.inputs[0]


def _extra_dangling_node(model: ir.Model) -> None:
    model.graph.append(ir.node("Relu", [model.graph.inputs[0]], name="unread"))


def _local_function_node(model: ir.Model) -> None:
    """The head's input through a function of the model's own domain (a Relu here, a float conv as
    well), which onnxruntime runs, ace counted as no work and compile refused."""
    head = next(n for n in model.graph if n.name == "fc")
    node = ir.node("F", [head.inputs[0]], domain="local", name="hidden")
    model.graph.insert_before(head, node)
    head.replace_input_with(0, node.outputs[0])
    model.opset_imports["local"] = 1
    function = ir.serde.deserialize_function(onnx.helper.make_function(
        "local", "F", ["a"], ["b"], [onnx.helper.make_node("Relu", ["a"], ["b"])], [onnx.helper.make_opsetid("", 18)]))
    model.functions[function.identifier()] = function


def _huge_input(model: ir.Model) -> None:
    model.graph.inputs[0].shape = ir.Shape([1, 3, 100_000, 100_000])


_CANNOT_RUN = "onnxruntime, the reference, cannot run this graph: "


@pytest.mark.parametrize("change, message", [
    (_unknown_domain_head, r"node 'fc' \(com.example:QuantGemm\): an op of domain 'com.example'"),
    (_duplicate_node_names, _CANNOT_RUN + r".*two nodes with same node name \(flatten\)"),
    (_output_is_the_input, r"node 'stem' \(.*output.* does not depend on it"),
    (_extra_dangling_node, r"node 'unread' \(.*output.* does not depend on it"),
    (_local_function_node, r"node 'hidden' \(local:F\): an op of domain 'local'; a PokeBNN graph holds ONNX "
     r"and ai.bnncc ops only"),
    (_huge_input, r"input 'x' of shape \[1, 3, 100000, 100000\]: at most 33554432 pixels"),
])
def test_a_graph_unfit_for_the_reference_is_refused_by_every_command(cli, tmp_path, change, message):
    """The reference must run the graph: compile fused an unknown-domain QuantGemm as ours into a
    library that verify then could not check; ace and export took two nodes of one name. ace measured
    a graph whose output was its input as the whole network it no longer computes, and counted a node
    nobody reads, where compile refused the first graph. An input of 10^10 pixels was run (its zeros
    allocated) before any refusal."""
    model = tiny_poke_model()
    change(model)
    path = tmp_path / "bad.onnx"
    ir.save(attach_functions(model), path)
    for args in [("ace", path), ("export", path, "--format", "qonnx", "-o", tmp_path / "q.onnx"),
                 ("compile", path, "--target", "x86-64", "-o", tmp_path / "lib")]:
        code, _, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)
        assert re.search(rf"{re.escape(str(path))}: {message}", err), (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_onnxruntime_logs_nothing_of_its_own_when_it_cannot_run_a_graph(tmp_path):
    """A graph that fails only when run (a stride of 4 leaves the block shortcut another size) had
    onnxruntime log the error, in colour, over several lines on the process's stderr, before
    bnncc's own line; a subprocess, since its log goes to file descriptor 2."""
    import subprocess
    import sys

    model = tiny_poke_model()
    next(n for n in model.graph if n.op_type == "PokeConv").attributes["strides"] = ir.AttrInt64s("strides", [4, 4])
    ir.save(attach_functions(model), tmp_path / "bad.onnx")
    done = subprocess.run([sys.executable, "-m", "bnncc", "ace", str(tmp_path / "bad.onnx")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "onnxruntime, the reference, cannot run this graph" in done.stderr


def test_onnxruntime_runs_a_graph_once_a_process(tmp_path, monkeypatch):
    """convert reads each stage's graph twice (its ACE, then compile): the seconds onnxruntime takes
    on a ResNet-50 are spent once for the same bytes, and again for a graph that differs."""
    import onnxruntime

    from bnncc import frontend

    sessions = []
    real = onnxruntime.InferenceSession

    def counted(*args, **kwargs):
        sessions.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(frontend, "_REFERENCE_RAN", set(), raising=False)
    monkeypatch.setattr(onnxruntime, "InferenceSession", counted)
    model = tiny_poke_model()
    ir.save(attach_functions(model), tmp_path / "a.onnx")
    for _ in range(2):
        frontend.read_pokebnn(tmp_path / "a.onnx", "compile")
    assert len(sessions) == 1
    _set(model, "stem.bound", 2.5)
    frontend.read_pokebnn(model, "compile")
    assert len(sessions) == 2


def test_an_unknown_op_of_our_domain_is_one_line_naming_it(cli, tmp_path):
    path = tmp_path / "bad.onnx"
    ir.save(attach_functions(tiny_poke_model()), path)
    proto = onnx.load(path)
    next(n for n in proto.graph.node if n.name == "poke").op_type = "PokeConvv"
    onnx.save(proto, path)
    for args in [("ace", path), ("compile", path, "--target", "x86-64", "-o", tmp_path / "lib")]:
        code, _, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "PokeConvv" in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]
