import pytest
from idx_files import brightness_idx, write_idx

from bnncc.frontend import load
from bnncc.rewriting import rewrite
from bnncc.zoo import export_onnx, resnet50


@pytest.fixture
def idx_writer():
    """``write_idx``, for a test that writes a data set of its own."""
    return write_idx


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory):
    """``brightness_idx``, 256 training and 64 test images."""
    return brightness_idx(tmp_path_factory.mktemp("idx"), 256, 64)


@pytest.fixture(scope="session")
def teacher_and_student(tmp_path_factory):
    """A tiny float ResNet-50 teacher (4 classes, 32 px) and its PokeBNN-1x rewrite, as ONNX files."""
    folder = tmp_path_factory.mktemp("ft")
    teacher = export_onnx(resnet50(width=0.125, num_classes=4).eval(), folder / "teacher.onnx", input_size=32)
    student, _ = rewrite(load(teacher), "pokebnn_1x", ["passes.poke_stem.mid_channels=8"])
    import onnx_ir as ir

    path = folder / "student.onnx"
    ir.save(student, path)
    return teacher, path


@pytest.fixture
def finetune_four_steps(idx_dir, tmp_path):
    """``run(student, teacher, out)``: ``bnncc.train.finetune`` on ``idx_dir`` for 4 steps of batch 8,
    calibration and weight quantization both starting halfway, a checkpoint every 2 steps
    (``tmp_path/c.ckpt``, metrics in ``tmp_path/m.jsonl``): the smoke tests' schedule."""
    from bnncc.train import TrainConfig, finetune

    def run(student, teacher, out):
        cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=4, checkpoint_every=2, calibration_batches=1,
                          act_calibration_at=0.5, weight_quant_start=0.5)
        return finetune(student, teacher, idx_dir, out, cfg, checkpoint=tmp_path / "c.ckpt",
                        metrics=tmp_path / "m.jsonl", show_progress=False)

    return run
