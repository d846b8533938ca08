import os
import subprocess
import sys

import pytest

from bnncc.cli._app import app
from bnncc.errors import BnnccError


def test_version_lists_dependencies(cli):
    code, out, _ = cli("version")
    assert code == 0
    assert "bnncc 0.1.0" in out and "onnxruntime" in out


def test_version_option_prints_bnncc_s_version(cli):
    """`bnncc --version` was "No such option", exit 2: the spelling a script tries first."""
    import bnncc

    assert cli("--version") == (0, f"bnncc {bnncc.__version__}\n", "")


def test_unknown_command_is_a_usage_error(cli):
    code, _, err = cli("no-such-command")
    assert code == 2
    assert "no-such-command" in err


def test_bnncc_error_is_one_line_and_exit_2(cli):
    @app.command("_raise-for-test", hidden=True)
    def _raise() -> None:
        raise BnnccError("model.onnx: node 'x' (Conv): broken")

    code, out, err = cli("_raise-for-test")
    assert code == 2
    assert err.strip() == "error: model.onnx: node 'x' (Conv): broken"
    assert "Traceback" not in err


def test_usage_error_is_one_line_and_exit_2(cli):
    code, _, err = cli("run", "somewhere", "--top", "abc")
    assert code == 2
    assert err.strip().splitlines() == [
        "error: Invalid value for '--top' / '-k': Input should be a valid integer, unable to parse string as an "
        "integer (see `bnncc run --help`)"]


def test_out_of_range_option_is_a_usage_error(cli):
    code, _, err = cli("verify", "somewhere", "--n", "0")
    assert code == 2 and "Input should be greater than or equal to 1" in err


def test_ctrl_c_in_python_code_is_one_line_and_exit_130(cli):
    """typer turns a KeyboardInterrupt into a silent exit 130: Ctrl-C during a rewrite or a fine-tune
    ended the run with no word of why (only one inside TVM's compiler said "interrupted")."""
    @app.command("_interrupt-for-test", hidden=True)
    def _interrupt() -> None:
        raise KeyboardInterrupt

    code, out, err = cli("_interrupt-for-test")
    assert (code, out, err) == (130, "", "error: interrupted\n")


def test_unexpected_exception_is_one_line_and_exit_1(cli, monkeypatch):
    @app.command("_crash-for-test", hidden=True)
    def _crash() -> None:
        raise ValueError("deep inside\nsecond line")

    monkeypatch.delenv("BNNCC_DEBUG", raising=False)
    code, _, err = cli("_crash-for-test")
    assert code == 1
    assert err.strip() == "error: unexpected ValueError: deep inside (BNNCC_DEBUG=1 shows the traceback)"


def test_bnncc_debug_adds_the_traceback_to_the_line(cli, monkeypatch):
    """BNNCC_DEBUG=1 re-raised, and for TVM's errors its exception hook printed only a note: no
    traceback and no error line."""
    @app.command("_crash-for-debug", hidden=True)
    def _crash() -> None:
        raise ValueError("deep inside")

    monkeypatch.setenv("BNNCC_DEBUG", "1")
    code, _, err = cli("_crash-for-debug")
    assert code == 1
    assert err.startswith("Traceback (most recent call last):") and 'raise ValueError("deep inside")' in err
    assert err.strip().splitlines()[-1] == "error: unexpected ValueError: deep inside"


def test_rewrite_refuses_to_write_over_its_input(cli, tmp_path, resnet50_onnx):
    import shutil

    model = shutil.copy(resnet50_onnx["light"], tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    code, _, err = cli("rewrite", model, "-o", model)
    assert code == 2 and "is the input model" in err
    assert (tmp_path / "m.onnx").read_bytes() == before


def test_rewrite_prints_the_exact_ace_after_each_pass(cli, tmp_path):
    """The table gave ACE as "9.25e+11" beside "9.548e+11": neither `bnncc ace`'s exact figure nor one
    precision."""
    import onnx
    from test_fuzz import base_model

    from bnncc.cost import ace

    onnx.save(base_model(), tmp_path / "small.onnx")
    code, out, err = cli("rewrite", tmp_path / "small.onnx", "-o", tmp_path / "poke.onnx",
                         "--set", "passes.poke_stem.mid_channels=8")
    assert code == 0, err
    rows = {line.split("│")[1].strip(): line.split("│")[-2].strip() for line in out.splitlines() if "│" in line}
    # the float input by hand (as test_cost's test_cli_table): conv and fc MACs at 16 x 16 bits
    macs = 8 * 8 * 8 * (7 * 7 * 3) + 4 * 4 * (8 * 16 + 9 * 16 * 16 + 16 * 64 + 8 * 64) + 64 * 5
    assert (rows["input"], rows["int8_head"]) == (f"{macs * 256:,}", f"{ace(tmp_path / 'poke.onnx').total:,}")


def test_rewrite_to_a_folder_is_an_error(cli, tmp_path, resnet50_onnx):
    code, _, err = cli("rewrite", resnet50_onnx["light"], "-o", tmp_path)
    assert code == 2 and "is a folder; expected the path of a file to write" in err


@pytest.mark.parametrize("command", ["rewrite", "export"])
def test_an_output_whose_folder_is_a_file_is_refused_before_any_work(cli, tmp_path, monkeypatch, command):
    """The README promises it; rewrite and export found out only when writing, after the work."""
    import bnncc.qonnx
    import bnncc.rewriting

    def no_work(*args, **kwargs):
        raise AssertionError("the work began")

    monkeypatch.setattr(bnncc.rewriting, "rewrite", no_work)
    monkeypatch.setattr(bnncc.qonnx, "export_qonnx", no_work)
    (tmp_path / "file").write_text("")
    code, _, err = cli(command, tmp_path / "model.onnx", "-o", tmp_path / "file" / "out.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "out.onnx: cannot write there" in err, err


def test_an_option_has_the_same_short_form_in_every_command():
    """`finetune --recipe` had no -r (rewrite's and convert's have) and `export --batch` no -b
    (compile's and verify's have): `-r pokebnn_1x` or `-b 8` copied from one command failed in another."""
    import typer.main

    shorts = {"--output": "-o", "--recipe": "-r", "--target": "-t", "--batch": "-b", "--input": "-i"}
    missing = [(name, long) for name, command in typer.main.get_command(app).commands.items()
               for param in command.params for long in param.opts if long in shorts and shorts[long] not in param.opts]
    assert missing == []


def test_an_option_has_the_same_range_in_every_command(cli):
    """`convert --max-steps 0` was refused naming --max-steps, `finetune --max-steps 0` as "training setting
    max_steps = 0", a name the user never typed; train-teacher's help showed no range for --epochs or
    --batch-size, finetune's and convert's showed 1 or more."""
    import typer.main

    ranges = {}
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            for long in param.opts:
                ranges.setdefault(long, set()).add((param.min, param.max))
    assert {long: found for long, found in ranges.items() if len(found) > 1} == {}
    for command in ("finetune", "train-teacher", "convert"):
        code, _, err = cli(command, "--max-steps", "0")
        assert code == 2 and "Invalid value for '--max-steps'" in err, err


@pytest.mark.parametrize("seconds, shown", [(73.96, "0.03"), (500.0, "0.004")])
def test_finetune_table_shows_a_slow_rate_as_more_than_zero(cli, tmp_path, monkeypatch, seconds, shown):
    """A step of 2 images at 224 px on a busy CPU took 74 s: the table said "0.0" img/s, as if nothing trained;
    at 500 s two decimals said "0.00"."""
    import importlib
    from types import SimpleNamespace

    module = importlib.import_module("bnncc.train.finetune")  # (bnncc.train.finetune is the function)
    train = SimpleNamespace(steps=1, final_loss=8.5869, images_per_second=2 / seconds)  # the run's metrics line
    result = SimpleNamespace(train=train, student_top1=None, student_top5=None, teacher_top1=None,
                             teacher_top5=None, ace=4.2e9)
    monkeypatch.setattr(module, "finetune", lambda *args, **kwargs: result)
    code, out, err = cli("finetune", "poke.onnx", "--teacher", "float.onnx", "--data", tmp_path,
                         "-o", tmp_path / "trained.onnx", "--max-steps", "1")
    assert code == 0, err
    row = next(line for line in out.splitlines() if "8.5869" in line)
    assert row.split("│")[3].strip() == shown


def test_json_keeps_names_that_look_like_emoji_codes(cli, tmp_path):
    """rich replaced ":fire:" in a printed string by its emoji: `ace --json` gave a node 'conv:fire:1'
    as 'conv\U0001f5251', a name no graph holds (and a path such as run:x:1.npy lost its ':x:')."""
    import json

    import onnx

    from test_fuzz import base_model

    proto = base_model()
    proto.graph.node[0].name = "conv:fire:1"
    onnx.save(proto, tmp_path / "small.onnx")
    code, out, err = cli("ace", tmp_path / "small.onnx", "--json")
    assert code == 0, err
    assert json.loads(out)["layers"][0]["name"] == "conv:fire:1"


def test_control_characters_in_printed_names_show_as_escapes(cli, tmp_path):
    """An ESC in a file or node name reached the terminal through `ace`'s table (rich drops BEL and CR,
    not ESC), recolouring or clearing it; it now prints as \\x1b, and tables keep their lines."""
    import onnx

    from test_fuzz import base_model

    proto = base_model()
    proto.graph.node[0].name = "conv\x1b[2J"
    path = tmp_path / "a\x1b[31mb.onnx"
    onnx.save(proto, path)
    code, out, err = cli("ace", path, "--per-layer")
    assert code == 0, err
    assert "\x1b" not in out and "a\\x1b[31m" in out and "conv\\x1b[2J" in out  # (the title wraps)
    assert len(out.splitlines()) > 5  # a table, over several lines


def test_verify_help_states_the_verification_limits(cli):
    """As the demo's: the help states them as numbers, which must be bnncc.verification's."""
    from bnncc.verification import MAX_INPUTS, PERTURBATIONS

    code, out, _ = cli("verify", "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0
    assert f"at most {MAX_INPUTS}: each takes {3 + PERTURBATIONS} onnxruntime runs" in text


def test_demo_help_states_the_demos_defaults(cli):
    """The help cannot import the pipeline (it would slow every command's start), so it states the
    defaults as numbers: they must be DemoOptions'."""
    from bnncc.pipeline import DemoOptions

    code, out, _ = cli("demo", "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0
    assert f"fine-tuning epochs of the PokeBNN student (default: {DemoOptions.epochs})" in text
    assert f"training epochs of the float teacher (default: {DemoOptions.teacher_epochs})" in text


def test_finetune_help_states_the_training_defaults(cli):
    """--lr, --temperature, --label-weight and --checkpoint-every showed no default; the help states them as
    numbers (it cannot import the trainer), which must be the shipped recipes' and TrainConfig's."""
    from bnncc.recipe import available_recipes, load_recipe
    from bnncc.train import TrainConfig

    code, out, _ = cli("finetune", "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0
    assert "(default: the recipe's, 2e-5 in the shipped ones)" in text
    assert {load_recipe(name).train["lr"] for name in available_recipes()} == {2e-5}
    assert "(default: the recipe's, else 1)" in text and TrainConfig().temperature == 1
    assert "(default 0: distillation alone)" in text and TrainConfig().label_weight == 0
    assert "checkpoints (default 100)" in text and TrainConfig().checkpoint_every == 100


def test_demo_refuses_its_arguments_before_its_banner(cli, tmp_path):
    """`bnncc demo --data nope` printed its banner, then the error. An output folder inside the data
    folder was refused by the convert after the teacher's minutes of training, the teacher left in the data."""
    import shutil

    from bnncc.data import FASHION_MNIST_SAMPLE

    (tmp_path / "file").write_text("")
    data = shutil.copytree(FASHION_MNIST_SAMPLE, tmp_path / "data")
    for args, error in [(["--data", str(tmp_path / "nope")], f"error: {tmp_path / 'nope'}: no such folder"),
                        (["-o", str(tmp_path / "file")], f"error: {tmp_path / 'file'}: exists and is not a folder"),
                        (["--data", str(data), "-o", str(data / "demo")],
                         f"error: {data / 'demo'}: inside the data folder {data}; choose an output folder outside it")]:
        code, out, err = cli("demo", *args)
        assert (code, out) == (2, "")
        assert err.startswith(error) and err.count("\n") == 1
    assert sorted(os.listdir(data)) == sorted(os.listdir(FASHION_MNIST_SAMPLE))


_SIGNAL_IN_TVM = '''
import os, signal, sys, time
import tvm
from bnncc.cli import app, main

@app.command("signal-in-tvm")
def signal_in_tvm(name: str) -> None:
    def callback():  # Python code that TVM's C++ calls, as its compiler calls our passes
        os.kill(os.getpid(), getattr(signal, name))
        time.sleep(0.5)
    tvm.runtime.convert(callback)()

if sys.argv[2] == "ignored":  # as nohup starts a command
    signal.signal(getattr(signal, sys.argv[1]), signal.SIG_IGN)
else:  # as a terminal starts it, whatever the tests' own caller ignores (a background job ignores SIGINT)
    signal.signal(getattr(signal, sys.argv[1]),
                  signal.default_int_handler if sys.argv[1] == "SIGINT" else signal.SIG_DFL)
sys.argv = ["bnncc", "signal-in-tvm", sys.argv[1]]
main()
'''


@pytest.mark.parametrize("name, code, err", [("SIGTERM", 143, ""), ("SIGINT", 130, "error: interrupted\n"),
                                             ("SIGHUP", 129, "")])
def test_a_signal_while_tvm_runs_our_code_ends_the_run_as_that_signal(tmp_path, name, code, err):
    """SIGTERM or Ctrl-C during a compile came back from TVM as its RuntimeError: \"unexpected
    RuntimeError: 143\", exit 1; SIGHUP (the terminal closed) ended the run without removing the
    temporary files of its output."""
    script = tmp_path / "signal_in_tvm.py"
    script.write_text(_SIGNAL_IN_TVM)
    done = subprocess.run([sys.executable, script, name, "caught"], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (code, err)


_CTRL_C_WHILE_LOADING = '''
import os, runpy, signal, sys

signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal (a background job ignores it)

class CtrlC:  # presses Ctrl-C as the command modules load
    def find_spec(self, name, path=None, target=None):
        if name == "bnncc.cli._app":
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, CtrlC())
sys.argv = ["bnncc", "passes"]
runpy.run_module("bnncc", run_name="__main__")
'''


def test_ctrl_c_while_the_command_loads_is_one_line(tmp_path):
    """Ctrl-C in the seconds `bnncc` takes to import its modules, before it handles signals, printed the
    30-line traceback of an import."""
    script = tmp_path / "ctrl_c_while_loading.py"
    script.write_text(_CTRL_C_WHILE_LOADING)
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "error: interrupted\n")


@pytest.mark.parametrize("name", ["SIGHUP", "SIGINT"])
def test_a_signal_the_caller_ignores_stays_ignored(tmp_path, name):
    """nohup ignores SIGHUP (and a shell's background job SIGINT): the command goes on."""
    script = tmp_path / "signal_in_tvm.py"
    script.write_text(_SIGNAL_IN_TVM)
    done = subprocess.run([sys.executable, script, name, "ignored"], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("args", [["passes"], ["--help"], ["rewrite", "--help"]])
def test_output_to_a_reader_that_has_gone_is_a_quiet_sigpipe_exit(args):
    """`bnncc passes | head` ended with exit status 1 (rich's), which bnncc gives a failed verify and
    a bug; a tool that SIGPIPE ends exits 141, and says nothing. `bnncc --help | head -1` did too:
    typer draws help with a rich console of its own."""
    process = subprocess.Popen([sys.executable, "-m", "bnncc", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # before bnncc writes a line: its first write finds no reader
    err = process.stderr.read()
    assert (process.wait(timeout=120), err) == (141, b"")


def test_run_reads_an_image_in_the_networks_channels(tmp_path):
    """A 4-channel network reads an image as RGBA (a grey 16-bit one: grey colours, opaque); one of
    another channel count refuses images in one line naming the .npy that works. Every image was
    read as grey for a 4-channel network and then failed to fill it: 'not a readable image'."""
    import numpy as np
    from PIL import Image

    from bnncc.cli._inputs import _read_image

    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    got = _read_image(tmp_path / "rgba.png", (4, 8, 8), None)
    np.testing.assert_array_equal(got, rgba.transpose(2, 0, 1)[None] / np.float32(255))
    grey = np.random.default_rng(1).integers(0, 65536, (8, 8)).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    got = _read_image(tmp_path / "grey16.png", (4, 8, 8), None)[0]
    eight_bit = np.round(grey / 65535.0 * 255.0) / 255.0  # what training sees of it
    np.testing.assert_allclose(got[:3], np.repeat(eight_bit[None], 3, axis=0), rtol=1e-6)
    assert (got[3] == 1).all()
    with pytest.raises(BnnccError, match=r"rgba.png: the network takes 2-channel inputs, and an image gives 1 \(grey\), "
                                         r"3 \(RGB\) or 4 \(RGBA\); give its pixels as a .npy of shape \(2, 8, 8\)"):
        _read_image(tmp_path / "rgba.png", (2, 8, 8), None)


def test_targets_table_and_missing_line_come_from_one_probe(cli, monkeypatch):
    """The host was probed twice, once for the table and once for the missing line: a device that
    answered differently the second time (a GPU busy or reset) was "found" in the table and
    "missing" on the line below it."""
    from bnncc.targets import registry

    answers = iter(["yes", None])

    def check():
        return {"cuda": [registry.Requirement("CUDA device", "run", next(answers), "an NVIDIA GPU")]}

    monkeypatch.setattr(registry, "check", check)
    code, out, _ = cli("targets")
    assert code == 0
    assert "yes" in out and out.splitlines()[-1] == "missing: nothing"


def test_targets_table_cuts_no_path_nor_install_command(cli, monkeypatch, terminal):
    """In an 80-column terminal the table cut its cells with an ellipsis: it showed "/usr/bin/aarch…"
    found and "g++-aarch64-l…" to install. Folded, every character is there: each cell's lines,
    joined, give back the text."""
    from bnncc.targets import registry

    found = "/root/.cache/bnncc/arm64-runtime/tvm-0.27.0.post1-ffi-0.1.14.post1"
    install = "apt-get install g++-aarch64-linux-gnu"
    monkeypatch.setattr(registry, "check", lambda: {"arm64": [
        registry.Requirement("aarch64-linux-gnu-g++", "build", None, install),
        registry.Requirement("aarch64 TVM runtime", "run", found, "bnncc targets --prepare (pip download)")]})
    terminal(80)
    code, out, _ = cli("targets")
    assert code == 0 and "…" not in out
    rows = [line.split("│")[1:-1] for line in out.splitlines() if line.startswith("│")]  # (the header: ┃)
    columns = ["".join(cells).replace(" ", "") for cells in zip(*rows)]
    assert columns[1] == "aarch64-linux-gnu-g++aarch64TVMruntime"
    assert columns[3] == "missing" + found
    assert columns[4].startswith(install.replace(" ", ""))


def test_tables_in_a_file_are_not_cut_to_the_terminals_width(cli, tmp_path, monkeypatch):
    """Output to a file or a pipe was laid out for 80 columns (or COLUMNS): `ace > costs.txt` folded a
    layer name over two lines, so the file held no line naming it, and `targets | cat` cut paths to
    "/usr/bin/aarch…". Such an output now has lines as long as their contents."""
    import onnx

    from bnncc.targets import registry
    from test_fuzz import base_model

    monkeypatch.setenv("COLUMNS", "80")
    proto = base_model()
    name = "/layer4/layer4.1/downsample/downsample.0/Conv_with_a_long_exported_name"
    proto.graph.node[0].name = name
    onnx.save(proto, tmp_path / "small.onnx")
    code, out, err = cli("ace", tmp_path / "small.onnx")
    assert code == 0, err
    row = [line for line in out.splitlines() if name in line]
    assert len(row) == 1 and "Conv 16x16" in row[0]

    found = "/opt/cross-compilers/aarch64-linux-gnu/bin/aarch64-linux-gnu-g++-12"
    monkeypatch.setattr(registry, "check", lambda: {
        "arm64": [registry.Requirement("aarch64-linux-gnu-g++", "build", found, "apt-get install g++-aarch64")]})
    code, out, _ = cli("targets")
    assert code == 0 and found in out


def test_ace_and_rewrite_print_a_long_path_whole(cli, tmp_path):
    """The path was the table's title, which rich wraps to the table's width: `ace` and `rewrite` of a model
    in a deep folder printed it cut in two, in a file too, where no line held it."""
    import onnx

    from test_fuzz import base_model

    path = tmp_path / ("a_folder_of_exported_models_" * 4) / "small.onnx"
    path.parent.mkdir()
    onnx.save(base_model(), path)
    code, out, err = cli("ace", path)
    assert code == 0, err
    assert str(path) in out.splitlines()
    output = tmp_path / "poke.onnx"
    code, out, err = cli("rewrite", path, "-o", output, "--set", "passes.poke_stem.mid_channels=8")
    assert code == 0, err
    assert f"{path} -> {output} (pokebnn_1x)" in out.splitlines()


def test_no_command_writes_over_its_input_models_external_data(cli, tmp_path, resnet50_onnx):
    """A model's weights in `model.onnx.data` are as much the input as `model.onnx`: `rewrite model.onnx -o
    model.onnx.data` replaced them (only the .onnx path was compared), and the input no longer loaded."""
    import shutil
    from pathlib import Path

    source = Path(resnet50_onnx["dynamo"])
    model = shutil.copy(source, tmp_path / source.name)
    data = Path(shutil.copy(f"{source}.data", tmp_path))
    before = data.read_bytes()
    output = tmp_path / "." / data.name  # (compared resolved, as the input's own path)
    for args, what, result in ((["rewrite", model], "input", "the result"),
                               (["export", model], "input", "the result"),
                               (["finetune", resnet50_onnx["legacy"], f"--teacher={model}", "--data=x"], "teacher",
                                "the trained model")):
        code, _, err = cli(*args, "-o", output)
        assert (code, err.strip()) == (2, f"error: {tmp_path}/{data.name}: is the {what} model's external data "
                                          f"'{data.name}'; write {result} to another path")
    assert data.read_bytes() == before
