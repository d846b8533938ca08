"""A ResNet-18 student (resnet18_pokebnn, and resnet18_bireal without SE gates) fine-tunes by
distillation from its float teacher."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from bnncc.frontend import load
from bnncc.rewriting import rewrite
from bnncc.zoo import export_onnx, resnet18


@pytest.mark.parametrize("recipe", ["resnet18_pokebnn", "resnet18_bireal"])
def test_resnet18_student_fine_tunes_a_few_steps(tmp_path, recipe, finetune_four_steps):
    teacher = export_onnx(resnet18(width=0.25, num_classes=4), tmp_path / "teacher.onnx", input_size=32)
    student, _ = rewrite(load(teacher), recipe, ["passes.poke_stem.mid_channels=8"])
    student_path = tmp_path / "student.onnx"
    ir.save(student, student_path)
    out = tmp_path / "trained.onnx"
    result = finetune_four_steps(student_path, teacher, out)
    assert np.isfinite(result.train.final_loss)
    trained = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    original = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(student_path).graph.initializer}
    # the batch norms and DPReLUs of both PokeConvs of a block learn (the second BN from gamma 0)
    for name in ("/layer1/layer1.0/conv1/Conv/bn.gamma", "/layer1/layer1.0/conv2/Conv/bn.gamma",
                 "/layer4/layer4.1/conv2/Conv/dprelu.neg_slope"):
        assert not np.array_equal(original[name], trained[name]), name
    bounds = [n for n in trained if "bound" in n]  # the stem's, the head's and the SE gates' (not in bireal)
    assert len(bounds) == 3 + (2 * 16 if recipe == "resnet18_pokebnn" else 0)
    assert all((trained[n] > 0).any() for n in bounds), "bounds not calibrated"
    session = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: np.random.rand(1, 3, 32, 32).astype(np.float32)})[0]
    assert logits.shape == (1, 4) and np.isfinite(logits).all()
