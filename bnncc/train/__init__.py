"""Fine-tuning: quantization-aware training with distillation from the float network."""

from bnncc.train.config import TrainConfig
from bnncc.train.finetune import FinetuneResult, finetune, train_teacher

__all__ = ["TrainConfig", "FinetuneResult", "finetune", "train_teacher"]
