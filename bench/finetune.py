"""Fine-tuning bench: float ResNet teacher on Fashion-MNIST -> PokeBNN rewrite -> distillation.

The teacher is ResNet-50 by default; ``--arch resnet18`` (or resnet34) runs the same protocol on a
basic-block ResNet with its recipe.

Prints teacher top-1, student top-1, the gap, run times, and the training throughput of the
student over the float teacher on the same batch (target: >= 0.5), and again for full-size
ResNet-50 (224 px, width 1), where the convolutions rather than op dispatch set the pace.

The throughput reference is the float teacher as ``train-teacher`` trains it: torchvision's
ResNet-50 module, batch norms in train mode. The ONNX view of the exported teacher (BNs folded
into the convs by the export, so fewer ops) is printed too, labelled, as the earlier reference.
``--throughput-only`` skips the training runs and times networks with random weights at the same
sizes, so the throughput lines can be rerun in a minute. ``--compile`` also times both networks
through torch.compile (``bnncc finetune --compile``) at the fine-tune's size.

    .venv/bin/python bench/finetune.py [--data /usr/share/datasets/fashion-mnist] [--width 0.25]
        [--image-size 32] [--teacher-epochs 3] [--student-epochs 7] [--arch resnet50] [--recipe pokebnn_1x]
        [--full-size-batch 8]
        [--throughput-only] [--compile]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import onnx_ir as ir
import torch

from bnncc.frontend import load
from bnncc.rewriting import rewrite
from bnncc.torchview import to_torch
from bnncc.train import TrainConfig, finetune, train_teacher
from bnncc.train.data import open_dataset
from bnncc.train.trainer import MEMORY_FORMAT, keep_freed_memory, make_optimizer
from bnncc.zoo import ARCHITECTURES, export_onnx
from workdir import in_workdir  # bench/, beside this script


# the recipe each architecture's student is rewritten with by default
_RECIPES = {"resnet18": "resnet18_pokebnn", "resnet34": "resnet34_pokebnn", "resnet50": "pokebnn_1x",
            "resnet101": "pokebnn_1x"}


def stem_width(width: float) -> int:
    """The PokeInit stem's middle width: the stem width must be a multiple of it, at most 32."""
    return min(32, max(8, int(64 * width)))


def step_times(models: list[torch.nn.Module], batch: torch.Tensor, steps: int = 9) -> list[list[float]]:
    """Seconds of each forward + backward + Adam step on ``batch``, per model, the models taking
    their steps in turn, so that the VM's slow periods (seconds to minutes, see RESULTS.md) fall
    on all of them alike. The first two steps of each are warm-up (and compilation)."""
    keep_freed_memory()  # as the trainer does on CPU
    runs = []
    for model in models:
        # the trainer's memory format and optimizer, for every network
        model.to(memory_format=MEMORY_FORMAT).train()
        runs.append((model, make_optimizer(model, 1e-4)))
    batch = batch.contiguous(memory_format=MEMORY_FORMAT)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(steps + 2):
        for (model, optimizer), seconds in zip(runs, times):
            start = time.perf_counter()
            loss = model(batch).logsumexp(dim=1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seconds.append(time.perf_counter() - start)
    return times


def images_per_second(seconds: list[float], batch: torch.Tensor) -> float:
    """From the median step after the warm-up (on a shared machine a single step can stall)."""
    return batch.shape[0] / statistics.median(seconds[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--student-epochs", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--teacher-lr", type=float, default=3e-2)
    parser.add_argument("--student-lr", type=float, default=3e-2)
    parser.add_argument("--arch", default="resnet50", choices=sorted(ARCHITECTURES),
                        help="the teacher's architecture (torchvision's definition)")
    parser.add_argument("--recipe", default=None, help="default: pokebnn_1x, resnet18_pokebnn or resnet34_pokebnn "
                        "by --arch")
    parser.add_argument("--workdir", default=None, help="keep the teacher, student and checkpoints here "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--full-size-batch", type=int, default=8,
                        help="also time both networks at full size with this batch (0: skip)")
    parser.add_argument("--throughput-only", action="store_true",
                        help="skip the training runs; time networks with random weights at the same sizes")
    parser.add_argument("--compile", action="store_true",
                        help="also time both networks through torch.compile at the fine-tune's size (minutes)")
    args = parser.parse_args()
    args.recipe = args.recipe or _RECIPES[args.arch]
    in_workdir(args.workdir, "bnncc-bench-ft-", lambda work: run(args, work))


def run(args: argparse.Namespace, work: Path) -> None:
    print(f"bench/finetune.py on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"work dir {work}")

    data = open_dataset(args.data, "train")
    batch, _ = data.batch(torch.arange(args.batch_size), (3, args.image_size, args.image_size), augment=False)
    if args.throughput_only:
        teacher_path = export_onnx(ARCHITECTURES[args.arch](args.width, data.num_classes), work / "teacher.onnx",
                                   input_size=args.image_size)
        student, _ = rewrite(load(teacher_path), args.recipe,
                             [f"passes.poke_stem.mid_channels={stem_width(args.width)}"])
    else:
        student, teacher_path = train_and_report(args, work)
    # the float teacher is timed as train-teacher trains it; its trained weights do not change a
    # step's cost, so it is the same torchvision module with random weights
    print_throughput("", student, teacher_path, ARCHITECTURES[args.arch](args.width, data.num_classes), batch)
    if args.compile:
        print_compiled_throughput(student, ARCHITECTURES[args.arch](args.width, data.num_classes), batch)
    if args.full_size_batch:
        path = export_onnx(ARCHITECTURES[args.arch](1.0, 1000), work / f"{args.arch}.onnx", input_size=224)
        student, _ = rewrite(load(path), args.recipe)
        full = torch.randn(args.full_size_batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        print_throughput(f", {args.arch} at width 1, 224 px, batch {args.full_size_batch} (random weights)",
                         student, path, ARCHITECTURES[args.arch](1.0, 1000), full, steps=5)


def train_and_report(args: argparse.Namespace, work: Path) -> tuple[ir.Model, Path]:
    """Train the teacher, rewrite and fine-tune the student; print accuracies. Returns the student
    graph before fine-tuning and the teacher's ONNX path."""
    began = time.perf_counter()
    teacher_cfg = TrainConfig(lr=args.teacher_lr, batch_size=args.batch_size, epochs=args.teacher_epochs,
                              label_weight=1.0, weight_decay=5e-5)
    teacher_path, teacher_top1, _ = train_teacher(args.data, work / "teacher.onnx", teacher_cfg, width=args.width,
                                                 image_size=args.image_size, arch=args.arch)
    teacher_seconds = time.perf_counter() - began

    student, _ = rewrite(load(teacher_path), args.recipe, [f"passes.poke_stem.mid_channels={stem_width(args.width)}"])
    student_path = work / "student.onnx"
    ir.save(student, student_path)

    began = time.perf_counter()
    cfg = TrainConfig.from_recipe({}, lr=args.student_lr, batch_size=args.batch_size, epochs=args.student_epochs)
    result = finetune(student_path, teacher_path, args.data, work / "trained.onnx", cfg,
                      checkpoint=work / "trained.ckpt", metrics=work / "trained.metrics.jsonl")
    student_seconds = time.perf_counter() - began

    print(f"teacher   top-1 {teacher_top1:6.2f}%   ({args.teacher_epochs} epochs, {teacher_seconds:.0f} s)")
    print(f"student   top-1 {result.student_top1:6.2f}%   ({args.student_epochs} epochs, {student_seconds:.0f} s, "
          f"ACE {result.ace / 1e9:.3f}e9)")
    print(f"gap       {teacher_top1 - result.student_top1:6.2f} points (target <= 2)")
    return ir.load(student_path), teacher_path


def print_throughput(where: str, student: ir.Model, teacher_path: Path, float_teacher: torch.nn.Module,
                     batch: torch.Tensor, steps: int = 9) -> None:
    """Student images/s over the float teacher's: torchvision's module in train mode (BN, as
    train-teacher trains it) is the reference; the teacher's ONNX view (BNs folded) is printed too."""
    times = step_times([to_torch(student), float_teacher, to_torch(load(teacher_path))], batch, steps)
    student_ips, float_ips, onnx_ips = (images_per_second(t, batch) for t in times)
    print(f"training throughput{where}: student {student_ips:.1f} img/s; "
          f"float teacher (torchvision, BN in train mode) {float_ips:.1f} img/s, ratio {student_ips / float_ips:.3f} "
          f"(target >= 0.5); teacher's ONNX view (BN folded) {onnx_ips:.1f} img/s, ratio {student_ips / onnx_ips:.3f}")


def print_compiled_throughput(student: ir.Model, float_teacher: torch.nn.Module, batch: torch.Tensor) -> None:
    """Both networks through torch.compile, as ``bnncc finetune --compile`` trains, with the seconds
    their first step took (compiling)."""
    student_times, teacher_times = step_times([torch.compile(to_torch(student)), torch.compile(float_teacher)], batch)
    student_ips, teacher_ips = images_per_second(student_times, batch), images_per_second(teacher_times, batch)
    print(f"training throughput with torch.compile: student {student_ips:.1f} img/s "
          f"(first step {student_times[0]:.0f} s, "
          f"compiling); float teacher (torchvision, BN in train mode) {teacher_ips:.1f} img/s "
          f"(first step {teacher_times[0]:.0f} s), ratio {student_ips / teacher_ips:.3f}")


if __name__ == "__main__":
    main()
