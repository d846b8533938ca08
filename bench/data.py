"""Data-path bench: a synthetic ImageNet-like set, the loader's throughput, and `bnncc finetune`'s start.

Builds ``--images`` JPEGs of about 500x375 (quality 90) in ``--classes`` classes from procedural
textures (per class: four oriented gratings in its own colours; per image: a crop of its own size,
a colour cast and grain), as an ImageFolder tree (``train/``, and ``val/`` with 1/20 as many) and,
with ``--shards``, as tar shards of 1,000 images in the WebDataset layout. Then prints:

* the time to index both splits;
* decode + augment throughput (random resized crop + flip to 224 px, normalised), images/s with 1
  and 2 worker processes, and the CPU time an image takes in one process (what a free core
  sustains, whatever else the machine runs);
* for ``bnncc finetune`` of PokeBNN-0.5x from a torchvision ResNet-50 at 224 px (random weights),
  ``--max-steps 3 --batch-size 8``: seconds from its start to the first step's loss and to its end,
  the peak RSS of its main process and of its whole process tree (workers included, shared pages
  counted once per process), sampled every 0.1 s.

The work folder (1.3 GB for 20,000 images) is removed at the end unless ``--workdir`` names one.
``--python`` runs ``bnncc finetune`` with another checkout's interpreter, for a before/after.

    .venv/bin/python bench/data.py [--images 2000] [--classes 100] [--shards] [--workdir DIR]
        [--no-finetune] [--python PATH]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tarfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from workdir import in_workdir  # bench/, beside this script

SHARD_SIZE = 1000

# Runs `bnncc finetune` and prints the moment its first loss is computed (the first step's forward).
_TIMED_FINETUNE = """
import sys, time
import bnncc.train.trainer as trainer
from bnncc.cli._app import run_app
loss = trainer.distillation_loss
def first_loss(*args, **kwargs):
    trainer.distillation_loss = loss
    print(f"first-loss-at {time.time():.3f}", file=sys.stderr, flush=True)
    return loss(*args, **kwargs)
trainer.distillation_loss = first_loss
sys.exit(run_app(["finetune", *sys.argv[1:]]))
"""


def texture(label: int, height: int = 560, width: int = 750) -> np.ndarray:
    """A class's picture: four oriented gratings of random frequency in random colours."""
    rng = np.random.default_rng(10_000 + label)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    picture = np.zeros((height, width, 3), np.float32)
    for _ in range(4):
        angle, frequency, phase = rng.uniform(0, np.pi), rng.uniform(0.01, 0.08), rng.uniform(0, 2 * np.pi)
        wave = np.sin(frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase)
        picture += wave[..., None] * rng.uniform(-60, 60, 3).astype(np.float32)
    return picture + rng.uniform(60, 190, 3).astype(np.float32)


def write_class(task: tuple[Path, int, int, int]) -> None:
    """``count`` images of class ``label`` into ``folder/c<label>/``, each 450-550 x 338-412 px."""
    from PIL import Image

    folder, label, count, seed = task
    rng = np.random.default_rng(seed)
    base = texture(label)
    grain = rng.normal(0, 8, (base.shape[0], base.shape[1], 1)).astype(np.float32)
    (folder / f"c{label:03d}").mkdir(parents=True, exist_ok=True)
    for k in range(count):
        w, h = int(rng.integers(450, 551)), int(rng.integers(338, 413))
        top, left = int(rng.integers(0, base.shape[0] - h)), int(rng.integers(0, base.shape[1] - w))
        dy, dx = int(rng.integers(0, base.shape[0] - h)), int(rng.integers(0, base.shape[1] - w))
        pixels = base[top:top + h, left:left + w] * rng.uniform(0.7, 1.3, 3).astype(np.float32)
        pixels += grain[dy:dy + h, dx:dx + w]
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"c{label:03d}" / f"{k:06d}.jpg",
                                                                      quality=90)


def build(root: Path, images: int, classes: int, shards: bool) -> None:
    per_class = images // classes
    tasks = [(root / "images" / "train", c, per_class, c) for c in range(classes)]
    tasks += [(root / "images" / "val", c, max(1, per_class // 20), 100_000 + c) for c in range(classes)]
    with Pool(os.cpu_count()) as pool:
        pool.map(write_class, tasks)
    if shards:
        (root / "shards").mkdir()
        for split in ("train", "val"):
            files = sorted((root / "images" / split).glob("c*/*.jpg"))
            for number, begin in enumerate(range(0, len(files), SHARD_SIZE)):
                with tarfile.open(root / "shards" / f"{split}-{number:06d}.tar", "w") as tar:
                    for path in files[begin:begin + SHARD_SIZE]:
                        key = f"{path.parent.name}/{path.stem}"
                        tar.add(path, f"{key}.jpg")
                        label = tarfile.TarInfo(f"{key}.cls")
                        text = str(int(path.parent.name[1:])).encode()
                        label.size = len(text)
                        tar.addfile(label, io.BytesIO(text))


def loader_throughput(folder: Path, workers: int, batch: int = 64, batches: int = 20) -> float:
    """Training images/s (decode, random resized crop + flip to 224 px, normalise), after a first batch."""
    import torch

    from bnncc.train.data import open_dataset
    from bnncc.train.loader import Loader, Plan

    data = open_dataset(folder, "train")
    loader = Loader(data, (3, 224, 224), workers=workers)
    stream = loader(Plan(data.batch_indices(s, batch, 0), s, torch.arange(batch)) for s in range(batches + 1))
    next(stream)  # the workers start
    began = time.perf_counter()
    count = sum(len(labels) for _, labels in stream)
    return count / (time.perf_counter() - began)


def cpu_ms_per_image(folder: Path, images: int = 256) -> float:
    """CPU milliseconds to read, decode and augment one image to 224 px, in this process."""
    import torch

    from bnncc.train.data import open_dataset

    data = open_dataset(folder, "train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker; restored for what the bench measures next
    try:
        began = time.process_time()
        data.load(data.batch_indices(0, images, 0), (3, 224, 224), augment=True, positions=torch.arange(images))
        return 1000 * (time.process_time() - began) / images
    finally:
        torch.set_num_threads(threads)


def models(work: Path, recipe: str = "pokebnn_0.5x") -> tuple[Path, Path]:
    """A torchvision ResNet-50 at 224 px (random weights) and its PokeBNN rewrite (``recipe``)."""
    import onnx_ir as ir

    from bnncc.frontend import load
    from bnncc.rewriting import rewrite
    from bnncc.zoo import export_onnx, resnet50

    teacher = export_onnx(resnet50(1.0, 1000), work / "resnet50.onnx", input_size=224)
    student, _ = rewrite(load(teacher), recipe)
    ir.save(student, work / "poke.onnx")
    return teacher, work / "poke.onnx"


def _tree_rss(root: int) -> tuple[int, int]:
    """(VmHWM of ``root``, summed VmRSS of ``root`` and its descendants), in bytes."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    peak = total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        total += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        if pid == root:
            peak = int(fields.get("VmHWM", "0 kB").split()[0]) * 1024
    return peak, total


def timed_finetune(python: str, teacher: Path, student: Path, data: Path, work: Path) -> dict:
    command = [python, "-c", _TIMED_FINETUNE, str(student), "--teacher", str(teacher), "--data", str(data),
               "-o", str(work / "trained.onnx"), "--recipe", "pokebnn_0.5x", "--max-steps", "3", "--batch-size", "8"]
    began = time.time()
    # stderr to a file, read at the end: a pipe read only then filled up with the fine-tune's
    # logs (64 KiB), and the fine-tune and this loop waited for each other for ever.
    # cwd: `python -c` imports from the current folder first, which must not be another checkout
    with open(work / "finetune.stderr", "w+", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=work)
        peak = total = 0
        while process.poll() is None:
            main_peak, tree = _tree_rss(process.pid)
            peak, total = max(peak, main_peak), max(total, tree)
            time.sleep(0.1)
        ended = time.time()
        log.seek(0)
        errors = log.read()
    if process.returncode != 0:
        raise SystemExit(f"bnncc finetune failed ({process.returncode}):\n{errors}")
    first = next(float(line.split()[1]) for line in errors.splitlines() if line.startswith("first-loss-at"))
    return {"first_step_s": first - began, "total_s": ended - began, "peak_rss_main": peak, "peak_rss_tree": total}


def run(args: argparse.Namespace, work: Path) -> None:
    from bnncc.train.data import open_splits

    print(f"bench/data.py on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}, {args.images} images in {args.classes} classes, work dir {work}")
    began = time.perf_counter()
    build(work, args.images, args.classes, args.shards)
    size = sum(p.stat().st_size for p in (work / "images").rglob("*.jpg"))
    print(f"built in {time.perf_counter() - began:.0f} s: {size / 1e6:.0f} MB of JPEGs"
          + (" (and as shards)" if args.shards else ""))
    for layout in ["images"] + (["shards"] if args.shards else []):
        began = time.perf_counter()
        open_splits(work / layout)
        print(f"{layout}: both splits indexed in {time.perf_counter() - began:.2f} s")
        rates = ", ".join(f"{loader_throughput(work / layout, w):.0f} img/s with {w} worker{'s' * (w > 1)}"
                          for w in (1, 2))
        cpu = cpu_ms_per_image(work / layout)
        print(f"decode + augment to 224 px ({layout}): {rates}; {cpu:.2f} ms CPU an image "
              f"({1000 / cpu:.0f} img/s a core)")
    if args.finetune:
        teacher, student = models(work)
        for layout in ["images"] + (["shards"] if args.shards else []):
            r = timed_finetune(args.python, teacher, student, work / layout, work)
            print(f"bnncc finetune ({layout}, --max-steps 3 --batch-size 8): first step's loss after "
                  f"{r['first_step_s']:.1f} s, done after {r['total_s']:.1f} s; peak RSS "
                  f"{r['peak_rss_main'] / 2**20:.0f} MiB (main process), "
                  f"{r['peak_rss_tree'] / 2**20:.0f} MiB (process tree)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--shards", action="store_true", help="also write tar shards and measure them")
    parser.add_argument("--workdir", default=None, help="build here and keep it (default: a temporary folder)")
    parser.add_argument("--no-finetune", dest="finetune", action="store_false", help="skip the bnncc finetune run")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose bnncc runs the fine-tune")
    args = parser.parse_args()
    in_workdir(args.workdir, "bnncc-bench-data-", lambda work: run(args, work))


if __name__ == "__main__":
    main()
