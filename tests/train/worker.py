"""A tiny training run, launched as a separate process (torchrun for DDP, or to be killed).

usage: worker.py DATA_DIR OUT_STATE CHECKPOINT STEPS [--resume] [--slow] [--input-norm]

The trained state goes to OUT_STATE, the metrics beside it (OUT_STATE with the suffix .jsonl).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bnncc.train import TrainConfig
from bnncc.train.data import open_dataset
from bnncc.train.trainer import train


def tiny_net(input_norm: bool = False) -> nn.Module:
    """No batch norm after a trained layer: DDP ranks normalise per device (pokebnn.md 7.6), which
    would differ from one process. With ``input_norm`` a batch norm of the input comes first: its
    running mean depends on the images alone, and the processes' mean of it is one process's."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)]
    return nn.Sequential(*([nn.BatchNorm2d(1)] if input_norm else []), *layers)


def main(argv: list[str]) -> None:
    # (CHECKPOINT and DATA_DIR may name $LOCAL_RANK: a file or a data copy of each process's own, as on
    # nodes without a shared disk)
    data_dir, out_state, steps = Path(os.path.expandvars(argv[0])), Path(argv[1]), int(argv[3])
    checkpoint = Path(os.path.expandvars(argv[2]))
    net = tiny_net("--input-norm" in argv)
    if "--slow" in argv:  # leaves time to kill the process between two checkpoints
        net.register_forward_pre_hook(lambda module, args: time.sleep(0.2))
    cfg = TrainConfig(lr=0.05, batch_size=16, max_steps=steps, weight_decay=5e-5, label_weight=1.0,
                      checkpoint_every=2, seed=3, log_every=1)
    data = open_dataset(data_dir, "train")
    train(net, None, data, cfg, (1, 8, 8), checkpoint=checkpoint, resume="--resume" in argv,
          metrics=out_state.with_suffix(".jsonl"), show_progress=False)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        torch.save(net.state_dict(), out_state)


if __name__ == "__main__":
    main(sys.argv[1:])
