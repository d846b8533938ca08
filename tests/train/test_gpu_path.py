"""The GPU path where no GPU is needed to check it: clean refusals, bf16 teachers, no host syncs in the step."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bnncc.frontend import load, read
from bnncc.torchview import to_torch
from bnncc.train import TrainConfig
from bnncc.train.data import open_dataset
from bnncc.train.trainer import MEMORY_FORMAT, evaluate, train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("command", [["finetune", "student.onnx", "--teacher", "teacher.onnx", "--data", "data",
                                      "-o", "out.onnx"],
                                     ["train-teacher", "--data", "data", "-o", "out.onnx"]])
def test_cuda_without_a_gpu_fails_at_the_start_in_one_line(cli, tmp_path, no_gpu, command):
    # the files do not exist: the device is checked before anything is read
    code, out, err = cli(*[str(tmp_path / a) if a.endswith(".onnx") or a == "data" else a for a in command],
                         "--device", "cuda")
    assert code == 2
    lines = (out + err).strip().splitlines()
    assert len(lines) == 1 and "--device cuda: no CUDA GPU is usable here" in lines[0], out + err
    assert not (tmp_path / "out.onnx").exists()


def test_an_unknown_device_is_refused(cli, tmp_path):
    code, out, err = cli("train-teacher", "--data", tmp_path / "data", "-o", tmp_path / "t.onnx", "--device", "tpu")
    assert code == 2 and "--device 'tpu': expected cpu or cuda" in out + err


def test_gpu_bench_exits_cleanly_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and done.stderr.strip().count("\n") == 0
    assert "no CUDA GPU is usable here" in done.stderr


def test_a_bf16_teacher_matches_onnxruntime_within_bf16_precision(teacher_and_student):
    """On CUDA the trainer casts the teacher to bf16; its ops must take bf16 weights and inputs."""
    teacher_path, _ = teacher_and_student
    images = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    expected = ort.InferenceSession(str(teacher_path)).run(None, {"input": images})[0]
    teacher = to_torch(load(teacher_path)).to(dtype=torch.bfloat16, memory_format=MEMORY_FORMAT).eval()
    with torch.no_grad():
        got = teacher(torch.from_numpy(images).to(torch.bfloat16, memory_format=MEMORY_FORMAT)).float().numpy()
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() < 0.05 * scale


def test_evaluate_feeds_a_bf16_model_bf16_images(idx_dir):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    data = open_dataset(idx_dir, "test")
    top1_float, _ = evaluate(model, data, (3, 8, 8))
    top1_bf16, _ = evaluate(model.to(torch.bfloat16), data, (3, 8, 8))
    assert abs(top1_bf16 - top1_float) <= 100 * 2 / len(data)  # bf16 rounding may flip a near tie or two


def test_the_step_reads_nothing_back_between_logs(idx_dir, teacher_and_student, monkeypatch):
    """On a GPU, reading a tensor's value waits for the step to finish: after the one-off calibration
    the loop may read only the loss, once every log_every steps. The torch compositions (the ops a
    GPU runs) are used: the CPU kernels are switched off. Index tensors (integers) stay on the host."""
    import bnncc.train.trainer as trainer

    monkeypatch.setenv("BNNCC_CPU_KERNELS", "0")
    teacher_path, student_path = teacher_and_student
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        def counted(self, *args, _original=getattr(torch.Tensor, name), _name=name):
            if self.is_floating_point() or self.dtype == torch.bool:
                reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    calibrate = trainer._calibrate

    def calibrate_then_count(*args):
        calibrate(*args)
        reads.clear()

    monkeypatch.setattr(trainer, "_calibrate", calibrate_then_count)
    cfg = TrainConfig(batch_size=16, max_steps=6, log_every=3, act_calibration_at=0.0, weight_quant_start=0.0,
                      calibration_batches=1)
    train(to_torch(read(student_path)), to_torch(load(teacher_path)), open_dataset(idx_dir, "train"), cfg,
          (3, 32, 32), show_progress=False)
    assert reads == ["__float__", "__float__"]  # the losses of steps 3 and 6
