"""``finetune`` and ``train_teacher``: the ONNX-in, ONNX-out entry points around the training loop."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from bnncc.domain import DOMAIN, PREPROCESSING_KEY, TRAINING_KEY
from bnncc.errors import BnnccError
from bnncc.fileio import atomic_path, check_writable, refuse_overwriting
from bnncc.passes.width_multiplier import MAX_MULTIPLIER
from bnncc.train.config import TrainConfig
from bnncc.train.data import Dataset, open_splits
from bnncc.train.trainer import (RUN_SETTINGS, TrainResult, evaluate, evaluate_models, is_main_process, train,
                                 training_device)

__all__ = ["FinetuneResult", "finetune", "train_teacher", "input_shape"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    output: Path
    train: TrainResult
    student_top1: float | None
    student_top5: float | None
    teacher_top1: float | None
    teacher_top5: float | None
    ace: float | None


def input_shape(model: ir.Model) -> tuple[int, int, int]:
    """(C, H, W) of the model's one image input; these must be fixed numbers."""
    dims = model.graph.inputs[0].shape
    if dims is None or len(dims) != 4 or not all(isinstance(d, int) for d in list(dims)[1:]):
        raise BnnccError(f"input {model.graph.inputs[0].name!r}: expected (N, C, H, W) with fixed C, H, W, got {dims}")
    return tuple(int(d) for d in list(dims)[1:])  # type: ignore[return-value]


def _override_clip_bound(model: ir.Model, clip_bound: float) -> None:
    """Set B on every op of the domain that has one (BinaryConv, PokeConv): the graph is B's one home,
    so the torch view trains with the new value and the written graph keeps it (TrainConfig checked
    that it is above 0)."""
    nodes = [n for n in model.graph if n.domain == DOMAIN and "clip_bound" in n.attributes]
    old = sorted({n.attributes["clip_bound"].as_float() for n in nodes})
    for node in nodes:
        node.attributes["clip_bound"] = ir.AttrFloat32("clip_bound", clip_bound)
    logger.info("clip bound B overridden: %s -> %s on %d nodes", ", ".join(map(str, old)) or "none", clip_bound,
                len(nodes))


def _classes(model: ir.Model) -> int:
    dims = model.graph.outputs[0].shape
    return int(dims[-1]) if dims is not None and isinstance(dims[-1], int) else -1


def _save(model: ir.Model, output: Path) -> None:
    """Write the trained graph, if every command could read it back (``check_graph``): training at
    an extreme setting (--clip-bound 1e20) overflowed a batch norm's variance, and the file it
    wrote was then refused by ace and compile."""
    from bnncc.ops import attach_functions, check_graph

    try:
        check_graph(model)
    except BnnccError as e:
        raise BnnccError(f"the trained graph is not a valid PokeBNN graph ({e}); nothing is written to "
                         f"{output}: train with settings nearer the recipe's") from None
    attach_functions(model)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    with atomic_path(output) as tmp:
        onnx.save(proto, tmp)


def finetune(student_path: str | Path, teacher_path: str | Path, data_dir: str | Path, output: str | Path,
             cfg: TrainConfig, *, checkpoint: str | Path | None = None, resume: bool = False,
             metrics: str | Path | None = None, device: str | torch.device = "cpu",
             show_progress: bool = True) -> FinetuneResult:
    """Fine-tune the PokeBNN student against the float teacher; write the trained graph to ``output``.

    The teacher is the imported float model run in eval mode; the loss needs no labels, so the
    data may have other classes than the models (top-1/top-5 are reported only when they match).
    """
    from bnncc.cost import ace
    from bnncc.frontend import input_files, load, read_pokebnn
    from bnncc.torchview import to_torch, write_back

    _require_config(cfg)
    output = Path(output)
    refuse_overwriting({"the trained model": output, "the checkpoint": checkpoint, "the metrics": metrics},
                       {**input_files("the student model", student_path),
                        **input_files("the teacher model", teacher_path)})
    for path in (output, checkpoint, metrics):  # before minutes of training
        if path is not None:
            check_writable(path)
    device = training_device(device)  # a missing GPU fails here, before minutes of loading
    student_model = read_pokebnn(student_path, "finetune")
    teacher_model = load(teacher_path)
    if cfg.clip_bound is not None:
        _override_clip_bound(student_model, cfg.clip_bound)
    shape = input_shape(student_model)
    if input_shape(teacher_model) != shape:
        raise BnnccError(f"{student_path}: input {shape} but the teacher {teacher_path} takes "
                         f"{input_shape(teacher_model)}: distillation feeds both the same images")
    if _classes(student_model) != _classes(teacher_model):
        raise BnnccError(f"{student_path}: {_classes(student_model)} classes but the teacher {teacher_path} has "
                         f"{_classes(teacher_model)}: distillation needs the same output")
    if _classes(student_model) == 1:
        # the softmax of one logit is 1 whatever the input: the run changed the weights by their decay alone
        # and the report called the network fine-tuned
        raise BnnccError(f"{student_path}: one output class; distillation and labels compare softmaxes, which "
                         f"give it no gradient: there is nothing to fine-tune")
    train_data, val_data = open_splits(data_dir)  # indexed and checked before any training
    if cfg.label_weight > 0 and train_data.num_classes != _classes(student_model):
        raise BnnccError(f"{data_dir}: labels of {train_data.num_classes} classes for a model of "
                         f"{_classes(student_model)}; a label weight needs the model's classes")
    torch.manual_seed(cfg.seed)
    student, teacher = to_torch(student_model), to_torch(teacher_model)
    result = train(student, teacher, train_data, cfg, shape, checkpoint=Path(checkpoint) if checkpoint else None,
                   resume=resume, metrics=Path(metrics) if metrics else None, device=device,
                   show_progress=show_progress)
    accuracy: tuple[float | None, ...] = (None, None, None, None)
    if not is_main_process():  # under torchrun, rank 0 alone evaluates and writes the result
        return FinetuneResult(output, result, *accuracy, None)
    if val_data.num_classes == _classes(student_model):
        label = "student and teacher" if show_progress else None
        scores = evaluate_models([student, teacher], val_data, shape, device=device, workers=cfg.num_workers,
                                 label=label)
        accuracy = (*scores[0], *scores[1])
    else:
        logger.warning("the data has %d classes, the model %d: no top-1/top-5 (distillation needs no labels)",
                       val_data.num_classes, _classes(student_model))
    student.cpu()
    write_back(student, student_model)
    student_model.metadata_props[PREPROCESSING_KEY] = json.dumps(_preprocessing(train_data, shape[0]))
    # the seed and settings were recorded nowhere: a trained graph could not be trained again to the same weights
    # (TrainConfig holds Python numbers alone, which json writes)
    student_model.metadata_props[TRAINING_KEY] = json.dumps(
        {"steps": result.steps, **{name: getattr(cfg, name) for name in RUN_SETTINGS}})
    _save(student_model, output)
    return FinetuneResult(output, result, *accuracy, float(ace(student_model).total))


def _preprocessing(data: Dataset, channels: int) -> dict:
    """The normalisation the model was trained with, per input channel (data._adapt: grey data is
    repeated to C channels, exactly; colour data averaged to one channel after normalising, which
    one mean and std of the channels' give only approximately), and how evaluation resized an image, which
    `bnncc run` then does too: the centre crop of image files (``crop``: the share of the largest box of the
    input's shape), or the bilinear interpolation of data held as arrays (IDX: ``resize``)."""
    mean, std = list(data.mean), list(data.std)
    if len(mean) != channels:
        if len(mean) == 1:
            mean, std = mean * channels, std * channels
        else:
            mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    resize = {"resize": "bilinear"} if data.eval_crop is None else {"crop": data.eval_crop}
    return {"mean": mean, "std": std, **resize}


def _require_config(cfg: object) -> None:
    """A TypeError naming the fix where ``cfg`` is no TrainConfig: a dict of settings failed after the
    models were read, naming an attribute ('dict' object has no attribute 'clip_bound')."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg is a bnncc.TrainConfig, not {type(cfg).__name__}: "
                        f"write bnncc.TrainConfig(lr=..., epochs=...)")


def train_teacher(data_dir: str | Path, output: str | Path, cfg: TrainConfig, *, width: float = 1.0,
                  image_size: int = 32, device: str | torch.device = "cpu", arch: str = "resnet50",
                  show_progress: bool = True) -> tuple[Path, float | None, float | None]:
    """Train a float ResNet (torchvision's definition of ``arch``, a name of ``bnncc.zoo.ARCHITECTURES``,
    ``width`` times narrower) on labels; export ONNX.

    Returns (path, top-1, top-5) on the validation split; (path, None, None) on torchrun ranks > 0.
    """
    from bnncc.zoo import ARCHITECTURES, export_onnx

    _require_config(cfg)
    if arch not in ARCHITECTURES:
        raise BnnccError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    # (a ResNet divides its input by 32; below 8 pixels its stages see less than one. A ResNet-50 16
    # times wider holds some 6 billion weights: the width_multiplier pass's cap of 4 holds here too)
    if not 0 < width <= MAX_MULTIPLIER or not 8 <= image_size <= 4096:
        raise BnnccError(f"width {width}, image size {image_size}: expected a width above 0 and at most "
                         f"{MAX_MULTIPLIER} and an image size of 8 to 4096 pixels")
    if cfg.label_weight <= 0:  # without a teacher, the loss would be the weight decay alone
        raise BnnccError(f"train_teacher learns from the labels alone: label_weight is {cfg.label_weight}, "
                         f"expected above 0 (the command line's is 1)")

    check_writable(output)  # before minutes of training
    device = training_device(device)
    train_data, val_data = open_splits(data_dir)
    if train_data.num_classes == 1:
        # the softmax of one logit is 1 whatever the input: the run trained on a loss of 0, reported a top-1
        # of 100% and wrote a teacher that finetune refuses
        raise BnnccError(f"{data_dir}: one class; a network of one class gets no gradient from its labels (the "
                         f"softmax of one logit is 1): there is nothing to learn")
    shape = (3, image_size, image_size)
    torch.manual_seed(cfg.seed)
    model = ARCHITECTURES[arch](width=width, num_classes=train_data.num_classes, seed=cfg.seed)
    train(model, None, train_data, cfg, shape, device=device, show_progress=show_progress)
    if not is_main_process():  # under torchrun, rank 0 alone evaluates and exports
        return Path(output), None, None
    top1, top5 = evaluate(model, val_data, shape, device=device, workers=cfg.num_workers,
                          label="teacher" if show_progress else None)
    model.cpu().eval()
    # export_onnx writes atomically itself: inside another atomic_path, a full disk was reported
    # under that one's temporary name, not the output's
    output = export_onnx(model, output, exporter="legacy", input_size=image_size)
    return output, top1, top5
