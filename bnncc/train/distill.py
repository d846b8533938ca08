"""The distillation loss (pokebnn.md section 4, train_utils.kl_div_loss).

    L = -(T^2 / N) * sum_i sum_k softmax(t_i / T)_k * log_softmax(s_i / T)_k
        + label_weight * CE(s, y)

With T = 1 and label_weight = 0 this is the paper's loss: cross-entropy to the teacher's
softmax, no labels. The T^2 factor (Hinton et al.) keeps gradient magnitudes comparable
across temperatures; it is 1 at the default T = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
                      temperature: float = 1.0, label_weight: float = 0.0) -> torch.Tensor:
    loss = student.new_zeros(())
    if teacher is not None:
        target = F.softmax(teacher.float() / temperature, dim=1)
        log_probs = F.log_softmax(student.float() / temperature, dim=1)
        loss = loss - (target * log_probs).sum(dim=1).mean() * temperature**2
    if label_weight:
        loss = loss + label_weight * F.cross_entropy(student.float(), labels)
    return loss
