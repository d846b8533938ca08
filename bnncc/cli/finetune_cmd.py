"""``bnncc finetune`` and ``bnncc train-teacher``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from bnncc.cli._app import app, console

_OUT = Annotated[Path, typer.Option("--output", "-o", help="Where to write the ONNX model.")]


@app.command()
def finetune(
    student: Annotated[Path, typer.Argument(help="PokeBNN graph from `bnncc rewrite`.")],
    teacher: Annotated[Path, typer.Option(help="The float model the student learns from.")],
    data: Annotated[Path, typer.Option(
        help="IDX folder (MNIST-style), ImageFolder tree (train/, val/) or tar shards (train-*.tar, val-*.tar).")],
    output: _OUT,
    # "\[": the help is rich markup, where a bare [train] is a tag and disappears
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe whose \\[train] table sets the schedule.")] = (
        "pokebnn_1x"),  # -r: as rewrite's and convert's
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs over the training split (default 1).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        min=1, help="Stop after this many steps (overrides --epochs).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Global batch size (default 64).")] = None,
    lr: Annotated[Optional[float], typer.Option(
        help="Learning rate per 256 images (default: the recipe's, 2e-5 in the shipped ones).")] = None,
    clip_bound: Annotated[Optional[float], typer.Option(
        help="Override the graph's B (STE window of binary activations); the output graph keeps it.")] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help="Distillation temperature (default: the recipe's, else 1).")] = None,
    label_weight: Annotated[Optional[float], typer.Option(
        help="Weight of a label cross-entropy term (default 0: distillation alone).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Checkpoint file (default: OUTPUT.ckpt).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        min=1, help="Steps between checkpoints (default 100).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of data order, augmentation and init.")] = 0,
    device: Annotated[str, typer.Option(
        help="cpu or cuda (bf16 autocast; under torchrun each process takes the GPU of its LOCAL_RANK).")] = "cpu",
    workers: Annotated[Optional[int], typer.Option(
        help="Processes decoding image files (default: the cores, shared by torchrun's processes).")] = None,
    compile_step: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the training step: faster steps after minutes of compiling.")] = False,
) -> None:
    """Fine-tune a PokeBNN graph with distillation from its float teacher (QAT)."""
    from bnncc.fileio import output_path
    from bnncc.recipe import load_recipe
    from bnncc.train import TrainConfig
    from bnncc.train.finetune import finetune as run_finetune
    from bnncc.train.trainer import is_main_process

    output = output_path(output)  # (the checkpoint and metrics files beside it: a/../t.onnx made a folder a)
    train_table = load_recipe(recipe).train
    cfg = TrainConfig.from_recipe(
        train_table, epochs=1 if epochs is None else epochs, max_steps=max_steps,
        batch_size=64 if batch_size is None else batch_size, lr=lr,
        clip_bound=clip_bound, temperature=temperature, label_weight=label_weight,
        checkpoint_every=checkpoint_every, seed=seed, compile=compile_step, num_workers=workers)
    result = run_finetune(student, teacher, data, output, cfg, checkpoint=checkpoint or output.with_suffix(".ckpt"),
                          resume=resume, metrics=output.with_suffix(".metrics.jsonl"), device=device)
    if not is_main_process():  # under torchrun, rank 0 alone reports
        return
    from bnncc.report import percent

    if checkpoint is None:  # the run is done and its result written: the default checkpoint (GBs for a ResNet-50) goes
        output.with_suffix(".ckpt").unlink(missing_ok=True)
    overridden = "" if clip_bound is None else f" (clip bound B overridden: {clip_bound})"
    table = Table(title=f"fine-tuned {student.name} -> {output}{overridden}")
    for column in ("steps", "final loss", "img/s", "student top-1", "student top-5", "teacher top-1",
                   "teacher top-5", "ACE (1e9)"):
        table.add_column(column, justify="right")
    rate = result.train.images_per_second
    trained = rate > 0  # (a resumed run whose checkpoint held its last step trains none)
    # two decimals: a 224 px ResNet-50 on a busy CPU trains at 0.03 images/s, which one decimal showed as 0.0;
    # two digits below 0.01, which two decimals showed as 0.00 (2 images in 500 s)
    table.add_row(str(result.train.steps), f"{result.train.final_loss:.4f}" if trained else "-",
                  (f"{rate:.2f}" if rate >= 0.01 else f"{rate:.2g}") if trained else "-",
                  percent(result.student_top1), percent(result.student_top5), percent(result.teacher_top1),
                  percent(result.teacher_top5), f"{(result.ace or 0) / 1e9:.3f}")
    console.print(table)


@app.command("train-teacher")
def train_teacher(
    data: Annotated[Path, typer.Option(help="IDX folder, ImageFolder tree or tar shards.")],
    output: _OUT,
    width: Annotated[float, typer.Option(help="Width multiplier of the torchvision ResNet.")] = 1.0,
    arch: Annotated[str, typer.Option(help="resnet18, resnet34, resnet50 or resnet101.")] = "resnet50",
    image_size: Annotated[int, typer.Option(help="Input size the teacher is trained and exported at.")] = 32,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs.")] = 1,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many steps.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Learning rate per 256 images.")] = 3e-2,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    device: Annotated[str, typer.Option(
        help="cpu or cuda (bf16 autocast; under torchrun each process takes the GPU of its LOCAL_RANK).")] = "cpu",
    workers: Annotated[Optional[int], typer.Option(help="Processes decoding image files (default: the cores).")] = None,
) -> None:
    """Train a float ResNet (ResNet-50 by default) on labelled data and export it to ONNX (the distillation teacher)."""
    from bnncc.fileio import output_path
    from bnncc.train import TrainConfig
    from bnncc.train.finetune import train_teacher as run
    from bnncc.train.trainer import is_main_process

    output = output_path(output)  # (the path it reports: a/../t.onnx read nowhere once no a was made)
    cfg = TrainConfig(lr=lr, batch_size=batch_size, epochs=epochs, max_steps=max_steps, label_weight=1.0, seed=seed,
                      num_workers=workers)
    path, top1, top5 = run(data, output, cfg, width=width, image_size=image_size, device=device, arch=arch)
    if is_main_process():  # under torchrun, rank 0 alone reports
        from bnncc.report import percent

        console.print(f"teacher written to {path}: top-1 {percent(top1)}, top-5 {percent(top5)}",
                      soft_wrap=True)  # one line in a pipe too
