"""QONNX export: the exported network, run by the qonnx package, agrees with bnncc's reference."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from tiny_poke import tiny_poke_model

from bnncc.ops import attach_functions
from bnncc.qonnx import QONNX_DOMAIN, export_qonnx
from bnncc.torchview import to_torch, write_back

pytest.importorskip("qonnx")


def calibrated(model: ir.Model, shape) -> ir.Model:
    module = to_torch(model)
    gen = torch.Generator().manual_seed(0)
    module.calibrate_bounds([torch.randn(*shape, generator=gen) for _ in range(2)])
    return write_back(module, model)


def qonnx_matches_reference(model: ir.Model, shape, path) -> None:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    export_qonnx(model, path, batch=shape[0])
    wrapper = ModelWrapper(str(path)).transform(InferShapes())
    domains = {n.domain for n in wrapper.graph.node}
    assert QONNX_DOMAIN in domains and "ai.bnncc" not in domains
    session = ort.InferenceSession(ir.to_proto(attach_functions(model)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = session.run(None, {model.graph.inputs[0].name: x})[0]
    got = execute_onnx(wrapper, {model.graph.inputs[0].name: x})[wrapper.graph.output[0].name]
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("se_gate", [True, False], ids=["gated", "ungated"])
def test_one_poke_conv_network(tmp_path, se_gate):
    model = calibrated(tiny_poke_model(se_gate), (2, 3, 16, 16))
    qonnx_matches_reference(model, (2, 3, 16, 16), tmp_path / "q.onnx")


@pytest.mark.slow
def test_rewritten_resnet50(tmp_path):
    """The whole pokebnn_1x rewrite of a narrow ResNet-50 (the qonnx executor runs node by node: minutes)."""
    from bnncc.frontend import load
    from bnncc.rewriting import rewrite
    from bnncc.zoo import export_onnx, resnet50

    float_model = export_onnx(resnet50(width=0.125, num_classes=10).eval(), tmp_path / "f.onnx", input_size=32)
    model, _ = rewrite(load(float_model), "pokebnn_1x", ["passes.poke_stem.mid_channels=8"])
    qonnx_matches_reference(calibrated(model, (4, 3, 32, 32)), (1, 3, 32, 32), tmp_path / "q.onnx")


@pytest.mark.parametrize("batch", [0, 4097, 10**20])
def test_a_batch_out_of_range_is_refused_in_one_line(cli, tmp_path, batch):
    """10**20 reached onnx_ir as a shape it could not convert, reported as a weight's fault."""
    path = tmp_path / "poke.onnx"
    ir.save(attach_functions(tiny_poke_model(True)), path)
    code, _, err = cli("export", path, "-o", tmp_path / "q.onnx", "--batch", str(batch))
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "q.onnx").exists()
    assert f"batch {batch}: expected 1 to 4096" in err or "--batch" in err, err
