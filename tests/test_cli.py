from bnncc.cli._app import app
from bnncc.errors import BnnccError


def test_version_lists_dependencies(cli):
    code, out, _ = cli("version")
    assert code == 0
    assert "bnncc 0.1.0" in out and "onnxruntime" in out


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
