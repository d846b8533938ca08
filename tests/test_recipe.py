"""Recipes: the shipped files load, overrides go through validation, errors name key, value and expectation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bnncc.errors import BnnccError, shown
from bnncc.recipe import TRAIN_SCHEMA, apply_overrides, available_recipes, load_recipe

PASS_ORDER = ["remove_projection_shortcuts", "stride_to_3x3", "width_multiplier", "poke_stem", "poke_conv",
              "int8_head"]
WIDTHS = {"pokebnn_0.5x": 0.5, "pokebnn_0.75x": 0.75, "pokebnn_1x": 1.0, "pokebnn_1.4x": 1.4, "pokebnn_2x": 2.0}
# checked in tests/test_basic_block.py
BASIC_BLOCK_RECIPES = ("resnet18_pokebnn", "resnet34_pokebnn", "resnet18_bireal", "resnet34_bireal")


def test_shipped_recipes():
    assert sorted(available_recipes()) == sorted([*WIDTHS, *BASIC_BLOCK_RECIPES])
    assert available_recipes()[:5] == ["pokebnn_0.5x", "pokebnn_0.75x", "pokebnn_1x", "pokebnn_1.4x", "pokebnn_2x"]
    for name, width in WIDTHS.items():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.blocks == "bottleneck"
        assert [n for n, _ in recipe.passes] == PASS_ORDER
        assert recipe.params("width_multiplier")["multiplier"] == width
        assert recipe.params("poke_stem") == {"mid_channels": 32, "w_bits": 8, "a_bits": 8, "seed": 0}
        assert recipe.params("poke_conv")["clip_bound"] == 3.0
        assert (recipe.params("poke_conv")["se_w_bits"], recipe.params("poke_conv")["se_a_bits"]) == (4, 4)
        assert recipe.params("int8_head") == {"w_bits": 8, "a_bits": 8}
        assert set(recipe.train) == set(TRAIN_SCHEMA)
        assert (recipe.train["lr"], recipe.train["weight_decay"]) == (2e-5, 5e-5)


def test_overrides_are_typed_by_the_schema():
    recipe = load_recipe("pokebnn_1x", ["passes.width_multiplier.multiplier=2", "train.lr = 1e-4",
                                        "description=a bare word string"])
    multiplier = recipe.params("width_multiplier")["multiplier"]
    assert multiplier == 2.0 and isinstance(multiplier, float)
    assert recipe.train["lr"] == 1e-4
    assert recipe.description == "a bare word string"
    assert load_recipe("pokebnn_1x", ["blocks=basic"]).blocks == "basic"
    # the same through an already-loaded recipe; the original is untouched
    base = load_recipe("pokebnn_1x")
    changed = apply_overrides(base, ["passes.poke_stem.mid_channels=16"])
    assert changed.params("poke_stem")["mid_channels"] == 16
    assert base.params("poke_stem")["mid_channels"] == 32


def test_the_clip_bound_is_set_in_one_place():
    """B is the graph's: the poke_conv parameter alone sets it; no [train] key repeats it."""
    recipe = load_recipe("pokebnn_1x", ["passes.poke_conv.clip_bound=2.0"])
    assert recipe.params("poke_conv")["clip_bound"] == 2.0 and "clip_bound" not in recipe.train
    assert "clip_bound" not in TRAIN_SCHEMA


def test_a_user_recipe_with_train_clip_bound_is_told_where_b_went(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text('[[passes]]\nname = "poke_conv"\nclip_bound = 2.0\n\n[train]\nclip_bound = 2.0\n')
    with pytest.raises(BnnccError, match=r"old.toml: train.clip_bound: B is not a training setting"):
        load_recipe(path)


def test_recipe_from_a_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[[passes]]\nname = "poke_conv"\nclip_bound = 1.0\n')
    recipe = load_recipe(path)
    assert recipe.name == "mine" and recipe.passes == (("poke_conv", {"clip_bound": 1.0}),) and recipe.train == {}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["passes.poke_conv.clip_bound=abc"], "passes.poke_conv.clip_bound = 'abc': expected a number"),
        (["passes.poke_stem.mid_channels=2.5"], "passes.poke_stem.mid_channels = 2.5: expected an integer"),
        (["passes.poke_stem.w_bits=true"], "passes.poke_stem.w_bits = True: expected an integer"),
        (["passes.poke_conv.bits=4"], "passes.poke_conv.bits: unknown parameter; expected clip_bound, se_gate, se_ratio"),
        (["passes.width_multiplier.multiplier=0"],
         "pokebnn_1x.toml: passes.width_multiplier.multiplier must be above 0 and at most 4, got 0.0"),
        (["passes.fold_batchnorm.x=1"], "--set passes.fold_batchnorm.x: pokebnn_1x.toml names no such pass"),
        (["train.momentum=0.9"], "train.momentum: unknown key; expected lr, batch_size"),
        (["train.epochs=1.5"], "train.epochs = 1.5: expected an integer"),
        (["train.clip_bound=2.0"], "pokebnn_1x.toml: train.clip_bound: B is not a training setting but the "
                                   "graph's: set passes.poke_conv.clip_bound (bnncc finetune --clip-bound overrides "
                                   "a graph's B)"),
        (["model.width=1"], "--set model.width: unknown key"),
        # it swapped the pass: stride_to_3x3 became a second remove_projection_shortcuts without a word
        (["passes.stride_to_3x3.name=remove_projection_shortcuts"],
         "--set passes.stride_to_3x3.name: a pass's name is not a parameter"),
        (["passes.width_multiplier"], "--set 'passes.width_multiplier': expected key=value"),
        (["passes.width_multiplier.multiplier=1e9"], "multiplier must be above 0 and at most 4, got 1000000000.0"),
        (["passes.poke_conv.clip_bound=inf"],
         "passes.poke_conv.clip_bound must be a finite number > 0 in float32, got inf"),
        (["passes.poke_conv.clip_bound=3.4e39"], "clip_bound must be a finite number > 0 in float32, got 3.4e+39"),
        (["passes.poke_conv.clip_bound=1e-50"], "clip_bound must be a finite number > 0 in float32, got 1e-50"),
        (["passes.poke_conv.seed=-1"], "passes.poke_conv.seed must be >= 0, got -1"),
        (["passes.poke_stem.seed=-1"], "passes.poke_stem.seed must be >= 0, got -1"),
        (["passes.int8_head.w_bits=16"], "passes.int8_head.w_bits must be 2 to 8"),
        (["train.lr=-1"], "train.lr = -1: expected a finite number > 0"),
        (["train.lr=nan"], "train.lr = nan: expected a finite number > 0"),
        (["train.batch_size=0"], "train.batch_size = 0: expected a finite number >= 1"),
        (["train.weight_decay=-0.1"], "train.weight_decay = -0.1: expected a finite number >= 0"),
        # the run's first 50/40 epochs in float weights: it never binarized them, without a word
        (["train.epochs=40"], "train.weight_quant_start = 50: the epoch the weights turn binary must be below "
                              "train.epochs = 40"),
        (["train.weight_quant_start=800"], "train.weight_quant_start = 800: the epoch the weights turn binary"),
        # the bounds were never calibrated, said only by compile's warning after the whole fine-tune
        (["train.act_calibration_step=124800"], "train.act_calibration_step = 124800: the step the activation "
                                                "bounds are calibrated at must be below the run's 124,800 steps "
                                                "(train.epochs = 800 times 156: ImageNet's 1,281,167 images in "
                                                "batches of train.batch_size = 8192)"),
        (["train.batch_size=1281167", "train.act_calibration_step=800"], "must be below the run's 800 steps"),
        # float() of an integer of 401 digits: an 'unexpected' OverflowError
        (["passes.poke_conv.clip_bound=1" + "0" * 400], "0: expected a number within a float's range"),
        (["train.lr=1" + "0" * 400], "train.lr = 1000"),
        # isfinite() of an integer past a float's range: an 'unexpected' OverflowError; past int64 no loader holds it
        (["train.batch_size=1" + "0" * 400], "train.batch_size = 1000"),
        (["train.epochs=" + str(2**63)],
         f"train.epochs = {2**63}: expected a finite number >= 1 (an integer below 2**63)"),
        # tomllib's int() refuses more than 4300 digits with a ValueError, not a TOMLDecodeError
        (["train.lr=" + "1" * 5000], "train.lr = '1111"),
        # tomllib recursed into 1000 nested arrays until Python's stack limit: an 'unexpected' RecursionError
        (["train.lr=" + "[" * 1000], "train.lr = '[[[["),
        # the text after a newline was read as more TOML and dropped: this gave clip_bound 2.0
        (["passes.poke_conv.clip_bound=2\nseed = 5"],
         "passes.poke_conv.clip_bound = '2\\nseed = 5': expected a number"),
    ],
)
def test_bad_overrides_name_the_key_value_and_expectation(overrides, message):
    with pytest.raises(BnnccError) as info:
        load_recipe("pokebnn_1x", overrides)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[passes]]\nname = "no_such_pass"\n', "passes[0].name: unknown pass 'no_such_pass'"),
        ('passes = "poke_conv"\n', "passes = 'poke_conv': expected a non-empty array of tables"),
        ('width = 1.0\n[[passes]]\nname = "poke_conv"\n', "unknown key 'width'"),
        ('[[passes]]\nname = "poke_conv"\nseed = ' + "1" * 5000 + "\n",
         "not valid TOML: Exceeds the limit (4300 digits)"),
        ('blocks = "resnet50"\n[[passes]]\nname = "poke_conv"\n',
         "blocks = 'resnet50': expected one of 'bottleneck', 'basic'"),
        ('[[passes]]\nname = "poke_conv"\n[train]\nlr = "fast"\n', "train.lr = 'fast': expected a number"),
        ('[[passes]]\nname = "poke_conv"\n[train]\nweight_quant_start = 5\n',
         "train.weight_quant_start = 5: the epoch the weights turn binary must be below train.epochs = 1 (unset)"),
        ('[[passes]]\nname = "poke_conv"\n[train]\nact_calibration_step = 156\n',
         "train.act_calibration_step = 156: the step the activation bounds are calibrated at must be below the "
         "run's 156 steps (train.epochs = 1 (unset) times 156: ImageNet's 1,281,167 images in batches of "
         "train.batch_size = 8192 (unset, as in the paper))"),
        ("[[passes]\n", "not valid TOML"),
        ("x = " + "[" * 1000 + "]" * 1000 + "\n", "not valid TOML: arrays or inline tables nested too deeply"),
        ('[[passes]]\nname = "set_opset"\nversion = 99\n', "passes.set_opset.version must be one of 9 to 28, got 99"),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(BnnccError) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and message in str(info.value)


@pytest.mark.parametrize("line, message", [
    # a table nested deeper than an error shows (2000 deep, from Python: "unexpected RecursionError" while its
    # repr was built, tests/test_passes_canonical.py)
    ("clip_bound." + ".".join(["a"] * 15) + " = 1", "passes.poke_conv.clip_bound = {'a': {'a': {'a': {...}}}}: "
                                                    "expected a number"),
    # a long string or list was printed whole: an error line of 500 kB
    ('clip_bound = "' + "x" * 500_000 + '"', "passes.poke_conv.clip_bound = 'xxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxx"),
    ("clip_bound = [" + "1, " * 100_000 + "]", "passes.poke_conv.clip_bound = [1, 1, 1, 1, 1, 1, 1, 1, ...]: "),
])
def test_a_deep_or_long_value_is_shown_short_in_its_one_line_error(tmp_path, line, message):
    path = tmp_path / "big.toml"
    path.write_text(f'[[passes]]\nname = "poke_conv"\n{line}\n[train]\n{line.replace("clip_bound", "lr")}\n')
    with pytest.raises(BnnccError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: {message}") and len(str(info.value)) < len(str(path)) + 150
    with pytest.raises(BnnccError) as info:  # the [train] table alike
        load_recipe(path, ["passes.poke_conv.clip_bound=3.0"])
    assert str(info.value).startswith(f"{path}: {message.replace('passes.poke_conv.clip_bound', 'train.lr')}")


@pytest.mark.parametrize("text, shown", [("", "None"), ('[passes]\nname = "poke_conv"\n', "{'name': 'poke_conv'}")])
def test_a_pass_override_on_a_file_without_passes_names_what_the_file_lacks(tmp_path, text, shown):
    """An empty file with --set passes.poke_stem.mid_channels=8: "empty.toml names no such pass; its passes are "."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for overrides in ([], ["passes.poke_stem.mid_channels=8"]):
        with pytest.raises(BnnccError) as info:
            load_recipe(path, overrides)
        assert str(info.value) == f"{path}: passes = {shown}: expected a non-empty array of tables ([[passes]])"


def test_a_dotted_key_of_many_parts_is_refused_before_parsing(tmp_path):
    """tomllib's time grows with the square of a dotted key's depth: 8000 parts took 4 s, a 1 MiB line
    a.a.a... would take hours. A run of more than 16 parts is refused unparsed, in a file or an override."""
    path = tmp_path / "deep.toml"
    path.write_text(".".join(["a"] * 4000) + ' = 1\n[[passes]]\nname = "int8_head"\n')
    with pytest.raises(BnnccError) as info:
        load_recipe(path)
    assert str(info.value) == (f"{path}: a dotted key more than 16 parts long (a.b.c...); a recipe's keys are at "
                               f"most 3 deep")
    with pytest.raises(BnnccError, match=r"train.lr = '\{a.a.a.a.*': expected a number"):
        load_recipe("pokebnn_1x", ["train.lr={" + ".".join(["a"] * 4000) + " = 1}"])
    path.write_text("a" + ' . "a"' * 15 + ' = 1\n[[passes]]\nname = "int8_head"\n')  # 16 parts: parsed
    with pytest.raises(BnnccError, match="unknown key 'a'"):
        load_recipe(path)


def test_unknown_recipe_lists_the_shipped_ones(tmp_path):
    with pytest.raises(BnnccError, match="unknown recipe 'pokebnn_3x'; shipped recipes: pokebnn_0.5x"):
        load_recipe("pokebnn_3x")
    with pytest.raises(BnnccError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.toml")


def test_a_recipe_name_is_a_shipped_one_not_a_path_from_their_folder(tmp_path, monkeypatch):
    """A name that is no file here was looked up beside the shipped recipes: "../x" read any x.toml the
    package's folder leads to, as if it were shipped."""
    from importlib import resources

    mine = tmp_path / "mine.toml"
    mine.write_text('[[passes]]\nname = "int8_head"\n')
    monkeypatch.chdir(tmp_path / "..")  # where neither name is a file
    shipped = resources.files("bnncc.recipes")
    for name in [f"../{shipped.name}/pokebnn_1x", "../" * 40 + str(mine.with_suffix("")).lstrip("/")]:
        with pytest.raises(BnnccError, match=f"^unknown recipe {re.escape(shown(name))}; shipped recipes: "):
            load_recipe(name)
    assert load_recipe(mine).passes == (("int8_head", {}),)  # as a path it is read
    assert load_recipe(Path("pokebnn_1x")).name == "pokebnn_1x"


def test_a_recipe_name_too_long_for_a_path_is_an_error():
    """--recipe "$(cat mine.toml)", the recipe's text for its name: "unexpected OSError: [Errno 36] File name too
    long" (a line of it between two slashes is over 255 bytes)."""
    from importlib import resources

    text = (resources.files("bnncc.recipes") / "pokebnn_1x.toml").read_text().replace("/", " ")
    with pytest.raises(BnnccError) as info:
        load_recipe(text)
    assert str(info.value) == ("unknown recipe '# PokeBNN-1x (Zhang, Zhang,...lation softmax temperature\\n': "
                               "not a shipped recipe's name, nor a path (File name too long)")
    with pytest.raises(BnnccError) as info:  # with its slashes, a path of short parts: not printed whole either
        load_recipe(text.replace(" ", "/"))
    assert str(info.value).startswith("unknown recipe '#/PokeBNN-1x/(Zhang,/Zhang,...") and len(str(info.value)) < 400


def test_a_recipe_file_that_is_not_utf8_is_an_error(tmp_path):
    path = tmp_path / "latin.toml"
    path.write_bytes('# r\xe9sum\xe9\n[[passes]]\nname = "poke_conv"\n'.encode("latin-1"))
    with pytest.raises(BnnccError, match="latin.toml: not a UTF-8 text file"):
        load_recipe(path)


def test_a_recipe_file_that_cannot_be_read_is_an_error(tmp_path):
    """An I/O error (here /proc/self/mem, which fails at offset 0) was an 'unexpected' error."""
    (tmp_path / "r.toml").symlink_to("/proc/self/mem")
    with pytest.raises(BnnccError, match=r"r.toml: cannot read it \(Input/output error\)"):
        load_recipe(tmp_path / "r.toml")


@pytest.mark.parametrize("train, at", [
    ({"epochs": 800, "batch_size": 8192, "act_calibration_step": 7500}, 7500 / (800 * 156)),  # the paper's
    ({"epochs": 800, "act_calibration_step": 7500}, 7500 / (800 * 156)),  # steps of the paper's batch
    ({"epochs": 800, "batch_size": 1024, "act_calibration_step": 7500}, 7500 / (800 * 1251)),  # 1,281,167 // 1024
])
def test_the_calibration_step_counts_batches_of_the_recipes_own_size(train, at):
    from bnncc.train.config import TrainConfig

    assert TrainConfig.from_recipe(train).act_calibration_at == pytest.approx(at)


def test_overrides_given_as_one_string_are_refused_naming_the_list_to_write():
    """A string is iterable: ``rewrite(model, "pokebnn_1x", "train.lr=1e-4")`` was read letter by
    letter and refused as "--set 't': expected key=value", naming an override nobody wrote."""
    for call in (lambda o: load_recipe("pokebnn_1x", o), lambda o: apply_overrides(load_recipe("pokebnn_1x"), o)):
        with pytest.raises(TypeError, match=r"not the string 'train.lr=1e-4'; write \['train.lr=1e-4'\]"):
            call("train.lr=1e-4")
    assert load_recipe("pokebnn_1x", ["train.lr=1e-4"]).train["lr"] == 1e-4


@pytest.mark.parametrize("overrides, message", [
    ({"train.lr": 1e-4}, r"not a dict; write \['train.lr=0.0001'\]"),
    (["train.lr=1e-4", 3], r"overrides are key=value strings, not int 3"),
])
def test_overrides_given_as_a_dict_or_with_a_non_string_are_a_type_error(overrides, message):
    """A dict is iterated as its keys: ``{"train.lr": 1e-4}`` was refused as "--set 'train.lr': expected
    key=value", as if the user had written no value; an int failed inside, "'int' object has no attribute
    'partition'"."""
    for call in (lambda o: load_recipe("pokebnn_1x", o), lambda o: apply_overrides(load_recipe("pokebnn_1x"), o)):
        with pytest.raises(TypeError, match=message):
            call(overrides)
    # what the message says to write is taken
    assert load_recipe("pokebnn_1x", ["train.lr=0.0001"]).train["lr"] == 1e-4


@pytest.mark.parametrize("recipe", [{"name": "mine", "passes": []}, None])
def test_a_recipe_neither_name_nor_path_is_a_type_error_saying_what_is_taken(recipe):
    """A dict (a recipe written inline) or None failed inside pathlib: "expected str, bytes or os.PathLike
    object, not dict", which names neither the recipe nor what it may be."""
    with pytest.raises(TypeError, match=rf"^expected a recipe's shipped name or the path of its .toml file, "
                                        rf"not {type(recipe).__name__}$"):
        load_recipe(recipe)


@pytest.mark.parametrize("passes, shown", [
    (("poke_conv",), "['poke_conv']"),  # a bare name, as PassManager takes it: "too many values to unpack"
    ((("poke_conv", None),), "[('poke_conv', None)]"),  # "'NoneType' object is not a mapping"
    (None, "None"),  # "'NoneType' object is not iterable"
])
def test_a_recipe_object_with_malformed_passes_is_refused_as_its_file_would_be(passes, shown):
    """bnncc.rewrite(model, recipe) validates a Recipe through apply_overrides."""
    import dataclasses

    recipe = dataclasses.replace(load_recipe("pokebnn_1x"), passes=passes)
    with pytest.raises(BnnccError) as info:
        apply_overrides(recipe, [])
    assert str(info.value) == f"pokebnn_1x.toml: passes = {shown}: expected a non-empty array of tables ([[passes]])"
    fixed = dataclasses.replace(recipe, passes=(("poke_conv", {"seed": 1}),))
    assert apply_overrides(fixed, ["passes.poke_conv.seed=2"]).passes == (("poke_conv", {"seed": 2}),)


def test_a_shipped_name_is_the_shipped_recipe_whatever_the_current_folder_holds(tmp_path, monkeypatch):
    """An output folder named after its recipe (bnncc convert ... --recipe pokebnn_0.5x -o pokebnn_0.5x)
    made the next run with that recipe fail: "pokebnn_0.5x: recipe file not found"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pokebnn_0.5x").mkdir()
    (tmp_path / "pokebnn_1x").write_text("not a recipe")
    assert load_recipe("pokebnn_0.5x").params("width_multiplier")["multiplier"] == 0.5
    assert load_recipe("pokebnn_1x").name == "pokebnn_1x"
    mine = tmp_path / "mine"
    mine.write_text('[[passes]]\nname = "poke_conv"\n')
    assert load_recipe("mine").name == "mine"  # a path without .toml is still read
    with pytest.raises(BnnccError, match="not valid TOML"):
        load_recipe("./pokebnn_1x")  # a path that names the file


def test_a_recipe_path_that_is_not_a_regular_file_says_so(tmp_path):
    """A folder or a FIFO given as the recipe was "recipe file not found", though it is there."""
    import os

    (tmp_path / "dir.toml").mkdir()
    os.mkfifo(tmp_path / "fifo.toml")
    for name in ("dir.toml", "fifo.toml"):
        with pytest.raises(BnnccError) as info:
            load_recipe(tmp_path / name)
        assert str(info.value) == f"{tmp_path / name}: not a regular file; a recipe is a .toml file"


def test_a_recipe_file_larger_than_a_mib_is_refused_unread(tmp_path):
    """A 100 MB file was read whole and parsed: minutes and gigabytes for keys, before any error."""
    path = tmp_path / "huge.toml"
    with path.open("wb") as file:
        file.truncate(100 * 2**20)  # sparse: nothing is written
    with pytest.raises(BnnccError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: larger than 1 MiB; a recipe is a few kB of TOML"
    path.write_text('[[passes]]\nname = "int8_head"\n' + "#" * (2**20 - 40) + "\n")  # up to 1 MiB is read
    assert load_recipe(path).passes == (("int8_head", {}),)


def test_a_recipe_saved_with_a_utf8_byte_order_mark_is_read(tmp_path):
    """Windows editors save UTF-8 with a BOM; tomllib saw it as a character and refused the file with
    "Invalid statement (at line 1, column 1)", where nothing is to be seen."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbf[[passes]]\nname = "int8_head"\nw_bits = 4\n')
    assert load_recipe(path).passes == (("int8_head", {"w_bits": 4}),)
