"""Image files (ImageFolder trees, WebDataset tar shards) read batch by batch in DataLoader workers.

The data sets are small synthetic JPEGs made here: each class its own brightness, each image its
own size. The shards hold the very bytes of the ImageFolder's files in the same order, so both
layouts must give the same batches. Run as a script (under torchrun) this file is the DDP worker:
    test_data_files.py DATA_DIR OUT_STATE STEPS
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bnncc.errors import BnnccError
from bnncc.train import TrainConfig
from bnncc.train.data import open_dataset, open_splits, read_idx
from bnncc.images import centre_box
from bnncc.train.imagefiles import _random_box
from bnncc.train.loader import Loader, Plan
from bnncc.train.trainer import evaluate, evaluate_models, train

SHAPE = (3, 16, 16)
CLASSES = 3


def jpeg(rng: np.random.Generator, label: int, width: int, height: int) -> bytes:
    pixels = (rng.integers(0, 60, (height, width, 3)) + 80 * label).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_data(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """``root/images`` (ImageFolder) and ``root/shards`` (two training shards, one validation shard)."""
    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True)
    for split, count in per_class.items():
        samples = []
        for label in range(CLASSES):
            folder = root / "images" / split / f"c{label}"
            folder.mkdir(parents=True)
            for k in range(count):
                data = jpeg(rng, label, 32 + 8 * (k % 3), 24 + 4 * (k % 4))
                (folder / f"{k:03d}.jpg").write_bytes(data)
                samples.append((f"c{label}/{k:03d}", data, label))
        shards = 2 if split == "train" else 1
        for number in range(shards):
            with tarfile.open(root / "shards" / f"{split}-{number:06d}.tar", "w") as tar:
                part = samples[number * len(samples) // shards:(number + 1) * len(samples) // shards]
                for key, data, label in part:
                    for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", f"{label}\n".encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("files"), {"train": 12, "val": 4})


@pytest.fixture(scope="module", params=["images", "shards"])
def data_dir(request, data_root) -> Path:
    return data_root / request.param


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    # No batch norm: DDP ranks normalise per device, which would differ from one process.
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, CLASSES))


def cfg(**kw) -> TrainConfig:
    base = dict(lr=0.05, batch_size=8, max_steps=6, weight_decay=5e-5, label_weight=1.0, checkpoint_every=2,
                seed=3, num_workers=2)
    return TrainConfig(**{**base, **kw})


def train_batches(data, steps, workers, batch_size=8, seed=3):
    loader = Loader(data, SHAPE, seed=seed, workers=workers)
    plans = [Plan(data.batch_indices(s, batch_size, seed), s, torch.arange(batch_size)) for s in steps]
    return list(loader(plans))


def test_both_layouts_index_the_same_images(data_root):
    folder, shards = open_dataset(data_root / "images", "train"), open_dataset(data_root / "shards", "train")
    assert len(folder) == len(shards) == 36 and folder.num_classes == shards.num_classes == CLASSES
    assert folder.labels.tolist() == shards.labels.tolist() == [c for c in range(CLASSES) for _ in range(12)]
    for i in (0, 17, 35):
        path = data_root / "images" / "train" / f"c{folder.labels[i]}" / f"{i % 12:03d}.jpg"
        assert folder.read(i) == shards.read(i) == path.read_bytes()
    assert shards.describe(20) == f"{data_root / 'shards' / 'train-000001.tar'}:c1/008.jpg"
    # The index is a few arrays, no pixels: memory does not grow with the images' size.
    assert folder.names.nbytes + folder.labels.nbytes + folder.source.nbytes < 40 * len(folder)


def test_evaluation_crop_is_the_centre_224_of_256_resized(data_dir):
    data = open_dataset(data_dir, "val")
    images, labels, bad = data.load(torch.arange(3), SHAPE, augment=False)
    assert images.dtype == torch.uint8 and images.shape == (3, *SHAPE) and not bad
    assert images.is_contiguous(memory_format=torch.channels_last)
    for row in range(3):
        with Image.open(io.BytesIO(data.read(row))) as im:
            width, height = im.size
            side = 0.875 * min(width, height)  # square output: the centred square of 224/256 of the short side
            left, top = (width - side) / 2, (height - side) / 2
            expected = im.convert("RGB").resize((16, 16), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
        assert torch.equal(images[row].permute(1, 2, 0), torch.from_numpy(np.array(expected)))


def test_large_jpegs_decode_at_a_reduced_dct_scale_close_to_the_full_decode(tmp_path):
    rng = np.random.default_rng(1)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((512, 384), Image.BICUBIC))
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(smooth).save(tmp_path / "train" / "a" / "big.jpg", quality=95)
    data = open_dataset(tmp_path, "train")
    images = data.load(torch.arange(1), SHAPE, augment=False)[0][0].permute(1, 2, 0).float()
    with Image.open(tmp_path / "train" / "a" / "big.jpg") as im:
        im.draft("RGB", (512 * 16 // 336 + 1, 384 * 16 // 336 + 1))
        assert im.size == (64, 48)  # 336 px of crop -> >= 16 px at 1/8 scale
    side = 0.875 * 384
    full = Image.fromarray(smooth).resize((16, 16), Image.Resampling.BICUBIC,
                                          box=((512 - side) / 2, (384 - side) / 2, (512 + side) / 2, (384 + side) / 2))
    assert (images - torch.from_numpy(np.array(full)).float()).abs().mean() < 4  # of 255


def test_random_crops_follow_the_inception_recipe():
    rng = np.random.default_rng(0)
    boxes = np.array([_random_box(500, 375, rng) for _ in range(2000)])
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 500).all() and (boxes[:, 3] <= 375).all()
    random_ones = ~np.isclose(widths * heights, 500 * 375)  # the rest fell back to the whole 4:3 image
    areas = widths[random_ones] * heights[random_ones] / (500 * 375)
    ratios = widths[random_ones] / heights[random_ones]
    assert areas.min() >= 0.1 - 1e-9 and areas.max() <= 1 and ratios.min() >= 0.75 - 1e-9 and ratios.max() <= 4 / 3 + 1e-9
    assert np.quantile(areas, 0.1) < 0.25 and random_ones.mean() > 0.5
    # A long image falls back to its centred 4:3 crop.
    assert _random_box(1000, 10, np.random.default_rng(0)) == pytest.approx(centre_box(1000, 10, (4, 3), 1.0))
    assert centre_box(1000, 10, (4, 3), 1.0) == pytest.approx((500 - 20 / 3, 0, 500 + 20 / 3, 10))


def test_augmentation_flips_half_of_the_images(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, 16:] = 255  # dark left half, bright right half: a flip shows as bright left columns
    Image.fromarray(half).save(tmp_path / "train" / "a" / "x.png")
    data = open_dataset(tmp_path, "train")
    images = data.load(torch.zeros(200, dtype=torch.int64), SHAPE, augment=True, step=5, seed=1)[0].float()
    flipped = images[:, :, :, 0].mean(dim=(1, 2)) > images[:, :, :, -1].mean(dim=(1, 2))
    assert 70 < int(flipped.sum()) < 130


def test_batches_depend_on_seed_step_and_position_only(data_root):
    folder, shards = open_dataset(data_root / "images", "train"), open_dataset(data_root / "shards", "train")
    steps = range(7)  # 4 batches an epoch: crosses into the second epoch
    reference = train_batches(folder, steps, workers=0)
    for data, workers in ((folder, 2), (shards, 2), (shards, 0)):
        batches = train_batches(data, steps, workers)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(reference, batches))
    # a run resumed at step 4 loads the batches of an uninterrupted one
    resumed = train_batches(shards, range(4, 7), workers=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(reference[4:], resumed))
    assert not torch.equal(reference[0][0], reference[4][0])  # epochs differ in order and augmentation
    assert sorted(torch.cat([folder.batch_indices(s, 8, 3) for s in range(4)]).tolist()) == \
        sorted(torch.randperm(36, generator=torch.Generator().manual_seed(3 * 100_003))[:32].tolist())


def test_ddp_ranks_load_disjoint_slices_of_the_global_batch(data_dir):
    data = open_dataset(data_dir, "train")
    index = data.batch_indices(5, 8, 3)
    loader = Loader(data, SHAPE, seed=3, workers=2)
    (whole, labels), = loader([Plan(index, 5, torch.arange(8))])
    for rank in range(2):
        positions = torch.arange(rank, 8, 2)  # the trainer's slice for rank r of 2
        (part, part_labels), = loader([Plan(index[positions], 5, positions)])
        assert torch.equal(part, whole[positions]) and torch.equal(part_labels, labels[positions])


def test_workers_leave_a_stop_signal_to_the_trainer(data_dir):
    """A SIGTERM to the whole process group (timeout, SLURM) killed the workers first, and torch's
    iterator printed a traceback from its __del__ beside the trainer's own stop line."""
    import os
    import signal
    from pathlib import Path

    def children() -> set[int]:
        pids = set()
        for task in Path("/proc/self/task").iterdir():
            try:  # a thread of an earlier test's pool may end between the listing and the read (CI failed so)
                pids |= {int(pid) for pid in (task / "children").read_text().split()}
            except FileNotFoundError:
                continue
        return pids

    data = open_dataset(data_dir, "train")
    index = data.batch_indices(5, 8, 3)
    before = children()
    batches = Loader(data, SHAPE, seed=3, workers=2)(Plan(index, step, None) for step in range(5))
    next(batches), next(batches)  # one batch from each worker: both have started
    workers = children() - before
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    assert len(list(batches)) == 3  # the workers went on


@contextlib.contextmanager
def ctrl_c_at_the_next_fork():
    """bnncc.cli's handling of Ctrl-C, and a Ctrl-C as the next process is forked."""
    import signal

    from bnncc.cli._app import on_signal

    armed = [True]

    def ctrl_c_as_a_process_is_forked():
        if armed:
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)

    os.register_at_fork(after_in_parent=ctrl_c_as_a_process_is_forked)  # (inert once fired: it cannot be removed)
    previous = signal.signal(signal.SIGINT, on_signal)
    try:
        yield
    finally:
        armed.clear()
        signal.signal(signal.SIGINT, previous)


def test_a_stop_signal_while_the_workers_are_forked_stops_the_run(data_dir):
    """Ctrl-C or SIGTERM as the loader forked its workers ran bnncc.cli's handler inside the at-fork
    callbacks (logging's), which printed its KeyboardInterrupt as "Exception ignored" and dropped it:
    `bnncc finetune --workers 2` trained on to its end and exited 0. The shards' indexing forked alike."""
    data = open_dataset(data_dir, "train")
    with ctrl_c_at_the_next_fork(), pytest.raises(KeyboardInterrupt):
        next(Loader(data, SHAPE, seed=3, workers=2)(Plan(data.batch_indices(5, 8, 3), 5, None) for _ in range(3)))
    if data_dir.name == "shards":
        with ctrl_c_at_the_next_fork(), pytest.raises(KeyboardInterrupt):
            open_dataset(data_dir, "train")


def test_a_process_holding_a_started_loader_at_exit_ends(data_dir):
    """The workers ignore the stop signals, and at exit multiprocessing ends its daemonic children with
    SIGTERM and waits for them: a process that still held a started loader (a run stopped by an error
    whose traceback was kept, as pytest keeps it) waited forever at exit."""
    script = f"""
from bnncc.train.data import open_dataset
from bnncc.train.loader import Loader, Plan
data = open_dataset({str(data_dir)!r}, "train")
batches = Loader(data, {SHAPE!r}, seed=3, workers=2)(Plan(data.batch_indices(5, 8, 3), 5, None) for _ in range(3))
next(batches)  # held to the end
print("done")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "done\n"), done.stderr


def test_a_stop_signal_to_the_run_ends_the_shard_indexing_at_once():
    """The indexing processes, forked with the stop signals held, kept holding them: a Ctrl-C to the
    process group stopped the run only once every shard was indexed (minutes on ImageNet)."""
    script = """
import os, signal, sys, time
from pathlib import Path
from bnncc.cli._app import on_signal
from bnncc.train import imagefiles

def index(shard):  # the Ctrl-C comes as the first shard is read, which would take 30 s
    if shard.name == "train-0.tar":
        os.killpg(0, signal.SIGINT)
    time.sleep(30)

signal.signal(signal.SIGINT, on_signal)
imagefiles._index_shard = index
start = time.monotonic()
try:
    imagefiles._index_shards([Path("train-0.tar"), Path("train-1.tar")])
except KeyboardInterrupt:
    print(f"interrupted after {time.monotonic() - start:.1f} s")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          start_new_session=True)  # (its own process group: the Ctrl-C reaches no one else)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    seconds = float(done.stdout.split()[2])
    assert seconds < 10, done.stdout


def test_the_callers_tensors_stay_its_own_when_sent_to_workers(data_dir):
    """Sending a tensor to a worker moves it into shared memory on the queue's feeder thread while the
    caller may be reading it; the trainer reuses one positions tensor for every plan and once read
    garbage indices. The loader sends copies, so the caller's tensors never move."""
    data = open_dataset(data_dir, "train")
    index, positions = data.batch_indices(5, 8, 3), torch.arange(8)
    list(Loader(data, SHAPE, seed=3, workers=2)([Plan(index, 5, positions), Plan(index, 6, positions)]))
    assert not index.is_shared() and not positions.is_shared()


def test_resume_at_step_k_trains_on_the_uninterrupted_runs_batches(data_dir, tmp_path, monkeypatch):
    import bnncc.train.trainer as trainer

    data = open_dataset(data_dir, "train")
    saved, at_step4 = trainer._save_checkpoint, tmp_path / "step4.ckpt"

    def keep_step4(path, step, *args):
        saved(path, step, *args)
        if step == 4:
            at_step4.write_bytes(path.read_bytes())

    def recording(net):
        inputs = []
        net.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
        return net, inputs

    monkeypatch.setattr(trainer, "_save_checkpoint", keep_step4)
    (whole, seen), (resumed, seen_resumed) = recording(tiny_net()), recording(tiny_net())
    train(whole, None, data, cfg(), SHAPE, checkpoint=tmp_path / "run.ckpt", show_progress=False)
    train(resumed, None, data, cfg(), SHAPE, checkpoint=at_step4, resume=True, show_progress=False)
    assert len(seen) == 6 and len(seen_resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(seen[4:], seen_resumed))
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_two_process_ddp_with_workers_matches_one_process(data_root, tmp_path):
    data_dir, double = data_root / "shards", tmp_path / "double.pt"
    single = tiny_net()
    train(single, None, open_dataset(data_dir, "train"), cfg(max_steps=4), SHAPE, show_progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
                    __file__, data_dir, double, "4"], env=env, check=True, timeout=300)
    a, b = single.state_dict(), torch.load(double, weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.fixture
def with_bad_images(tmp_path):
    """210 training images, two of them (under 1%) unreadable: a truncated JPEG, a text file named .jpg."""
    root = make_data(tmp_path, {"train": 70, "val": 2})
    for layout in ("images", "shards"):
        folder = root / layout
        if layout == "images":
            truncated = folder / "train" / "c0" / "005.jpg"
            truncated.write_bytes(truncated.read_bytes()[:300])
            (folder / "train" / "c1" / "007.jpg").write_text("not an image")
        else:
            members = {}
            with tarfile.open(folder / "train-000000.tar") as tar:
                for member in tar:
                    members[member.name] = tar.extractfile(member).read()
            members["c0/005.jpg"] = members["c0/005.jpg"][:300]
            members["c1/007.jpg"] = b"not an image"
            with tarfile.open(folder / "train-000000.tar", "w") as tar:
                for name, payload in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


@pytest.mark.parametrize("layout", ["images", "shards"])
def test_bad_images_are_replaced_by_the_next_logged_once_and_counted(with_bad_images, layout, tmp_path, caplog):
    data = open_dataset(with_bad_images / layout, "train")
    bad = {5, 70 + 7}
    images, labels, found = data.load(torch.tensor([5, 77, 9]), SHAPE, augment=True, step=2, seed=1)
    assert [i for i, _ in found] == [5, 77] and "OSError" in found[0][1]
    replaced, replaced_labels, _ = data.load(torch.tensor([6, 78, 9]), SHAPE, augment=True, step=2, seed=1)
    assert torch.equal(images, replaced) and torch.equal(labels, replaced_labels)
    metrics = tmp_path / "m.jsonl"
    steps = 3 * len(data) // 70  # three epochs at batch 70: every image, each bad one three times
    with caplog.at_level(logging.WARNING, logger="bnncc.train.loader"):
        train(tiny_net(), None, data, cfg(batch_size=70, max_steps=steps, log_every=1), SHAPE, metrics=metrics,
              show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert sorted(w.split(": unreadable")[0] for w in warnings) == sorted(data.describe(i) for i in bad)
    counts = [json.loads(line)["bad_images"] for line in metrics.read_text().splitlines()]
    assert counts[-1] == 2 and counts == sorted(counts)


def test_a_bad_image_met_twice_in_one_batch_is_logged_once(with_bad_images, caplog):
    """Two bad images in a row: the first is replaced by the next readable one, so the second is met as its
    replacement and again in its own place, and was logged twice."""
    (with_bad_images / "images" / "train" / "c0" / "006.jpg").write_bytes(b"")
    data = open_dataset(with_bad_images / "images", "train")
    loader = Loader(data, SHAPE, workers=0, stops=False)
    with caplog.at_level(logging.WARNING, logger="bnncc.train.loader"):
        list(loader([Plan(torch.tensor([5, 6]))]))
    warnings = [r.getMessage().split(": unreadable")[0] for r in caplog.records]
    assert warnings == [data.describe(5), data.describe(6)] and loader.bad == {5, 6}


def test_a_bad_image_met_twice_in_a_batch_loaded_in_this_process_is_logged_once(with_bad_images, caplog):
    """Dataset.batch (a batch loaded without the Loader) logged the second of two bad images in a row twice, as
    the replacement of the first and in its own place."""
    (with_bad_images / "images" / "train" / "c0" / "006.jpg").write_bytes(b"")
    data = open_dataset(with_bad_images / "images", "train")
    with caplog.at_level(logging.WARNING, logger="bnncc.train.data"):
        data.batch(torch.tensor([5, 6]), SHAPE, augment=False)
    warnings = [r.getMessage().split(": unreadable")[0] for r in caplog.records]
    assert warnings == [data.describe(5), data.describe(6)]


def test_an_image_beyond_pillows_bomb_guard_is_a_bad_image_and_not_a_crash(with_bad_images, monkeypatch):
    """An image of more than twice Pillow's pixel guard (here lowered: the tree's 8x8 images are 64
    pixels) is replaced as any unreadable one, where it ended the run with an unexpected error."""
    data = open_dataset(with_bad_images / "images", "train")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)
    _, _, found = data.load(torch.tensor([3]), SHAPE, augment=False)
    assert found and "DecompressionBombError" in found[0][1]


def test_a_link_loop_in_a_class_folder_is_skipped(tmp_path):
    root = images_tree(tmp_path, {"a": 2}, {"a": 1})
    os.symlink(root / "train" / "a" / "loop2.jpg", root / "train" / "a" / "loop1.jpg")
    os.symlink(root / "train" / "a" / "loop1.jpg", root / "train" / "a" / "loop2.jpg")
    assert len(open_dataset(root, "train")) == 2


def test_more_than_one_percent_bad_stops_with_one_line(with_bad_images):
    data = open_dataset(with_bad_images / "images", "train")
    (with_bad_images / "images" / "train" / "c2" / "000.jpg").write_bytes(b"")  # 3 of 210: 1.4%
    with pytest.raises(BnnccError, match=r"c0/005.jpg and 2 more images are unreadable: more than 1% of the 210") as e:
        train(tiny_net(), None, data, cfg(batch_size=70, max_steps=3), SHAPE, show_progress=False)
    assert "\n" not in str(e.value)


def test_torchrun_processes_count_the_runs_bad_images_together(with_bad_images, tmp_path):
    """2 bad images of 210 are under 1% of the run, whichever process reads them: each process
    counted its own against 1% of its half, so the one that met both stopped the run (and the
    other ended on gloo's "connection closed"), and the metrics counted rank 0's alone."""
    metrics, env = tmp_path / "m.jsonl", {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 3 * 210 // 70  # three epochs: each process meets both bad images
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29549",
                    __file__, with_bad_images / "images", tmp_path / "net.pt", str(steps), "70", metrics], env=env,
                   check=True, timeout=300)
    assert json.loads(metrics.read_text().splitlines()[-1])["bad_images"] == 2


def test_an_evaluation_counts_bad_images_and_does_not_stop(with_bad_images, caplog):
    """Past 1% of bad images an evaluation goes on (it follows a training that stopping would throw
    away), each one logged."""
    data = open_dataset(with_bad_images / "images", "train")
    (with_bad_images / "images" / "train" / "c2" / "000.jpg").write_bytes(b"")  # 3 of 210: 1.4%
    with caplog.at_level(logging.WARNING):
        top1, top5 = evaluate(tiny_net(), data, SHAPE, batch_size=70)
    assert 0 <= top1 <= 100 and top5 is None  # (top-5 of 4 classes is 100% whatever the model)
    assert caplog.text.count("unreadable image") == 3
    assert "3 of the 210 evaluation images could not be read (the first: " in caplog.text


def test_models_evaluated_together_score_as_alone_and_log_each_bad_image_once(with_bad_images, caplog):
    """A student and its teacher were evaluated in turn: every unreadable image logged twice, and
    the split decoded twice."""
    data = open_dataset(with_bad_images / "images", "train")
    first, second = tiny_net(), tiny_net()
    with torch.no_grad():
        second[0].weight.neg_()
    alone = [evaluate(net, data, SHAPE, batch_size=70) for net in (first, second)]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert evaluate_models([first, second], data, SHAPE, batch_size=70) == alone
    assert caplog.text.count("unreadable image") == 2 and caplog.text.count("evaluation images could not") == 1
    assert alone[0] != alone[1]


def test_an_evaluation_of_no_readable_image_gives_no_accuracy(with_bad_images, caplog):
    """It gave 33% top-1 and 100% top-5: the accuracy on black images."""
    data = open_dataset(with_bad_images / "images", "val")
    for path in (with_bad_images / "images" / "val").rglob("*.jpg"):
        path.write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert evaluate(tiny_net(), data, SHAPE) == (None, None)
    assert f"{len(data)} of the {len(data)} evaluation images could not be read" in caplog.text
    assert ": no accuracy" in caplog.text


def images_tree(root: Path, train: dict[str, int], val: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for split, classes in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True)
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for k in range(count):
                (root / split / name / f"{k}.jpg").write_bytes(jpeg(rng, 0, 8, 8))
    return root


@pytest.mark.parametrize("train, val, message", [
    ({}, {"a": 1}, r"train: no class folders"),
    ({"a": 2, "b": 0}, {"a": 1, "b": 1}, r"train/b: no images \(an empty class\)"),
    ({"a": 2, "b": 2}, {"a": 1, "c": 1}, r"train/ and val/ have different classes \(only in train/: b; only in val/: c\)"),
    ({"a": 2}, {}, r"val: no class folders"),
])
def test_image_folder_problems_are_one_line_errors_before_training(tmp_path, train, val, message):
    with pytest.raises(BnnccError, match=message):
        open_splits(images_tree(tmp_path, train, val))


def test_a_class_spelt_in_two_unicode_forms_is_named_as_such(tmp_path):
    """train/café composed and val/café decomposed (a copy through a Mac's disk) were reported as
    "only in train/: café; only in val/: café", which reads as the same name."""
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    root = images_tree(tmp_path, {nfc: 1, "b": 1}, {nfd: 1, "b": 1})
    with pytest.raises(BnnccError, match=r"spell class 'café' in different Unicode forms .*NFC.*NFD") as e:
        open_splits(root)
    assert "\n" not in str(e.value)


def write_shard(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("train, val, message", [
    ({"x.txt": b"0"}, {"a.jpg": b"", "a.cls": b"0"}, r"train-\*.tar: no images"),
    ({"a.jpg": b"", "a.cls": b"0", "b.jpg": b"", "b.cls": b"2"}, {"a.jpg": b"", "a.cls": b"0"},
     r"class 1 has no images \(an empty class; the classes are 0 to 2\)"),
    ({"a.jpg": b"", "a.cls": b"0"}, {"a.jpg": b"", "a.cls": b"1"}, r"val-\*.tar: class 1 is not among the 1 classes"),
    ({"a.jpg": b"", "a.cls": b"zero"}, {}, r"train-000000.tar:a.cls: not a class number"),
    ({"a.jpg": b"", "b.cls": b"0"}, {}, r"train-000000.tar: sample 'a' has no .cls member"),
    # the second member replaced the first, the label too, without a word
    ({"a.jpg": b"", "a.cls": b"0", "a.png": b"", "b.jpg": b"", "b.cls": b"0"}, {},
     r"train-000000.tar: sample 'a' has more than one image member \(a.png again\)"),
    ({"a.jpg": b"", "a.cls": b"0", "b.jpg": b"", "b.cls": b"0", "a.CLS": b"1"}, {},
     r"train-000000.tar: sample 'a' has more than one .cls member \(a.CLS again\)"),
    ({"a.jpg": b"", "a.cls": b"-1"}, {}, r"train-000000.tar:a.cls: not a class number \(b'-1'\)"),
    # int() read '1_0' as 10 and '+1' as 1; and the member was read whole, whatever its size
    ({"a.jpg": b"", "a.cls": b"1_0"}, {}, r"a.cls: not a class number \(b'1_0'\)"),
    ({"a.jpg": b"", "a.cls": b"+1"}, {}, r"a.cls: not a class number"),
    ({"a.jpg": b"", "a.cls": b"0" * 100}, {}, r"a.cls: not a class number"),
    ({"a.jpg": b"", "a.cls": b"99999999999"}, {}, r"a.cls: class 99999999999, outside 0 to 999999"),
])
def test_shard_problems_are_one_line_errors_before_training(tmp_path, train, val, message):
    write_shard(tmp_path / "train-000000.tar", train)
    write_shard(tmp_path / "val-000000.tar", val)
    with pytest.raises(BnnccError, match=message):
        open_splits(tmp_path)


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar writes the sparse member")
def test_a_sparse_member_is_refused_by_name(tmp_path):
    """tar --sparse stores a file's data without its holes: its size is the file's, so the shard
    was said to be 'cut short', and reading that many bytes at its offset would not give the file."""
    (tmp_path / "src").mkdir()
    with open(tmp_path / "src" / "a.jpg", "wb") as f:
        f.write(b"x" * 512)
        f.seek(4 << 20)
        f.write(b"y")
    (tmp_path / "src" / "a.cls").write_text("0")
    subprocess.run(["tar", "--format=gnu", "-S", "-cf", str(tmp_path / "train-000000.tar"), "a.jpg", "a.cls"],
                   cwd=tmp_path / "src", check=True)
    shutil.copyfile(tmp_path / "train-000000.tar", tmp_path / "val-000000.tar")
    with pytest.raises(BnnccError, match=r"train-000000.tar: a.jpg is a sparse member, which bnncc does not read"):
        open_splits(tmp_path)


def test_idx_files_of_no_images_or_a_damaged_gzip_body_are_one_line_errors(tmp_path, idx_writer):
    idx_writer(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((0, 8, 8)))
    idx_writer(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(0))
    with pytest.raises(BnnccError, match=r"train-images-idx3-ubyte.gz: no images"):
        open_dataset(tmp_path, "train")
    idx_writer(tmp_path / "train-images-idx3-ubyte.gz", np.random.default_rng(0).integers(0, 40, (4, 8, 8)))
    idx_writer(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4))
    data = bytearray((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    data[len(data) // 2:len(data) // 2 + 4] = b"\xff" * 4  # inside the deflate stream: zlib.error
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bytes(data))
    with pytest.raises(BnnccError, match=r"train-images-idx3-ubyte.gz: not a readable IDX file"):
        open_dataset(tmp_path, "train")


@pytest.mark.parametrize("height, width", [(0, 8), (8, 0)])
def test_idx_images_of_no_pixels_are_a_one_line_error(tmp_path, idx_writer, height, width):
    """A header of 0 rows or columns opened, with numpy's warnings of an empty mean, and training stopped with
    torch's "unexpected RuntimeError: Input and output sizes should be greater than 0"."""
    for prefix in ("train", "t10k"):
        idx_writer(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((4, height, width)))
        idx_writer(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(4) % 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BnnccError, match=rf"train-images-idx3-ubyte.gz: images of {height}x{width} pixels$"):
            open_splits(tmp_path)


def test_idx_training_images_of_one_grey_level_are_a_one_line_error(tmp_path, idx_writer):
    """Normalising by a spread of 0 made every input NaN: finetune stopped at its first steps with "training
    diverged: the loss is not finite (nan) ... try a lower --lr", which sent the user after the wrong thing."""
    for prefix in ("train", "t10k"):
        # (a file zero-filled past its header)
        idx_writer(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((4, 8, 8)))
        idx_writer(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(4) % 2)
    with pytest.raises(BnnccError, match=r"train-images-idx3-ubyte.gz: every pixel of every image is 0: nothing to "
                                         r"learn from, and no spread to normalise by$"):
        open_splits(tmp_path)


@pytest.mark.parametrize("kind, dimensions, message", [
    # a labels file whose count byte says 3: its first labels were read as dimensions
    ("labels", 3, r"train-labels-idx1-ubyte.gz: an IDX file of 3 dimensions \(its magic number is 00000803\); "
                  r"expected 1$"),
    ("images", 255, r"train-images-idx3-ubyte.gz: an IDX file of 255 dimensions \(its magic number is 000008ff\); "
                    r"expected 3$"),
    ("images", 1, r"train-images-idx3-ubyte.gz: an IDX file of 1 dimension \(its magic number is 00000801\); "
                  r"expected 3$"),
])
def test_an_idx_file_of_the_wrong_number_of_dimensions_is_named_as_such(tmp_path, idx_writer, kind, dimensions,
                                                                        message):
    """A damaged dimension count read the data as dimensions: a labels file was refused as "(60000, 150994947,
    132866), 1121056897.3 GiB to hold in memory ... use an ImageFolder tree or tar shards for a data set this
    large", an images file named in a line of 255 dimensions."""
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        idx_writer(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (300, 8, 8)))
        idx_writer(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(300) % 256)
    path = tmp_path / f"train-{kind}-idx{1 if kind == 'labels' else 3}-ubyte.gz"
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[3] = dimensions
    path.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(BnnccError, match=message):
        open_splits(tmp_path)


@pytest.mark.parametrize("dimensions, count", [(1, "1 dimension"), (3, "3 dimensions")])
def test_an_idx_header_cut_short_is_named_in_its_dimensions(tmp_path, dimensions, count):
    """A labels file cut off inside its header was "IDX header of 1 dimensions cut short"."""
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, dimensions, 0, 0]))  # the magic number and half a dimension
    with pytest.raises(BnnccError, match=rf"train-labels-idx1-ubyte: IDX header of {count} cut short$"):
        read_idx(path)


def test_an_idx_file_inflated_under_its_gz_name_is_read(tmp_path, idx_writer):
    """A download inflated on its way (a .gz served as Content-Encoding: gzip) keeps its .gz: it was refused as
    "not a readable IDX file (Not a gzipped file (b'\\x00\\x00'))"."""
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8))
    for prefix in ("train", "t10k"):
        idx_writer(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        idx_writer(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(4) % 2)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.decompress(path.read_bytes()))
    train = open_splits(tmp_path)[0]
    np.testing.assert_array_equal(train.images[:, 0].numpy(), images)


def test_an_idx_file_is_read_only_as_far_as_its_header_says(tmp_path, monkeypatch):
    """A 9 MB gzip that inflates to 2 GiB took memory until the process was killed: the data is read
    into the size the header gives, which must fit in half the machine's memory, and no further."""
    import gzip
    import os

    from bnncc.train.data import read_idx

    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + np.array([2, 4, 4], ">u4").tobytes()
    path.write_bytes(gzip.compress(header + bytes(32)))
    assert read_idx(path).shape == (2, 4, 4)
    path.write_bytes(gzip.compress(header + bytes(33)))
    with pytest.raises(BnnccError, match=r"IDX header says \(2, 4, 4\) but holds more than 32 bytes"):
        read_idx(path)
    path.write_bytes(gzip.compress(header + bytes(31)))
    with pytest.raises(BnnccError, match=r"IDX header says \(2, 4, 4\) but holds 31 bytes"):
        read_idx(path)
    sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_PHYS_PAGES" else sysconf(name))  # one page
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + np.array([60000, 28, 28], ">u4").tobytes()))
    with pytest.raises(BnnccError, match=r"IDX header says \(60000, 28, 28\), 0.0 GiB to hold in memory, more than "
                                         r"half of this machine's"):
        read_idx(path)


def test_a_truncated_shard_is_a_one_line_error(tmp_path):
    write_shard(tmp_path / "train-000000.tar", {"a.jpg": b"x" * 5000, "a.cls": b"0"})
    (tmp_path / "train-000001.tar").write_bytes((tmp_path / "train-000000.tar").read_bytes()[:700])
    with pytest.raises(BnnccError, match=r"train-000001.tar: cut short inside a.jpg"):
        open_dataset(tmp_path, "train")


def test_a_shard_cut_between_members_is_a_one_line_error(tmp_path):
    """Cut at a member's end, a shard reads as a shorter whole one; its missing end-of-archive blocks
    tell."""
    write_shard(tmp_path / "train-000000.tar", {"a.jpg": b"x" * 600, "a.cls": b"0", "b.jpg": b"y", "b.cls": b"0"})
    data = (tmp_path / "train-000000.tar").read_bytes()
    (tmp_path / "train-000000.tar").write_bytes(data[:512 + 1024 + 512 + 512])  # a.jpg's and a.cls's blocks
    with pytest.raises(BnnccError, match=r"train-000000.tar: cut short after a.cls \(no end-of-archive blocks\)"):
        open_dataset(tmp_path, "train")


def test_cli_reports_bad_data_in_one_line_and_writes_nothing(tmp_path, cli):
    images_tree(tmp_path / "d", {"a": 2, "b": 2}, {"a": 1})
    out = tmp_path / "t.onnx"
    code, _, err = cli("train-teacher", "--data", tmp_path / "d", "-o", out, "--image-size", "16")
    assert code == 2 and "different classes" in err and len(err.strip().splitlines()) == 1 and not out.exists()


def _ddp_worker(data_dir: str, out: str, steps: str, batch_size: str = "8", metrics: str | None = None) -> None:
    net = tiny_net()
    config = cfg(max_steps=int(steps), batch_size=int(batch_size), log_every=1)
    data = open_dataset(data_dir, "train")
    train(net, None, data, config, SHAPE, metrics=metrics and Path(metrics), show_progress=False)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        torch.save(net.state_dict(), out)


if __name__ == "__main__":
    _ddp_worker(*sys.argv[1:])


def test_evaluation_with_workers_scores_every_validation_image(data_dir):
    data, net = open_dataset(data_dir, "val"), tiny_net().eval()
    images, labels = data.batch(torch.arange(len(data)), SHAPE, augment=False)  # in this process, one batch
    with torch.no_grad():
        top1 = 100 * float((net(images).argmax(dim=1) == labels).float().mean())
    got = evaluate(net, data, SHAPE, batch_size=5, workers=2)
    assert got[0] == pytest.approx(top1) and got[1] is None  # (no top-5 of 4 classes)


@pytest.mark.slow  # builds a ResNet-50 teacher and its PokeBNN student (tens of seconds)
def test_finetune_reads_shards_and_evaluates_on_their_validation_split(data_root, tmp_path):
    import onnx
    import onnx_ir as ir

    from bnncc.frontend import load
    from bnncc.rewriting import rewrite
    from bnncc.train import finetune
    from bnncc.zoo import export_onnx, resnet50

    teacher = export_onnx(resnet50(width=0.125, num_classes=CLASSES).eval(), tmp_path / "teacher.onnx", input_size=32)
    student, _ = rewrite(load(teacher), "pokebnn_1x", ["passes.poke_stem.mid_channels=8"])
    ir.save(student, tmp_path / "student.onnx")
    cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=2, calibration_batches=1, num_workers=2)
    result = finetune(tmp_path / "student.onnx", teacher, data_root / "shards", tmp_path / "trained.onnx", cfg,
                      metrics=tmp_path / "m.jsonl", show_progress=False)
    # 12 validation images: accuracies are multiples of 1/12
    assert result.student_top1 is not None and round(result.student_top1 * 12 / 100, 6).is_integer()
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])["bad_images"] == 0
    metadata = {p.key: p.value for p in onnx.load(tmp_path / "trained.onnx").metadata_props}
    assert json.loads(metadata["bnncc.preprocessing"])["crop"] == 224 / 256  # what `bnncc run` crops alike


def test_image_files_record_the_centre_crop_they_were_evaluated_on(data_root, idx_dir):
    """`bnncc run` took the whole image where evaluation took the centre 224/256 of its short side."""
    from bnncc.train.finetune import _preprocessing

    recorded = _preprocessing(open_dataset(data_root / "images", "train"), 3)
    assert recorded == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop": 0.875}
    assert "crop" not in _preprocessing(open_dataset(idx_dir, "train"), 3)  # IDX images are evaluated whole


def test_more_workers_than_cores_is_an_error(data_root):
    """--workers 1000 started 1000 decoding processes for 30 images; the run took minutes to stop."""
    from bnncc.train.loader import default_workers

    data = open_dataset(data_root / "images", "train")
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(BnnccError, match=f"--workers 1000: more than the {cores} cores this process may use"):
        Loader(data, (3, 16, 16), workers=1000)
    assert Loader(data, (3, 16, 16), workers=cores).workers == cores and default_workers() <= cores


def test_a_16_bit_image_trains_as_its_8_bit_version(tmp_path):
    """Training's convert("RGB") clipped a 16-bit PNG to white (a gradient's mean 255 against 127),
    where bnncc run scaled it by 65535: the network trained on other pixels than it ran on."""
    from bnncc.train.imagefiles import _decode

    gradient = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    deep, shallow = io.BytesIO(), io.BytesIO()
    Image.fromarray(gradient).save(deep, format="PNG")
    Image.fromarray(np.round(gradient / 65535 * 255).astype(np.uint8)).save(shallow, format="PNG")
    got = _decode(deep.getvalue(), (32, 32), None)
    assert got.shape == (32, 32, 3) and 120 < got.mean() < 135
    np.testing.assert_array_equal(got, _decode(shallow.getvalue(), (32, 32), None))


def _jpeg(path: Path, width: int, height: int, orientation: int = 1) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    return path


@pytest.mark.parametrize("stored, orientation, chw", [
    ((74, 75), 1, (3, 32, 32)),  # where the DCT scale of a crop and of the whole image's box differed
    ((256, 160), 6, (3, 32, 32)),  # stored sideways: the scale is chosen on the stored pixels
    ((800, 400), 1, (3, 168, 224)),  # a network input of another shape than a square
    ((3001, 2048), 8, (3, 224, 224)),
])
def test_run_decodes_an_image_file_as_evaluation_did(tmp_path, stored, orientation, chw):
    """`bnncc run` with the crop fine-tuning records gives the library the pixels evaluation decoded
    from the same file: it chose another DCT scale for JPEGs (up to 43/255 apart) and turned EXIF
    photos that evaluation read as stored."""
    from bnncc.cli._inputs import read_input
    from bnncc.train.imagefiles import _decode

    path = _jpeg(tmp_path / "photo.jpg", *stored, orientation)
    stats = {"mean": [0.0] * 3, "std": [1.0] * 3, "crop": 224 / 256}
    evaluated = _decode(path.read_bytes(), chw[:0:-1], None).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(read_input(path, chw, stats)[0], evaluated, rtol=0, atol=1e-6)


def test_run_gives_a_one_channel_network_the_channel_mean_evaluation_gave(tmp_path):
    """A one-channel network fine-tuned on colour image files takes the mean of their RGB channels
    (ImageFiles.finish); `bnncc run` gave it Pillow's grey (0.299 R + 0.587 G + 0.114 B) instead."""
    from bnncc.cli._inputs import read_input
    from bnncc.train.imagefiles import _decode

    path = tmp_path / "colour.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    stats = {"mean": [0.0], "std": [1.0], "crop": 224 / 256}
    evaluated = _decode(path.read_bytes(), (32, 24), None).mean(axis=2) / 255
    np.testing.assert_allclose(read_input(path, (1, 24, 32), stats)[0, 0], evaluated, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stored, chw", [((28, 28), (3, 32, 32)), ((28, 28), (1, 224, 224)), ((64, 48), (3, 32, 20))])
def test_run_resizes_an_image_as_fine_tuning_on_idx_arrays_did(tmp_path, stored, chw):
    """Fine-tuning resizes IDX arrays by torch's bilinear interpolation; `bnncc run` resized a PNG of one
    bicubically (Fashion-MNIST's 28 px to 32: 2.6 grey levels apart on average, up to 46)."""
    import torch

    from bnncc.cli._inputs import read_input
    from bnncc.train.data import _adapt

    pixels = np.random.default_rng(7).integers(0, 256, stored[::-1], dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "item.png")
    stats = {"mean": [0.3] * chw[0], "std": [0.4] * chw[0], "resize": "bilinear"}
    trained = _adapt(torch.from_numpy(pixels / 255.0).float()[None, None], chw, [0.3], [0.4])[0].numpy()
    np.testing.assert_allclose(read_input(tmp_path / "item.png", chw, stats)[0], trained, rtol=0, atol=1e-5)


def test_run_resizes_a_large_image_bilinearly_without_making_it_float_whole(tmp_path):
    """The bilinear resize of a network fine-tuned on IDX arrays made the whole decoded image float32 and then
    float64 (an 8000x8000 photo for a 28x28 network: 2.8 GB, where the bicubic resize takes 0.1): it reads the
    two rows and columns about each output pixel, and takes only those."""
    import tracemalloc

    import torch

    from bnncc.cli._inputs import read_input

    height, width = 2000, 3000
    pixels = (np.add.outer(np.arange(height) * 7, np.arange(width) * 3) % 256).astype(np.uint8)  # compresses well
    Image.fromarray(pixels).save(tmp_path / "large.png")
    stats = {"mean": [0.3], "std": [0.4], "resize": "bilinear"}
    tracemalloc.start()  # numpy's arrays are traced (Pillow's decoded pixels are not)
    try:
        x = read_input(tmp_path / "large.png", (1, 28, 28), stats)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # read as RGB, it is 3 bytes a pixel (twice: Pillow's and numpy's copies); as float32, 12
    assert peak < 3 * height * width * 4, f"{peak / 2**20:.0f} MiB: the image was made float whole"
    # torch's interpolation in float64: in float32 its source positions are 2e-4 off at a 100-fold shrink
    resized = torch.nn.functional.interpolate(torch.from_numpy(pixels / 255.0)[None, None], size=(28, 28),
                                              mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(x[0], (resized - 0.3) / 0.4, rtol=0, atol=1e-5)


@pytest.mark.parametrize("entry", [
    b"\x12\x34 not a TIFF header at all",
    b"II*\x00" + (8).to_bytes(4, "little") + (500).to_bytes(2, "little") + bytes(10),  # 500 entries, room for none
    b"MM\x00*" + (8).to_bytes(4, "big") + (1).to_bytes(2, "big") + bytes.fromhex("0112 0003 00000001 0063 0000"),  # 99
])
def test_a_photo_with_corrupt_exif_decodes_as_stored_and_quietly(tmp_path, entry):
    """A photo whose EXIF block is damaged decodes as stored (an orientation of 99 is none), and Pillow's
    warning about it ("Corrupt EXIF data", from Image.open) no longer reaches stderr from each worker."""
    from bnncc.cli._inputs import read_input
    from bnncc.train.imagefiles import _decode

    plain = tmp_path / "plain.jpg"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(plain, quality=95)
    data = plain.read_bytes()
    segment = b"Exif\x00\x00" + entry
    damaged = data[:2] + b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment + data[2:]
    (tmp_path / "damaged.jpg").write_bytes(damaged)
    stats = {"mean": [0.0] * 3, "std": [1.0] * 3, "crop": 0.875}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(_decode(damaged, (32, 24), None), _decode(data, (32, 24), None))
        np.testing.assert_array_equal(read_input(tmp_path / "damaged.jpg", (3, 24, 32), stats),
                                      read_input(plain, (3, 24, 32), stats))
    assert not caught, [str(w.message) for w in caught]


def test_a_palette_image_with_transparent_colours_decodes_to_its_colours_quietly(tmp_path):
    """A palette PNG with (semi-)transparent colours (as the web's are) decodes to its palette's
    colours, as torchvision's loader gives them, and Pillow's warning that RGBA would keep the
    transparency ("Palette images with Transparency expressed in bytes ...", two lines pointing into
    Pillow) no longer reaches stderr from `bnncc run` and from each training worker."""
    from bnncc.cli._inputs import read_input
    from bnncc.train.imagefiles import _decode

    palette = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [90, 90, 90]], np.uint8)
    index = np.random.default_rng(5).integers(0, len(palette), (24, 32), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.ravel().tolist())
    path = tmp_path / "web.png"
    image.save(path, transparency=bytes([0, 128, 255, 255]))  # (one transparent colour alone Pillow reads as a number)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = read_input(path, (3, 24, 32), None)[0]  # its own size: no resize
        _decode(path.read_bytes(), (16, 12), None)
    assert not caught, [str(w.message) for w in caught]
    np.testing.assert_array_equal(run, palette[index].transpose(2, 0, 1) / np.float32(255))


def test_an_image_within_twice_the_pixel_guard_decodes_without_a_warning():
    """Training's decoding silenced Pillow's DecompressionBombWarning only after Image.open, which warns."""
    from bnncc.train.imagefiles import _decode

    png = io.BytesIO()
    Image.new("L", (10000, 10000), 200).save(png, format="PNG")  # 100 M pixels: above the guard, below twice it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (_decode(png.getvalue(), (16, 16), None) == 200).all()
    assert not caught, [str(w.message) for w in caught]


def test_an_exif_turned_photo_trains_upright(tmp_path):
    """A photo stored sideways with an EXIF orientation (what phones write) trained as stored."""
    from bnncc.train.imagefiles import _decode

    stored = np.random.default_rng(3).integers(0, 256, (40, 64, 3), dtype=np.uint8)  # 64 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise
    sideways, upright = tmp_path / "sideways.png", tmp_path / "upright.png"
    Image.fromarray(stored).save(sideways, exif=exif)
    Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1))).save(upright)  # 40 wide, 64 high
    for key in (None, (0, 1, 2)):  # evaluation's centre crop, a training crop
        np.testing.assert_array_equal(_decode(sideways.read_bytes(), (24, 32), key),
                                      _decode(upright.read_bytes(), (24, 32), key))


def test_hidden_files_and_folders_are_no_data(tmp_path):
    """A Mac copies each image's ._ sidecar along (counted as unreadable: past 1% the run stopped),
    and a notebook leaves .ipynb_checkpoints (an empty class, refused)."""
    root = make_data(tmp_path, {"train": 3, "val": 1})
    for split in ("train", "val"):
        (root / "images" / split / ".ipynb_checkpoints").mkdir()
        for image in list((root / "images" / split).rglob("*.jpg")):
            image.with_name("._" + image.name).write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    data = open_dataset(root / "images", "train")
    assert data.num_classes == CLASSES and len(data) == 3 * CLASSES


def test_every_image_kind_torchvisions_image_folder_reads_is_data(tmp_path):
    """TIFF, PPM and PGM files (what scanners, microscopes and old data sets write) were skipped: a class
    of them alone was refused as an empty class, one of some of them trained on the others alone."""
    for split in ("train", "val"):
        for label, suffix in enumerate((".tif", ".tiff", ".ppm", ".pgm")):
            folder = tmp_path / split / f"c{label}"
            folder.mkdir(parents=True)
            pixels = np.full((12, 10, 3), 60 * label, np.uint8)
            image = Image.fromarray(pixels if suffix != ".pgm" else pixels[..., 0])
            image.save(folder / f"x{suffix}")
    data = open_dataset(tmp_path, "train")
    assert data.num_classes == 4 and len(data) == 4
    images, labels = data.batch(torch.arange(4), (3, 8, 8), augment=False)
    assert images.std(dim=(2, 3)).max() < 1e-4  # each image one grey, read as it was written:
    assert images[labels.argsort(), 0, 0, 0].diff().min() > 0  # class c<k>'s grey is 60 k


def test_images_in_subfolders_of_a_class_are_its_images_as_torchvisions_image_folder_takes_them(tmp_path):
    """Only the images directly in a class folder were indexed: those in its subfolders were left out without a
    word, and a class of them alone was refused as "no images (an empty class)"."""
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for path in ("a/0.jpg", "a/more/1.jpg", "a/more/deeper/2.png", "b/by day/3.jpg", "b/by night/4.jpg"):
            (tmp_path / split / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / split / path).write_bytes(jpeg(rng, 0, 8, 8))
    data = open_splits(tmp_path)[0]
    ours = sorted((data.describe(i), int(data.labels[i])) for i in range(len(data)))
    assert ours == sorted(ImageFolder(str(tmp_path / "train")).samples) and len(ours) == 5
    assert data.load(torch.arange(5), SHAPE, augment=False)[2] == []  # every one read


def test_links_take_a_class_no_images_of_another_class_nor_loop(tmp_path):
    root = images_tree(tmp_path, {"a": 2, "b": 3}, {"a": 1, "b": 1})
    os.symlink(root / "train" / "b", root / "train" / "a" / "to b")
    os.symlink(root / "train" / "a", root / "train" / "a" / "to itself")
    os.symlink(root / "train", root / "train" / "b" / "to the split")
    data = open_dataset(root, "train")
    assert len(data) == 5 and np.bincount(data.labels).tolist() == [2, 3]


def test_links_take_a_class_no_images_of_another_class_s_subfolder_nor_of_the_other_split(tmp_path):
    """A link to a subfolder of another class gave its images both labels, and one to ../../val/<class>
    trained on the validation images; a link out of the data set is followed."""
    root = images_tree(tmp_path, {"a": 2, "b": 3}, {"a": 1, "b": 1})
    (root / "train" / "b" / "more").mkdir()
    (root / "train" / "b" / "more" / "m.jpg").write_bytes((root / "train" / "b" / "0.jpg").read_bytes())
    os.symlink(root / "train" / "b" / "more", root / "train" / "a" / "to b's subfolder")
    os.symlink(root / "val" / "a", root / "train" / "a" / "to val")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "e.jpg").write_bytes((root / "train" / "a" / "0.jpg").read_bytes())
    os.symlink(elsewhere, root / "train" / "a" / "to elsewhere")
    data = open_dataset(root, "train")
    names = sorted(data.names[i] for i in range(len(data)))
    assert names == ["0.jpg", "0.jpg", "1.jpg", "1.jpg", "2.jpg", "more/m.jpg", "to elsewhere/e.jpg"]
    assert np.bincount(data.labels).tolist() == [3, 4]


def test_a_class_of_files_not_named_as_images_says_what_it_holds(tmp_path):
    """A class of GIFs (or a phone's .heic, Windows' .jfif) was refused as "no images (an empty class)", which the
    user could see it was not."""
    root = images_tree(tmp_path, {"a": 2, "b": 0}, {"a": 1, "b": 1})
    for name in ("x.gif", "y.gif", "z.jfif"):
        Image.new("RGB", (8, 8)).save(root / "train" / "b" / name, "GIF" if name.endswith(".gif") else "JPEG")
    with pytest.raises(BnnccError, match=r"train/b: no images \(an empty class\); its 3 file\(s\), such as x.gif, are "
                                         r"not named as images \(\*.bmp, \*.jpeg, \*.jpg, \*.pgm, \*.png, \*.ppm, "
                                         r"\*.tif, \*.tiff, \*.webp\)$"):
        open_dataset(root, "train")


def test_a_split_of_images_without_class_folders_says_where_they_lie(tmp_path):
    """ImageNet's validation images come in one folder: it was refused as "no class folders" alone."""
    root = images_tree(tmp_path, {"a": 2, "b": 2}, {})
    for k in range(3):
        (root / "val" / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(jpeg(np.random.default_rng(k), 0, 8, 8))
    with pytest.raises(BnnccError, match=r"val: no class folders; its 3 image\(s\) lie in it directly, where each "
                                         r"belongs in the folder of its class \(ImageNet's validation images come so: "
                                         r"sort them into the training split's class folders\)$"):
        open_splits(root)


def test_a_training_split_of_images_without_class_folders_is_not_sent_to_its_own_class_folders(tmp_path):
    """The line for ImageNet's validation images told a training split to sort its images into the training
    split's class folders, which it has none of."""
    root = images_tree(tmp_path, {}, {"a": 2, "b": 2})
    for k in range(3):
        (root / "train" / f"{k}.jpg").write_bytes(jpeg(np.random.default_rng(k), 0, 8, 8))
    with pytest.raises(BnnccError, match=r"train: no class folders; its 3 image\(s\) lie in it directly, where each "
                                         r"belongs in the folder of its class$"):
        open_splits(root)


def test_an_unreadable_folder_under_a_class_is_a_one_line_error(tmp_path, monkeypatch):
    """Skipped, its images would be left out without a word (a root user reads every folder: os.scandir fails)."""
    root = images_tree(tmp_path, {"a": 2}, {"a": 1})
    (root / "train" / "a" / "locked").mkdir()
    scandir = os.scandir

    def refusing(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(BnnccError, match=r"train/a/locked: cannot read this folder of the data set \(Permission "
                                         r"denied\)$"):
        open_dataset(root, "train")


def test_the_data_fingerprint_stats_each_file_once_and_keeps_its_key(tmp_path, monkeypatch):
    """convert's stage key lists the data's files: by rglob, is_file and stat, two stats and a Path a
    file (ImageNet's 1.33 million took ~27 s and ~600 MB before every run). The key is unchanged:
    the files in the order of their sorted paths (a-b/ sorts after a/ as a path, before it as text)."""
    import hashlib

    from bnncc.pipeline import _data_fingerprint

    root = images_tree(tmp_path / "data", {"a": 8, "a-b": 2, "a.b": 2, "B": 2}, {"a": 1, "a-b": 1, "a.b": 1, "B": 1})
    expected = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):  # the key as it was
        stat = path.stat()
        expected.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    files, stats = sum(1 for p in root.rglob("*") if p.is_file()), []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: stats.append(a[0]) or real_stat(*a, **k))
    assert _data_fingerprint(root) == expected.hexdigest()
    assert len(stats) < files // 2, stats  # (a few tell the folder's kind; the files' come with their entries)


def test_the_data_fingerprint_sees_the_images_behind_a_linked_folder(tmp_path):
    """ImageNet's train/ is often a link to another disk; the stage key did not look through links to
    folders (rglob), so a changed image there left the key as it was and convert reused the old
    fine-tune. A link loop is followed once."""
    from bnncc.pipeline import _data_fingerprint

    elsewhere = images_tree(tmp_path / "disk", {"a": 2, "b": 1}, {})
    root = images_tree(tmp_path / "data", {}, {"a": 1, "b": 1})
    (root / "train").rmdir()
    (root / "train").symlink_to(elsewhere / "train")
    os.symlink(root / "val", root / "val" / "a" / "loop")
    before = _data_fingerprint(root)
    image = elsewhere / "train" / "b" / "0.jpg"
    image.write_bytes(image.read_bytes() + b"\0")
    assert _data_fingerprint(root) != before
