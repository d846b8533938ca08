"""The README as a new user reads it: its public names, its Python example and its CLI lines run as written.

The example and the commands run in a fresh interpreter, in a folder where ``resnet50.onnx`` is a
ResNet-50 at half width and 32x32 inputs (bnncc.zoo, random weights): the same graph as the real
one, small enough to rewrite and compile in seconds.
"""

from __future__ import annotations

import os
import pkgutil
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest

import bnncc
from bnncc import zoo

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BNNCC = Path(sys.executable).parent / "bnncc"
# The CLI lines of "Using it" that need no data set, a trained graph or a cross toolchain.
NO_DATA_COMMANDS = ("inspect", "ace", "rewrite", "passes", "targets", "--help")


def _python(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    threads = os.environ.get("TVM_NUM_THREADS", str(min(2, len(os.sched_getaffinity(0)))))  # no more than the CPUs
    env = {**os.environ, "TVM_NUM_THREADS": threads}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _readme_commands(*names: str) -> list[list[str]]:
    """The ``bnncc NAME ...`` lines of the README's "Using it" section, comments cut, ``a | b`` listings split."""
    section = README.split("## Using it", 1)[1].split("\n## ", 1)[0]
    parts = [part for line in section.splitlines() if line.startswith("    bnncc ")
             for part in line.split("#", 1)[0].split(" | ")]
    return [shlex.split(part) for part in parts if part.split()[1] in names]


# --------------------------------------------------------------------------- the public names


def test_no_submodule_shares_a_public_name():
    """Importing a submodule ``bnncc.X`` sets the package attribute X, hiding a function of that name."""
    submodules = {m.name for m in pkgutil.iter_modules(bnncc.__path__)}
    assert not submodules & set(bnncc.__all__)


@pytest.mark.parametrize("order", ["names first", "every module first"])
def test_public_names_are_the_functions_in_a_fresh_interpreter(tmp_path, order):
    """Every name of ``bnncc.__all__`` is the object its module defines, not a module, whatever was
    imported before: nothing, or every module of bnncc (passes and targets included)."""
    imports = "" if order == "names first" else textwrap.dedent("""
        import bnncc.passes, bnncc.targets
        for package in (bnncc, bnncc.passes, bnncc.targets):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                if not info.name.endswith("__main__"):
                    importlib.import_module(info.name)
        """)
    code = textwrap.dedent("""
        import importlib, pkgutil, types
        import bnncc
        {imports}
        for name in bnncc.__all__:
            value = getattr(bnncc, name)
            assert not isinstance(value, types.ModuleType), (name, value)
            if name != "__version__":
                assert value is getattr(importlib.import_module(bnncc._LAZY[name]), name), name
        print("checked", len(bnncc.__all__))
        """).format(imports=imports)
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"checked {len(bnncc.__all__)}"


def test_dir_and_help_show_the_public_names_without_importing_them_for_dir(tmp_path):
    """The names are imported lazily: dir(bnncc) (a notebook's completion) listed none of them, and
    help(bnncc) showed ``__getattr__`` as its only function."""
    code = textwrap.dedent("""
        import pydoc, sys
        import bnncc
        missing = set(bnncc.__all__) - set(dir(bnncc))
        assert not missing, missing
        assert "torch" not in sys.modules  # dir names them without importing them
        text = pydoc.render_doc(bnncc, renderer=pydoc.plaintext)
        for name in ("load(", "rewrite(", "compile(", "to_torch(", "class BnnccError("):
            assert "\\n    " + name in text, name
        print("ok")
        """)
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --------------------------------------------------------------------------- the example and the commands


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    zoo.export_onnx(zoo.resnet50(width=0.5, num_classes=10), folder / "resnet50.onnx", input_size=32)
    return folder


def test_python_example_runs_as_written(workdir):
    """The README's one Python block, unchanged, then `bnncc verify lib/` on the library it built."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    assert len(blocks) == 1
    result = _python(blocks[0], workdir)
    assert result.returncode == 0, result.stderr
    first_block, ace_total = result.stdout.splitlines()[:2]
    assert first_block.startswith("Bottleneck(stage=0, index=0, ")  # recognize(model).blocks[0]
    assert int(ace_total) > 0 and (workdir / "lib" / "model.so").is_file()
    verify = _readme_commands("verify")
    assert verify == [["bnncc", "verify", "lib/"]]
    result = subprocess.run([str(BNNCC), *verify[0][1:]], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "argmax agreement" in result.stdout
    bundle = _readme_commands("bundle")
    assert bundle == [["bnncc", "bundle", "lib/", "-o", "device/"]]
    result = subprocess.run([str(BNNCC), *bundle[0][1:]], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "./runner run model.so batch_1" in (workdir / "device" / "README.txt").read_text()


def test_cli_lines_that_need_no_data_run_as_written(workdir):
    commands = _readme_commands(*NO_DATA_COMMANDS)
    assert sorted({c[1] for c in commands}) == sorted(NO_DATA_COMMANDS)
    outputs = {}
    for command in commands:
        result = subprocess.run([str(BNNCC), *command[1:]], cwd=workdir, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (command, result.stdout + result.stderr)
        outputs[command[1]] = " ".join(result.stdout.split())
    assert "stem" in outputs["inspect"] and "head" in outputs["inspect"]
    assert "float MACs at 16 x 16 bits" in outputs["ace"]
    assert "poke_conv" in outputs["rewrite"]
    onnx.checker.check_model(onnx.load(workdir / "poke.onnx"))
    assert "poke_conv" in outputs["passes"] and "x86-64" in outputs["targets"]
    assert "Usage: bnncc" in outputs["--help"]


def test_the_demo_folder_is_ignored_by_git():
    """`make demo` writes its default output folder into the checkout, where `git status` listed it as
    untracked (the README's `out/` was ignored already)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    import inspect

    from bnncc.cli.demo_cmd import demo

    folder = inspect.signature(demo).parameters["output"].default.default  # --output's typer.Option
    result = subprocess.run(["git", "check-ignore", "-q", f"{folder}/report.md"], cwd=ROOT)
    assert result.returncode == 0, f"{folder}/ is not in .gitignore"
