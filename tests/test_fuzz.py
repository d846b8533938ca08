"""Fuzzing the importer: whatever the file holds, ``load`` + ``recognize`` either succeed or raise a
BnnccError with a one-line message; no other exception (and so no traceback) escapes. A model
they accept goes through a recipe (each case another of the shipped ones) and the cost model
without any error: the front end refuses what the later stages cannot take.

Every case is seeded by its number, so a failure names the case that reproduces it. A base is
a small valid bottleneck ResNet (stem, one projection bottleneck, head) in ONNX text, as torch
exports it or as tf2onnx converts Keras' (every other case); each case mutates it one way: random bytes, truncation, byte flips and insertions, random attribute values,
shapes, element types, opsets, op types, wiring and external data locations.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import pytest

from bnncc.cost import ace
from bnncc.domain import SUPPORTED_OPSETS
from bnncc.errors import BnnccError
from bnncc.frontend import load, recognize
from bnncc.recipe import available_recipes, load_recipe
from bnncc.rewriting import rewrite

BOTTLENECK = """
    c1 = Conv <kernel_shape = [1, 1]> (p, w1, bias1)
    r1 = Relu (c1)
    c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r1, w2, bias2)
    r2 = Relu (c2)
    c3 = Conv <kernel_shape = [1, 1]> (r2, w3, bias3)
    sc = Conv <kernel_shape = [1, 1]> (p, wp, biasp)
    a = Add (c3, sc)
    ar = Relu (a)
    gp = GlobalAveragePool (ar)
"""
# the bases: as torch exports a ResNet, and as tf2onnx converts a Keras one (an NHWC input, a
# biased stem conv with its batch norm as Mul and Add, a Pad before the max pool, Squeeze, MatMul)
BASES = {
    "torch": """
<ir_version: 8, opset_import: ["" : 13]>
net (float[1,3,16,16] x) => (float[1,5] y) {
    s = Conv <kernel_shape = [7, 7], strides = [2, 2], pads = [3, 3, 3, 3]> (x, w_stem)
    sb = BatchNormalization <epsilon = 0.00001> (s, g0, b0, m0, v0)
    sr = Relu (sb)
    p = MaxPool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (sr)""" + BOTTLENECK + """
    f = Flatten <axis = 1> (gp)
    y = Gemm <transB = 1> (f, wfc, bfc)
}
""",
    "keras": """
<ir_version: 8, opset_import: ["" : 13]>
net (float[1,16,16,3] xh) => (float[1,5] y) {
    x = Transpose <perm = [0, 3, 1, 2]> (xh)
    s = Conv <kernel_shape = [7, 7], strides = [2, 2], pads = [3, 3, 3, 3]> (x, w_stem, bias_stem)
    sm = Mul (s, scale0)
    sb = Add (sm, shift0)
    sr = Relu (sb)
    pool_pads = Constant <value = int64[8] {0, 0, 1, 1, 0, 0, 1, 1}> ()
    sp = Pad (sr, pool_pads)
    p = MaxPool <kernel_shape = [3, 3], strides = [2, 2]> (sp)""" + BOTTLENECK + """
    unit_axes = Constant <value = int64[2] {2, 3}> ()
    f = Squeeze (gp, unit_axes)
    m = MatMul (f, wfc_t)
    y = Add (m, bfc)
}
""",
}
# The bottleneck is 16 wide so that every recipe's width still leaves an SE channel (se_ratio 8).
BLOCK_SHAPES = {"w_stem": (8, 3, 7, 7), "w1": (16, 8, 1, 1), "bias1": (16,), "w2": (16, 16, 3, 3), "bias2": (16,),
                "w3": (64, 16, 1, 1), "bias3": (64,), "wp": (64, 8, 1, 1), "biasp": (64,), "bfc": (5,)}
SHAPES = {"torch": {**BLOCK_SHAPES, "g0": (8,), "b0": (8,), "m0": (8,), "v0": (8,), "wfc": (5, 64)},
          "keras": {**BLOCK_SHAPES, "bias_stem": (8,), "scale0": (1, 8, 1, 1), "shift0": (1, 8, 1, 1),
                    "wfc_t": (64, 5)}}
OP_TYPES = ("Conv", "Relu", "Add", "Sum", "MatMul", "Gemm", "Sigmoid", "Reshape", "Identity", "Softmax",
            "BatchNormalization", "GlobalAveragePool", "ReduceMean", "MaxPool", "Flatten", "NoSuchOp")
FAST_CASES, SLOW_CASES = 300, 3000
# the recipes for the base model's bottleneck block (a recipe for basic blocks refuses it)
RECIPES = [name for name in available_recipes() if load_recipe(name).blocks == "bottleneck"]
# PokeInit's middle width must divide the stem's (8 here; the recipes' 32 is for ResNet-50's 64).
RECIPE_OVERRIDES = ("passes.poke_stem.mid_channels=8",)
DATA_FILE = "weights.bin"  # 256 random bytes that run_cases writes beside every case
LIGHT_RESNET50 = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"


def base_model(kind: str = "torch") -> onnx.ModelProto:
    model = onnx.parser.parse_model(BASES[kind])
    rng = np.random.default_rng(0)
    for name, shape in SHAPES[kind].items():
        data = rng.uniform(0.5, 1.5, shape) if name.startswith("v") else rng.normal(0, 0.3, shape)
        model.graph.initializer.append(onnx.numpy_helper.from_array(data.astype(np.float32), name))
    return model


# --------------------------------------------------------------------------- mutations on bytes


def random_bytes(rng, data: bytes) -> bytes:
    return rng.bytes(int(rng.integers(0, 4096)))


def truncate(rng, data: bytes) -> bytes:
    return data[:int(rng.integers(0, len(data)))]


def flip_bytes(rng, data: bytes) -> bytes:
    out = bytearray(data)
    for i in rng.integers(0, len(out), int(rng.integers(1, 9))):
        out[i] = int(rng.integers(0, 256))
    return bytes(out)


def insert_bytes(rng, data: bytes) -> bytes:
    at = int(rng.integers(0, len(data)))
    return data[:at] + rng.bytes(int(rng.integers(1, 64))) + data[at:]


# --------------------------------------------------------------------------- mutations on the proto


def _random_ints(rng) -> list[int]:
    return [int(v) for v in rng.integers(-3, 10, int(rng.integers(0, 5)))]


def mutate_attribute(rng, model: onnx.ModelProto) -> None:
    """A random value of the attribute's own type (or a new attribute) on a random node."""
    node = model.graph.node[int(rng.integers(len(model.graph.node)))]
    names = [a.name for a in node.attribute] + ["kernel_shape", "strides", "pads", "dilations", "group", "axis",
                                                "epsilon", "transA", "transB", "alpha", "auto_pad", "ceil_mode"]
    name = names[int(rng.integers(len(names)))]
    del node.attribute[:]  # keep it simple: the node carries only the mutated attribute
    kind = rng.integers(4)
    if kind == 0:
        value = _random_ints(rng)
    elif kind == 1:
        value = int(rng.integers(-3, 10))
    elif kind == 2:
        value = float(rng.choice([np.nan, np.inf, -1.0, 0.0, 1e30, rng.normal()]))
    else:
        value = str(rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET", "", "x"]))
    attr_type = onnx.AttributeProto.INTS if isinstance(value, list) else None  # an empty list has no element type
    node.attribute.append(onnx.helper.make_attribute(name, value, attr_type=attr_type))


def mutate_shape(rng, model: onnx.ModelProto) -> None:
    """New dims for the input, the output or an initializer (whose data then no longer fits)."""
    dims = [int(d) for d in rng.integers(-1, 20, int(rng.integers(0, 6)))]
    where = rng.integers(3)
    if where == 2:
        tensor = model.graph.initializer[int(rng.integers(len(model.graph.initializer)))]
        del tensor.dims[:]
        tensor.dims.extend(dims)
        return
    value = model.graph.input[0] if where == 0 else model.graph.output[0]
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if d < 0:
            dim.dim_param = "n"
        else:
            dim.dim_value = d


def mutate_elem_type(rng, model: onnx.ModelProto) -> None:
    elem = int(rng.choice([onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64, onnx.TensorProto.DOUBLE,
                           onnx.TensorProto.STRING, onnx.TensorProto.BOOL, 0]))
    if rng.integers(2):
        model.graph.input[0].type.tensor_type.elem_type = elem
    else:
        model.graph.initializer[int(rng.integers(len(model.graph.initializer)))].data_type = elem


def mutate_opset(rng, model: onnx.ModelProto) -> None:
    model.opset_import[0].version = int(rng.integers(-1, 30))
    if rng.integers(2):
        model.ir_version = int(rng.integers(-1, 15))


def mutate_op_type(rng, model: onnx.ModelProto) -> None:
    node = model.graph.node[int(rng.integers(len(model.graph.node)))]
    node.op_type = str(rng.choice(OP_TYPES))
    if rng.integers(4) == 0:
        node.domain = "com.example"


def mutate_wiring(rng, model: onnx.ModelProto) -> None:
    """Point a node input at another value, an unknown name or nothing; or drop a node or an initializer."""
    graph = model.graph
    names = [v for n in graph.node for v in n.output] + [i.name for i in graph.initializer] + ["x", "missing", ""]
    kind = rng.integers(3)
    if kind == 0:
        node = graph.node[int(rng.integers(len(graph.node)))]
        if node.input:
            node.input[int(rng.integers(len(node.input)))] = str(rng.choice(names))
    elif kind == 1:
        del graph.node[int(rng.integers(len(graph.node)))]
    else:
        del graph.initializer[int(rng.integers(len(graph.initializer)))]


def mutate_external_data(rng, model: onnx.ModelProto) -> None:
    """Move an initializer's data out of the file to a hostile or broken location: longer than a file
    name may be, outside the folder, absent, a folder, or DATA_FILE at a random offset and length."""
    tensor = model.graph.initializer[int(rng.integers(len(model.graph.initializer)))]
    locations = ["x" * int(rng.integers(256, 5000)), "../outside.bin", "/etc/hostname", "missing.bin", "",
                 ".", "sub/../../x", DATA_FILE]
    location = locations[int(rng.integers(len(locations)))]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    if location == DATA_FILE:
        tensor.external_data.add(key="offset", value=str(int(rng.integers(-8, 300))))
        tensor.external_data.add(key="length", value=str(int(rng.integers(-8, 300))))


BYTE_MUTATIONS = (random_bytes, truncate, flip_bytes, insert_bytes)
PROTO_MUTATIONS = (mutate_attribute, mutate_shape, mutate_elem_type, mutate_opset, mutate_op_type, mutate_wiring,
                   mutate_external_data)


def make_case(case: int, base: onnx.ModelProto) -> tuple[str, bytes]:
    """(mutation names, file bytes) of case number ``case``: 1-3 proto mutations, or one byte mutation."""
    rng = np.random.default_rng(case)
    if case % 3 == 0:
        mutation = BYTE_MUTATIONS[int(rng.integers(len(BYTE_MUTATIONS)))]
        return mutation.__name__, mutation(rng, base.SerializeToString())
    model = onnx.ModelProto()
    model.CopyFrom(base)
    applied = []
    for _ in range(int(rng.integers(1, 4))):
        mutation = PROTO_MUTATIONS[int(rng.integers(len(PROTO_MUTATIONS)))]
        mutation(rng, model)
        applied.append(mutation.__name__)
    return "+".join(applied), model.SerializeToString()


def run_cases(cases: range, tmp_path, caplog, every_recipe: bool = False) -> dict[str, int]:
    """Import every case; rewrite an accepted one with one recipe (``every_recipe``: each of them)
    and measure it; return the outcome counts. Fails on the first exception that is not a
    one-line BnnccError from the importer, any error after it, or the first log record that
    carries a traceback, naming the case number and its mutations."""
    bases = [base_model(kind) for kind in BASES]
    outcomes = {"recognized": 0, "BnnccError": 0}
    path = tmp_path / "case.onnx"
    (tmp_path / DATA_FILE).write_bytes(np.random.default_rng(0).bytes(256))
    for case in cases:
        mutations, data = make_case(case, bases[case % len(bases)])
        path.write_bytes(data)
        caplog.clear()
        try:
            recognize(load(path))
            outcomes["recognized"] += 1
            for recipe in RECIPES if every_recipe else [RECIPES[case % len(RECIPES)]]:
                _rewrite_and_measure(path, recipe, f"case {case} ({mutations})")
        except BnnccError as e:
            message = str(e)
            assert message and "\n" not in message, f"case {case} ({mutations}): message not one line: {message!r}"
            outcomes["BnnccError"] += 1
        except Exception as e:  # noqa: BLE001 (the point of the test: name any other exception)
            pytest.fail(f"case {case} ({mutations}): {type(e).__name__} escaped the importer: {e}")
        logged = [r.getMessage() for r in caplog.records if r.exc_info]
        assert not logged, f"case {case} ({mutations}): a traceback was logged: {logged[0]}"
    return outcomes


def _rewrite_and_measure(path: Path, recipe: str, case: str) -> None:
    try:
        poke, _ = rewrite(load(path), recipe, RECIPE_OVERRIDES)
        ace(poke)
    except Exception as e:  # noqa: BLE001 (an accepted model must go through; name whatever stops it)
        pytest.fail(f"{case}: accepted by the front end, but recipe {recipe} failed: {type(e).__name__}: {e}")


@pytest.mark.parametrize("kind", BASES)
def test_the_base_model_imports_and_is_recognized(tmp_path, kind):
    path = tmp_path / "base.onnx"
    onnx.save(base_model(kind), path)
    resnet = recognize(load(path))
    assert len([b for stage in resnet.stages for b in stage]) == 1


def _report(cases: int, outcomes: dict[str, int], capsys) -> None:
    with capsys.disabled():
        print(f"\nfuzz: {cases} importer cases: {outcomes}")


def test_fuzz_importer(tmp_path, capsys, caplog):
    outcomes = run_cases(range(FAST_CASES), tmp_path, caplog)
    _report(FAST_CASES, outcomes, capsys)
    assert sum(outcomes.values()) == FAST_CASES
    assert outcomes["BnnccError"] > FAST_CASES // 2  # the mutations do break the model most of the time


@pytest.mark.slow
def test_fuzz_importer_many(tmp_path, capsys, caplog):
    outcomes = run_cases(range(FAST_CASES, FAST_CASES + SLOW_CASES), tmp_path, caplog, every_recipe=True)
    _report(SLOW_CASES, outcomes, capsys)
    assert sum(outcomes.values()) == SLOW_CASES


# --------------------------------------------------------------------------- the escapes the fuzzing found


@pytest.mark.parametrize("version", [0, 29, 999])
def test_an_unsupported_opset_is_refused(tmp_path, version):
    """light_resnet50 (IR version 3) relabelled to an opset the canonicalization does not know used to
    pass the front end and fail inside the rewrite."""
    model = onnx.load(str(LIGHT_RESNET50))
    model.opset_import[0].version = version
    onnx.save(model, tmp_path / "light.onnx")
    with pytest.raises(BnnccError) as error:
        load(tmp_path / "light.onnx")
    assert str(error.value) == f"{tmp_path / 'light.onnx'}: opset {version}; bnncc reads float models of opsets 1 to 28"


@pytest.mark.slow
def test_light_resnet50_is_the_same_model_at_every_supported_opset(tmp_path):
    """Relabelled to any opset the front end takes, light_resnet50 gives the same canonical model,
    and every recipe rewrites that into a valid graph (``rewrite`` runs the checker)."""
    model = onnx.load(str(LIGHT_RESNET50))
    canonical = set()
    for version in SUPPORTED_OPSETS:
        model.opset_import[0].version = version
        onnx.save(model, tmp_path / "light.onnx")
        canonical.add(ir.to_proto(load(tmp_path / "light.onnx")).SerializeToString())
    assert len(canonical) == 1
    for recipe in RECIPES:
        poke, _ = rewrite(load(tmp_path / "light.onnx"), recipe)
        assert ace(poke).total < ace(load(tmp_path / "light.onnx")).total


def test_a_too_long_external_data_location_is_refused(tmp_path):
    model = base_model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="x" * 300)
    onnx.save(model, tmp_path / "long.onnx")
    with pytest.raises(BnnccError) as error:
        load(tmp_path / "long.onnx")
    assert str(error.value) == (f"{tmp_path / 'long.onnx'}: tensor 'w_stem': its external data location "
                                "(300 characters) cannot be opened: File name too long")


def test_external_data_naming_its_location_twice_is_refused(tmp_path):
    """Case 4019: bnncc checked the first location, onnx read the last (empty), and its
    ValidationError escaped the importer."""
    model = base_model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    (tmp_path / DATA_FILE).write_bytes(bytes(8 * 3 * 7 * 7 * 4))
    tensor.external_data.add(key="location", value=DATA_FILE)
    tensor.external_data.add(key="location", value="")
    onnx.save(model, tmp_path / "twice.onnx")
    with pytest.raises(BnnccError) as error:
        load(tmp_path / "twice.onnx")
    assert str(error.value) == (f"{tmp_path / 'twice.onnx'}: tensor 'w_stem': its external data names a key "
                                "twice (location)")


# --------------------------------------------------------------------------- safe loading, by reading the code

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("bnncc", "passes", "targets", "bench") for p in (ROOT / folder).rglob("*.py"))
UNSAFE_MODULES = {"pickle", "dill", "yaml", "toml", "tomli", "marshal", "shelve"}


def _calls(tree, owner: str, attr: str):
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == attr and isinstance(node.func.value, ast.Name) and node.func.value.id == owner]


def _keyword_is_true(call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def test_code_loads_nothing_unsafely():
    """torch.load only with weights_only=True, np.load never with allow_pickle=True, no pickle/yaml/toml
    modules (recipes are parsed with tomllib), no eval/exec."""
    assert len(SOURCES) > 20
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        where = path.relative_to(ROOT)
        problems += [f"{where}:{c.lineno}: torch.load without weights_only=True" for c in _calls(tree, "torch", "load")
                     if not _keyword_is_true(c, "weights_only")]
        problems += [f"{where}:{c.lineno}: np.load with allow_pickle=True" for c in _calls(tree, "np", "load")
                     if _keyword_is_true(c, "allow_pickle")]
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            problems += [f"{where}:{node.lineno}: imports {m}" for m in modules if m.split(".")[0] in UNSAFE_MODULES]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                problems.append(f"{where}:{node.lineno}: calls {node.func.id}")
    assert not problems, "\n".join(problems)
    recipe_source = (ROOT / "bnncc" / "recipe.py").read_text(encoding="utf-8")
    assert "import tomllib" in recipe_source and "tomllib.loads" in recipe_source
