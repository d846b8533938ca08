"""Batches for training and evaluation: loaded ahead in ``DataLoader`` worker processes, bad images counted.

The caller plans the batches (``Plan``: which images, at which step, at which positions of the
global batch); a batch's content depends on its plan alone, so the number of workers and their
timing change nothing. Image files are decoded in ``workers`` processes (default: the cores, shared
among the processes of a torchrun node); data held in memory is sliced in this process.

An unreadable image is replaced inside the batch (``Dataset.load``); the loader logs each one
once, counts them (``bad``, kept in checkpoints), and, when training, stops the run with a
``BnnccError`` when more than 1% of the split is bad. The processes of a torchrun training share
what they found after every batch, so the count is the run's and all of them stop at the same
step (one stopping alone left the others in a collective, ended by gloo's "connection closed").
An evaluation only counts: it comes after the training, which stopping would throw away (one bad
image of a 30-image validation split did).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing.util
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from bnncc.errors import BnnccError
from bnncc.train.data import Dataset, Loaded

__all__ = ["Plan", "Loader", "default_workers", "stop_signals_held", "BAD_SHARE", "STOPS"]

logger = logging.getLogger(__name__)

BAD_SHARE = 0.01  # more unreadable images than this share of the split stop the run


@dataclass(frozen=True)
class Plan:
    """One batch: images ``index``, augmented for ``step`` at ``positions`` of the global batch
    (``None``: not augmented, the evaluation crop)."""

    index: torch.Tensor
    step: int = 0
    positions: torch.Tensor | None = None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    """The cores this process may use, shared among the torchrun processes on this machine."""
    return max(1, _cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _checked_workers(workers: int) -> int:
    """More decoding processes than cores only contend (1000 were started for 30 images, and the run
    took minutes to stop)."""
    if workers > _cores():
        raise BnnccError(f"--workers {workers}: more than the {_cores()} cores this process may use")
    return workers


# the signals that stop a run (bnncc.cli turns them into exceptions)
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Batches(torch.utils.data.Dataset):
    """A ``Plan`` -> its loaded batch, in whichever process runs it."""

    def __init__(self, data: Dataset, shape: tuple[int, int, int], seed: int):
        self.data, self.shape, self.seed = data, shape, seed

    def __getitem__(self, plan: Plan) -> Loaded:
        return self.data.load(plan.index, self.shape, augment=plan.positions is not None, step=plan.step,
                              seed=self.seed, positions=plan.positions)


class Loader:
    """Loads planned batches of ``data`` for a model input of ``shape``, onto ``device``."""

    def __init__(self, data: Dataset, shape: tuple[int, int, int], *, seed: int = 0, workers: int | None = None,
                 device: str | torch.device = "cpu", world: int = 1, stops: bool = True):
        self.data, self.shape, self.device, self.stops = data, shape, torch.device(device), stops
        self.batches = _Batches(data, shape, seed)
        self.workers = 0 if data.in_memory else (default_workers() if workers is None else _checked_workers(workers))
        self.bad: set[int] = set()
        # a CPU group: counting over NCCL would make the host wait for the GPU at every step
        self.shared = dist.new_group(backend="gloo") if world > 1 and stops else None

    def __call__(self, plans: Iterable[Plan]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised images, labels) on the device for each plan, in order."""
        if self.workers == 0:
            loaded: Iterable[Loaded] = map(self.batches.__getitem__, plans)
        else:
            # batch_size=None: each plan is one item, a whole batch made by one worker
            loaded = DataLoader(self.batches, sampler=map(_own_tensors, plans), batch_size=None,
                                num_workers=self.workers, collate_fn=_as_is, pin_memory=self.device.type == "cuda",
                                worker_init_fn=_leave_stop_signals_to_the_trainer)
            with stop_signals_held():
                loaded = iter(loaded)  # (forks the workers)
        for images, labels, bad in loaded:
            self._count(bad)
            images = images.to(self.device, non_blocking=True)
            yield self.data.finish(images, self.shape), labels.to(self.device, non_blocking=True)

    def _count(self, bad: list[tuple[int, str]]) -> None:
        # once each: a bad image that follows another is met as its replacement and again in its own place
        for i, reason in dict(bad).items():
            if i not in self.bad:
                logger.warning("%s: unreadable image (%s), replaced by the next readable one", self.data.describe(i),
                               reason)
        found = {i for i, _ in bad}
        self.bad |= found if self.shared is None else _found_by_all(found, self.shared)
        if self.stops and len(self.bad) > BAD_SHARE * len(self.data):
            more = f" and {len(self.bad) - 1} more images are" if len(self.bad) > 1 else " is"
            raise BnnccError(f"{self.data.describe(min(self.bad))}{more} unreadable: more than {BAD_SHARE:.0%} of "
                             f"the {len(self.data)} images of the split")


def _found_by_all(found: set[int], group: dist.ProcessGroup) -> set[int]:
    """The bad images every process of ``group`` found in its part of this batch. One number is
    summed every batch; the images themselves are sent only when some were found."""
    count = torch.tensor([len(found)])
    dist.all_reduce(count, group=group)
    if not int(count):
        return found
    parts: list[list[int] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, sorted(found), group=group)
    return {i for part in parts for i in part}


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold the stop signals that a Python handler takes (bnncc.cli's: Ctrl-C, SIGTERM, SIGHUP) while processes
    are forked (the loader's workers, the shard indexer's), and pass the first on to it afterwards. Run then,
    the handler ran inside the at-fork callbacks (logging's), which printed its KeyboardInterrupt or SystemExit
    as "Exception ignored" and dropped it: the run trained on to its end and exited 0. (Blocking the signals in
    this thread is not enough: another thread takes them, and the handler still runs here, in the callbacks.)"""
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # (where signal handlers are set and run)
        handlers = {stop: handler for stop in STOPS if callable(handler := signal.getsignal(stop))}
    held: list[int] = []
    for stop in handlers:
        signal.signal(stop, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for stop, handler in handlers.items():
            signal.signal(stop, handler)
    if held:
        handlers[held[0]](held[0], None)


def _end_workers_at_exit() -> None:
    """Kill the loader's workers left at exit: they ignore SIGTERM (below), with which multiprocessing's own
    exit function ends daemonic children before waiting for them, so a process that still held a started
    loader (a run stopped by an error whose traceback was kept, as pytest keeps it) waited forever."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# registered after multiprocessing.util's exit function (imported above), so it runs before it
atexit.register(_end_workers_at_exit)


def _leave_stop_signals_to_the_trainer(_worker: int) -> None:
    """A worker ignores the signals that stop a run: sent to the whole process group (a terminal's
    Ctrl-C, ``timeout``, SLURM, systemd), they killed the workers first, and torch's iterator then
    printed a traceback from its ``__del__``; the trainer stops and shuts its workers down itself,
    and a worker whose trainer dies ends with it (torch's watchdog)."""
    for stop in STOPS:
        signal.signal(stop, signal.SIG_IGN)


def _own_tensors(plan: Plan) -> Plan:
    """The plan with copies of its tensors. The queue to a worker moves a tensor it sends into shared
    memory on its feeder thread and frees the old memory, while this thread may still read it: the
    trainer's positions, sent with every plan, read as indices like 23165848769 (one CI run in many)."""
    positions = None if plan.positions is None else plan.positions.clone()
    return replace(plan, index=plan.index.clone(), positions=positions)


def _as_is(loaded: Loaded) -> Loaded:
    """The batch as the worker made it (module level: workers may be spawned, not forked)."""
    return loaded
