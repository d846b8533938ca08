import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bnncc
from bnncc.errors import BnnccError
from bnncc.train import TrainConfig
from bnncc.train.data import open_dataset, read_idx
from bnncc.train.distill import distillation_loss
from bnncc.train.trainer import (MEMORY_FORMAT, _kernel_l2, evaluate, load_checkpoint, make_optimizer,
                                 to_training_layout, train)

from worker import tiny_net

WORKER = Path(__file__).with_name("worker.py")
# the workers import the bnncc under test (a clone's, not the editable install's) and worker.py beside this file
WORKER_ENV = {**os.environ,
              "PYTHONPATH": os.pathsep.join([str(WORKER.parent), str(Path(bnncc.__file__).parents[1])])}
SHAPE = (1, 8, 8)


def cfg(**kw) -> TrainConfig:
    base = dict(lr=0.05, batch_size=16, max_steps=8, weight_decay=5e-5, label_weight=1.0, checkpoint_every=2, seed=3)
    return TrainConfig(**{**base, **kw})


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_idx_reader_and_dataset(idx_dir):
    assert read_idx(idx_dir / "train-images-idx3-ubyte.gz").shape == (256, 8, 8)
    data = open_dataset(idx_dir, "train")
    assert data.num_classes == 4 and len(data) == 256
    images, labels = data.batch(torch.arange(4), (3, 16, 16), augment=True, step=0)
    assert images.shape == (4, 3, 16, 16) and labels.shape == (4,)
    with pytest.raises(BnnccError, match="neither an IDX folder"):
        open_dataset(idx_dir.parent, "train")


def test_distillation_loss_is_cross_entropy_to_teacher_softmax():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    expected = -(torch.softmax(t, 1) * torch.log_softmax(s, 1)).sum(1).mean()
    torch.testing.assert_close(distillation_loss(s, t, None), expected)
    # Minimised where the student's distribution equals the teacher's.
    assert distillation_loss(t, t, None) < distillation_loss(s, t, None)


def test_loss_falls_and_accuracy_rises(idx_dir, tmp_path):
    data = open_dataset(idx_dir, "train")
    net = tiny_net()
    before = evaluate(net, open_dataset(idx_dir, "val"), SHAPE)[0]
    metrics = tmp_path / "m.jsonl"
    train(net, None, data, cfg(lr=0.5, max_steps=150, log_every=5), SHAPE, metrics=metrics, show_progress=False)
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert losses[-1] < losses[0] and losses[-1] < 0.6 * math.log(4)  # chance level is ln 4
    after = evaluate(net, open_dataset(idx_dir, "val"), SHAPE)[0]
    assert after > max(before, 50.0)  # chance level is 25%


def test_progress_bars_are_drawn_on_a_terminal_s_stderr_only(idx_dir, capsys, monkeypatch):
    """Training's and evaluation's bars were drawn on stdout (verify's on stderr), so `finetune > out`
    or `convert | tee` mixed their last frames into the result tables that a script reads; and on
    stderr, out of a terminal, those frames stood before a failed run's one-line error."""
    import rich.console

    import bnncc.progress

    def run():
        train(tiny_net(), None, open_dataset(idx_dir, "train"), cfg(max_steps=2), SHAPE)
        evaluate(tiny_net(), open_dataset(idx_dir, "val"), SHAPE, label="val")
        return capsys.readouterr()

    assert run() == ("", "")  # no terminal: nothing
    monkeypatch.setattr(bnncc.progress, "Console",
                        lambda stderr: rich.console.Console(stderr=stderr, force_terminal=True))
    out, err = run()
    assert out == "" and "train" in err and "2/2" in err and "evaluate val" in err


def test_resume_is_bit_exact(idx_dir, tmp_path, monkeypatch):
    import bnncc.train.trainer as trainer

    data = open_dataset(idx_dir, "train")
    whole = tiny_net()
    saved = trainer._save_checkpoint
    at_step4 = tmp_path / "step4.ckpt"

    def keep_step4(path, step, *args):
        saved(path, step, *args)
        if step == 4:
            at_step4.write_bytes(path.read_bytes())

    monkeypatch.setattr(trainer, "_save_checkpoint", keep_step4)
    train(whole, None, data, cfg(), SHAPE, checkpoint=tmp_path / "run.ckpt", show_progress=False)
    assert load_checkpoint(at_step4)["step"] == 4
    metrics = tmp_path / "m.jsonl"
    train(tiny_net(), None, data, cfg(log_every=1), SHAPE, metrics=metrics, show_progress=False)
    resumed = tiny_net()
    train(resumed, None, data, cfg(log_every=1), SHAPE, checkpoint=at_step4, resume=True, metrics=metrics,
          show_progress=False)
    assert states_equal(resumed.state_dict(), whole.state_dict())
    # the steps after the checkpoint, logged before the stop, are logged once (they were twice)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    # each step's own rate, lr * batch / 256 decaying linearly (the next step's was logged: 0 at the last)
    assert [r["lr"] for r in records] == pytest.approx([0.05 * 16 / 256 * (1 - s / 8) for s in range(8)])
    fresh = tiny_net()  # and a run that does not resume differs after 4 steps
    assert not states_equal(fresh.state_dict(), whole.state_dict())


def test_a_run_removes_the_partial_checkpoints_of_a_killed_one(idx_dir, tmp_path):
    """A kill -9 while a checkpoint was written left its temporary file (as large as a checkpoint) beside
    it, and every later run kept it; other files of similar names are not a checkpoint's."""
    checkpoint = tmp_path / "run.ckpt"
    partial, others = tmp_path / ".run.ckpt.x1y2z3.ckpt", [tmp_path / ".run.ckpt.mine", tmp_path / ".run.ckpt"]
    for path in (partial, *others):
        path.write_bytes(b"half a checkpoint")
    train(tiny_net(), None, open_dataset(idx_dir, "train"), cfg(max_steps=2), SHAPE, checkpoint=checkpoint,
          show_progress=False)
    assert sorted(tmp_path.iterdir()) == sorted([checkpoint, *others])


def test_resuming_another_runs_checkpoint_is_refused_and_a_new_run_begins_its_metrics(idx_dir, tmp_path, caplog):
    """A checkpoint continues only the run of its settings (another batch size's step count would be
    taken for this run's); without --resume the metrics file starts anew; --resume without a
    checkpoint says so."""
    data = open_dataset(idx_dir, "train")
    checkpoint, metrics = tmp_path / "run.ckpt", tmp_path / "m.jsonl"
    train(tiny_net(), None, data, cfg(), SHAPE, checkpoint=checkpoint, metrics=metrics, show_progress=False)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    with pytest.raises(BnnccError, match=r"run.ckpt: written by a run with other settings \(batch_size 16 -> 8\)"):
        train(tiny_net(), None, data, cfg(batch_size=8), SHAPE, checkpoint=checkpoint, resume=True, show_progress=False)
    train(tiny_net(), None, data, cfg(), SHAPE, checkpoint=checkpoint, metrics=metrics, show_progress=False)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == steps  # not appended
    with caplog.at_level("WARNING"):
        train(tiny_net(), None, data, cfg(), SHAPE, checkpoint=tmp_path / "none.ckpt", resume=True, show_progress=False)
    assert "none.ckpt: no checkpoint to resume from; training from step 0" in caplog.text


def test_resume_compares_the_runs_length_and_its_teacher(idx_dir, tmp_path):
    """--resume refused a run of the same --max-steps for its other --epochs, which do not count then,
    and took another teacher's checkpoint for its own."""
    data = open_dataset(idx_dir, "train")
    checkpoint, teacher = tmp_path / "run.ckpt", tiny_net()
    train(tiny_net(), teacher, data, cfg(max_steps=2, epochs=1), SHAPE, checkpoint=checkpoint, show_progress=False)
    train(tiny_net(), tiny_net(), data, cfg(max_steps=2, epochs=5), SHAPE, checkpoint=checkpoint, resume=True,
          show_progress=False)
    other = tiny_net()
    with torch.no_grad():
        other[0].weight[0, 0, 0, 0] += 1
    with pytest.raises(BnnccError, match=r"run.ckpt: written by a run with other settings \(another teacher \(its "
                                         r"weights differ\)\)"):
        train(tiny_net(), other, data, cfg(max_steps=2), SHAPE, checkpoint=checkpoint, resume=True,
              show_progress=False)
    # without --max-steps the epochs decide the length: 256 images are 16 batches of 16
    train(tiny_net(), None, data, cfg(max_steps=None, epochs=1), SHAPE, checkpoint=checkpoint, show_progress=False)
    with pytest.raises(BnnccError, match=r"run.ckpt: written by a run with other settings \(steps 16 -> 32\)"):
        train(tiny_net(), None, data, cfg(max_steps=None, epochs=2), SHAPE, checkpoint=checkpoint, resume=True,
              show_progress=False)


def test_a_teacher_with_a_batch_norm_resumes(idx_dir, tmp_path):
    """A teacher whose state holds a 0-dim tensor (a torch batch norm's num_batches_tracked) ended a
    run with a checkpoint in torch's RuntimeError ("self.dim() cannot be 0 to view Long as Byte")
    where its digest was taken; its checkpoint resumes, and another teacher's step count is refused."""
    data = open_dataset(idx_dir, "train")
    checkpoint = tmp_path / "run.ckpt"
    train(tiny_net(), tiny_net(input_norm=True), data, cfg(max_steps=2), SHAPE, checkpoint=checkpoint,
          show_progress=False)
    train(tiny_net(), tiny_net(input_norm=True), data, cfg(max_steps=2), SHAPE, checkpoint=checkpoint, resume=True,
          show_progress=False)
    other = tiny_net(input_norm=True)
    other[0].num_batches_tracked += 1
    with pytest.raises(BnnccError, match=r"another teacher \(its weights differ\)"):
        train(tiny_net(), other, data, cfg(max_steps=2), SHAPE, checkpoint=checkpoint, resume=True,
              show_progress=False)


def test_a_batch_of_one_image_at_the_last_stages_size_is_refused(idx_dir):
    """An 8 px image is one pixel at the last stage of a ResNet: alone in its batch, its batch norms
    see one value a channel, and torch raised an unexpected ValueError at the first step."""
    data = open_dataset(idx_dir, "train")
    with pytest.raises(BnnccError, match="a batch of 1 image a process at 8x8 gives the last stage's batch norms one "
                                         "value a channel; use --batch-size 2 or more"):
        train(tiny_net(), None, data, cfg(batch_size=1), SHAPE, show_progress=False)
    train(tiny_net(), None, data, cfg(batch_size=1, max_steps=1), (1, 64, 64), show_progress=False)  # 2x2 pixels


def test_a_checkpoint_of_other_data_or_another_network_is_refused(idx_dir, idx_writer, tmp_path):
    """Resumed on another data set, a checkpoint's step was taken for this run's (a step-160 state
    "resumed" a 60-step run: exit 0, loss nan); another network's ended in an unexpected
    RuntimeError whose message stopped at a colon."""
    data = open_dataset(idx_dir, "train")
    checkpoint = tmp_path / "run.ckpt"
    train(tiny_net(), None, data, cfg(max_steps=2), SHAPE, checkpoint=checkpoint, show_progress=False)
    # half the images; as many images of other labels (only the image count was checked)
    for images, change in ((128, r"training images 256 -> 128"),
                           (256, r"another data set of as many training images \(their labels differ\)")):
        (tmp_path / str(images)).mkdir()
        pixels = np.random.default_rng(images).integers(0, 256, (images, 8, 8))  # (of one grey, a data set is refused)
        idx_writer(tmp_path / str(images) / "train-images-idx3-ubyte.gz", pixels)
        idx_writer(tmp_path / str(images) / "train-labels-idx1-ubyte.gz", np.arange(images) % 4)
        other = open_dataset(tmp_path / str(images), "train")
        with pytest.raises(BnnccError, match=rf"run.ckpt: written by a run with other settings \({change}\)"):
            train(tiny_net(), None, other, cfg(max_steps=2), SHAPE, checkpoint=checkpoint, resume=True,
                  show_progress=False)
    wider = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(64, 4))
    with pytest.raises(BnnccError, match=r"run.ckpt: a checkpoint of another network \(size mismatch for 0.weight"):
        train(wider, None, data, cfg(max_steps=2), SHAPE, checkpoint=checkpoint, resume=True, show_progress=False)


def test_the_optimizer_state_is_the_same_in_one_process_and_under_torchrun():
    """One process keeps Adam's state in one flat buffer, DDP per parameter: a checkpoint of either
    failed to load into the other ("parameter group that doesn't match the size"), so a run could not
    resume on another number of processes. Both now save and load the per-parameter form."""
    nets = [tiny_net().to(memory_format=MEMORY_FORMAT) for _ in range(4)]
    flat, plain = make_optimizer(nets[0], 0.01), make_optimizer(nets[1], 0.01, flat=False)
    assert type(flat) is not type(plain)

    def step(net, optimizer, seed):
        optimizer.zero_grad()
        net(torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
        optimizer.step()

    for seed in range(3):
        step(nets[0], flat, seed)
        step(nets[1], plain, seed)
    a, b = flat.state_dict(), plain.state_dict()
    assert a["state"].keys() == b["state"].keys() and a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][key], b["state"][i][key]), (i, key)
    # each continues from the other's state as from its own
    nets[2].load_state_dict(nets[1].state_dict())
    nets[3].load_state_dict(nets[0].state_dict())
    flat_from_plain, plain_from_flat = make_optimizer(nets[2], 0.01), make_optimizer(nets[3], 0.01, flat=False)
    flat_from_plain.load_state_dict(b)
    plain_from_flat.load_state_dict(a)
    for net, optimizer in ((nets[0], flat), (nets[2], flat_from_plain), (nets[3], plain_from_flat)):
        step(net, optimizer, 7)
    assert states_equal(nets[0].state_dict(), nets[2].state_dict())
    assert states_equal(nets[0].state_dict(), nets[3].state_dict())


@pytest.mark.parametrize("stop_at, said", [
    (1, "stopped at step 0 of 8, before the first checkpoint (every 2 steps): nothing is kept"),
    (6, "stopped at step 5 of 8; {ckpt} holds step 4: run the command again (finetune with --resume)"),
])
# a torchrun peer that dies breaks the collectives with a RuntimeError (gloo: "Connection closed by peer")
@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_stopped_run_says_which_step_its_checkpoint_holds(idx_dir, tmp_path, monkeypatch, caplog, stop_at, said,
                                                            stop):
    """Ctrl-C (KeyboardInterrupt; SIGTERM is a SystemExit in bnncc.cli) or a failure during step ``stop_at``."""
    import bnncc.train.trainer as trainer

    calls, kernel_l2 = [0], trainer._kernel_l2

    def interrupted(module):
        calls[0] += 1
        if calls[0] == stop_at:
            raise stop
        return kernel_l2(module)

    monkeypatch.setattr(trainer, "_kernel_l2", interrupted)
    checkpoint = tmp_path / "run.ckpt"
    with caplog.at_level("WARNING"), pytest.raises(stop):
        train(tiny_net(), None, open_dataset(idx_dir, "train"), cfg(), SHAPE, checkpoint=checkpoint, show_progress=False)
    assert said.format(ckpt=checkpoint) in caplog.text
    assert checkpoint.exists() == (stop_at > 2) and (stop_at < 2 or load_checkpoint(checkpoint)["step"] == 4)


def test_a_stop_right_after_a_checkpoints_rename_names_that_checkpoint(idx_dir, tmp_path, monkeypatch, caplog):
    """A stop landing after the checkpoint of step 4 replaced the file, before the run noted it
    (seen under torchrun), said the file held step 2."""
    import bnncc.train.trainer as trainer

    save = trainer._save_checkpoint

    def stopped_after_rename(path, step, *args):
        save(path, step, *args)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_checkpoint", stopped_after_rename)
    checkpoint = tmp_path / "run.ckpt"
    data = open_dataset(idx_dir, "train")
    with caplog.at_level("WARNING"), pytest.raises(KeyboardInterrupt):
        train(tiny_net(), None, data, cfg(), SHAPE, checkpoint=checkpoint, show_progress=False)
    assert load_checkpoint(checkpoint)["step"] == 4 and f"{checkpoint} holds step 4:" in caplog.text


def test_a_diverging_run_stops_before_its_checkpoint_or_metrics_keep_it(idx_dir, tmp_path):
    """A learning rate of 1e30 makes the loss NaN within a few steps: an error naming the step,
    the last checkpoint and metrics line from before it (NaN in them: a diverged state to resume
    and a line that is not JSON)."""
    checkpoint, metrics = tmp_path / "run.ckpt", tmp_path / "m.jsonl"
    with pytest.raises(BnnccError, match=r"training diverged: the loss is not finite \(nan\) by step (\d+)") as error:
        train(tiny_net(), None, open_dataset(idx_dir, "train"), cfg(lr=1e30, max_steps=40, log_every=1), SHAPE,
              checkpoint=checkpoint, metrics=metrics, show_progress=False)
    step = int(error.value.args[0].split("by step ")[1].split(";")[0])
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, step)) and all(math.isfinite(r["loss"]) for r in records)
    if checkpoint.exists():
        state = load_checkpoint(checkpoint)
        assert state["step"] < step and all(torch.isfinite(v).all() for v in state["model"].values())


@contextlib.contextmanager
def files_of_at_most(size: int):
    """Writes past ``size`` bytes of a file fail (EFBIG), as they do on a full disk (ENOSPC)."""
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_checkpoint_the_disk_cannot_hold_is_one_error_and_leaves_no_file(idx_dir, tmp_path):
    """torch.save on a full disk raises "unexpected pos 576 vs 534", which ended finetune as an
    unexpected RuntimeError (exit 1)."""
    data = open_dataset(idx_dir, "train")
    with files_of_at_most(1000), pytest.raises(BnnccError, match=r"run.ckpt: cannot write there \(.* MiB free"):
        train(tiny_net(), None, data, cfg(), SHAPE, checkpoint=tmp_path / "run.ckpt", show_progress=False)
    assert os.listdir(tmp_path) == []


def test_metrics_the_disk_cannot_hold_are_one_error(idx_dir, tmp_path):
    """A metrics line written onto a full disk ended finetune as an unexpected OSError (exit 1)."""
    data = open_dataset(idx_dir, "train")
    with files_of_at_most(200), pytest.raises(BnnccError, match=r"m.jsonl: cannot write there \(File too large\)"):
        train(tiny_net(), None, data, cfg(log_every=1), SHAPE, metrics=tmp_path / "m.jsonl", show_progress=False)


def test_a_batch_larger_than_the_data_is_refused_with_a_step_limit_too(idx_dir):
    data = open_dataset(idx_dir, "train")
    with pytest.raises(BnnccError, match=f"{len(data)} training images make no batch of 1000"):
        train(tiny_net(), None, data, cfg(batch_size=1000, max_steps=1), SHAPE, show_progress=False)


@pytest.mark.parametrize("train_labels, val_labels, message", [
    ([0, 1, 2, 200], [0, 1], r"train-labels-idx1-ubyte.gz: class 3 has no images \(the labels go up to 200\)"),
    ([0, 1, 2, 3], [0, 42], r"t10k-labels-idx1-ubyte.gz: label 42, where the training labels are 0 to 3"),
])
def test_idx_labels_beyond_the_classes_are_refused(tmp_path, idx_writer, train_labels, val_labels, message):
    for prefix, labels in (("train", train_labels), ("t10k", val_labels)):
        idx_writer(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((len(labels), 8, 8)))
        idx_writer(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.array(labels))
    with pytest.raises(BnnccError, match=message):
        open_dataset(tmp_path, "train" if "train-" in message else "val")


def _run_worker(args, **kw):
    return subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=WORKER_ENV, check=True, timeout=300,
                          **kw)


def test_kill_minus_nine_loses_nothing_before_the_last_checkpoint(idx_dir, tmp_path):
    reference = tmp_path / "ref.pt"
    _run_worker([idx_dir, reference, tmp_path / "ref.ckpt", 10])
    checkpoint, out = tmp_path / "run.ckpt", tmp_path / "run.pt"
    proc = subprocess.Popen([sys.executable, str(WORKER), idx_dir, out, checkpoint, "10", "--slow"], env=WORKER_ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not checkpoint.exists():
        time.sleep(0.05)
    # inside the next step's 0.2 s sleep: the next checkpoint is written two sleeps later (0.5 s, as before, fell about
    # when it was being written, and a kill during the write leaves its temporary)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it was killed"
    state = load_checkpoint(checkpoint)  # intact, not partial
    assert state["step"] % 2 == 0 and 2 <= state["step"] < 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.ckpt")], "a temporary file was left"
    _run_worker([idx_dir, out, checkpoint, 10, "--resume"])
    assert states_equal(torch.load(out, weights_only=True), torch.load(reference, weights_only=True))


def test_two_process_ddp_matches_one_process(idx_dir, tmp_path):
    single = tmp_path / "single.pt"
    _run_worker([idx_dir, single, tmp_path / "s.ckpt", 6])
    double = tmp_path / "double.pt"
    env = {**WORKER_ENV, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    str(WORKER), str(idx_dir), str(double), str(tmp_path / "d.ckpt"), "6"],
                   env=env, check=True, timeout=300)
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    # the loss logged is the global batch's, not rank 0's half of it
    losses = [[json.loads(line)["loss"] for line in path.with_suffix(".jsonl").read_text().splitlines()]
              for path in (single, double)]
    assert len(losses[0]) == 6 and losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_ddp_processes_that_find_different_checkpoints_stop_in_one_line(idx_dir, tmp_path):
    """Each process reads the checkpoint's path itself: where only rank 0's disk held one, rank 0
    resumed at step 6 and rank 1 began at 0, and their collectives no longer matched."""
    _run_worker([idx_dir, tmp_path / "single.pt", tmp_path / "c0.ckpt", 6])
    assert (tmp_path / "c0.ckpt").exists()
    env = {**WORKER_ENV, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29533", str(WORKER), str(idx_dir), str(tmp_path / "double.pt"),
                           str(tmp_path / "c$LOCAL_RANK.ckpt"), "6", "--resume"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and not (tmp_path / "double.pt").exists()
    assert "the processes found different checkpoints there (rank 0: step 6, rank 1: none)" in done.stderr


def test_ddp_processes_given_different_data_stop_before_training(idx_dir, tmp_path, idx_writer):
    """Each process opens --data itself: on nodes with data copies of their own, one copy of other
    images (here: as many, other labels) trained without a word on other batches than the others'
    (and a copy of fewer images ran fewer steps, leaving the others in a collective)."""
    other = tmp_path / "d1"
    other.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz"):
        (other / name).symlink_to(idx_dir / name)
    labels = read_idx(idx_dir / "train-labels-idx1-ubyte.gz")
    idx_writer(other / "train-labels-idx1-ubyte.gz", (labels + 1) % 4)
    (tmp_path / "d0").symlink_to(idx_dir)
    env = {**WORKER_ENV, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29535", str(WORKER), str(tmp_path / "d$LOCAL_RANK"), str(tmp_path / "double.pt"),
                           str(tmp_path / "c.ckpt"), "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and not (tmp_path / "double.pt").exists()
    assert "the processes opened different training data (rank 0: 256 images, labels " in done.stderr
    assert "rank 1: 256 images, labels " in done.stderr


def test_ddp_processes_average_their_batch_norm_statistics(idx_dir, tmp_path):
    """Each process keeps its own running statistics and the run writes their mean (pokebnn.md 7.6).
    An input batch norm's running mean is an average of image means, so the two processes' mean of
    it is the one-process run's; DDP's buffer broadcast gave rank 0's, from its half of each batch."""
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    _run_worker([idx_dir, single, tmp_path / "s.ckpt", 5, "--input-norm"])
    env = {**WORKER_ENV, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                    str(WORKER), str(idx_dir), str(double), str(tmp_path / "d.ckpt"), "5", "--input-norm"],
                   env=env, check=True, timeout=300)
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    torch.testing.assert_close(b["0.running_mean"], a["0.running_mean"], rtol=1e-5, atol=1e-6)


def test_gradients_come_in_their_parameters_strides(teacher_and_student):
    # DDP copies a gradient whose strides are not its parameter's into its bucket, with a warning: under
    # torchrun the SE gates' 1x1 weights, channels_last, got their gradients (the kernel L2 term's added in)
    # in plain strides. The loss has the L2 term as train() adds it.
    import onnx_ir as ir

    from bnncc.torchview import to_torch

    student = to_training_layout(to_torch(ir.load(teacher_and_student[1])), torch.device("cpu")).train()
    images = torch.randn(2, 3, 32, 32).to(memory_format=MEMORY_FORMAT)
    (student(images).square().mean() + _kernel_l2(student)).backward()
    params = dict(student.named_parameters())
    one_by_one = [name for name, p in params.items() if p.dim() == 4 and p.shape[2:] == (1, 1)]
    assert len(one_by_one) >= 32  # the SE gates' weights, two a PokeConv
    assert all(p.is_contiguous(memory_format=MEMORY_FORMAT) for p in params.values() if p.dim() == 4)
    assert {name: p.grad.stride() for name, p in params.items()} == {name: p.stride() for name, p in params.items()}


@pytest.mark.slow  # compiles (tens of seconds)
def test_compiled_step_trains_like_the_eager_one(idx_dir, caplog):
    data = open_dataset(idx_dir, "train")
    eager, compiled = tiny_net(), tiny_net()
    compiled.load_state_dict(eager.state_dict())
    train(eager, None, data, cfg(max_steps=3), SHAPE, show_progress=False)
    with caplog.at_level("INFO", logger="bnncc.train.trainer"):
        train(compiled, None, data, cfg(max_steps=3, compile=True), SHAPE, show_progress=False)
    assert "torch.compile: step 1 took" in caplog.text
    for a, b in zip(eager.parameters(), compiled.parameters()):  # the same training, up to rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_flat_adam_steps_exactly_as_adam_over_each_parameter():
    """One flat buffer (the trainer's optimizer in one process) against torch's fused Adam over
    each tensor: the same weights bit for bit, with channels-last weights kept channels-last and
    a gradient replaced behind the optimizer's back (module.zero_grad()) still counted."""
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5)).contiguous(memory_format=MEMORY_FORMAT)
    states = []
    for flat in (True, False):
        net = tiny_net().to(memory_format=MEMORY_FORMAT)
        optimizer = make_optimizer(net, 1e-2, flat=flat)
        assert (type(optimizer) is torch.optim.Adam) != flat
        for step in range(5):
            optimizer.zero_grad()
            if step == 2:
                net.zero_grad()  # set_to_none: the next backward allocates fresh gradients
            net(x).logsumexp(1).mean().backward()
            optimizer.step()
        assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
        states.append(net.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


_FAULTS_SCRIPT = """
import resource, sys, torch
from bnncc.train.trainer import keep_freed_memory
if sys.argv[1] == "kept":
    keep_freed_memory()
faults = []
for step in range(2):  # a step's activations: buffers of a few sizes (MiBs), alive together, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [torch.ones(n << 16) for n in (16, 4, 8, 4, 2, 12, 8, 1, 32, 4) * 3]
    del buffers
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_training_keeps_freed_buffers_instead_of_faulting_them_in_again():
    def faults(mode: str) -> tuple[int, int]:
        done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        first, second = map(int, done.stdout.split())
        return first, second

    first, second = faults("default")
    assert second > first // 2  # glibc unmaps or trims the freed buffers; the second step faults them in again
    first, second = faults("kept")
    assert second < first // 20


ABOVE_0, AT_LEAST_0 = "a finite number above 0", "a finite number of at least 0"


@pytest.mark.parametrize("setting, expected", [
    (dict(lr=float("nan")), ABOVE_0), (dict(lr=-1.0), ABOVE_0), (dict(batch_size=0), "1 or more"),
    (dict(max_steps=0), "1 or more"), (dict(temperature=0.0), ABOVE_0), (dict(label_weight=float("inf")), AT_LEAST_0),
    (dict(checkpoint_every=0), "1 or more"), (dict(num_workers=-1), AT_LEAST_0), (dict(clip_bound=0.0), ABOVE_0),
    (dict(seed=2**63 - 1), r"0 to 2\*\*32 - 1"),
    # not numbers, or not the integers they count: lr "1e-3" failed comparing with 0 ("'>' not supported between
    # instances of 'str' and 'int'"), a batch of 2.5 was taken
    (dict(lr="1e-3"), ABOVE_0), (dict(batch_size=2.5), "1 or more"), (dict(log_every=10.0), "1 or more"),
    # an integer beyond a float's range: isfinite failed on it, "int too large to convert to float"
    (dict(seed=10**400), r"0 to 2\*\*32 - 1")])
def test_training_settings_out_of_range_are_an_error(setting, expected):
    """A setting out of range is refused when the config is made: a zero batch or step interval
    divided by zero deep inside the loop, a NaN rate trained to nothing without a word. The error
    says the range (it said "out of range" alone: `finetune --max-steps 0`)."""
    (name, value), = setting.items()
    with pytest.raises(BnnccError, match=f"^training setting {name} = {value!r} is out of range; expected {expected}$"):
        TrainConfig(**setting)


def test_a_rate_that_is_infinite_at_the_batch_size_is_an_error():
    # 1e308 is finite, and so is 8192; the optimizer's rate lr * 8192 / 256 is not
    with pytest.raises(BnnccError, match=r"^training setting lr = 1e\+308 at a batch of 8192 gives the optimizer an "
                                         r"infinite rate \(lr \* batch_size / 256\); expected a finite one$"):
        TrainConfig(lr=1e308, batch_size=8192)
    assert TrainConfig(lr=1e300, batch_size=8192).lr == 1e300


def test_numpy_numbers_are_training_settings():
    config = TrainConfig(lr=np.float32(0.5), batch_size=np.int64(8), seed=np.uint32(3))
    assert (config.lr, config.batch_size, config.seed) == (0.5, 8, 3)
    # held as Python's numbers, which torch's generator and json take
    assert [type(value) for value in (config.lr, config.batch_size, config.seed)] == [float, int, int]
