"""Training settings: one dataclass, filled from a recipe's [train] table and the command line."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from bnncc.errors import BnnccError
from bnncc.recipe import IMAGENET_TRAIN_IMAGES, steps_per_epoch

__all__ = ["TrainConfig", "IMAGENET_TRAIN_IMAGES"]


@dataclass(frozen=True)
class TrainConfig:
    """How one fine-tuning (or teacher-training) run goes.

    ``lr`` is per 256 images: the optimizer's rate is ``lr * batch_size / 256``, decaying linearly
    to 0 at the run's end (the last of N steps at 1/N of it). The two-phase schedule and the
    calibration point are fractions of the run, so a short fine-tune keeps the paper's proportions:
    float weights until ``weight_quant_start`` (the paper: epoch 50 of 800), activation bounds calibrated once at
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
            values["act_calibration_at"] = train["act_calibration_step"] / (max(epochs, 1) * steps_per_epoch(train))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return dataclasses.replace(cls(), **values)

    def __post_init__(self) -> None:
        """Every setting in its range: a zero batch or a NaN rate would fail deep inside torch, or worse,
        train to nothing without a word."""
        def real(value) -> bool:  # (a bool is an int to Python)
            return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

        def count(value) -> bool:  # (an int is finite; isfinite overflowed on one beyond a float's range)
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        # (whether it is in range, the range): the error said "out of range" and not which. Each range is tested
        # once the value is a number (lr="1e-3" failed comparing: "'>' not supported between instances of 'str' and
        # 'int'"); the settings that count something take integers (a batch_size of 2.5 failed in torch's sampler)
        above_0, at_least_0, at_least_1 = "a finite number above 0", "a finite number of at least 0", "1 or more"
        checks = {
            "lr": (real(self.lr) and self.lr > 0, above_0),
            "batch_size": (count(self.batch_size) and self.batch_size >= 1, at_least_1),
            "epochs": (count(self.epochs) and self.epochs >= 1, at_least_1),
            "max_steps": (self.max_steps is None or count(self.max_steps) and self.max_steps >= 1, at_least_1),
            "weight_decay": (real(self.weight_decay) and self.weight_decay >= 0, at_least_0),
            "clip_bound": (self.clip_bound is None or real(self.clip_bound) and self.clip_bound > 0, above_0),
            "temperature": (real(self.temperature) and self.temperature > 0, above_0),
            "label_weight": (real(self.label_weight) and self.label_weight >= 0, at_least_0),
            "weight_quant_start": (real(self.weight_quant_start) and self.weight_quant_start >= 0, at_least_0),
            "act_calibration_at": (real(self.act_calibration_at) and self.act_calibration_at >= 0, at_least_0),
            "calibration_batches": (count(self.calibration_batches) and self.calibration_batches >= 1, at_least_1),
            "checkpoint_every": (count(self.checkpoint_every) and self.checkpoint_every >= 1, at_least_1),
            "log_every": (count(self.log_every) and self.log_every >= 1, at_least_1),
            # (2**63 overflowed torch's generator seed, unexpectedly)
            "seed": (count(self.seed) and 0 <= self.seed < 2**32, "0 to 2**32 - 1"),
            "num_workers": (self.num_workers is None or count(self.num_workers) and self.num_workers >= 0, at_least_0),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise BnnccError(f"training setting {name} = {getattr(self, name)!r} is out of range; "
                                 f"expected {expected}")
        # a number of another type (numpy's, a Fraction) as the Python int or float it is: torch's generator took no
        # numpy integer (batch_size=np.int64(8) failed at the first step), nor json (the trained graph's record) a
        # Fraction, which trained to its end and then failed in a traceback, writing nothing
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
                object.__setattr__(self, name, int(value) if isinstance(value, numbers.Integral) else float(value))
        # each finite, their product need not be: lr = 1e308 at a batch of 8192 gave the optimizer an infinite rate,
        # and the run stopped on a NaN loss after its start-up
        if not math.isfinite(self.lr * self.batch_size / 256):
            raise BnnccError(f"training setting lr = {self.lr!r} at a batch of {self.batch_size} gives the optimizer "
                             f"an infinite rate (lr * batch_size / 256); expected a finite one")
