"""``convert``: a float ResNet ONNX file -> a PokeBNN library folder with its report, in cached stages.

The stages:

1. import: ``bnncc.load`` (always run: it validates the input and gives the float ACE);
2. rewrite: the recipe's passes -> ``stages/rewrite.onnx``;
3. fine-tune (only with data): distillation from the imported float model -> ``stages/finetune.onnx``;
4. compile: ``bnncc.compile`` of the last graph -> ``stages/library/``; model.so, model.json and
   the reference graph model.onnx are then copied into OUTDIR;
5. report: report.json, report.md, plots (``bnncc.report``), latency (and the library's accuracy) when
   this machine's CPU runs the target's libraries (``registry.runs_natively``).

Caching: stage S records ``stages/S.json`` = {key, outputs: {file: sha256}, results}. The key is
the sha256 of S's inputs: the bytes of the files it reads (the imported model serialized, so
external data counts; the previous stage's output), the data set's files by path, size and
modification time (``_data_fingerprint``), the resolved recipe,
S's options and the bnncc version. S is skipped when its record has the same key and every
output still has its recorded hash. Every file is written atomically, and a record only after
its outputs, so a killed run never leaves a record for a partial stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from bnncc.domain import LIBRARY_FILES
from bnncc.errors import BnnccError
from bnncc.fileio import (atomic_path, atomic_write_text, folder_id, hash_file, make_folders, output_errors,
                          output_path, partial_writes, remove_made, remove_partial)
from bnncc.report import LAYERS_PLOT, STAGES_PLOT, Report, Stage, write_report

__all__ = ["ConvertOptions", "ConvertResult", "DemoOptions", "convert", "demo", "cached_stage", "check_outdir",
           "hash_files", "measure_latency", "OUTPUT_NAMES"]

logger = logging.getLogger(__name__)

# what convert writes in its output folder (the demo adds its teacher); anything else there is the
# user's, and kept
OUTPUT_NAMES = (*LIBRARY_FILES, "report.json", "report.md", "latency.json", STAGES_PLOT, LAYERS_PLOT, "stages")
HOST_TARGET = "x86-64"  # this machine's own target: convert's and the demo's default


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """How ``convert`` runs. ``overrides`` are recipe ``key=value`` strings (``train.lr=3e-2``);
    ``epochs``/``max_steps``/``batch_size`` set the fine-tune, which runs only when ``data`` is given."""

    recipe: str = "pokebnn_1x"
    overrides: tuple[str, ...] = ()
    target: str = HOST_TARGET
    data: Path | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    seed: int = 0
    batches: tuple[int, ...] = (1,)
    latency_runs: int = 20
    show_progress: bool = True


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    outdir: Path
    report: Report
    cached: dict[str, bool]  # stage name -> whether its output was reused
    seconds: dict[str, float]  # stage name -> wall time of this run

    @property
    def trained(self) -> bool:
        return self.report.trained


def convert(model_path: str | Path, outdir: str | Path, options: ConvertOptions = ConvertOptions()) -> ConvertResult:
    """Run import, rewrite, fine-tune (with data), compile and report; return what was produced."""
    from bnncc.cost import ace
    from bnncc.frontend import load, require_path, stored_bytes
    from bnncc.recipe import load_recipe
    from bnncc.targets import cuda, registry, tvm_compat
    from bnncc.targets.build import check_batches

    model_path, outdir = require_path(model_path), output_path(outdir)
    # an unknown target or one whose build tools are missing, a batch it cannot build, an output folder of
    # someone else's files, a folder that holds no data set fail before any work. The batches as checked (whole
    # numbers, 1 among them) are what compiles and keys the stage: numpy integers failed the key's JSON
    batches = check_batches(registry.get(options.target, build=True), options.batches)
    if options.latency_runs < 1:  # (no option of the command) 0 failed after the compile: "no median for empty data"
        raise BnnccError(f"latency_runs = {options.latency_runs}: the latency is the median of at least one run")
    check_outdir(outdir)
    if options.data is not None:
        from bnncc.train.data import dataset_kind

        dataset_kind(options.data)
        _check_outside(outdir, Path(options.data))
    recipe = load_recipe(options.recipe, options.overrides)
    stages_dir = outdir / "stages"
    cached: dict[str, bool] = {}
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    float_model = load(model_path)
    float_hash = hashlib.sha256(ir.to_proto(float_model).SerializeToString()).hexdigest()
    report_stages = [Stage("float import", model_path.name, stored_bytes(model_path), ace(float_model))]
    seconds["import"] = time.perf_counter() - start

    # the float import above writes nothing: a model refused there leaves no folder behind
    with _sole_writer(stages_dir):
        # the rewrite reads only the passes and writes the recipe's name into the graph (model.json's "recipe":
        # a renamed recipe reused the graph of the old name); it refuses a model of other blocks than the recipe's
        # (a stage reused after --set blocks=basic let the recipe through unchanged); the [train] table is part of
        # the fine-tune's key
        passes = [[name, params] for name, params in recipe.passes]
        rewrite_out = stages_dir / "rewrite.onnx"

        def run_rewrite() -> dict:
            from bnncc.rewriting import rewrite

            student, _ = rewrite(float_model, recipe)
            with atomic_path(rewrite_out) as tmp:
                ir.save(student, tmp)
            return {}

        rewrite_key = {"model": float_hash, "passes": passes, "name": recipe.name, "blocks": recipe.blocks}
        _timed(seconds, cached, "rewrite", lambda: cached_stage(
            stages_dir, "rewrite", rewrite_key, [rewrite_out], run_rewrite))
        report_stages.append(Stage("rewrite", rewrite_out.name, rewrite_out.stat().st_size, ace(rewrite_out)))

        graph, accuracy = rewrite_out, None
        if options.data is not None:
            graph = stages_dir / "finetune.onnx"
            accuracy = _timed(seconds, cached, "finetune",
                              lambda: _finetune(model_path, float_hash, rewrite_out, graph, recipe.train, options))
            report_stages.append(Stage("fine-tune", graph.name, graph.stat().st_size, ace(graph)))

        library = stages_dir / "library"

        def run_compile() -> dict:
            from bnncc.targets.build import compile as compile_graph

            compile_graph(graph, library, target=options.target, batches=batches,
                          show_progress=options.show_progress)
            return {}

        # the library is built for what the target resolves to here (x86-64: this CPU's class and TVM's threads;
        # cuda: the arch, CUDA graphs, tensor cores): keyed on the name alone, a stage folder on a shared disk
        # converted again on an AVX2 machine reused the AVX-512 library of another, which this CPU cannot run.
        # And by the TVM that builds it: after an upgrade the old library came back, built by the old compiler
        spec = registry.get(options.target)
        build = [str(spec.tvm_target()), spec.pass_config() if spec.pass_config else None, tvm_compat.versions()]
        if options.target == "cuda":  # the schedule too: a convert again with BNNCC_CUDA_MMA=1 reused the popc one
            build.append({"tensor_cores": cuda.tensor_cores()})
        _timed(seconds, cached, "compile", lambda: cached_stage(
            stages_dir, "compile", {"graph": hash_files([graph]), "target": options.target, "build": build,
                                    "batches": list(batches)},
            [library / name for name in LIBRARY_FILES], run_compile))
        try:
            report = _publish(outdir, library, model_path, recipe.name, report_stages, accuracy, options)
        except BaseException:  # an interrupt, or a failure measuring the library: its cache, no library without report
            _unpublish(outdir)
            raise
        return ConvertResult(outdir, report, cached, seconds)


# the stages folders whose lock this process holds: the demo's convert runs inside the demo's own hold
_held: set[Path] = set()


@contextlib.contextmanager
def _sole_writer(stages_dir: Path, names: tuple[str, ...] = OUTPUT_NAMES):
    """Hold ``stages_dir``/lock while a run writes the folder (and its outputs ``names`` beside it). Two
    converts into one folder replaced each other's stage files and published a library whose report
    described the other's stages. A hold of this process's own is not taken again (flock would refuse it)."""
    if stages_dir.resolve() in _held:
        yield
        return
    with output_errors(stages_dir.parent):  # (an output folder under a file, a read-only file system)
        made = make_folders(stages_dir)
        lock = open(stages_dir / "lock", "a")
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BnnccError(f"{stages_dir.parent}: another bnncc convert or demo is writing this folder; wait for it "
                             "or choose another output folder") from None
        except OSError as e:  # a file system without locks (some NFS mounts): the run goes on unguarded
            logger.warning("%s: cannot be locked (%s); do not run another convert into this folder meanwhile",
                           stages_dir / "lock", e.strerror)
        else:  # (no other convert writes the folder: what temporaries it holds, no run is writing)
            _remove_partial_outputs(stages_dir, names)
        _held.add(stages_dir.resolve())
        try:
            yield  # the lock goes with the file's closing, or the process's end
        except BaseException:
            # a run refused before it wrote anything (a recipe that does not fit the model) leaves nothing
            if [p.name for p in stages_dir.iterdir()] == ["lock"]:
                (stages_dir / "lock").unlink()
                remove_made(made)
            raise
        finally:
            _held.discard(stages_dir.resolve())


def _remove_partial_outputs(stages_dir: Path, names: tuple[str, ...]) -> None:
    """Remove the temporaries that a run stopped while it wrote them left in ``stages_dir`` (bnncc's own
    folder: whatever is hidden there) and beside the outputs ``names`` in the folder above it."""
    remove_partial([*stages_dir.glob(".*"), *(path for name in names
                                              for path in partial_writes(stages_dir.parent / name))])


def _publish(outdir: Path, library: Path, model_path: Path, recipe: str, stages: list[Stage], accuracy: dict | None,
             options: ConvertOptions) -> Report:
    """Copy the library into ``outdir``, measure it there (where this CPU runs it) and write its report."""
    from bnncc.targets import registry

    # an earlier run's outputs go first: a run killed while it copied left its model.so beside the
    # earlier model.onnx and report, of another network (verify failed on the folder)
    _unpublish(outdir)
    for name in LIBRARY_FILES:
        with atomic_path(outdir / name) as tmp:
            shutil.copyfile(library / name, tmp)
    stages = [*stages, Stage("compiled", "model.so", (outdir / "model.so").stat().st_size, stages[-1].cost)]
    latency = None
    # an x86 class target's library runs here as the host target's does (x86-64-avx2 on an AVX-512 CPU)
    if registry.runs_natively(options.target):
        from bnncc.runtime import load as load_library

        lib = load_library(outdir)
        latency = measure_latency(lib, options.latency_runs)
        # measured where the fine-tune measured the student: its test split's classes are the network's
        if options.data is not None and accuracy is not None and accuracy.get("student_top1") is not None:
            accuracy = {**accuracy, **_library_accuracy(lib, options.data, options.show_progress)}
    # the model by its file name, as report.md names it: its path as given (absolute, or a CI job's own
    # folder) made report.json differ between runs of the same model
    report = Report(model_path.name, recipe, options.target, options.data is not None, tuple(stages), accuracy,
                    latency)
    write_report(report, outdir)
    return report


def _unpublish(outdir: Path) -> None:
    """Remove what a run published in ``outdir`` (all but the stage cache)."""
    for name in OUTPUT_NAMES:
        if name != "stages":
            (outdir / name).unlink(missing_ok=True)


def check_outdir(outdir: Path, names: tuple[str, ...] = OUTPUT_NAMES) -> None:
    """Refuse an output folder that is a file, or that holds files of ``names`` (which a run would
    replace) without being an earlier run's (a library manifest or a stage record of bnncc's)."""
    from bnncc.targets.build import holds_manifest

    with output_errors(outdir):  # (a name over NAME_MAX, a folder without search permission on the way)
        if outdir.exists() and not outdir.is_dir():
            raise BnnccError(f"{outdir}: exists and is not a folder; choose another output folder")
        clashes = [name for name in names if (outdir / name).exists()]
    stages = outdir / "stages"
    if clashes and not (holds_manifest(outdir) or _holds_stage_record(stages) or (stages / "lock").is_file()):
        raise BnnccError(f"{outdir}: holds {', '.join(clashes)}, which bnncc did not write; remove "
                         f"{'it' if len(clashes) == 1 else 'them'} or choose another output folder")


def _holds_stage_record(stages: Path) -> bool:
    """Whether ``stages`` holds a record that ``cached_stage`` wrote (``NAME.json`` of ``"stage": NAME``). Any
    ``*.json`` was taken for one: a user's own ``stages`` folder with a ``plan.json`` was written into, and
    the run removed what was hidden there (``.ipynb_checkpoints``) as its own stopped writes."""
    for path in stages.glob("*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # ValueError: JSON's and UTF-8's
            continue
        if isinstance(record, dict) and record.get("stage") == path.stem:
            return True
    return False


def _timed(seconds: dict[str, float], cached: dict[str, bool], name: str, run: Callable[[], tuple[bool, dict]]):
    """Run a cached stage, recording whether it was reused and how long it took; return its results."""
    start = time.perf_counter()
    cached[name], results = run()
    seconds[name] = time.perf_counter() - start
    return results


def _finetune(teacher: Path, teacher_hash: str, student: Path, output: Path, train: dict,
              options: ConvertOptions) -> tuple[bool, dict]:
    """The fine-tune stage: the recipe's [train] table with the command line's epochs, steps, batch and seed."""
    from bnncc.train import TrainConfig
    from bnncc.train.finetune import finetune

    cfg = TrainConfig.from_recipe(train, epochs=options.epochs, max_steps=options.max_steps,
                                  batch_size=options.batch_size, seed=options.seed)

    key = {"teacher": teacher_hash, "student": hash_files([student]), "data": _data_fingerprint(options.data),
           "train": dataclasses.asdict(cfg)}
    # a run that is stopped (hours into ImageNet) continues from its last checkpoint when convert is
    # run again with the same inputs; other inputs have another checkpoint
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    checkpoint = output.parent / f"finetune-{name}.ckpt"

    def run() -> dict:
        result = finetune(student, teacher, options.data, output, cfg, checkpoint=checkpoint,
                          resume=checkpoint.exists(), show_progress=options.show_progress)
        checkpoint.unlink(missing_ok=True)
        return {"student_top1": result.student_top1, "student_top5": result.student_top5,
                "teacher_top1": result.teacher_top1, "teacher_top5": result.teacher_top5}

    return cached_stage(output.parent, "finetune", key, [output], run)


def _check_outside(outdir: Path, data: Path) -> None:
    """The output folder is not inside the data set's: the stages' key takes every file of the data
    folder, so a run's own outputs there changed it and the fine-tune ran again at every run (and
    inside an ImageFolder split the output folder became a class)."""
    if outdir.resolve().is_relative_to(data.resolve()):
        raise BnnccError(f"{outdir}: inside the data folder {data}; choose an output folder outside it")


def _data_fingerprint(folder: Path) -> str:
    """The data set's files by path, size and modification time: what a stage's key needs to see a
    changed data set, where hashing the bytes of ImageNet's 150 GB took minutes before every run."""
    from bnncc.train.data import dataset_kind

    dataset_kind(folder)  # a folder of a data set, or its one-line error
    digest = hashlib.sha256()
    _hash_files(folder, "", digest, {folder_id(os.stat(folder))})
    return digest.hexdigest()


def _hash_files(folder: Path, prefix: str, digest, seen: set[tuple[int, int]]) -> None:
    """Add ``folder``'s files (path, size, mtime), depth first with each folder's entries in name order:
    the order of the sorted paths that ``rglob`` gave, so the key stays what it was. By ``os.scandir``,
    one stat a file and no Path object, where ``rglob`` + ``is_file`` + ``stat`` took two and a Path
    object each (ImageNet's 1.33 million files took ~27 s and ~600 MB before every convert).
    Links to folders are followed, as training reads through them (rglob did not: with train/ a link
    to another disk, ImageNet's usual layout, the key saw none of its images and a changed data set
    reused the last fine-tune); a folder met again (``seen``: a link loop) is not. An unreadable
    folder is skipped."""
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except PermissionError:
        return
    for entry in entries:
        try:
            if entry.is_dir():
                entry_id = folder_id(entry.stat())
                if entry_id not in seen:
                    seen.add(entry_id)
                    _hash_files(Path(entry.path), f"{prefix}{entry.name}{os.sep}", digest, seen)
            elif entry.is_file():
                stat = entry.stat()
                digest.update(f"{prefix}{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:  # a link that leads nowhere or into a loop: no file
            continue


def cached_stage(folder: Path, name: str, key: dict, outputs: list[Path], run: Callable[[], dict]) -> tuple[bool, dict]:
    """Run ``run`` (which writes ``outputs`` and returns a JSON-able result) unless ``folder/name.json``
    records the same key and the outputs still have their recorded hashes; return (reused, result)."""
    from bnncc import __version__

    digest = hashlib.sha256(json.dumps({"bnncc": __version__, **key}, sort_keys=True).encode()).hexdigest()
    record_path = folder / f"{name}.json"
    results = _recorded_results(record_path, digest, outputs)
    if results is not None:
        logger.info("stage %s: reusing %s", name, ", ".join(p.name for p in outputs))
        return True, results
    # a stale record must not vouch for outputs being rewritten; a folder in its place ended the run in
    # "unexpected IsADirectoryError"
    with output_errors(record_path):
        record_path.unlink(missing_ok=True)
    results = run()
    record = {"stage": name, "key": digest, "outputs": {p.name: hash_files([p]) for p in outputs}, "results": results,
              "results_sha256": _results_digest(results)}
    atomic_write_text(record_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return False, results


def _recorded_results(record_path: Path, digest: str, outputs: list[Path]) -> dict | None:
    """The results the stage record at ``record_path`` holds, if it has the key ``digest`` and the
    outputs still have their recorded hashes, else None; a record that cannot be read (missing,
    damaged, edited) vouches for nothing."""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        reusable = record["key"] == digest and all(
            p.is_file() and record["outputs"].get(p.name) == hash_files([p]) for p in outputs)
        results = record["results"]
        # results edited by hand (a top-1 of "x") were served, and the report failed on them
        return results if reusable and record["results_sha256"] == _results_digest(results) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # ValueError: JSON's and UTF-8's
        return None


def _results_digest(results: dict) -> str:
    return hashlib.sha256(json.dumps(results, sort_keys=True).encode()).hexdigest()


def hash_files(paths: list[Path]) -> str:
    """sha256 over the files' names and bytes, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        hash_file(digest, path)
    return digest.hexdigest()


def measure_latency(lib, runs: int) -> dict:
    """Milliseconds of one batch-1 call on zeros: median and minimum of ``runs`` after 3 warm-up calls."""
    from bnncc.targets.registry import pool_threads

    x = np.zeros((1, *lib.input_chw), np.float32)
    for _ in range(3):
        lib(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        lib(x)
        times.append(1000 * (time.perf_counter() - start))
    # TVM's worker threads spin at each kernel's barrier: with other work on the cores a call can
    # take 1000x longer, so the load beside the measurement is part of the figure.
    # the threads of TVM's pool, not TVM_NUM_THREADS: its 0 (TVM's default, half the CPUs) read "0 threads"
    return {"batch": 1, "runs": runs, "threads": pool_threads(), "median_ms": statistics.median(times),
            "min_ms": min(times), "load_average": os.getloadavg()[0], "cpus": os.cpu_count()}


def _library_accuracy(lib, data: Path, show_progress: bool) -> dict:
    """Top-1/top-5 (%) of the compiled library on the data's test split, whose classes the fine-tune
    found to be the model's: batch by batch, as the torch models are evaluated (the whole split at
    once held 3.1 GB for Fashion-MNIST's 10000 images at 160 px). The test split alone is indexed:
    ImageNet's training shards took some 95 s of CPU more, on every run."""
    import torch

    from bnncc.train.data import open_dataset
    from bnncc.train.trainer import evaluate

    class Library(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(lib(images.numpy()))

    test = open_dataset(data, "val")
    top1, top5 = evaluate(Library(), test, tuple(int(d) for d in lib.input_chw),
                          label="library" if show_progress else None)
    return {"library_top1": top1, "library_top5": top5}


# --------------------------------------------------------------------------- the demo


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """The embedded default: torchvision's ResNet-50 at ``width`` x the channels, ``image_size`` inputs,
    a float teacher trained for ``teacher_epochs`` on the data, then ``convert`` with ``epochs`` of
    distillation at ``lr`` per 256 images (the recipe's 2e-5 is for 800 epochs from a trained network)."""

    width: float = 0.25
    image_size: int = 32
    teacher_epochs: int = 10  # 2000 sample images: 310 steps at batch 64
    epochs: int = 3
    batch_size: int = 64
    teacher_lr: float = 3e-2
    lr: float = 3e-2
    seed: int = 0


DEMO_NAMES = (*OUTPUT_NAMES, "teacher.onnx")


def check_demo(outdir: Path, data: Path) -> None:
    """Refuse a demo's output folder or data set in one line before any work: `bnncc demo` checks them
    before its banner, which came before the error of a wrong --data."""
    from bnncc.train.data import dataset_kind

    check_outdir(outdir, DEMO_NAMES)
    dataset_kind(data)
    # (the convert after the teacher's training refused it: minutes later, the teacher left in the data folder)
    _check_outside(outdir, data)


def demo(outdir: str | Path, data: str | Path | None = None, options: DemoOptions = DemoOptions(),
         show_progress: bool = True) -> ConvertResult:
    """Train a small float teacher on ``data`` (default: the shipped Fashion-MNIST sample) and convert it
    for the host; the teacher is a cached stage like the others (``stages/teacher.json``)."""
    from bnncc.data import FASHION_MNIST_SAMPLE
    from bnncc.train import TrainConfig
    from bnncc.train.finetune import train_teacher
    from bnncc.zoo import STEM_WIDTH

    outdir, data = output_path(outdir), Path(data or FASHION_MNIST_SAMPLE)
    check_demo(outdir, data)
    teacher = outdir / "teacher.onnx"
    cfg = TrainConfig(lr=options.teacher_lr, batch_size=options.batch_size, epochs=options.teacher_epochs,
                      label_weight=1.0, seed=options.seed)

    def run() -> dict:
        _, top1, top5 = train_teacher(data, teacher, cfg, width=options.width, image_size=options.image_size,
                                      show_progress=show_progress)
        return {"teacher_top1": top1, "teacher_top5": top5}

    key = {"data": _data_fingerprint(data), "train": dataclasses.asdict(cfg), "width": options.width,
           "image_size": options.image_size}
    # PokeInit's middle width must divide the stem width: 32 at full width, the stem itself when narrower.
    mid_channels = min(32, max(1, round(STEM_WIDTH * options.width)))
    convert_options = ConvertOptions(
        overrides=(f"passes.poke_stem.mid_channels={mid_channels}", f"train.lr={options.lr}"), target=HOST_TARGET,
        data=data, epochs=options.epochs, batch_size=options.batch_size, seed=options.seed,
        show_progress=show_progress)
    # the teacher under the folder's lock too: another demo into the folder replaced teacher.onnx while
    # this one's convert distilled from it, after hashing the first
    with _sole_writer(outdir / "stages", DEMO_NAMES):
        cached_stage(outdir / "stages", "teacher", key, [teacher], run)
        return convert(teacher, outdir, convert_options)
