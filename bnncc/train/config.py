"""Training settings: one dataclass, filled from a recipe's [train] table and the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["TrainConfig", "IMAGENET_STEPS_PER_EPOCH"]

# The paper's schedule is written for ImageNet at batch 8192: floor(1,281,167 / 8192) steps per epoch.
IMAGENET_STEPS_PER_EPOCH = 156


@dataclass(frozen=True)
class TrainConfig:
    """How one fine-tuning (or teacher-training) run goes.

    ``lr`` is per 256 images: the optimizer's rate is ``lr * batch_size / 256``, decaying linearly
    to 0 at the last step. The two-phase schedule and the calibration point are fractions of the
    run, so a short fine-tune keeps the paper's proportions: float weights until
    ``weight_quant_start`` (the paper: epoch 50 of 800), activation bounds calibrated once at
    ``act_calibration_at`` (the paper: step 7500 of 124,800) and frozen after.
    """

    lr: float = 2e-5
    batch_size: int = 64
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    weight_decay: float = 5e-5  # coupled L2: 0.5 * wd * sum ||W||^2 over kernels (ndim > 1)
    clip_bound: float | None = None  # B, the STE window: None trains with the graph's; a number overrides it
    temperature: float = 1.0
    label_weight: float = 0.0  # weight of a cross-entropy term on the labels (0: pure distillation)
    weight_quant_start: float = 0.0625
    act_calibration_at: float = 0.06
    calibration_batches: int = 4
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    num_workers: int | None = None  # processes decoding image files; None: the cores (bnncc.train.loader)
    compile: bool = False  # torch.compile the training step: faster steps after minutes of compiling

    @classmethod
    def from_recipe(cls, train: dict, **overrides) -> "TrainConfig":
        """Read a recipe's [train] table; epoch/step boundaries become fractions of the run."""
        epochs = int(train.get("epochs", 1))
        values = {k: train[k] for k in ("lr", "batch_size", "weight_decay", "temperature") if k in train}
        if "weight_quant_start" in train:
            values["weight_quant_start"] = train["weight_quant_start"] / max(epochs, 1)
        if "act_calibration_step" in train:
            values["act_calibration_at"] = train["act_calibration_step"] / (max(epochs, 1) * IMAGENET_STEPS_PER_EPOCH)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return dataclasses.replace(cls(), **values)
