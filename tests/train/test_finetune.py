"""End to end: a tiny float ResNet-50 teacher, its PokeBNN rewrite, fine-tuned by distillation."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bnncc.domain import DOMAIN
from bnncc.train import TrainConfig, finetune
from bnncc.train.data import open_splits


def test_finetune_writes_a_trained_graph_that_onnxruntime_runs(tmp_path, idx_dir, teacher_and_student,
                                                              finetune_four_steps):
    teacher, student = teacher_and_student
    out = tmp_path / "trained.onnx"
    result = finetune_four_steps(student, teacher, out)
    assert np.isfinite(result.train.final_loss)
    assert result.student_top1 is not None and 0 <= result.student_top1 <= 100
    model = onnx.load(out)
    trained = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    original = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(student).graph.initializer}
    changed = [n for n in original if not np.array_equal(original[n], trained[n])]
    assert changed, "no weight changed"
    bounds = [n for n in trained if n.endswith("act_bound") or n.endswith("bound1")]
    assert bounds and all((trained[n] > 0).any() for n in bounds), "activation bounds were not calibrated"
    session = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: np.random.rand(1, 3, 32, 32).astype(np.float32)})[0]
    assert logits.shape == (1, 4) and np.isfinite(logits).all()
    # what bnncc run needs to feed the library as training fed the model: the grey data's one mean
    # and std, for each of the model's 3 input channels, resized bilinearly as the arrays were; and the recipe
    metadata = {p.key: p.value for p in model.metadata_props}
    data = open_splits(idx_dir)[0]
    assert json.loads(metadata["bnncc.preprocessing"]) == {"mean": [data.mean[0]] * 3, "std": [data.std[0]] * 3,
                                                           "resize": "bilinear"}
    assert metadata["bnncc.recipe"] == "pokebnn_1x"


# B, the clip bound, has one home: the graph. A fine-tune keeps it; --clip-bound overrides it and is written back.


def _clip_bounds(path) -> set[float]:
    return {attr.f for node in onnx.load(path).graph.node if node.domain == DOMAIN
            for attr in node.attribute if attr.name == "clip_bound"}


@pytest.fixture(scope="module")
def student_with_b2(tmp_path_factory, teacher_and_student):
    """The student rewritten with B = 2.0, set by the poke_conv parameter alone."""
    from bnncc.cli._app import run_app

    teacher, _ = teacher_and_student
    path = tmp_path_factory.mktemp("b2") / "student.onnx"
    assert run_app(["rewrite", str(teacher), "-o", str(path), "--set", "passes.poke_conv.clip_bound=2.0",
                    "--set", "passes.poke_stem.mid_channels=8"]) == 0
    assert _clip_bounds(path) == {2.0}
    return path


def test_finetune_keeps_the_graphs_clip_bound(idx_dir, tmp_path, teacher_and_student, student_with_b2):
    teacher, _ = teacher_and_student
    out = tmp_path / "trained.onnx"
    cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=2, calibration_batches=1)
    finetune(student_with_b2, teacher, idx_dir, out, cfg, show_progress=False)
    assert _clip_bounds(out) == {2.0}


def test_clip_bound_option_overrides_and_is_written_back(cli, idx_dir, tmp_path, teacher_and_student,
                                                        student_with_b2):
    teacher, _ = teacher_and_student
    out = tmp_path / "trained.onnx"
    code, stdout, stderr = cli("finetune", student_with_b2, "--teacher", teacher, "--data", idx_dir, "-o", out,
                               "--max-steps", "2", "--batch-size", "8", "--clip-bound", "1.5")
    assert code == 0, stderr
    assert "clip bound B overridden: 1.5" in " ".join(stdout.split())
    assert _clip_bounds(out) == {1.5} and _clip_bounds(student_with_b2) == {2.0}
    # the default checkpoint (hundreds of MB for a ResNet-50) goes once the result is written; one
    # that --checkpoint names stays
    assert (tmp_path / "trained.metrics.jsonl").exists() and not (tmp_path / "trained.ckpt").exists()
    code, _, stderr = cli("finetune", student_with_b2, "--teacher", teacher, "--data", idx_dir, "-o", out,
                          "--max-steps", "2", "--batch-size", "8", "--checkpoint", tmp_path / "kept.ckpt")
    assert code == 0 and (tmp_path / "kept.ckpt").exists(), stderr


def test_a_label_weight_needs_labels_of_the_models_classes(cli, tmp_path, teacher_and_student, idx_writer):
    """Without labels in the loss any data set will do; with them, labels past the model's classes
    would be indexed out of its logits: refused before training, in one line."""
    rng = np.random.default_rng(1)
    for prefix in ("train", "t10k"):
        idx_writer(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (16, 8, 8)))
        idx_writer(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(16) % 7)
    teacher, student = teacher_and_student
    code, _, err = cli("finetune", student, "--teacher", teacher, "--data", tmp_path, "-o", tmp_path / "ft.onnx",
                       "--max-steps", "1", "--batch-size", "4", "--workers", "0", "--label-weight", "0.5")
    assert code == 2 and "labels of 7 classes for a model of 4" in err, err
    assert not (tmp_path / "ft.onnx").exists()


def test_a_network_of_one_class_has_nothing_to_fine_tune(cli, idx_dir, tmp_path):
    """The softmax of one logit is 1: the run's loss was 0 at every step, its weights moved by their decay
    alone, and convert's report called the network fine-tuned."""
    import onnx_ir as ir

    from bnncc import load, rewrite
    from bnncc.zoo import export_onnx, resnet50

    teacher = export_onnx(resnet50(width=0.125, num_classes=1).eval(), tmp_path / "t1.onnx", input_size=32)
    student, _ = rewrite(load(teacher), "pokebnn_1x", ["passes.poke_stem.mid_channels=8"])
    ir.save(student, tmp_path / "s1.onnx")
    code, _, err = cli("finetune", tmp_path / "s1.onnx", "--teacher", teacher, "--data", idx_dir, "-o",
                       tmp_path / "ft.onnx", "--max-steps", "1", "--batch-size", "4", "--workers", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "s1.onnx: one output class; distillation and labels compare softmaxes" in err
    assert not (tmp_path / "ft.onnx").exists()


def test_a_diverging_finetune_is_an_error_and_writes_nothing(cli, idx_dir, tmp_path, teacher_and_student):
    teacher, student = teacher_and_student
    code, _, err = cli("finetune", student, "--teacher", teacher, "--data", idx_dir, "-o", tmp_path / "ft.onnx",
                       "--max-steps", "3", "--batch-size", "4", "--workers", "0", "--lr", "1e30")
    assert code == 2 and "training diverged: the loss is not finite" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ft.onnx").exists()


def test_a_trained_graph_the_commands_would_refuse_is_not_written(cli, idx_dir, tmp_path, teacher_and_student):
    """At --clip-bound 1e20 the loss stayed finite but a batch norm's running variance overflowed:
    exit 0, and ace then refused the file it wrote."""
    teacher, student = teacher_and_student
    code, _, err = cli("finetune", student, "--teacher", teacher, "--data", idx_dir, "-o", tmp_path / "ft.onnx",
                       "--max-steps", "2", "--batch-size", "4", "--workers", "0", "--clip-bound", "1e20")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the trained graph is not a valid PokeBNN graph" in err and "NaN or infinite" in err, err
    assert not (tmp_path / "ft.onnx").exists()


def test_finetune_refuses_before_training(cli, idx_dir, tmp_path, teacher_and_student):
    """A teacher of another input size, a float student, zero epochs, an output under a file: one line each, exit 2,
    nothing written (zero epochs used to train one, an output under a file ended in an unexpected
    NotADirectoryError after training)."""
    from bnncc.zoo import export_onnx, resnet50

    teacher, student = teacher_and_student
    wide = export_onnx(resnet50(width=0.125, num_classes=4).eval(), tmp_path / "t64.onnx", input_size=64)
    (tmp_path / "file").write_text("")
    cases = [(student, ["--teacher", wide], "input (3, 32, 32) but the teacher"),
             # (a float student trained, and was written as if it were a PokeBNN graph)
             (teacher, ["--teacher", teacher], "no ai.bnncc op; finetune takes a PokeBNN graph"),
             (student, ["--teacher", teacher, "--epochs", "0"], "Invalid value for '--epochs'"),
             (student, ["--teacher", teacher, "-o", tmp_path / "file" / "ft.onnx"], "file/ft.onnx: cannot write there")]
    for first, args, message in cases:
        code, _, err = cli("finetune", first, "--data", idx_dir, "-o", tmp_path / "ft.onnx", "--max-steps", "1",
                           "--batch-size", "4", "--workers", "0", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "t64.onnx"]


def test_finetune_never_writes_over_its_inputs_or_its_other_outputs(cli, idx_dir, tmp_path, teacher_and_student):
    """--checkpoint or -o naming the teacher or the student replaced it (exit 0: the teacher became a
    torch checkpoint, or the trained student), and a checkpoint at -o's path overwrote the result."""
    import shutil

    teacher = shutil.copy(teacher_and_student[0], tmp_path / "teacher.onnx")
    student = shutil.copy(teacher_and_student[1], tmp_path / "student.onnx")
    before = {path: path.read_bytes() for path in (teacher, student)}
    cases = [(["-o", tmp_path / "ft.onnx", "--checkpoint", teacher], "teacher.onnx: is the teacher model; write the "
              "checkpoint to another path"),
             (["-o", teacher], "teacher.onnx: is the teacher model; write the trained model to another path"),
             (["-o", tmp_path / "." / "student.onnx"], "student.onnx: is the student model; write the trained model"),
             (["-o", tmp_path / "ft.onnx", "--checkpoint", tmp_path / "ft.onnx"], "ft.onnx: is the trained model; "
              "write the checkpoint to another path")]
    for args, message in cases:
        code, _, err = cli("finetune", student, "--teacher", teacher, "--data", idx_dir, "--max-steps", "1",
                           "--batch-size", "4", "--workers", "0", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert {path: path.read_bytes() for path in (teacher, student)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx", "teacher.onnx"]


@pytest.mark.parametrize("width", ["0", "16"])
def test_train_teacher_refuses_a_width_it_cannot_hold(cli, idx_dir, tmp_path, width):
    """16x a ResNet-50 (some 6 billion weights) was taken, and would be killed for memory."""
    code, _, err = cli("train-teacher", "--data", idx_dir, "--width", width, "-o", tmp_path / "t.onnx")
    assert code == 2 and "expected a width above 0 and at most 4" in err, err
    assert not (tmp_path / "t.onnx").exists()


def test_train_teacher_refuses_a_config_that_would_not_learn_from_the_labels(idx_dir, tmp_path):
    """TrainConfig()'s label weight is 0 (fine-tuning distils): train_teacher, which has no
    teacher, would train on the weight decay alone."""
    from bnncc.errors import BnnccError
    from bnncc.train import train_teacher

    with pytest.raises(BnnccError, match="label_weight is 0.0, expected above 0"):
        train_teacher(idx_dir, tmp_path / "t.onnx", TrainConfig(max_steps=1), show_progress=False)
    assert not (tmp_path / "t.onnx").exists()


def test_train_teacher_refuses_data_of_one_class(cli, idx_writer, tmp_path):
    """One class made a network of one logit, whose softmax is 1: it trained on a loss of 0, reported a
    top-1 of 100% and wrote a teacher that finetune refused."""
    data = tmp_path / "data"
    data.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8))
    for prefix in ("train", "t10k"):
        idx_writer(data / f"{prefix}-images-idx3-ubyte.gz", images)
        idx_writer(data / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(8))
    code, _, err = cli("train-teacher", "--data", data, "--width", "0.125", "--max-steps", "1", "--batch-size", "4",
                       "-o", tmp_path / "t.onnx")
    assert code == 2 and err == f"error: {data}: one class; a network of one class gets no gradient from its " \
                                "labels (the softmax of one logit is 1): there is nothing to learn\n", err
    assert not (tmp_path / "t.onnx").exists()


def test_a_teacher_the_disk_cannot_hold_is_one_error_naming_it(cli, idx_dir, tmp_path):
    """The export onto a full disk was reported under a temporary file's name (.t.onnx.x1y2.onnx),
    not the output's."""
    from test_trainer import files_of_at_most

    with files_of_at_most(100_000):
        code, _, err = cli("train-teacher", "--data", idx_dir, "--width", "0.125", "--max-steps", "1",
                           "--batch-size", "8", "--workers", "0", "-o", tmp_path / "t.onnx")
    assert code == 2 and err == f"error: {tmp_path / 't.onnx'}: cannot write there (File too large)\n", err
    assert os.listdir(tmp_path) == []


def test_finetune_writes_into_folders_that_do_not_exist_yet(cli, idx_dir, tmp_path, teacher_and_student):
    """The metrics file, opened at the first log, had its folder made only by the writability check. Through
    a folder that does not exist and back (new/a/..), the metrics file's folder was made as mkdir -p does,
    leaving an empty new/a. (One run of both: each fine-tune takes ~15 s.)"""
    teacher, student = teacher_and_student
    out = tmp_path / "new" / "sub" / "ft.onnx"
    code, _, err = cli("finetune", student, "--teacher", teacher, "--data", idx_dir, "-o",
                       tmp_path / "new" / "a" / ".." / "sub" / "ft.onnx", "--max-steps", "2", "--batch-size", "8",
                       "--workers", "0")
    assert code == 0, err
    assert out.is_file() and out.with_suffix(".metrics.jsonl").is_file()
    assert os.listdir(tmp_path / "new") == ["sub"]


def test_torchrun_processes_calibrate_on_their_part_of_each_batch_to_one_process_bounds(tmp_path, idx_dir,
                                                                                          teacher_and_student):
    """Each process ran the whole global batch through calibration, in float32 (at 8 GPUs, 8 times the
    images it trains on: where training fits a GPU, calibration may not). Each now runs its part and
    the maxima are taken over the processes: the bounds one process calibrates."""
    teacher, student = teacher_and_student
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, __file__, teacher, student, idx_dir, one], check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
                    __file__, teacher, student, idx_dir, two], env={**os.environ, "OMP_NUM_THREADS": "1"},
                   check=True, timeout=300)
    single, double = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert single["sizes"] == [8] * 3 and double["sizes"] == [4] * 3  # (rank 0's)
    assert single["bounds"].keys() == double["bounds"].keys()
    for name, bound in single["bounds"].items():
        torch.testing.assert_close(double["bounds"][name], bound, rtol=1e-5, atol=1e-6)


def _calibration_worker(teacher: str, student: str, data_dir: str, out: str) -> None:
    """Calibrate at step 0 of a one-step run; save the bounds and the sizes of the batches calibration
    loaded (IDX data loads in this process)."""
    from bnncc.frontend import load, read_pokebnn
    from bnncc.torchview import to_torch
    from bnncc.train.trainer import is_main_process, train

    data = open_splits(data_dir)[0]
    sizes, load_images = [], data.load

    def recording(index, shape, *, augment, **kw):
        if not augment:  # calibration takes the evaluation crop
            sizes.append(len(index))
        return load_images(index, shape, augment=augment, **kw)

    data.load = recording
    net = to_torch(read_pokebnn(student, "finetune"))
    cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=1, calibration_batches=3, act_calibration_at=0.0)
    train(net, to_torch(load(teacher)), data, cfg, (3, 32, 32), show_progress=False)
    if is_main_process():
        buffers = dict(net.named_buffers())
        torch.save({"sizes": sizes, "bounds": {name: buffers[name] for name in net.bound_names}}, out)


def test_settings_given_as_a_dict_are_a_type_error_naming_the_config(tmp_path):
    """finetune(..., {"lr": 3e-2}) read the models, then failed on an attribute: "'dict' object has no
    attribute 'clip_bound'"; train_teacher on one of 'label_weight'."""
    from bnncc.train import train_teacher

    message = r"^cfg is a bnncc.TrainConfig, not dict: write bnncc.TrainConfig\(lr=..., epochs=...\)$"
    with pytest.raises(TypeError, match=message):
        finetune(tmp_path / "s.onnx", tmp_path / "t.onnx", tmp_path, tmp_path / "out.onnx", {"lr": 3e-2})
    with pytest.raises(TypeError, match=message):
        train_teacher(tmp_path, tmp_path / "teacher.onnx", {"lr": 3e-2})
    assert not any(tmp_path.iterdir())


def test_settings_of_any_real_number_type_are_recorded_as_json_numbers(idx_dir, tmp_path, teacher_and_student):
    """TrainConfig takes any real number, a Fraction or numpy's: a batch size of np.int64(8) failed at the first step
    in torch's generator ('an integer is required'), and a Fraction rate trained to its end, then failed writing the
    training record in a traceback ('Fraction' object has no attribute 'item'), writing nothing."""
    from fractions import Fraction

    teacher, student = teacher_and_student
    cfg = TrainConfig(lr=Fraction(1, 100), batch_size=np.int64(8), max_steps=2, calibration_batches=1,
                      temperature=np.float32(0.5), seed=np.uint32(7))
    finetune(student, teacher, idx_dir, tmp_path / "out.onnx", cfg, show_progress=False)
    text = {p.key: p.value for p in onnx.load(tmp_path / "out.onnx").metadata_props}["bnncc.training"]
    recorded = json.loads(text)
    assert (recorded["lr"], recorded["batch_size"], recorded["temperature"], recorded["seed"]) == (0.01, 8, 0.5, 7)
    assert '"batch_size": 8,' in text  # a count is written as an int


def test_a_finetune_records_its_seed_and_gives_the_same_graph_again(idx_dir, tmp_path, teacher_and_student):
    """The seed (and the other settings the weights depend on) was recorded nowhere in the trained graph: it could
    not be trained again to the same weights. The same settings give the same bytes; another seed other weights."""
    teacher, student = teacher_and_student

    def run(name, seed):
        cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=3, calibration_batches=1, seed=seed)
        finetune(student, teacher, idx_dir, tmp_path / name, cfg, show_progress=False)
        return onnx.load(tmp_path / name)

    first, again, other = run("a.onnx", 7), run("b.onnx", 7), run("c.onnx", 8)
    assert first.SerializeToString() == again.SerializeToString()
    assert [t.raw_data for t in first.graph.initializer] != [t.raw_data for t in other.graph.initializer]
    recorded = json.loads({p.key: p.value for p in first.metadata_props}["bnncc.training"])
    assert recorded == {"steps": 3, "seed": 7, "lr": 1e-2, "batch_size": 8, "calibration_batches": 1,
                        "weight_decay": 5e-5, "clip_bound": None, "temperature": 1.0, "label_weight": 0.0,
                        "weight_quant_start": 0.0625, "act_calibration_at": 0.06}


if __name__ == "__main__":
    _calibration_worker(*sys.argv[1:])
