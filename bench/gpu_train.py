"""GPU training bench: PokeBNN-1x ResNet-50 fine-tuning against float ResNet-50 training, one GPU.

Generates ``--images`` synthetic ~500x375 JPEGs in tar shards (bench/data.py's generator), converts
a torchvision ResNet-50 (random weights, 224 px) to PokeBNN-1x, then on the same GPU and the same
shards runs, through bnncc's training loop (bf16 autocast, channels-last, data decoded in
``DataLoader`` workers):

* the student: ``--steps`` distillation steps at ``--batch`` images of 224 px, the teacher in bf16;
* the teacher's own training: the float ResNet-50 on the labels, ``--steps`` steps, same batch.

For each it prints the loss every 10 steps, images/s after the first ``--warmup`` steps (cuDNN's
algorithm search, the one-off activation calibration and the workers' start excluded) and overall,
and the peak GPU memory. Sized to finish in under 5 minutes on an H100/H200. Without a usable GPU it
exits at once with a one-line message and code 2.

    .venv/bin/python bench/gpu_train.py [--steps 100] [--batch 128] [--images 6400] [--workers N]
        [--compile] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from data import build, models  # bench/data.py, next to this script
from workdir import in_workdir  # bench/, beside this script


def _gpu_or_exit() -> None:
    if not torch.cuda.is_available():
        print(f"bench/gpu_train.py: no CUDA GPU is usable here (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda or 'none'}): nothing to measure", file=sys.stderr)
        sys.exit(2)


def timed_train(name: str, student, teacher, data, cfg, work: Path, warmup: int) -> None:
    """Run bnncc's training loop; print its losses, images/s and peak GPU memory."""
    from bnncc.train.trainer import train

    metrics = work / f"{name}.metrics.jsonl"
    torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    result = train(student, teacher, data, cfg, (3, 224, 224), metrics=metrics, device="cuda", show_progress=False)
    torch.cuda.synchronize()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for r in records:
        print(f"  {name} step {r['step']:4d}: loss {r['loss']:.4f}")
    # the loss is read (a host sync) at each record: the time between two records is the GPU's
    first = next(r for r in records if r["step"] >= warmup)
    last = records[-1]
    steady = (last["step"] - first["step"]) * cfg.batch_size / (last["seconds"] - first["seconds"])
    print(f"{name}: {steady:.0f} images/s over steps {first['step']}-{last['step']}, {result.images_per_second:.0f} "
          f"overall ({time.perf_counter() - began:.0f} s); peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def run(args: argparse.Namespace, work: Path) -> None:
    from bnncc.frontend import load, read
    from bnncc.torchview import to_torch
    from bnncc.train import TrainConfig
    from bnncc.train.data import open_dataset
    from bnncc.zoo import resnet50

    print(f"bench/gpu_train.py on {torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} cores; "
          f"batch {args.batch}, {args.steps} steps, 224 px, {args.images} images")
    began = time.perf_counter()
    build(work, args.images, args.classes, shards=True)
    teacher_path, student_path = models(work, "pokebnn_1x")
    print(f"shards and models built in {time.perf_counter() - began:.0f} s")
    data = open_dataset(work / "shards", "train")
    common = dict(batch_size=args.batch, max_steps=args.steps, log_every=10, num_workers=args.workers,
                  compile=args.compile)
    torch.manual_seed(0)
    timed_train("student", to_torch(read(student_path)), to_torch(load(teacher_path)), data, TrainConfig(**common),
                work, args.warmup)
    # the teacher's training: torchvision's ResNet-50 as `bnncc train-teacher` builds it, on the labels
    timed_train("teacher", resnet50(1.0, data.num_classes), None, data,
                TrainConfig(lr=3e-2, label_weight=1.0, **common), work, args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=6400, help="training images generated (epochs repeat them)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the steady images/s")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: the cores)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    parser.add_argument("--workdir", default=None, help="build here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    # the steady images/s is over the logged steps from --warmup on: with no step after it, the
    # bench ended in a StopIteration or ZeroDivisionError after minutes of training
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no step after the --warmup {args.warmup} to time")
    _gpu_or_exit()
    in_workdir(args.workdir, "bnncc-bench-gpu-", lambda work: run(args, work))


if __name__ == "__main__":
    main()
