"""The training loop: QAT with distillation, resumable bit for bit, one process or many (DDP).

One step at ``step`` s:

1. the global batch is ``data.batch_indices(s)`` (seeded by the run's seed and the epoch) and is
   augmented with a generator seeded by ``(seed, s)``; rank r of W takes rows r, r+W, ...; image
   files are decoded ahead in ``DataLoader`` workers (``bnncc.train.loader``);
2. before ``weight_quant_start`` the student keeps float weights (binary activations on);
3. at ``act_calibration_at`` the int8/int4 activation bounds are calibrated once and frozen;
4. Adam(0.9, 0.99) on distillation loss + 0.5 * wd * sum ||W||^2 over kernels; the rate is
   ``lr * global_batch / 256``, decaying linearly to 0 at the run's end (the last
   of N steps at 1/N of it).

Everything a step depends on is a function of ``s`` or is in the checkpoint (weights, BN
statistics, bounds, optimizer and schedule, the unreadable images met so far), so ``resume``
continues exactly where a run stopped. Checkpoints are written atomically every
``checkpoint_every`` steps and at the end.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from bnncc.errors import BnnccError
from bnncc.fileio import atomic_path, output_errors, partial_writes, remove_partial
from bnncc.progress import bar_console
from bnncc.train.config import TrainConfig
from bnncc.train.data import Dataset
from bnncc.train.distill import distillation_loss
from bnncc.train.loader import Loader, Plan

__all__ = ["TrainResult", "train", "evaluate", "evaluate_models", "load_checkpoint", "make_optimizer",
           "is_main_process", "keep_freed_memory", "training_device", "MEMORY_FORMAT",
           "to_training_layout", "RUN_SETTINGS"]

logger = logging.getLogger(__name__)

# Networks and images train in channels_last (NHWC in memory). On CPU torch's batch norm and its
# backward run ~3x faster on it, per-channel sums vectorize along C, and the convolutions skip
# mkldnn's layout conversions (bench/RESULTS.md, "Training choices"). Values are the same up to
# the convolutions' summation order.
MEMORY_FORMAT = torch.channels_last


def to_training_layout(student: nn.Module, device: torch.device) -> nn.Module:
    """``student`` on ``device`` in MEMORY_FORMAT, but a weight whose channels_last strides describe
    plain contiguous memory (a 1x1 kernel: the SE gates') in plain strides. channels_last gives a
    (O, I, 1, 1) weight strides (I, 1, I, I), which torch's elementwise ops do not keep: the kernel L2
    term's gradient came back (I, 1, 1, 1), and DDP copied it into its bucket with a warning each run
    ("Grad strides do not match bucket view strides")."""
    student.to(device, memory_format=MEMORY_FORMAT)
    for p in student.parameters():
        if p.is_contiguous() and p.stride() != torch.empty(p.shape, device="meta").stride():
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return student


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """Have glibc's malloc keep the memory a training step frees, for the next step to reuse.

    A CPU step frees and again allocates the same activation buffers, megabytes each. glibc maps
    blocks above its mmap threshold afresh (the threshold starts at 128 KiB and only rises as such
    blocks are freed) and returns its heap's free top above 128 KiB, so every step page-faults its
    buffers in again. Raising both (the mmap threshold to its 32 MiB maximum) keeps them in the
    heap: 100k fewer page faults over the fine-tune bench's throughput lines, the student's
    step 5-10% faster, the teacher's less (it allocates fewer, larger buffers). A no-op where the
    C library has no mallopt."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        mallopt(_M_TRIM_THRESHOLD, 1 << 30)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    images_per_second: float


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a torchrun group."""
    return _world()[0] == 0


def training_device(name: str | torch.device) -> torch.device:
    """The device this process trains on, checked before any data is read.

    ``cuda`` without a usable GPU is the user's error. Under torchrun each process of a node takes
    the GPU of its LOCAL_RANK (a bare ``cuda`` would put every rank on GPU 0)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BnnccError(f"--device {name!r}: expected cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise BnnccError(f"--device {name!r}: expected cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BnnccError(f"--device {name}: no CUDA GPU is usable here (torch {torch.__version__}, "
                             f"built for CUDA {torch.version.cuda or 'none'})")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise BnnccError(f"--device {name}: GPU {device.index} asked for, {torch.cuda.device_count()} present")
        torch.cuda.set_device(device)
    return device


def uses_bf16(device: torch.device) -> bool:
    """Mixed precision: bf16 autocast on GPUs that have it (no loss scaling needed, unlike fp16)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s floating weights: the inputs it takes (a bf16 teacher takes bf16)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on CPU, nccl on GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    """At exit, while the interpreter is whole: a gloo group torn down during finalization can
    abort the process (a worker thread frees its last work and needs the GIL: "terminate called
    without an active exception"). The collection frees the DDP wrapper, whose reference cycles
    would otherwise keep the group alive past destroy_process_group."""
    gc.collect()
    dist.destroy_process_group()


def total_steps(cfg: TrainConfig, data: Dataset) -> int:
    # the last partial batch of an epoch is dropped, so a batch larger than the data set is none,
    # with or without a step limit
    if len(data) < cfg.batch_size:
        raise BnnccError(f"{len(data)} training images make no batch of {cfg.batch_size}")
    return _steps(asdict(cfg), len(data))


def _steps(config: dict, images: int) -> int:
    """The steps of a run of ``config`` (a TrainConfig as a dict) on ``images`` images: --max-steps,
    where it is given, else the epochs' whole batches."""
    if config["max_steps"] is not None:
        return config["max_steps"]
    return config["epochs"] * (images // config["batch_size"])


def load_checkpoint(path: Path) -> dict:
    # weights_only: a checkpoint is data, never code.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        # (torch's own message is a paragraph of advice on weights_only)
        raise BnnccError(f"{path}: not a bnncc checkpoint (torch.load: {type(e).__name__})") from None


def _save_checkpoint(path: Path, step: int, student: nn.Module, optimizer, scheduler, calibrated: bool,
                     cfg: TrainConfig, data: dict, bad_images: set[int]) -> None:
    state = {"step": step, "model": student.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "calibrated": calibrated, "config": asdict(cfg),
             "train_images": data["images"], "train_labels": data["labels"], "teacher": data["teacher"],
             "bad_images": torch.tensor(sorted(bad_images), dtype=torch.int64)}
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch's writer says a full disk is "unexpected pos 2104942 vs 2104912"
            free = shutil.disk_usage(tmp.parent).free
            raise BnnccError(f"{path}: cannot write there ({free / 2**20:.1f} MiB free; torch.save: "
                             f"{str(e).strip().splitlines()[0]})") from None


# the settings a run's steps depend on, besides its length (_steps): a checkpoint continues only the run
# that wrote it
RUN_SETTINGS = ("lr", "batch_size", "weight_decay", "clip_bound", "temperature", "label_weight",
                "weight_quant_start", "act_calibration_at", "calibration_batches", "seed")


def _run_identity(data: Dataset, teacher: nn.Module | None) -> dict:
    """What a checkpoint records of its training data and teacher, to be resumed on the same: the image
    count, the labels' digest and the digest of the teacher's state (None: no teacher). Digests, not
    paths: a cluster may mount them elsewhere."""
    digest = None
    if teacher is not None:  # a ResNet-50's 100 MB in about 0.2 s
        sha = hashlib.sha256()
        for name, tensor in teacher.state_dict().items():
            sha.update(name.encode())
            # (flattened: a 0-dim tensor, as a batch norm's step count, has no bytes view)
            sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digest = sha.hexdigest()
    return {"images": len(data), "labels": data.labels_digest(), "teacher": digest}


def _check_same_run(path: Path, state: dict, cfg: TrainConfig, data: dict) -> None:
    """Refuse to resume a run of other settings, another length, other data or another teacher
    (``_run_identity``) from ``path``: its step count and schedule would be taken for this run's (a
    checkpoint of 4 epochs at batch 16 resumed as 1 epoch at batch 32 ran no step and wrote the
    checkpoint's weights as the result), and another data set of as many images, or another teacher,
    was trained on as if it were the same. The epochs count only where --max-steps does not decide
    the length."""
    saved, current = state.get("config", {}), asdict(cfg)
    changed = [f"{key} {saved[key]} -> {current[key]}" for key in RUN_SETTINGS
               if key in saved and saved[key] != current[key]]
    if "epochs" in saved and "train_images" in state:
        before, after = _steps(saved, state["train_images"]), _steps(current, data["images"])
        if before != after:
            changed.append(f"steps {before} -> {after}")
    if state.get("train_images", data["images"]) != data["images"]:
        changed.append(f"training images {state['train_images']} -> {data['images']}")
    elif state.get("train_labels", data["labels"]) != data["labels"]:
        changed.append("another data set of as many training images (their labels differ)")
    if state.get("teacher", data["teacher"]) != data["teacher"]:
        changed.append("another teacher (its weights differ)")
    if changed:
        raise BnnccError(f"{path}: written by a run with other settings ({', '.join(changed)}); resume with "
                         f"the same settings, or start anew without --resume")


def _drop_records_after(metrics: Path, step: int) -> None:
    """Keep the metrics file's records up to ``step``: a run stopped after its checkpoint logged the
    steps it then lost, and the resumed run logs them again (step 60 appeared twice)."""
    kept = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut by the stop, or not ours
            continue
    with atomic_path(metrics) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _kernel_l2(module: nn.Module) -> torch.Tensor:
    return sum(p.pow(2).sum() for p in module.parameters() if p.ndim > 1)


def make_optimizer(module: nn.Module, lr: float, *, flat: bool = True) -> torch.optim.Optimizer:
    """Adam(0.9, 0.99), fused: one kernel over all tensors instead of a dozen ops per parameter.
    With ``flat`` (one process: DDP keeps its own gradient buckets) and parameters of one dtype
    and device, over one buffer that holds them all (``_FlatAdam``)."""
    options = dict(lr=lr, betas=(0.9, 0.99), eps=1e-8, fused=True)
    params = list(module.parameters())
    if flat and len({(p.dtype, p.device) for p in params}) == 1:
        return _FlatAdam(params, **options)
    return torch.optim.Adam(params, **options)


class _FlatAdam(torch.optim.Adam):
    """Adam over one flat buffer: the parameters become views into it and their gradients views
    into a second one, so a step is one kernel over one tensor. Torch's fused Adam pays about
    5 us a tensor, and a PokeBNN has 642 small ones (DPReLU, SE, BN vectors; bench/RESULTS.md).
    Backward accumulates into the gradient views in place (they exist, so autograd adds to them);
    ``zero_grad`` zeroes the buffer, and a gradient something replaced (``module.zero_grad()``)
    is copied back into its view before the step. Its state dict has torch's Adam's form, a state
    per parameter, so a checkpoint of one process resumes under torchrun and the other way round."""

    _MOMENTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: list[nn.Parameter], **options):
        total = sum(p.numel() for p in params)
        flat = torch.empty(total, dtype=params[0].dtype, device=params[0].device)
        self._grad = torch.zeros_like(flat)
        self._views: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._layout: list[tuple[torch.Size, tuple[int, ...], int]] = []  # each parameter's place in the buffer
        offset = 0
        for p in params:
            # keep each parameter's strides (channels_last convolution weights) where they are dense
            dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
            stride = p.stride() if dense else torch.empty(p.shape).stride()
            view = flat.as_strided(p.shape, stride, offset)
            view.copy_(p.detach())
            p.data = view
            p.grad = self._grad.as_strided(p.shape, stride, offset)
            self._views.append((p, p.grad))
            self._layout.append((p.shape, stride, offset))
            offset += p.numel()
        whole = nn.Parameter(flat)
        whole.grad = self._grad
        super().__init__([whole], **options)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad.zero_()

    def state_dict(self) -> dict:
        packed = super().state_dict()
        group = {**packed["param_groups"][0], "params": list(range(len(self._layout)))}
        whole = packed["state"].get(0)
        state = {} if whole is None else {
            i: {"step": whole["step"].clone(),
                **{key: whole[key].as_strided(shape, stride, offset).clone() for key in self._MOMENTS}}
            for i, (shape, stride, offset) in enumerate(self._layout)}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict) -> None:
        group = state_dict["param_groups"][0]
        if len(group["params"]) != len(self._layout):
            raise ValueError(f"a state of {len(group['params'])} parameters for an optimizer of {len(self._layout)}")
        state = state_dict["state"]
        packed = {}
        if state:
            flat = self.param_groups[0]["params"][0]
            packed[0] = {"step": state[0]["step"].clone()}
            for key in self._MOMENTS:
                buffer = torch.zeros_like(flat.detach())
                for i, (shape, stride, offset) in enumerate(self._layout):
                    buffer.as_strided(shape, stride, offset).copy_(state[i][key])
                packed[0][key] = buffer
        super().load_state_dict({"state": packed, "param_groups": [{**group, "params": [0]}]})

    @torch.no_grad()
    def step(self, closure=None):
        for p, grad in self._views:
            if p.grad is not grad:
                grad.copy_(p.grad) if p.grad is not None else grad.zero_()
                p.grad = grad
        return super().step(closure)


def train(student: nn.Module, teacher: nn.Module | None, data: Dataset, cfg: TrainConfig,
          input_shape: tuple[int, int, int], *, checkpoint: Path | None = None, resume: bool = False,
          metrics: Path | None = None, device: str | torch.device = "cpu", show_progress: bool = True) -> TrainResult:
    """Train ``student`` in place; with ``teacher`` the loss is distillation, else labels only."""
    device = training_device(device)
    if device.type == "cpu":
        keep_freed_memory()
    init_distributed(device)
    rank, world = _world()
    if world > 1:
        _check_same_data(data)
    _check_batch(cfg, world, input_shape)
    steps = total_steps(cfg, data)
    # the teacher's digest before it is moved to the device and perhaps cast to bf16
    identity = _run_identity(data, teacher) if checkpoint is not None else None
    use_bf16 = uses_bf16(device)
    model = _place(student, teacher, device, use_bf16, world, cfg.compile)
    optimizer = make_optimizer(student, cfg.lr * cfg.batch_size / 256, flat=world == 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / steps))
    start, calibrated = 0, not hasattr(student, "calibrate_bounds")
    loader = Loader(data, input_shape, seed=cfg.seed, workers=cfg.num_workers, device=device, world=world)
    resumed = resume and checkpoint is not None and checkpoint.exists()
    if resume and not resumed:
        logger.warning("%s: no checkpoint to resume from; training from step 0", checkpoint)
    if resumed:
        start, calibrated = _restore(checkpoint, cfg, identity, student, optimizer, scheduler, loader)
    if resume and world > 1:
        _check_same_start(checkpoint, start if resumed else None)
    if checkpoint is not None and rank == 0:
        remove_partial(partial_writes(checkpoint))  # of a run killed while it wrote one
    quant_start = round(cfg.weight_quant_start * steps)
    calibration_step = round(cfg.act_calibration_at * steps)
    mode = "a" if resumed else "w"  # the metrics file's first record continues a resumed run's, else begins anew
    if resumed and metrics is not None and rank == 0 and metrics.exists():
        _drop_records_after(metrics, start)
    bar = bar_console()
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s"),
                        TimeRemainingColumn(), console=bar, disable=bar is None or not show_progress or rank != 0,
                        transient=False)
    positions = torch.arange(rank, cfg.batch_size, world)
    plans = (Plan(data.batch_indices(step, cfg.batch_size, cfg.seed)[positions], step, positions)
             for step in range(start, steps))
    loss_value, seen, began = float("nan"), 0, time.perf_counter()
    stopped = _StopNotice(checkpoint if rank == 0 else None, steps, cfg.checkpoint_every, start if resumed else None)
    with progress, stopped:
        task = progress.add_task("train", total=steps, completed=start, loss="-", lr=scheduler.get_last_lr()[0], ips=0.0)
        for step, (images, labels) in enumerate(loader(plans), start):
            step_began = time.perf_counter()
            if hasattr(student, "set_weight_quantization"):
                student.set_weight_quantization(step >= quant_start)
            if not calibrated and step >= calibration_step:
                _calibrate(student, data, loader, cfg, step)
                calibrated = True
            loss = _train_step(model, student, teacher, images, labels, cfg, optimizer, device, use_bf16)
            rate = scheduler.get_last_lr()[0]  # the step's own rate, which the log gives
            scheduler.step()
            seen += cfg.batch_size
            done = stopped.done = step + 1
            if cfg.compile and step in (start, quant_start):  # the steps that compile
                logger.info("torch.compile: step %d took %.1f s, compiling included", done,
                            time.perf_counter() - step_began)
            progress.update(task, completed=done)
            log_due = done % cfg.log_every == 0 or done == steps
            checkpoint_due = checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == steps)
            if log_due or checkpoint_due:
                # reading the loss waits for the GPU to finish the step: only every log_every steps
                # (and before a checkpoint, which must not keep a diverged state), so the host keeps
                # queueing work in between
                loss_value = _finite_loss(loss, done)
            if log_due:
                seconds = time.perf_counter() - began
                progress.update(task, loss=f"{loss_value:.4f}", lr=rate, ips=seen / seconds)
                if metrics is not None and rank == 0:
                    _append_record(metrics, mode, {"step": done, "loss": loss_value, "lr": rate,
                                                   "images_per_s": seen / seconds, "seconds": seconds,
                                                   "bad_images": len(loader.bad)})
                    mode = "a"
            if checkpoint_due or done == steps:  # what a checkpoint or the caller reads
                _average_statistics(student)
            if checkpoint_due and rank == 0:
                stopped.saving(done)
                _save_checkpoint(checkpoint, done, student, optimizer, scheduler, calibrated, cfg, identity,
                                 loader.bad)
    seconds = time.perf_counter() - began
    return TrainResult(steps, loss_value, seconds, seen / seconds if seconds > 0 else 0.0)


def _check_batch(cfg: TrainConfig, world: int, input_shape: tuple[int, int, int]) -> None:
    """The batch splits evenly over the ``world`` processes, and each one's part is large enough to train."""
    if cfg.batch_size % world:
        raise BnnccError(f"batch size {cfg.batch_size} does not split over {world} processes")
    # a batch norm in training needs two values a channel, and the last stage of a ResNet (all bnncc
    # trains) sees 1/32 of the input: a 32 px image alone gave torch's unexpected ValueError at step 0
    last_map = math.ceil(input_shape[1] / 32) * math.ceil(input_shape[2] / 32)
    if cfg.batch_size // world * last_map < 2:
        raise BnnccError(f"a batch of {cfg.batch_size // world} image a process at {input_shape[1]}x{input_shape[2]} "
                         f"gives the last stage's batch norms one value a channel; use --batch-size {2 * world} "
                         f"or more")


def _place(student: nn.Module, teacher: nn.Module | None, device: torch.device, use_bf16: bool, world: int,
           use_compile: bool) -> nn.Module:
    """Move ``student`` (in training mode) and ``teacher`` (in eval mode) to ``device``; the module that
    trains the student: itself, in DDP under torchrun, compiled with ``use_compile``."""
    to_training_layout(student, device).train()
    if teacher is not None:
        # the teacher only runs forward, under no_grad: bf16 weights halve its memory traffic
        teacher.to(device, dtype=torch.bfloat16 if use_bf16 else None, memory_format=MEMORY_FORMAT).eval()
    device_ids = [device.index] if device.type == "cuda" else None
    # Each process keeps its own batch norm statistics, averaged where they are read (_average_statistics),
    # as the paper's TPU run does (pokebnn.md 7.6); DDP's default sent rank 0's to all at every step.
    model = nn.parallel.DistributedDataParallel(student, device_ids=device_ids,
                                                forward_sync_buffers=False) if world > 1 else student
    if use_compile:
        # Opt-in: the compiled step is faster, but compiling the ~400-node graph takes minutes
        # (and again when the weight quantization switches on), so short runs lose by it.
        model = torch.compile(model)
    return model


def _restore(checkpoint: Path, cfg: TrainConfig, identity: dict, student: nn.Module, optimizer, scheduler,
             loader: Loader) -> tuple[int, bool]:
    """Load the run that ``checkpoint`` holds into ``student``, ``optimizer``, ``scheduler`` and the
    loader's unreadable images; (its step, whether its activation bounds are calibrated)."""
    state = load_checkpoint(checkpoint)
    _check_same_run(checkpoint, state, cfg, identity)
    try:
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:  # torch names the first mismatch on a later line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise BnnccError(f"{checkpoint}: a checkpoint of another network ({detail}); start anew without "
                         f"--resume") from None
    loader.bad.update(state.get("bad_images", torch.zeros(0, dtype=torch.int64)).tolist())
    logger.info("resumed from %s at step %d", checkpoint, int(state["step"]))
    return int(state["step"]), bool(state["calibrated"])


def _train_step(model: nn.Module, student: nn.Module, teacher: nn.Module | None, images: torch.Tensor,
                labels: torch.Tensor, cfg: TrainConfig, optimizer, device: torch.device,
                use_bf16: bool) -> torch.Tensor:
    """One optimizer step of ``model`` (which trains ``student``) on a batch; its loss, still on the device."""
    images = images.to(memory_format=MEMORY_FORMAT)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(images.to(_dtype(teacher)))
        logits = model(images)
        loss = distillation_loss(logits, teacher_logits, labels, cfg.temperature, cfg.label_weight)
    loss = loss + 0.5 * cfg.weight_decay * _kernel_l2(student)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def _append_record(metrics: Path, mode: str, record: dict) -> None:
    """Write ``record`` as a line of JSON to ``metrics``, opened with ``mode``."""
    # opened for each record and closed inside output_errors: a full disk is one error naming the
    # file (a file held open failed again at its close, as an unexpected OSError)
    with output_errors(metrics):
        metrics.parent.mkdir(parents=True, exist_ok=True)  # (like the other outputs' folders)
        with metrics.open(mode) as log:
            log.write(json.dumps(record) + "\n")


@torch.no_grad()
def _average_statistics(student: nn.Module) -> None:
    """Under torchrun, every float buffer but the activation bounds (the batch norms' running means and
    variances) becomes the mean over the processes, each of which kept its own."""
    world = _world()[1]
    if world == 1:
        return
    bounds = set(getattr(student, "bound_names", ()))
    for name, buffer in student.named_buffers():
        if buffer.is_floating_point() and name not in bounds:
            dist.all_reduce(buffer)
            buffer.div_(world)


def _identity(path: Path) -> tuple[int, int] | None:
    """(inode, modification time) of ``path``, None when absent: a rename onto it changes both."""
    try:
        found = path.stat()
    except FileNotFoundError:
        return None
    return found.st_ino, found.st_mtime_ns


def _check_same_data(data: Dataset) -> None:
    """Every process trains on the same data (``_run_identity``'s images and labels). Each opens --data itself: on nodes with
    copies of their own (shards on local disks), a copy of other images took other batches without a word,
    and a copy of fewer images ran fewer steps an epoch, leaving the others waiting in a collective."""
    identities: list[dict | None] = [None] * _world()[1]
    dist.all_gather_object(identities, _run_identity(data, None))
    if any(identity != identities[0] for identity in identities):
        found = ", ".join(f"rank {rank}: {identity['images']} images, labels {identity['labels'][:12]}"
                          for rank, identity in enumerate(identities))
        raise BnnccError(f"the processes opened different training data ({found}); give every process the same "
                         f"data set")


def _check_same_start(checkpoint: Path | None, step: int | None) -> None:
    """Every process resumes from the same step (None: none resumes). Each reads the checkpoint's
    path itself: on nodes without a shared file system rank 0 would resume at step N and the others
    begin at 0, and their collectives then wait on each other for ever."""
    steps: list[int | None] = [None] * _world()[1]
    dist.all_gather_object(steps, step)
    if len(set(steps)) > 1:
        found = ", ".join(f"rank {rank}: {'none' if s is None else f'step {s}'}" for rank, s in enumerate(steps))
        raise BnnccError(f"{checkpoint}: the processes found different checkpoints there ({found}); put it where "
                         f"every process reads the same file (on several machines, a shared file system)")


def _finite_loss(loss: torch.Tensor, step: int) -> float:
    """The loss of the global batch, the mean of the processes' losses (each of its part of the
    batch; rank 0's alone was logged); an error when it is NaN or infinite on any process, since
    every step after it trains NaN weights (all processes stop: one alone would leave the others
    waiting for it)."""
    value = loss.detach().float()
    world = _world()[1]
    # one read of the device each (on a GPU a read waits for the step)
    if world > 1:  # (sum, processes whose loss is not finite) in one reduction
        both = torch.stack([value, (~torch.isfinite(value)).float()])
        dist.all_reduce(both)
        total, failed = both.tolist()
        mean, finite = total / world, not failed
    else:
        mean = float(value)
        finite = math.isfinite(mean)
    if not finite:
        raise BnnccError(f"training diverged: the loss is not finite ({float(value)}) by step {step}; nothing is "
                         f"written (try a lower --lr, and check that the teacher's outputs are finite)")
    return mean


class _StopNotice:
    """Says, when a run is stopped (Ctrl-C; SIGTERM, which bnncc.cli turns into SystemExit) or ends
    in an error that is not the user's (a torchrun peer that died breaks the collectives: rank 0 then
    said nothing before torchrun's SIGTERM), which step its checkpoint holds, or that none was
    written yet.

    A save is known done by the file it replaced, not by a statement after it: a stop between the
    rename and such a statement named the step before (seen under torchrun)."""

    def __init__(self, checkpoint: Path | None, steps: int, every: int, saved: int | None) -> None:
        self.checkpoint, self.steps, self.every, self.saved = checkpoint, steps, every, saved
        self.done = saved or 0
        self.pending: tuple[int, tuple[int, int] | None] | None = None  # (step, the file before its save)

    def saving(self, step: int) -> None:
        """The checkpoint of ``step`` is about to be written (the one before it is complete)."""
        self._settle()
        self.pending = (step, _identity(self.checkpoint))

    def _settle(self) -> None:
        if self.pending is not None and _identity(self.checkpoint) != self.pending[1]:
            self.saved = self.pending[0]
        self.pending = None

    def __enter__(self) -> "_StopNotice":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self.checkpoint is None or kind is None or issubclass(kind, BnnccError):
            return
        self._settle()
        if self.saved is None:
            logger.warning("stopped at step %d of %d, before the first checkpoint (every %d steps): nothing is kept",
                           self.done, self.steps, self.every)
        else:
            logger.warning("stopped at step %d of %d; %s holds step %d: run the command again (finetune with "
                           "--resume) to continue from there", self.done, self.steps, self.checkpoint, self.saved)


def _calibrate(student: nn.Module, data: Dataset, loader: Loader, cfg: TrainConfig, step: int) -> None:
    """Calibrate the activation bounds on whole global batches (evaluation crops), in eval mode on the
    averaged batch norm statistics. Under torchrun each process runs its part of each batch and the
    batch's maxima are taken over the processes: one process's bounds, the same on every rank. (Each
    process ran the whole global batch, in float32: at 8 GPUs, 8 times the images a GPU trains on.)"""
    rank, world = _world()
    positions = torch.arange(rank, cfg.batch_size, world)
    plans = [Plan(data.batch_indices(step + j, cfg.batch_size, cfg.seed)[positions], step + j)
             for j in range(cfg.calibration_batches)]
    batches = [images.to(memory_format=MEMORY_FORMAT) for images, _ in loader(plans)]
    _average_statistics(student)
    with torch.no_grad():
        student.calibrate_bounds(batches, reduce=_max_over_processes if world > 1 else None)
    logger.info("activation bounds calibrated at step %d", step)


def _max_over_processes(values: torch.Tensor) -> torch.Tensor:
    """``values``, each the maximum of it over the processes."""
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def evaluate(model: nn.Module, data: Dataset, input_shape, batch_size: int = 256,
             device: str | torch.device = "cpu", workers: int | None = None,
             label: str | None = None) -> tuple[float | None, float | None]:
    """(top-1, top-5) accuracy in percent on every image of ``data``, batch by batch (ImageNet's
    validation split is 30 GB of floats at 224 px); with a progress bar named ``label`` if given.

    Top-5 is None for 5 classes or fewer (where it is 100% whatever the model), and both are None
    when no image of the split could be read: they would be the accuracy on black images."""
    return evaluate_models([model], data, input_shape, batch_size, device, workers, label)[0]


@torch.no_grad()
def evaluate_models(models: list[nn.Module], data: Dataset, input_shape, batch_size: int = 256,
                    device: str | torch.device = "cpu", workers: int | None = None,
                    label: str | None = None) -> list[tuple[float | None, float | None]]:
    """``evaluate`` for each of ``models`` on one pass over ``data``: each image decoded once, and
    each unreadable one logged once (a student and its teacher, evaluated in turn, logged each twice)."""
    for model in models:
        model.to(device).eval()
    top1, top5, classes = [0] * len(models), [0] * len(models), 0
    loader = Loader(data, input_shape, workers=workers, device=device, stops=False)
    plans = (Plan(torch.arange(begin, min(begin + batch_size, len(data)))) for begin in range(0, len(data), batch_size))
    bar = bar_console()
    progress = Progress(TextColumn(f"[bold]evaluate {label}"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                        TimeRemainingColumn(), console=bar, disable=bar is None or label is None, transient=False)
    with progress:
        task = progress.add_task("evaluate", total=len(data))
        for images, labels in loader(plans):
            labels = labels.cpu()
            for k, model in enumerate(models):
                logits = model(images.to(_dtype(model))).float().cpu()
                best = logits.topk(min(5, logits.shape[1]), dim=1).indices
                top1[k] += int((best[:, 0] == labels).sum())
                top5[k] += int((best == labels[:, None]).any(dim=1).sum())
                classes = logits.shape[1]
            progress.advance(task, len(labels))
    if loader.bad:
        logger.warning("%d of the %d evaluation images could not be read (the first: %s)%s", len(loader.bad), len(data),
                       data.describe(min(loader.bad)), ": no accuracy" if len(loader.bad) == len(data) else
                       "; each counts as the image that replaced it")
    if len(loader.bad) == len(data):
        return [(None, None)] * len(models)
    return [(100.0 * one / len(data), 100.0 * five / len(data) if classes > 5 else None)
            for one, five in zip(top1, top5)]
