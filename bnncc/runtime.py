"""Load a library folder written by ``bnncc compile`` and run it: NCHW float32 images -> logits.

Needs only TVM's runtime (the Relax VM over model.so) and model.json; no ONNX, no compiler.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
# numpy imports its ma module lazily, at its first use: in a call, that import held Python's import lock
# while another thread forked, and the child's first call waited for that lock for ever
from numpy import ma

from bnncc.domain import MAX_INPUT_PIXELS
from bnncc.errors import BnnccError, first_line

__all__ = ["Library", "largest_magnitude", "load"]

# ELF e_machine by the machine names of the targets (targets.registry's ``elf_machine``)
_ELF_MACHINES = {"x86-64": 62, "aarch64": 183}
_ELF64_PHDR_SIZE = 56  # bytes of one ELF64 program header
_ELF_DYNSYM = 11  # section type of the dynamic symbol table
_ELF64_SYM_SIZE = 24  # bytes of one ELF64 symbol
_VM_EXECUTABLE = "relax.VMExecutable"  # the kind of a Relax VM library's root module (TVM loads it first)


class Library:
    """A compiled PokeBNN network: ``lib(x)`` returns the logits of the images ``x`` (N, C, H, W) as a new
    float32 array (N, classes), the caller's own (a later call does not overwrite it). ``x`` is anything
    numpy reads as real numbers of that shape (any dtype, byte order or strides, a CPU torch tensor,
    nested lists), cast to float32; an image holding NaN, or float64 values beyond float32's range, is refused.

    A batch of a size compiled in is one call; any other size is cut into chunks of compiled
    sizes, largest first (compile builds batch 1 into every library, so every size runs).
    It pickles as its folder's absolute path and manifest: unpickling loads the folder again, with
    every check of ``load``, so a spawned worker (multiprocessing, concurrent.futures) can be handed
    one; a folder that no longer holds the same library (compiled again) is refused.
    """

    def __init__(self, folder: Path, manifest: dict, call) -> None:
        self.folder = folder
        self._absolute_folder = folder.resolve()  # as it was at load, whatever the working folder is later
        self.manifest = manifest
        self._call = call  # (function name, NCHW float32 array) -> logits array; per target (targets/registry.py)
        self.functions = {int(b): name for b, name in manifest["functions"].items()}
        self.input_chw = tuple(manifest["input"]["shape"][1:])

    def __reduce__(self):
        # the loaded VM is process memory; the folder is what another process can open. The manifest
        # goes along: a folder rebuilt since (compile replaces it whole) gave a worker another network
        return _load_same, (str(self._absolute_folder), self.manifest)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # np.asarray drops a mask: the masked pixels would go in as whatever values they hold underneath
        if ma.is_masked(x):
            raise BnnccError(f"{self.folder}: a masked array with masked pixels; fill them first (x.filled(0))")
        try:
            x = np.asarray(x.detach() if hasattr(x, "detach") else x)  # (a torch tensor that requires grad)
        except (TypeError, ValueError, RuntimeError) as e:  # e.g. a torch bfloat16 tensor, ragged lists
            raise BnnccError(f"{self.folder}: an input numpy cannot read as an array ({first_line(e)})") from None
        if x.dtype.kind not in "biuf":
            raise BnnccError(f"{self.folder}: an input of {x.dtype}; expected real numbers")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_chw:
            raise BnnccError(f"{self.folder}: input of shape {x.shape}; expected (N, {', '.join(map(str, self.input_chw))})")
        if x.dtype.kind == "f" and x.dtype.itemsize > 4:
            # float64 beyond float32's range became infinite in the cast with no more than numpy's warning,
            # and the network gave NaN logits; `bnncc run` refuses such a .npy alike
            with np.errstate(over="ignore"):  # said below, in one line
                narrow = x.astype(np.float32)
            overflow = np.isinf(narrow) & np.isfinite(x)
            if overflow.any():
                image = int(overflow.any(axis=(1, 2, 3)).argmax())
                raise BnnccError(f"{self.folder}: input image {image} holds values beyond float32's range "
                                 f"(up to {largest_magnitude(x[image][overflow[image]])})")
            x = narrow
        x = np.ascontiguousarray(x, dtype=np.float32)
        classes = self.manifest["output"]["shape"][-1]
        if len(x) == 0:
            return np.zeros((0, classes), np.float32)
        # the quantizers' clips map NaN to a bound, where the reference's keep it: finite logits for
        # a NaN input. A max propagates NaN, 10 us an image where isnan().any() took 15
        if np.isnan(x.max()):
            image = int(np.isnan(x).any(axis=(1, 2, 3)).argmax())
            raise BnnccError(f"{self.folder}: input image {image} holds NaN")
        outputs, start = [], 0
        for size in self._chunks(x.shape[0]):
            logits = self._call(self.functions[size], x[start:start + size])
            # model.json's classes are what an empty batch gives and what verify holds the reference to: a
            # manifest of another count gave (0, 5) for no images and (1, 10) for one, and verify blamed the graph
            if logits.shape != (size, classes):
                raise BnnccError(f"{self.folder}: {self.functions[size]} gave logits of shape {logits.shape} where "
                                 f"model.json records (N, {classes}); is model.json the one written with it?")
            outputs.append(logits)
            start += size
        return np.concatenate(outputs)

    def _chunks(self, n: int) -> list[int]:
        """Compiled batch sizes summing to ``n``, largest first."""
        chunks = []
        for size in sorted(self.functions, reverse=True):
            while n >= size:
                chunks.append(size)
                n -= size
        if n:
            raise BnnccError(f"{self.folder}: a batch of {sum(chunks) + n} cannot be made of the compiled batch "
                             f"sizes {sorted(self.functions)}; compile with --batch 1 as well")
        return chunks


def largest_magnitude(values: np.ndarray) -> str:
    """The largest |value| for a message, formatted by numpy: a Python float, as format() makes of a
    longdouble, says inf beyond 1.8e308."""
    return np.format_float_scientific(np.abs(values).max(), precision=2, trim="-")


def load(folder: str | os.PathLike) -> Library:
    """Open the library folder ``folder`` (model.so + model.json)."""
    folder = Path(folder)
    manifest, target = read_library(folder)
    if target.check_host is not None:
        target.check_host(manifest, folder / "model.json")
    return Library(folder, manifest, target.caller(folder / "model.so", manifest.get("library_sha256")))


def _load_same(folder: str, manifest: dict) -> Library:
    """``load(folder)`` where a pickled Library is unpickled, refused unless the folder still holds the
    library that was pickled (its manifest, which records model.so's SHA-256, unchanged)."""
    library = load(folder)
    # compared as JSON text: a NaN that model.json holds (json reads "NaN") is unequal to itself as a float
    if json.dumps(library.manifest, sort_keys=True) != json.dumps(manifest, sort_keys=True):
        raise BnnccError(f"{folder}: not the library that was pickled (its model.json changed since it was loaded: "
                         f"compiled again?); load the folder anew and hand that over")
    return library


def read_library(folder: Path):
    """The checked manifest of the library folder ``folder`` and its target (a ``TargetSpec``):
    model.so is the whole ELF library it records, for that target's machine."""
    from bnncc.targets.registry import get as get_target

    if not folder.is_dir():
        raise BnnccError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}; a library is the "
                         f"folder `bnncc compile` writes")
    manifest_path, library_path = folder / "model.json", folder / "model.so"
    for path in (manifest_path, library_path):
        if not path.is_file():
            raise BnnccError(f"{folder}: no {path.name}; is it a folder written by `bnncc compile`?")
    manifest = _read_manifest(manifest_path)
    try:
        target = get_target(manifest["target"]["name"])
    except BnnccError as e:
        raise BnnccError(f"{manifest_path}: {e}") from None
    _check_shared_library(library_path, target.elf_machine)
    _check_digest(library_path, manifest.get("library_sha256"), manifest_path)
    return manifest, target


def _read_manifest(path: Path) -> dict:
    """model.json, checked for what running the library reads from it."""
    from bnncc.targets.build import MANIFEST_FORMAT

    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # (ValueError: JSON's, numbers too long)
        raise BnnccError(f"{path}: not a JSON manifest ({first_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BnnccError(f"{path}: format {found!r}, expected {MANIFEST_FORMAT!r}")
    problem = _manifest_problem(manifest)
    if problem:
        raise BnnccError(f"{path}: {problem}")
    return manifest


def _manifest_problem(manifest: dict) -> str | None:
    """What in a manifest of the right format the runtime cannot use, or None."""
    def positive(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    def field(name: str) -> dict:
        value = manifest.get(name)
        return value if isinstance(value, dict) else {}

    shape = field("input").get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(positive(d) for d in shape[1:])
            and shape[2] * shape[3] <= MAX_INPUT_PIXELS and shape[1] * shape[2] * shape[3] < 2**31):
        return (f"input shape {shape!r}; expected [N, C, H, W] with positive C, H, W, H x W at most "
                f"{MAX_INPUT_PIXELS} (as bnncc compiles) and C x H x W under 2^31")
    output = field("output").get("shape")
    if not (isinstance(output, list) and len(output) == 2 and positive(output[1])):
        return f"output shape {output!r}; expected [N, classes]"
    functions = manifest.get("functions")
    # at most 9 digits: int() refuses more than 4300 (a ValueError), and compile writes at most 4
    if not (isinstance(functions, dict) and functions and all(
            isinstance(size, str) and re.fullmatch("[0-9]{1,9}", size) and int(size) > 0 and isinstance(name, str)
            and name.isidentifier() and name.isascii() for size, name in functions.items())):
        return f"functions {functions!r}; expected {{batch size >= 1: function name (a C identifier)}}"
    if not isinstance(field("target").get("name"), str):
        return f"target {manifest.get('target')!r}; expected {{\"name\": ...}}"
    digest = manifest.get("library_sha256")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        return f"library_sha256 {digest!r}; expected 64 hex digits"
    preprocessing = manifest.get("preprocessing")
    if preprocessing is not None:
        channels = shape[1]
        stats = [preprocessing.get(key) if isinstance(preprocessing, dict) else None for key in ("mean", "std")]
        big = float(np.finfo(np.float32).max)
        numbers = all(isinstance(v, list) and len(v) == channels and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and -big <= x <= big for x in v) for v in stats)
        if numbers:
            # run normalises pixels in [0, 1] in float32: a mean of Infinity or a std of 1e-300 (0 in float32)
            # made every image infinite, which the network took without a word (finite logits)
            with np.errstate(all="ignore"):
                mean, std = (np.asarray(v, np.float32) for v in stats)
                ends = (np.float32([[0.0], [1.0]]) - mean) / std
        if not numbers or not (std > 0).all() or not np.isfinite(ends).all():
            return (f"preprocessing {preprocessing!r}; expected mean and std of {channels} numbers, std > 0, "
                    f"that keep pixels in [0, 1] finite in float32")
        crop = preprocessing.get("crop", 1.0)
        if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
            return (f"preprocessing crop {crop!r}; expected a share in (0, 1] of the largest centre box of the "
                    f"input's shape")
        resize = preprocessing.get("resize")
        if resize is not None and (resize != "bilinear" or "crop" in preprocessing):
            return f"preprocessing resize {resize!r}; expected \"bilinear\" (of a whole image, no crop) or none"
    return None


def _check_digest(path: Path, digest: str | None, manifest_path: Path) -> None:
    """model.so is the file compile wrote beside this manifest: a damaged one (bytes flipped or zeroed
    in place) crashed the process inside TVM's loader or at its first call. Manifests written
    before compile recorded the digest have none to check."""
    from bnncc.fileio import file_sha256

    if digest is not None and file_sha256(path) != digest:
        raise BnnccError(f"{path}: not the library {manifest_path.name} was written with (its SHA-256 differs): "
                         f"damaged or replaced; compile it again")


def _check_shared_library(path: Path, machine: str | None) -> None:
    """A 64-bit ELF file whose headers and loaded segments lie within it: loading a truncated one
    would end the process with a bus error when its missing pages are touched. Its code is for ELF
    machine ``machine`` (``_ELF_MACHINES``; None: any): a library for another one beside the manifest (edited, or
    copied next to the wrong model.so) would go to the wrong runner and fail deep inside it. Its root
    module is a Relax VM executable: another shared library beside a manifest that records no digest
    was bundled, and the bundle's runner refused it on the device."""
    with path.open("rb") as f:
        data = f.read()
    if len(data) < 64 or data[:5] != b"\x7fELF\x02":
        raise BnnccError(f"{path}: not a 64-bit ELF shared library")
    order = "<" if data[5] == 1 else ">"
    (found,) = struct.unpack_from(order + "H", data, 18)
    if machine is not None and found != _ELF_MACHINES[machine]:
        names = {number: name for name, number in _ELF_MACHINES.items()}
        raise BnnccError(f"{path}: a library for {names.get(found, f'ELF machine {found}')}, not {machine}; "
                         "is model.json the one written with it?")
    phoff, shoff = struct.unpack_from(order + "QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", data, 54)
    if phnum and phentsize < _ELF64_PHDR_SIZE:
        raise BnnccError(f"{path}: damaged ELF headers (program headers of {phentsize} bytes, expected "
                         f"{_ELF64_PHDR_SIZE})")
    ends = [phoff + phentsize * phnum, shoff + shentsize * shnum]
    if ends[0] <= len(data):
        for i in range(phnum):
            kind, _, offset, _, _, filesz = struct.unpack_from(order + "IIQQQQ", data, phoff + i * phentsize)
            if kind == 1:  # PT_LOAD
                ends.append(offset + filesz)
    if max(ends) > len(data):
        raise BnnccError(f"{path}: truncated ({len(data)} bytes; its headers need {max(ends)})")
    if _root_module_kind(data, order) != _VM_EXECUTABLE:
        raise BnnccError(f"{path}: holds no Relax VM executable; is it a library written by `bnncc compile`?")


def _root_module_kind(data: bytes, order: str) -> str | None:
    """The kind of the root module of those an ELF library ``data`` (byte order ``order``) embeds for
    TVM (``cuda_blob.blob_modules``), read without loading it: a library of another machine cannot be.
    None when it exports no such blob or the blob lies past the file's end."""
    from bnncc.targets.cuda_blob import BLOB_SYMBOL, blob_modules

    symbol = BLOB_SYMBOL.encode() + b"\0"
    shoff, = struct.unpack_from(order + "Q", data, 40)
    shentsize, shnum = struct.unpack_from(order + "HH", data, 58)
    try:
        # (name, type, flags, address, offset, size, link, info, alignment, entry size) of each section
        sections = [struct.unpack_from(order + "IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
        # only the first table, of 24-byte symbols, up to the file's end: a damaged library that repeats it in
        # every section header, or says its symbols are 1 byte long, was scanned for hours
        table = next((section for section in sections if section[1] == _ELF_DYNSYM), None)
        if table is None or table[9] != _ELF64_SYM_SIZE:
            return None
        _, _, _, _, offset, size, link, *_ = table
        names = sections[link][4]
        for entry in range(offset, min(offset + size, len(data)), _ELF64_SYM_SIZE):
            name, _, _, section, value, _ = struct.unpack_from(order + "IBBHQQ", data, entry)
            if data[names + name:names + name + len(symbol)] == symbol:
                _, _, _, address, section_offset, *_ = sections[section]
                start = section_offset + value - address
                blob = data[start:start + 8 + struct.unpack_from("<Q", data, start)[0]]
                return blob_modules(blob)[0][0]
    # offsets past the end (or past what an index can be), a damaged blob
    except (struct.error, IndexError, OverflowError, UnicodeDecodeError, BnnccError):
        return None
    return None
