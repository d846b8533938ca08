"""Whole-network lowering (bnncc.targets.lower), compile, runtime and verify against onnxruntime.

The PokeBNN graph is built here node by node following bnncc/ops/spec.md, with every BN, DPReLU
and activation bound randomised (the passes' defaults -- gamma 0 on conv3, bounds -1 -- would
hide the binary convs and the quantizers). Shapes cover: channels not multiples of 32 (40, 72,
36), a 3x3 stride-2 conv on an even size (8 -> 4, padded 0 before / 1 after), channel zero-pad,
tile and mean, the count-pad average pool of both shortcuts, the padded border of 3x3 convs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from bnncc.domain import DOMAIN
from bnncc.errors import BnnccError
from bnncc.ops.poke_conv import INPUTS, overload
from bnncc.passes._util import add_initializer

CLASSES = 10


class _Net:
    """Appends spec.md patterns to a graph with random parameters."""

    def __init__(self, size: int, seed: int = 0, height: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.x = ir.Value(name="input", shape=ir.Shape([1, 3, height or size, size]),
                          type=ir.TensorType(ir.DataType.FLOAT))
        self.graph = ir.Graph([self.x], [], nodes=[], name="tiny_pokebnn", opset_imports={"": 18, DOMAIN: 1})
        self.count = 0

    def const(self, name: str, array) -> ir.Value:
        return add_initializer(self.graph, name, np.asarray(array, np.float32))

    def node(self, op: str, inputs: list, domain: str = "", overload: str = "", **attrs) -> ir.Value:
        self.count += 1
        name = f"{op}_{self.count}"
        node = ir.node(op, inputs, attrs or None, domain=domain, overload=overload, name=name,
                       outputs=[ir.Value(name=name)])
        self.graph.append(node)
        return node.outputs[0]

    def rand(self, name: str, shape, low=-1.0, high=1.0) -> ir.Value:
        return self.const(f"{name}{self.count}", self.rng.uniform(low, high, shape))

    def bn_params(self, c: int) -> list[ir.Value]:
        return [self.rand("g", c, 0.5, 1.5), self.rand("b", c), self.rand("m", c), self.rand("v", c, 0.5, 2)]

    def bn(self, x: ir.Value, c: int) -> ir.Value:
        return self.node("BatchNormalization", [x, *self.bn_params(c)], epsilon=1e-5)

    def dprelu_params(self, c: int) -> list[ir.Value]:
        return [self.rand("bx", c, -0.2, 0.2), self.rand("by", c, -0.2, 0.2), self.rand("ps", c, 0.5, 1.5),
                self.rand("ns", c, 0, 0.5)]

    def dprelu(self, x: ir.Value, c: int) -> ir.Value:
        return self.node("DPReLU", [x, *self.dprelu_params(c)], DOMAIN)

    def stem(self, mid: int, out: int) -> ir.Value:
        x = self.node("QuantConv", [self.x, self.rand("w", (mid, 3, 4, 4)), self.rand("ab", 3, 1, 3),
                                    self.rand("bias", mid)], DOMAIN, w_bits=8, a_bits=8, a_signed=1,
                      kernel_shape=[4, 4], strides=[4, 4], pads=[0, 0, 0, 0], group=1)
        x = self.dprelu(self.bn(x, mid), mid)
        x = self.node("QuantConv", [x, self.rand("w", (out, 1, 3, 3)), self.rand("ab", mid, 1, 3),
                                    self.rand("bias", out)], DOMAIN, w_bits=8, a_bits=8, a_signed=1,
                      kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], group=mid)
        return self.dprelu(self.bn(x, out), out)

    def poke_conv(self, x: ir.Value, cin: int, cout: int, k: int, stride: int, block: ir.Value | None = None,
                  gated: bool = True):
        """A PokeConv node (bnncc/ops/poke_conv.py), its "block" overload when ``block`` is given;
        ``gated=False``: without the SE gate (its inputs omitted, the "ungated" overloads)."""
        hidden = max(cin // 8, 1)
        se = [self.rand("w1", (hidden, cin, 1, 1)), self.rand("b1", cin, 0.5, 2), self.rand("c1", hidden),
              self.rand("w2", (cout, hidden, 1, 1)), self.rand("b2", hidden, 0.5, 2), self.rand("c2", cout)]
        inputs = [x, self.rand("w", (cout, cin, k, k)), *self.bn_params(cout), *self.dprelu_params(cout),
                  *(se if gated else [None] * len(se)), *self.bn_params(cout)]
        inputs += [block] if block is not None else []
        se_bits = dict(se_w_bits=4, se_a_bits=4) if gated else {}
        return self.node("PokeConv", inputs, DOMAIN, overload=overload(gated, block is not None),
                         kernel_shape=[k, k], strides=[stride, stride], clip_bound=3.0, **se_bits)

    def head(self, x: ir.Value, c: int) -> None:
        x = self.node("Flatten", [self.node("GlobalAveragePool", [x])], axis=1)
        y = self.node("QuantGemm", [x, self.rand("fc", (CLASSES, c)), self.rand("ab", c, 0.5, 2),
                                    self.rand("fcb", CLASSES)], DOMAIN, w_bits=8, a_bits=8, a_signed=1)
        y.name = "logits"
        y.type, y.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([1, CLASSES])  # a valid file's output
        self.graph.outputs.append(y)

    def model(self) -> ir.Model:
        from bnncc.ops import attach_functions

        model = ir.Model(self.graph, ir_version=10)
        attach_functions(model)
        return model


def tiny_pokebnn(size: int = 32) -> ir.Model:
    """Stem 3 -> 8 -> 16 (32 px -> 8 px), two bottlenecks (16 -> 40 -> 40/2 -> 72; 72 -> 36 -> 36 -> 72), head."""
    net = _Net(size)
    x = net.stem(8, 16)
    y = net.poke_conv(x, 16, 40, 1, 1)
    y = net.poke_conv(y, 40, 40, 3, 2)
    x = net.poke_conv(y, 40, 72, 1, 1, block=x)
    y = net.poke_conv(x, 72, 36, 1, 1)
    y = net.poke_conv(y, 36, 36, 3, 1)
    x = net.poke_conv(y, 36, 72, 1, 1, block=x)
    net.head(x, 72)
    return net.model()


def tiny_basic_block_ungated(size: int = 32) -> ir.Model:
    """Stem 3 -> 8 -> 16, a basic block of PokeConvs without SE gates (16 -> 40/2 "ungated", 40 -> 40
    "block_ungated" reading the block input), one gated PokeConv 40 -> 40, head."""
    net = _Net(size, seed=3)
    x = net.stem(8, 16)
    y = net.poke_conv(x, 16, 40, 3, 2, gated=False)
    x = net.poke_conv(y, 40, 40, 3, 1, block=x, gated=False)
    net.head(net.poke_conv(x, 40, 40, 3, 1), 40)
    return net.model()


def test_a_block_shortcut_of_another_width_alone_is_pooled(tmp_path):
    """A flat input's height reaches 1 while its width still halves: the reference's ReshapeAdd
    compared heights only and could not run the graph, and the kernel read the first columns of the
    unpooled shortcut (logits 0.03-0.06 off)."""
    from bnncc.runtime import load
    from bnncc.targets.build import compile

    net = _Net(64, seed=5, height=4)
    x = net.stem(8, 16)  # 1 x 16
    y = net.poke_conv(x, 16, 40, 1, 1)
    y = net.poke_conv(y, 40, 40, 3, 2)  # 1 x 8
    net.head(net.poke_conv(y, 40, 72, 1, 1, block=x), 72)
    model = net.model()
    images = np.random.default_rng(0).standard_normal((2, 3, 4, 64)).astype(np.float32)
    ref = _onnxruntime(model, images)
    got = load(compile(model, tmp_path / "lib"))(images)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def _onnxruntime(model: ir.Model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options)
    return np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The tiny network compiled for batch 1 and 8, and its graph."""
    from bnncc.targets.build import compile

    model = tiny_pokebnn()
    folder = compile(model, tmp_path_factory.mktemp("lib") / "tiny", batches=(1, 8))
    return folder, model


@pytest.mark.parametrize("batch", [1, 8])
def test_library_matches_onnxruntime(library, batch):
    from bnncc.runtime import load

    folder, model = library
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    got = load(folder)(x)
    ref = _onnxruntime(model, x)
    assert got.shape == (batch, CLASSES)
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_batch_8_runs_each_image_as_batch_1_does(library):
    """batch_8 calls the per-image function with the whole batch and each image's index, and the
    stem reads that image in place: each image's logits are batch_1's, bit for bit."""
    from bnncc.targets.tvm_compat import load_vm, to_tensor

    folder, _ = library
    vm = load_vm(folder / "model.so")
    x = np.random.default_rng(8).standard_normal((8, 3, 32, 32)).astype(np.float32)
    one_by_one = np.concatenate([vm["batch_1"](to_tensor(x[i:i + 1])).numpy() for i in range(8)])
    np.testing.assert_array_equal(vm["batch_8"](to_tensor(x)).numpy(), one_by_one)
    assert not np.array_equal(one_by_one[0], one_by_one[1])  # images that tell each other apart


def test_runtime_splits_other_batch_sizes(library):
    from bnncc.runtime import load

    folder, model = library
    x = np.random.default_rng(3).standard_normal((10, 3, 32, 32)).astype(np.float32)  # 8 + 1 + 1
    np.testing.assert_allclose(load(folder)(x), _onnxruntime(model, x), rtol=0, atol=1e-4)


def test_logits_are_a_new_float32_array_of_each_call(library):
    """As Library's docstring and the README say: the next call leaves the logits a caller holds as they were."""
    from bnncc.runtime import load

    lib = load(library[0])
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    first = lib(x[:1])
    kept = first.copy()
    second = lib(x[1:])
    assert first.dtype == np.float32 and first.shape == (1, CLASSES)
    assert np.array_equal(first, kept) and not np.array_equal(first, second)
    assert not np.shares_memory(first, second) and first.flags.writeable


def test_the_largest_batch_compiles_and_runs_each_image_as_batch_1_does(library, tmp_path):
    """A batch's logits were joined by one concat of its images', which TVM lowers to an expression as deep
    as the batch: compile --batch 1026 and above (4096 is allowed) ended in a segmentation fault."""
    import subprocess
    import sys

    from bnncc.domain import MAX_BATCH
    from bnncc.targets.tvm_compat import load_vm, to_tensor

    _, model = library
    ir.save(model, tmp_path / "tiny.onnx")
    # in a process of its own: the crash was a signal, which would have ended the test run
    done = subprocess.run([sys.executable, "-m", "bnncc", "compile", str(tmp_path / "tiny.onnx"), "-b", str(MAX_BATCH),
                           "-o", str(tmp_path / "lib")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    vm = load_vm(tmp_path / "lib" / "model.so")
    x = np.random.default_rng(9).standard_normal((MAX_BATCH, 3, 32, 32)).astype(np.float32)
    got = vm[f"batch_{MAX_BATCH}"](to_tensor(x)).numpy()
    rows = [0, 63, 64, 1025, 1026, MAX_BATCH - 1]  # both sides of each group of the join
    one_by_one = np.concatenate([vm["batch_1"](to_tensor(x[i:i + 1])).numpy() for i in rows])
    np.testing.assert_array_equal(got[rows], one_by_one)
    ref = _onnxruntime(model, x[rows])
    np.testing.assert_allclose(got[rows], ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_runtime_calls_from_threads_each_get_their_own_images(library):
    """The CPU runtime copies each batch into an input tensor it keeps per function: every call
    sees its own images (the same images give the same logits after others ran). Threads calling
    one library at once each get their images' logits; the VM runs one call at a time (two at once
    crashed the process)."""
    from concurrent.futures import ThreadPoolExecutor

    from bnncc.runtime import load

    folder, _ = library
    lib = load(folder)
    rng = np.random.default_rng(4)
    images = [rng.standard_normal((n, 3, 32, 32)).astype(np.float32) for n in (1, 1, 8, 1)]
    first = [lib(x) for x in images]
    assert not np.array_equal(first[0], first[1])
    assert all(np.array_equal(lib(x), want) for x, want in zip(images, first))
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            got = list(pool.map(lib, images * 4))
            assert all(np.array_equal(g, want) for g, want in zip(got, first * 4))


def test_threads_that_each_call_a_library_once_leave_no_threads_behind(library, tmp_path):
    """TVM gave every thread that ran a library a pool of workers of its own, which outlived it: a
    server running each request on a new thread kept two spinning workers per request (200
    requests: 400 threads, each call 500 times slower). The calls run on one thread of bnncc's."""
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: TVM starts no worker threads")
    script = tmp_path / "requests.py"
    script.write_text(f"""
import os, threading
import numpy as np
from bnncc.runtime import load
lib = load({str(library[0])!r})
x = np.zeros((1, 3, 32, 32), np.float32)
want = lib(x)
def requests(count):
    for _ in range(count):
        request = threading.Thread(target=lambda: np.testing.assert_array_equal(lib(x), want))
        request.start()
        request.join()
requests(1)
threads = len(os.listdir("/proc/self/task"))
requests(20)
print(len(os.listdir("/proc/self/task")) - threads)
""")
    env = {**os.environ, "TVM_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    # (a thread that join() has seen end may stay in /proc a moment longer)
    assert done.returncode == 0 and int(done.stdout) <= 2, done.stdout + done.stderr


def test_a_library_called_at_exit_runs(library):
    """An atexit handler's call (a server's last flush) ran after the runner thread had stopped taking work:
    "RuntimeError: cannot schedule new futures after shutdown"."""
    import subprocess
    import sys

    code = (f"import atexit\nimport numpy as np\nfrom bnncc.runtime import load\nlib = load({str(library[0])!r})\n"
            f"x = np.zeros((1, 3, 32, 32), np.float32)\nwant = lib(x)\n"
            f"atexit.register(lambda: print((lib(x) == want).all()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stdout + done.stderr


def test_a_daemon_thread_calling_a_library_at_exit_lets_the_process_exit(library):
    """A daemon thread (a ThreadingHTTPServer's request) that called a library while the process exited ran
    TVM's code during the exit, which aborted the process: "terminate called without an active exception",
    exit 134, in 6 of 8 runs."""
    import subprocess
    import sys

    code = (f"import threading, time\nimport numpy as np\nfrom bnncc.runtime import load\n"
            f"lib = load({str(library[0])!r})\nx = np.zeros((8, 3, 32, 32), np.float32)\nlib(x)\n"
            f"def requests():\n    while True:\n        lib(x)\n"
            f"threading.Thread(target=requests, daemon=True).start()\ntime.sleep(0.3)\n")
    for _ in range(3):  # (the abort depends on where the thread is when the process exits)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr


def test_runtime_takes_arrays_at_any_alignment(library):
    """The kernels assume 64-byte aligned inputs (a misaligned one crashed them); the runtime copies
    a caller's array, which may sit anywhere, into its own tensor."""
    from bnncc.runtime import load

    folder, model = library
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    misaligned = np.zeros(x.size + 1, np.float32)[1:].reshape(x.shape)
    misaligned[...] = x
    assert misaligned.ctypes.data % 64
    np.testing.assert_array_equal(load(folder)(misaligned), load(folder)(x))


def test_manifest(library):
    folder, _ = library
    manifest = json.loads((folder / "model.json").read_text())
    assert manifest["input"] == {"name": "input", "shape": ["N", 3, 32, 32], "layout": "NCHW", "dtype": "float32"}
    assert manifest["output"]["shape"] == ["N", CLASSES]
    assert manifest["functions"] == {"1": "batch_1", "8": "batch_8"}
    assert (folder / "model.onnx").is_file()


def test_verify_cli_agrees(library, cli):
    folder, _ = library
    code, out, _ = cli("verify", folder, "--n", "3", "--batch", "1")
    assert code == 0, out
    assert "argmax agreement 3/3" in out


def test_verify_cli_fails_against_another_graph(library, cli, tmp_path):
    folder, _ = library
    other = _Net(32, seed=5)
    x = other.stem(8, 16)
    other.head(other.poke_conv(x, 16, 72, 1, 1), 72)
    ir.save(other.model(), tmp_path / "other.onnx")
    code, out, _ = cli("verify", folder, "--reference", tmp_path / "other.onnx", "--n", "4")
    assert code == 1
    assert "FAIL" in out


def test_run_cli_prints_top_classes(library, cli, tmp_path):
    """Of each input, in order (a second --input was taken instead of the first, without a word)."""
    folder, model = library
    rng = np.random.default_rng(4)
    expected = []
    for name in ("x.npy", "y.npy"):
        x = rng.standard_normal((3, 32, 32)).astype(np.float32)
        np.save(tmp_path / name, x)
        expected.append(int(_onnxruntime(model, x[None]).argmax()))
    code, out, _ = cli("run", folder, "--input", tmp_path / "x.npy", "-i", tmp_path / "y.npy", "--top", "1")
    assert code == 0
    assert [int(c) for c in re.findall(r"│\s+(\d+) │", out)] == expected


def test_run_cli_names_each_input_on_one_line(library, cli, tmp_path):
    """The title over each table is the input's path: it was wrapped to the table's 18 columns, so a
    script could not tell which input a table is of (and a newline in a name began a line of its own)."""
    folder, _ = library
    deep = tmp_path / "a folder with a long name" / "ünïcode\nline"
    deep.mkdir(parents=True)
    np.save(deep / "x.npy", np.zeros((3, 32, 32), np.float32))
    code, out, _ = cli("run", folder, "--input", deep / "x.npy", "--top", "1")
    assert code == 0 and out.splitlines()[0] == str(deep / "x.npy").replace("\n", "\\n")


def test_run_cli_says_when_it_resizes_an_image(library, cli, tmp_path):
    from PIL import Image

    folder, _ = library
    Image.new("RGB", (2, 3)).save(tmp_path / "tiny.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "fits.png")
    # notes go to stderr: stdout holds the top classes alone, for scripts (the note was on stdout, wrapped at 80)
    code, out, err = cli("run", folder, "--input", tmp_path / "tiny.png")
    assert code == 0 and "tiny.png: a 2x3 image, resized to the network's 32x32" in " ".join(err.split())
    assert "resized" not in out and "normalisation" not in out
    code, out, _ = cli("run", folder, "--input", tmp_path / "fits.png")
    assert code == 0 and "resized" not in out
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: a 64x48 JPEG is a 48x64 picture
    Image.new("RGB", (64, 48)).save(tmp_path / "turned.jpg", exif=exif)
    code, _, err = cli("run", folder, "--input", tmp_path / "turned.jpg")
    assert code == 0 and "turned.jpg: a 48x64 image, resized" in " ".join(err.split())
    (tmp_path / "a_folder").mkdir()
    code, _, err = cli("run", folder, "--input", tmp_path / "a_folder")
    assert code == 2 and "a_folder: a folder, not an image or .npy file" in err


def _tampered(library, tmp_path, manifest=None, so=None):
    """A copy of the library folder with its manifest changed by ``manifest(dict)`` or its model.so
    replaced by the bytes ``so(bytes)``."""
    import shutil

    folder = tmp_path / "lib"
    shutil.copytree(library[0], folder)
    if manifest is not None:
        data = json.loads((folder / "model.json").read_text())
        manifest(data)
        (folder / "model.json").write_text(json.dumps(data))
    if so is not None:
        (folder / "model.so").write_bytes(so((folder / "model.so").read_bytes()))
    return folder


@pytest.mark.parametrize(("change", "message"), [
    (dict(so=lambda b: b[:len(b) // 2]), "model.so: truncated"),
    (dict(so=lambda b: b"not a library"), "model.so: not a 64-bit ELF shared library"),
    # another shared library of this machine's (the C math library), beside a manifest of before the digest
    (dict(so=lambda b: Path("/usr/lib/x86_64-linux-gnu/libm.so.6").read_bytes(),
          manifest=lambda m: m.pop("library_sha256")), "holds no Relax VM executable"),
    # 4 KiB zeroed in place (the size unchanged): TVM's loader or the first call crashed the process
    (dict(so=lambda b: b[:len(b) // 2] + bytes(4096) + b[len(b) // 2 + 4096:]),
     r"model.so: not the library model.json was written with \(its SHA-256 differs\)"),
    (dict(manifest=lambda m: m.update(library_sha256="abc")), "library_sha256 'abc'; expected 64 hex digits"),
    (dict(manifest=lambda m: m.update(library_sha256=[[[[]]]])), "library_sha256"),
    (dict(manifest=lambda m: m.update(functions={"0": "batch_1"})), r"functions \{'0': 'batch_1'\}"),
    # str.isdigit() takes a superscript two, which int() then refused: an 'unexpected' ValueError
    (dict(manifest=lambda m: m.update(functions={"\u00b2": "batch_1"})), r"functions \{'\u00b2': 'batch_1'\}"),
    # int() refuses a number of more than 4300 digits: an 'unexpected' ValueError
    (dict(manifest=lambda m: m.update(functions={"1" * 5000: "batch_1"})), r"functions \{'1111"),
    # an input of 10^12 pixels, to which run resized an image
    (dict(manifest=lambda m: m["input"].update(shape=[1, 3, 10**6, 10**6])), r"H x W at most 33554432"),
    (dict(manifest=lambda m: m["input"].update(shape=["N", 3, "x", -1])), "input shape"),
    (dict(manifest=lambda m: m.pop("target")), "target None"),
    (dict(manifest=lambda m: m.update(preprocessing={"mean": "abc"})), "preprocessing"),
    # every image normalised to +-inf (mean Infinity; std 1e-300, 0 in float32), which the network ran
    (dict(manifest=lambda m: m.update(preprocessing={"mean": [float("inf")] * 3, "std": [0.5] * 3})),
     "preprocessing"),
    (dict(manifest=lambda m: m.update(preprocessing={"mean": [0.5] * 3, "std": [1e-300] * 3})), "std > 0, that keep"),
    (dict(manifest=lambda m: m.update(preprocessing={"mean": [10**400] * 3, "std": [0.5] * 3})), "preprocessing"),
    (dict(manifest=lambda m: m.update(preprocessing={"mean": [0.5] * 3, "std": [0.5] * 3, "crop": 1.5})),
     "preprocessing crop 1.5"),
    (dict(manifest=lambda m: m.update(preprocessing={"mean": [0.5] * 3, "std": [0.5] * 3, "resize": "lanczos"})),
     "preprocessing resize 'lanczos'"),
    (dict(manifest=lambda m: m["target"].update(llvm="{not json")), "is not an LLVM target"),
    # no LLVM target: the CPU feature check was skipped (a library of a higher class ran into SIGILL)
    (dict(manifest=lambda m: m["target"].pop("llvm")), "target llvm None; expected the LLVM target"),
    (dict(manifest=lambda m: m["target"].update(llvm=5)), "target llvm 5"),
    (dict(manifest=lambda m: m["target"].update(name="arm64")), "a library for x86-64, not aarch64"),
    # an aarch64 library (ELF e_machine 183) beside a manifest naming x86-64
    (dict(so=lambda b: b[:18] + (183).to_bytes(2, "little") + b[20:]), "a library for aarch64, not x86-64"),
    (dict(manifest=lambda m: m["target"].update(llvm='{"kind": "no such kind"}')), "is not an LLVM target"),
    # another kind of target has no CPU features to check: the library ran under a TVM warning
    (dict(manifest=lambda m: m["target"].update(llvm='{"kind": "cuda"}')), r"is not an LLVM target \(kind cuda\)"),
    (dict(manifest=lambda m: m["target"].update(name="foo")), r"model.json: unknown target 'foo'"),
    # e_phentsize 1: reading 40 program headers ran past the end of a file this short
    (dict(so=lambda b: (b[:54] + (1).to_bytes(2, "little") + (40).to_bytes(2, "little") + b[58:])[:120]),
     r"model.so: damaged ELF headers"),
])
def test_a_tampered_library_folder_is_an_error(library, tmp_path, change, message):
    """A library folder whose files were cut short or edited: one BnnccError when it is loaded
    (a truncated model.so ended the process with a bus error, functions {"0": ...} never returned)."""
    from bnncc.runtime import load

    with pytest.raises(BnnccError, match=message):
        load(_tampered(library, tmp_path, **change))


def _dynamic_symbols(so: bytes) -> tuple[int, int, int]:
    """Where in ELF library ``so`` its dynamic symbol table's section header, its symbols and their names lie."""
    import struct

    shoff, = struct.unpack_from("<Q", so, 40)
    shentsize, shnum = struct.unpack_from("<HH", so, 58)
    for header in range(shoff, shoff + shentsize * shnum, shentsize):
        _, kind, _, _, offset, _, link, *_ = struct.unpack_from("<IIQQQQIIQQ", so, header)
        if kind == 11:  # SHT_DYNSYM
            return header, offset, struct.unpack_from("<Q", so, shoff + link * shentsize + 24)[0]
    raise AssertionError("no dynamic symbol table")


def _every_section_the_symbols(so: bytes) -> bytes:
    """``so`` with 65535 section headers, each its dynamic symbol table's, which reaches to the file's end."""
    import struct

    header, offset, _ = _dynamic_symbols(so)
    so = bytearray(so)
    struct.pack_into("<Q", so, 40, header)
    struct.pack_into("<HH", so, 58, 0, 65535)
    struct.pack_into("<Q", so, header + 32, len(so) - offset)
    return bytes(so)


def _blob_symbol_at(so: bytes, value: int) -> bytes:
    """``so`` with the value (address) of its imports blob's symbol ``value``."""
    import struct

    from bnncc.targets.cuda_blob import BLOB_SYMBOL

    _, offset, names = _dynamic_symbols(so)
    so = bytearray(so)
    symbol = offset
    while so[names + struct.unpack_from("<I", so, symbol)[0]:][:len(BLOB_SYMBOL) + 1] != BLOB_SYMBOL.encode() + b"\0":
        symbol += 24
    struct.pack_into("<Q", so, symbol + 8, value)
    return bytes(so)


@pytest.mark.parametrize("damage", [_every_section_the_symbols, lambda so: _blob_symbol_at(so, 2**63)])
def test_a_damaged_symbol_table_is_one_line_at_once(library, tmp_path, cli, damage):
    """A model.so whose section headers all name its dynamic symbol table (read 65535 times, for
    hours), or whose imports blob lies past any offset (an 'unexpected' OverflowError): one line
    naming it, within seconds."""
    import signal

    folder = _tampered(library, tmp_path, so=damage)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))

    def hung(*_):
        raise AssertionError("still reading model.so after 30 s")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        code, out, err = cli("run", folder, "--input", tmp_path / "x.npy")
    finally:
        signal.alarm(0)
    assert code == 2 and out == ""
    assert err == f"error: {folder / 'model.so'}: holds no Relax VM executable; is it a library written by " \
                  f"`bnncc compile`?\n"


def test_a_library_for_a_cpu_with_more_is_refused_before_it_runs(library, tmp_path, monkeypatch, cli):
    """A library whose target (model.json) uses CPU features this CPU lacks: one BnnccError naming them
    when it is loaded, and a one-line error from the CLI, where running it would end the process with
    SIGILL at the first such instruction. The same library on a CPU with them loads."""
    from bnncc.runtime import load
    from bnncc.targets import x86_64

    avx512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4", "mattr": ["+avx512vpopcntdq"]}
    folder = _tampered(library, tmp_path, manifest=lambda m: m["target"].update(llvm=json.dumps(avx512)))
    avx2 = {"avx2", "bmi2", "fma", "movbe", "sse4_2"}
    monkeypatch.setattr(x86_64, "cpu_flags", lambda: avx2)
    with pytest.raises(BnnccError, match="built for a CPU with avx512_vpopcntdq, avx512bw, avx512cd, avx512dq, "
                                         "avx512f, avx512vl, which this CPU lacks"):
        load(folder)
    monkeypatch.setattr(x86_64, "cpu_flags", lambda: avx2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})
    with pytest.raises(BnnccError, match="built for a CPU with avx512_vpopcntdq, which this CPU lacks"):
        load(folder)
    code, _, err = cli("run", folder, "--input", tmp_path / "none.npy")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "avx512_vpopcntdq" in err, err
    monkeypatch.setattr(x86_64, "cpu_flags", lambda: avx2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",
                                                              "avx512_vpopcntdq"})
    assert load(folder).input_chw == (3, 32, 32)


@pytest.mark.parametrize("recipe", ["pokebnn_0.75x", "pokebnn_1.4x"])
def test_channel_counts_of_no_whole_vectors_match_onnxruntime(tmp_path, recipe):
    """A quarter-width ResNet-50 at 0.75x has 48-channel PokeConvs, which AVX-512 tiled in 24
    channels: the second, partial vector's copy to the output wrote stack garbage over the next
    task's channels, and the in-place kernels then read it as their shortcut (logits off by 0.02
    at 0.75x and by 1e31 at 1.4x, different from call to call); AVX2's 8 lanes divide 24."""
    from bnncc import zoo
    from bnncc.frontend import load
    from bnncc.rewriting import rewrite
    from bnncc.runtime import load as load_library
    from bnncc.targets.build import compile
    from bnncc.verification import verify

    path = zoo.export_onnx(zoo.resnet50(width=0.25, num_classes=10), tmp_path / "r50.onnx", input_size=32)
    poke, _ = rewrite(load(path), recipe, ["passes.poke_stem.mid_channels=16"])
    folder = compile(poke, tmp_path / "lib")
    assert verify(folder, n=4).ok
    lib, x = load_library(folder), np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(lib(x), lib(x))


@pytest.mark.parametrize("target", ["x86-64", "x86-64-avx2"])
def test_a_one_channel_network_compiles_and_matches_onnxruntime(tmp_path, target):
    """A grayscale ResNet (Fashion-MNIST's kind) whose stem spreads 1 channel into 16: the AVX-512
    build asked TVM for a one-lane vector and the compile died in an unexpected DiagnosticError."""
    from bnncc import zoo
    from bnncc.frontend import load
    from bnncc.rewriting import rewrite
    from bnncc.targets.build import compile
    from bnncc.verification import verify

    path = zoo.export_onnx(zoo.resnet50(width=0.25, num_classes=10, in_channels=1), tmp_path / "grey.onnx",
                           input_size=32)
    poke, _ = rewrite(load(path), "pokebnn_1x", ["passes.poke_stem.mid_channels=16"])
    folder = compile(poke, tmp_path / "lib", target=target)
    assert verify(folder, n=4).ok


def test_class_targets_build_for_any_cpu_of_their_class(library, cli, tmp_path):
    """`compile --target x86-64-avx2` builds for every AVX2 CPU (x86-64-v3, whatever this CPU has); the
    library runs here and matches onnxruntime. The other class targets build for their classes."""
    from bnncc.runtime import load
    from bnncc.targets import registry, x86_64

    ir.save(library[1], tmp_path / "tiny.onnx")
    code, _, err = cli("compile", tmp_path / "tiny.onnx", "--target", "x86-64-avx2", "-o", tmp_path / "lib")
    assert code == 0, err
    manifest = json.loads((tmp_path / "lib" / "model.json").read_text())
    assert manifest["target"]["name"] == "x86-64-avx2"
    assert json.loads(manifest["target"]["llvm"])["mcpu"] == "x86-64-v3"
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got, ref = load(tmp_path / "lib")(x), _onnxruntime(library[1], x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    classes = {name: x86_64.popcount_class(registry.get(name).tvm_target())
               for name in ("x86-64-avx2", "x86-64-avx512bw", "x86-64-avx512")}
    assert classes == {"x86-64-avx2": x86_64.AVX2, "x86-64-avx512bw": x86_64.AVX512BW,
                       "x86-64-avx512": x86_64.AVX512_VPOPCNTDQ}


def test_a_build_machine_without_avx2_is_told_to_name_a_class(library, cli, tmp_path, monkeypatch):
    """`--target x86-64` builds for this CPU's class, and a CPU without AVX2 (a VM's default qemu64 model)
    has none: compile lowered the network and only then ended with "no schedule for kernel 'quant_conv2d'"
    (convert after its fine-tune), while `bnncc targets` listed x86-64 as ready. Now the build is refused
    first, naming what the CPU lacks and the class targets, which build on it; the table says so."""
    from bnncc.targets import x86_64

    ir.save(library[1], tmp_path / "tiny.onnx")
    monkeypatch.setattr(x86_64, "cpu_flags", lambda: {"sse4_2", "popcnt", "avx", "fma"})
    for command in ("compile", "convert"):
        code, out, err = cli(command, tmp_path / "tiny.onnx", "--target", "x86-64", "-o", tmp_path / command)
        assert code == 2 and out == "" and err == (
            "error: --target x86-64 builds for this CPU's class, and this CPU has no AVX2 (it lacks avx2, bmi2, "
            "movbe); build for the CPUs that will run the library: --target x86-64-avx2, x86-64-avx512bw or "
            "x86-64-avx512\n"), err
        assert not (tmp_path / command).exists()
    code, out, _ = cli("targets")
    assert "a CPU with avx2, bmi2, movbe" in out
    code, _, err = cli("compile", tmp_path / "tiny.onnx", "--target", "x86-64-avx2", "-o", tmp_path / "avx2")
    assert code == 0, err


def test_a_manifest_naming_a_missing_function_is_an_error(library, tmp_path):
    from bnncc.runtime import load

    lib = load(_tampered(library, tmp_path, manifest=lambda m: m.update(functions={"1": "batch_7"})))
    with pytest.raises(BnnccError, match="has no function 'batch_7'"):
        lib(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.parametrize("classes", [5, 20])
def test_a_manifest_of_another_number_of_classes_is_an_error_at_the_first_call(library, tmp_path, classes):
    """model.json's classes (what a batch of 0 gives, what verify checks the reference against)
    edited: the library returned its own 10 logits an image beside (0, classes) for no images."""
    from bnncc.runtime import load

    lib = load(_tampered(library, tmp_path, manifest=lambda m: m["output"].update(shape=["N", classes])))
    x = np.random.default_rng(0).standard_normal((9, 3, 32, 32)).astype(np.float32)
    assert lib(x[:0]).shape == (0, classes)
    for n in (1, 9):
        with pytest.raises(BnnccError, match=rf"gave logits of shape \(\d, {CLASSES}\) where model.json records "
                                             rf"\(N, {classes}\)"):
            lib(x[:n])


def test_a_manifest_function_name_must_be_an_identifier(library, tmp_path):
    """A bundle's README.txt prints the names into its shell commands."""
    from bnncc.runtime import load

    folder = _tampered(library, tmp_path, manifest=lambda m: m.update(functions={"1": "batch_1 $(touch x)"}))
    with pytest.raises(BnnccError, match=r"expected \{batch size >= 1: function name \(a C identifier\)\}"):
        load(folder)


def test_runtime_returns_no_logits_for_no_images(library):
    from bnncc.runtime import load

    assert load(library[0])(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, CLASSES)


def test_runtime_refuses_a_nan_input_that_the_reference_would_carry_to_the_logits(library):
    """The quantizers' clips map NaN to a bound where onnxruntime's Clip keeps it: the library gave
    finite logits for an image with one NaN pixel, the reference NaN logits."""
    from bnncc.runtime import load

    x = np.zeros((3, 3, 32, 32), np.float32)
    x[2, 1, 5, 7] = np.nan
    with pytest.raises(BnnccError, match="input image 2 holds NaN"):
        load(library[0])(x)


def test_runtime_refuses_a_masked_array_with_masked_pixels(library):
    """np.asarray drops a mask: a masked pixel went in as the value stored under it, without a word.
    A masked array with nothing masked is an array like any other."""
    from bnncc.runtime import load

    lib = load(library[0])
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert np.array_equal(lib(np.ma.masked_array(x, mask=False)), lib(x))
    with pytest.raises(BnnccError, match=r"a masked array with masked pixels; fill them first \(x.filled\(0\)\)"):
        lib(np.ma.masked_where(x > 2, x))


@pytest.mark.parametrize(("array", "message"), [
    (np.array([object()], dtype=object), "an array of object; expected real numbers"),
    (np.full((3, 32, 32), 1e300), r"holds values beyond float32's range \(up to 1e\+300\)"),
    (np.full((3, 32, 32), np.longdouble("1e4000")), r"beyond float32's range \(up to 1e\+4000\)"),  # not "inf"
    (np.zeros((0, 3, 32, 32), np.float32), "holds no images"),
    (np.full((3, 32, 32), np.nan, np.float32), "holds NaN or infinite values"),
    (np.zeros((3, 32, 32), np.complex64), "an array of complex64; expected real numbers"),
    (np.float32(1.0), r"an array of shape \(\); expected \(C, H, W\) or \(N, C, H, W\)"),
])
def test_run_cli_refuses_bad_arrays_in_one_line(library, cli, tmp_path, array, message):
    np.save(tmp_path / "x.npy", array, allow_pickle=True)
    code, out, err = cli("run", library[0], "--input", tmp_path / "x.npy")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_run_cli_refuses_an_array_it_cannot_read_in_one_line(library, cli, tmp_path):
    """An I/O error (here /proc/self/mem, which fails at offset 0) was an 'unexpected' error."""
    (tmp_path / "x.npy").symlink_to("/proc/self/mem")
    code, _, err = cli("run", library[0], "--input", tmp_path / "x.npy")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'x.npy'}: cannot read it (Input/output error)", err


def test_run_cli_checks_every_input_before_any_runs(library, cli, tmp_path):
    """A .npy of another image size after a good one: refused naming that file before the first
    table (the first input's table printed, then an error naming the library folder). A .NPY is an
    array, not an image."""
    np.save(tmp_path / "good.npy", np.zeros((3, 32, 32), np.float32))
    np.save(tmp_path / "small.npy", np.zeros((3, 16, 16), np.float32))
    code, out, err = cli("run", library[0], "--input", tmp_path / "good.npy", "--input", tmp_path / "small.npy")
    assert code == 2 and out == "" and err.strip() == (f"error: {tmp_path / 'small.npy'}: images of shape (3, 16, 16); "
                                                       f"the network takes (3, 32, 32) (C, H, W)"), (out, err)
    (tmp_path / "good.npy").rename(tmp_path / "upper.NPY")
    code, out, err = cli("run", library[0], "--input", tmp_path / "upper.NPY")
    assert code == 0 and "upper.NPY" in out, err


@pytest.mark.parametrize(("content", "message"), [
    # a .npz named .npy was taken apart as an archive: "unexpected AttributeError"
    (lambda path: np.savez(path.with_suffix(".npz"), np.zeros(3)) or path.with_suffix(".npz").rename(path),
     r"not a .npy array \(no .npy header; a .npz archive\)"),
    # a header claiming 56 GiB: "unexpected MemoryError"
    (lambda path: path.write_bytes(_npy_header((100000, 3, 224, 224)) + bytes(64)),
     r"truncated; its header gives \(100000, 3, 224, 224\) float32 \(60211200000 bytes\)"),
    (lambda path: path.write_text("1 2 3"), r"not a .npy array \(no .npy header\)"),
])
def test_run_cli_reads_the_npy_header_first(library, cli, tmp_path, content, message):
    content(tmp_path / "x.npy")
    code, _, err = cli("run", library[0], "--input", tmp_path / "x.npy")
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_run_cli_refuses_an_array_of_another_image_size_before_reading_its_data(library, cli, tmp_path):
    """An array of another image size than the network's was read whole, and copied to float32, before
    its shape was refused: a 4.8 GB .npy of 20000x20000 images took twice that in memory to be told so."""
    import tracemalloc

    path = tmp_path / "big.npy"
    with path.open("wb") as f:
        f.write(_npy_header((1, 3, 4000, 4000)))
        f.truncate(f.tell() + 3 * 4000 * 4000 * 4)  # 192 MB of zeros, sparse on the disk
    tracemalloc.start()  # numpy's arrays are traced too
    try:
        code, _, err = cli("run", library[0], "--input", path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2 and err.strip() == (f"error: {path}: images of shape (3, 4000, 4000); the network takes "
                                         f"(3, 32, 32) (C, H, W)"), err
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB traced while refusing it"


def _npy_header(shape) -> bytes:
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return header.getvalue()


def test_run_cli_normalises_as_the_manifest_says_and_reads_deep_images(library, cli, tmp_path):
    """preprocessing (fine-tuning records it) is applied to the image's [0, 1] pixels; a 16-bit grey
    PNG is scaled by 65535 (PIL's convert("RGB") clipped it, nearly all white) to 8 bits, as
    training reads it."""
    from PIL import Image

    def top_class(out):
        return int(re.search(r"│\s+(\d+) │", out).group(1))

    _, model = library
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    stats = {"mean": [0.2, 0.4, 0.6], "std": [0.5, 0.25, 0.125]}
    folder = _tampered(library, tmp_path, manifest=lambda m: m.update(preprocessing=stats))
    code, out, _ = cli("run", folder, "--input", tmp_path / "rgb.png", "--top", "1")
    pixels = rgb.transpose(2, 0, 1).astype(np.float32) / 255
    normalised = (pixels - np.reshape(stats["mean"], (3, 1, 1))) / np.reshape(stats["std"], (3, 1, 1))
    assert code == 0 and top_class(out) == int(_onnxruntime(model, normalised[None].astype(np.float32)).argmax())
    code, out, err = cli("run", library[0], "--input", tmp_path / "rgb.png")
    assert code == 0 and "records no input normalisation" in " ".join(err.split()) and "normalisation" not in out
    grey = rng.integers(0, 65536, (32, 32)).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    code, out, _ = cli("run", library[0], "--input", tmp_path / "grey16.png", "--top", "1")
    expected = np.repeat((np.round(grey / 65535 * 255) / 255).astype(np.float32)[None], 3, axis=0)
    assert code == 0 and top_class(out) == int(_onnxruntime(model, expected[None]).argmax())


def test_run_cli_crops_an_image_as_evaluation_decoded_it(library, cli, tmp_path):
    """With the centre crop that fine-tuning on image files records, `run` feeds the library what evaluation
    decoded from the file (imagefiles._decode: the centre 224/256 of the short side, bicubic), where it
    squeezed the whole image into the network's square (JPEGs: test_data_files)."""
    from PIL import Image

    from bnncc.cli._inputs import read_input
    from bnncc.train.imagefiles import _decode

    _, model = library
    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(path)
    stats = {"mean": [0.2, 0.4, 0.6], "std": [0.5, 0.25, 0.125], "crop": 224 / 256}
    evaluated = _decode(path.read_bytes(), (32, 32), None).transpose(2, 0, 1).astype(np.float32) / 255
    expected = (evaluated - np.reshape(stats["mean"], (3, 1, 1))) / np.reshape(stats["std"], (3, 1, 1))
    x = read_input(path, (3, 32, 32), stats)
    np.testing.assert_allclose(x[0], expected, atol=1e-5)
    whole = read_input(path, (3, 32, 32), {k: v for k, v in stats.items() if k != "crop"})
    assert np.abs(whole - x).max() > 1  # (the whole image, as before, where no crop is recorded)
    folder = _tampered(library, tmp_path, manifest=lambda m: m.update(preprocessing=stats))
    code, out, err = cli("run", folder, "--input", path, "--top", "1")
    assert code == 0 and "a 64x40 image, centre-cropped (0.875) and resized" in " ".join(err.split())
    assert int(re.search(r"│\s+(\d+) │", out).group(1)) == int(_onnxruntime(model, x.astype(np.float32)).argmax())
    # a share of 1e-300 made a box of no size, and the decode divided by it
    tiny = read_input(path, (3, 32, 32), {**stats, "crop": 1e-300})
    assert tiny.shape == (1, 3, 32, 32) and np.isfinite(tiny).all()  # a pixel's box, resized


def test_compile_says_the_batch_sizes_the_library_holds(cli, tmp_path, library):
    """`-b 3` said "batch 3" of a library that holds 1 and 3; `-b 4 -b 4` said "batch 4, 4"."""
    ir.save(library[1], tmp_path / "tiny.onnx")
    code, out, err = cli("compile", tmp_path / "tiny.onnx", "-b", "4", "-b", "3", "-b", "4", "-o", tmp_path / "lib")
    # one line, however long the paths: it was wrapped at 80 columns in a pipe, a CI log or a script's capture
    assert code == 0 and out.splitlines() == [f"{tmp_path / 'tiny.onnx'} -> {tmp_path / 'lib'}/model.so "
                                              f"({(tmp_path / 'lib' / 'model.so').stat().st_size / 2**20:.1f} MiB, "
                                              f"x86-64, batch 1, 3, 4)"], (out, err)
    assert json.loads((tmp_path / "lib" / "model.json").read_text())["functions"].keys() == {"1", "3", "4"}


def test_compile_keeps_what_is_at_the_output_path(cli, tmp_path, library):
    """Compiling onto a path that holds anything but an earlier library folder is refused before any
    work, and nothing there is touched; an earlier library folder is replaced."""
    from bnncc.fileio import umask

    ir.save(library[1], tmp_path / "tiny.onnx")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "file").write_text("keep too")
    (tmp_path / "model_only").mkdir()  # a user's model.onnx: one of a library's names, but not ours
    (tmp_path / "model_only" / "model.onnx").write_text("the user's")
    for target in ("mine", "file", "model_only"):
        code, _, err = cli("compile", tmp_path / "tiny.onnx", "-o", tmp_path / target)
        assert code == 2 and "exists and is not a library folder of bnncc" in err, err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert (tmp_path / "file").read_text() == "keep too"
    assert (tmp_path / "model_only" / "model.onnx").read_text() == "the user's"
    code, _, err = cli("compile", tmp_path / "tiny.onnx", "-o", tmp_path / "again")
    assert code == 0, err
    code, _, err = cli("compile", tmp_path / "tiny.onnx", "-o", tmp_path / "again")
    assert code == 0, err
    assert {p.name for p in (tmp_path / "again").iterdir()} == {"model.so", "model.json", "model.onnx"}
    assert (tmp_path / "again").stat().st_mode & 0o777 == 0o777 & ~umask()  # not mkdtemp's 0700


def test_unsupported_node_is_an_error():
    from bnncc.targets.lower import lower
    from bnncc.targets.x86_64 import host_target

    net = _Net(32)
    x = net.node("Relu", [net.stem(8, 16)])
    net.head(x, 16)
    with pytest.raises(BnnccError, match="Relu.*not supported"):
        lower(net.model(), host_target())


@pytest.mark.parametrize("shape", [(40, 16), (40, 8, 1, 1), (40, 16, 3, 1)])
def test_poke_conv_weights_of_another_shape_are_an_error(shape):
    """Weights that are not (Cout, Cin, k, k) for the conv's input: a BnnccError naming the node."""
    from bnncc.targets.lower import lower
    from bnncc.targets.x86_64 import host_target

    model = tiny_pokebnn()
    node = next(n for n in model.graph if n.op_type == "PokeConv")
    weight = node.inputs[1]
    weight.const_value = ir.tensor(np.ones(shape, np.float32), name=weight.name)
    with pytest.raises(BnnccError, match=rf"{node.name}.*PokeConv.*weights of shape"):
        lower(model, host_target())


def _initializers(op_type):
    """(op type, input index) of every constant input of the first ``op_type`` node of tiny_pokebnn."""
    node = next(n for n in tiny_pokebnn().graph if n.op_type == op_type)
    return [(op_type, i) for i, v in enumerate(node.inputs) if v is not None and v.const_value is not None]


@pytest.mark.parametrize(("op_type", "index"), [
    case for op in ("QuantConv", "BatchNormalization", "DPReLU", "PokeConv", "QuantGemm") for case in _initializers(op)])
def test_constant_of_a_wrong_shape_is_an_error(op_type, index):
    """Every constant input (weights, bounds, biases, norms, DPReLU and SE parameters) of another
    shape than its op needs: a BnnccError naming the node, not a numpy error from deep inside."""
    from bnncc.targets.lower import lower
    from bnncc.targets.x86_64 import host_target

    model = tiny_pokebnn()
    node = next(n for n in model.graph if n.op_type == op_type)
    value = node.inputs[index]
    wrong = np.ones((3,) if value.const_value.numpy().ndim > 1 else (2, 2), np.float32)
    value.const_value = ir.tensor(wrong, name=value.name)
    with pytest.raises(BnnccError, match=rf"node '{node.name}'"):
        lower(model, host_target())


@pytest.mark.parametrize(("op_type", "index"), [
    case for op in ("QuantConv", "BatchNormalization", "DPReLU", "PokeConv", "QuantGemm") for case in _initializers(op)])
def test_constant_with_nan_is_an_error(op_type, index):
    """A NaN in any float constant input: a BnnccError naming the node (the kernels would compute NaN
    logits, or a quantizer's scale would be NaN)."""
    from bnncc.targets.lower import lower
    from bnncc.targets.x86_64 import host_target

    model = tiny_pokebnn()
    node = next(n for n in model.graph if n.op_type == op_type)
    value = node.inputs[index]
    array = value.const_value.numpy().copy()
    if array.dtype.kind != "f":
        pytest.skip("not a float constant")
    array.flat[0] = np.nan
    value.const_value = ir.tensor(array, name=value.name)
    with pytest.raises(BnnccError, match=rf"node '{node.name}'.*NaN or infinite"):
        lower(model, host_target())


@pytest.mark.parametrize("op_type", ["QuantConv", "PokeConv"])
def test_folded_parameters_past_float32_are_an_error(op_type):
    """A batch norm gamma of 3.3e38 over a variance below 1: its scale, folded in float64, does not fit
    the float32 epilogue table (the reference overflows to NaN there; the library would compute inf)."""
    from bnncc.targets.lower import lower
    from bnncc.targets.x86_64 import host_target

    model = tiny_pokebnn()
    node = next(n for n in model.graph if n.op_type == op_type)
    norm = node.inputs[INPUTS.index("split_scale")] if op_type == "PokeConv" else next(
        use.node for use in node.outputs[0].uses()).inputs[1]
    norm.const_value = ir.tensor(np.full(norm.const_value.shape, 3.3e38, np.float32), name=norm.name)
    with pytest.raises(BnnccError, match=rf"node '{node.name}' \({op_type}\): the scales and shifts folded from its "
                                         r"batch norms and DPReLU overflow float32"):
        lower(model, host_target())


@pytest.mark.parametrize(("op_type", "attribute", "value", "message"), [
    ("QuantConv", "w_bits", 0, "w_bits = 0; a quantizer takes 2 to 24 bits"),  # the op's domain (check_graph)
    ("QuantConv", "a_bits", 12, "a_bits = 12; the kernels take 2 to 8 bits"),  # the kernels' (int8 weights)
    ("PokeConv", "se_w_bits", 9, "se_w_bits = 9"),
    ("QuantGemm", "w_bits", 1, "w_bits = 1"),
    ("PokeConv", "clip_bound", 0.0, "clip_bound = 0.0; expected a positive number"),
    ("PokeConv", "clip_bound", float("inf"), r"clip_bound = inf; expected a positive number \(finite\)"),
    ("PokeConv", "clip_bound", float("nan"), "clip_bound = nan"),
    ("PokeConv", "kernel_shape", [5, 5], r"kernel_shape \[5, 5\] but weights of shape"),
    ("PokeConv", "strides", [0, 0], r"strides \[0, 0\]; expected two equal strides >= 1"),
    ("QuantConv", "strides", [4, 2], r"strides \[4, 2\]"),
    ("QuantConv", "a_signed", 0, "unsigned activations are not supported"),  # the kernel quantized them signed
    ("QuantGemm", "a_signed", 0, "unsigned activations are not supported"),
])
def test_attribute_out_of_range_is_an_error(op_type, attribute, value, message):
    """Bit widths, clip bounds, kernel shapes and strides the kernels cannot take: a BnnccError
    naming the node, not a library computing something else."""
    from bnncc.targets.lower import lower
    from bnncc.targets.x86_64 import host_target

    model = tiny_pokebnn()
    node = next(n for n in model.graph if n.op_type == op_type)
    node.attributes[attribute] = ir.Attr(attribute, ir.AttributeType.FLOAT if isinstance(value, float) else
                                         ir.AttributeType.INTS if isinstance(value, list) else ir.AttributeType.INT, value)
    with pytest.raises(BnnccError, match=rf"node '{node.name}'.*{message}"):
        lower(model, host_target())


def test_poke_conv_without_its_split_norm_is_an_error():
    from bnncc.targets.lower import lower
    from bnncc.targets.x86_64 import host_target

    model = tiny_pokebnn()
    node = next(n for n in model.graph if n.op_type == "PokeConv")
    node.replace_input_with(INPUTS.index("split_var"), None)
    with pytest.raises(BnnccError, match=rf"node '{node.name}' \(PokeConv\): input\(s\) split_var missing"):
        lower(model, host_target())


def test_an_output_that_is_no_head_is_an_error(cli, tmp_path):
    """A graph cut after a PokeConv: the library returned its NHWC feature map where onnxruntime
    gives NCHW (and the manifest recorded H as the number of classes). `compile` names the file
    before the lowering's words."""
    from bnncc.targets.lower import lower
    from bnncc.targets.x86_64 import host_target

    model = tiny_pokebnn()
    last = [n for n in model.graph if n.op_type == "PokeConv"][-1]
    model.graph.outputs[0] = last.outputs[0]
    last.outputs[0].dtype = ir.DataType.FLOAT  # an output of the file must have a type
    ir.passes.common.RemoveUnusedNodesPass()(model)  # the head (a node the output does not need is refused apart)
    message = rf"output '{last.outputs[0].name}': a feature map; a library gives the logits of the head"
    with pytest.raises(BnnccError, match=message):
        lower(model, host_target())
    ir.save(model, tmp_path / "cut.onnx")
    code, _, err = cli("compile", tmp_path / "cut.onnx", "-o", tmp_path / "lib")
    assert code == 2 and re.match(rf"error: {re.escape(str(tmp_path / 'cut.onnx'))}: {message}", err), err
    assert not (tmp_path / "lib").exists()


def test_a_graph_input_that_is_also_an_initializer_is_named():
    """(An older exporter's habit.) The line said only "got 2 and 1"."""
    from bnncc.targets.lower import lower
    from bnncc.targets.x86_64 import host_target

    model = tiny_pokebnn()
    weight = next(n for n in model.graph if n.op_type == "PokeConv").inputs[1]
    model.graph.inputs.append(weight)
    with pytest.raises(BnnccError, match=rf"got inputs \['input', '{weight.name}'\] and outputs \['.*'\] \({weight.name} "
                                         r"also an initializer: list only the image as the graph's input\)"):
        lower(model, host_target())


def test_an_op_of_another_domain_is_not_fused_as_ours():
    """A QuantGemm of domain com.example after the head's Flatten was lowered as bnncc's."""
    from bnncc.targets.lower import lower
    from bnncc.targets.x86_64 import host_target

    model = tiny_pokebnn()
    next(n for n in model.graph if n.op_type == "QuantGemm").domain = "com.example"
    with pytest.raises(BnnccError, match=r"\(GlobalAveragePool\): expected Flatten -> QuantGemm after it"):
        lower(model, host_target())


def test_stem_window_larger_than_the_input_is_an_error():
    from bnncc.targets.lower import lower
    from bnncc.targets.x86_64 import host_target

    with pytest.raises(BnnccError, match=r"\(QuantConv\): its 4x4 window does not fit its 2x2 input"):
        lower(tiny_pokebnn(size=2), host_target())


def test_compile_refuses_a_batch_beyond_its_largest(tmp_path, library):
    from bnncc.domain import MAX_BATCH
    from bnncc.targets.build import compile

    with pytest.raises(BnnccError, match=f"batch sizes must be 1 to {MAX_BATCH} for x86-64, got \\[1, 10+\\]"):
        compile(library[1], tmp_path / "out", batches=(1, 10**9))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("batches", [(2.0,), ("8",), 8])
def test_compile_refuses_batch_sizes_that_are_no_whole_numbers_in_one_line(tmp_path, library, batches):
    """Through the Python API a float batch reached TVM's lowering (an InternalError of many lines after the
    lowering had started), and a string or a bare number failed in a TypeError of the check itself."""
    from bnncc.targets.build import compile

    with pytest.raises(BnnccError, match=f"^batch sizes {re.escape(repr(batches))}: expected whole numbers"):
        compile(library[1], tmp_path / "out", batches=batches)
    assert not (tmp_path / "out").exists()


def test_compile_refuses_a_cuda_batch_its_build_cannot_take(tmp_path, library, monkeypatch):
    """Above batch 1024 TVM's CUDA build of the batch's concat ran for minutes or crashed (segmentation fault)."""
    import dataclasses

    from bnncc.targets import cuda, registry
    from bnncc.targets.build import compile

    # without nvcc too: the batch is refused before any tool would run
    monkeypatch.setitem(registry.TARGETS, "cuda", dataclasses.replace(registry.TARGETS["cuda"], check_build=None))
    with pytest.raises(BnnccError, match=f"batch sizes must be 1 to {cuda.MAX_BATCH} for cuda, got \\[1, 1025\\]"):
        compile(library[1], tmp_path / "out", target="cuda", batches=(1, cuda.MAX_BATCH + 1))
    assert not (tmp_path / "out").exists()


def test_compile_refuses_a_float_graph(tmp_path):
    from bnncc.targets.build import compile

    net = _Net(32)
    x = net.node("Relu", [net.x])
    y = net.node("Flatten", [net.node("GlobalAveragePool", [x])], axis=1)
    net.graph.outputs.append(y)
    with pytest.raises(BnnccError, match="no ai.bnncc op"):
        compile(ir.Model(net.graph, ir_version=10), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compile_and_export_name_the_file_they_refuse(cli, tmp_path, library):
    """A float model's path and a graph of another version of the ai.bnncc ops, by file name."""
    import onnx

    from bnncc import zoo

    float_path = zoo.export_onnx(zoo.resnet18(width=0.125, num_classes=4), tmp_path / "float.onnx", input_size=32)
    proto = ir.to_proto(library[1])
    next(o for o in proto.opset_import if o.domain == "ai.bnncc").version = 99
    onnx.save(proto, tmp_path / "v99.onnx")
    cases = [(float_path, "no ai.bnncc op; {} takes a PokeBNN graph"),
             (tmp_path / "v99.onnx", "ai.bnncc opset 99; this bnncc knows version 1 of its ops")]
    for path, message in cases:
        for command, out in (("compile", tmp_path / "lib"), ("export", tmp_path / "q.onnx")):
            code, _, err = cli(command, path, "-o", out)
            assert code == 2 and err.startswith(f"error: {path}: {message.format(command)}"), err
            assert not out.exists()


def test_a_missing_library_folder_is_named_so(cli, tmp_path):
    code, _, err = cli("verify", tmp_path / "nowhere")
    assert code == 2 and "nowhere: no such folder" in err, err


def _fma_sensitive_inputs(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounds B_c and inputs x_c of an int8 signed quantizer where x s lies less than half a float32
    ulp below the -0.5 threshold: the reference rounds x * s to -0.5, adds 0.5 and floors to level 0;
    one fused multiply-add (fl(x s + 0.5) in one rounding) floors to level -1."""
    rng = np.random.default_rng(0)
    bounds = rng.uniform(0.5, 3, 64 * channels).astype(np.float32)
    scales = np.float32(127) / bounds
    x = (-0.5 / scales.astype(np.float64)).astype(np.float32)
    product = x.astype(np.float64) * scales.astype(np.float64)  # exact
    reference = np.floor(np.float32(np.float32(product) + np.float32(0.5)))
    fused = np.floor(np.float32(product + 0.5))
    pick = np.nonzero(reference != fused)[0][:channels]
    assert len(pick) == channels
    return bounds[pick], x[pick]


def test_quantizer_at_a_decision_point_agrees_with_onnxruntime(tmp_path):
    """GlobalAveragePool -> Flatten -> QuantGemm (identity weights) on values at the signed
    quantizer's rounding threshold, where FMA contraction of x * s + 0.5 flips a level: the library
    must quantize as onnxruntime does (the disagreement of issue: ResNet-50 verify, one input)."""
    from bnncc.ops import attach_functions
    from bnncc.runtime import load
    from bnncc.targets.build import compile

    channels = 16
    bounds, values = _fma_sensitive_inputs(channels)
    net = _Net(1)
    net.x.shape = ir.Shape([1, channels, 1, 1])
    flat = net.node("Flatten", [net.node("GlobalAveragePool", [net.x])], axis=1)
    y = net.node("QuantGemm", [flat, net.const("eye", np.eye(channels)), net.const("bound", bounds),
                               net.const("zero", np.zeros(channels))], DOMAIN, w_bits=8, a_bits=8, a_signed=1)
    net.graph.outputs.append(y)
    model = ir.Model(net.graph, ir_version=10)
    attach_functions(model)
    x = values.reshape(1, channels, 1, 1)
    ref = _onnxruntime(model, x)
    assert np.all(ref == 0)  # level 0 in the reference
    got = load(compile(model, tmp_path / "head"))(x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7)


def test_input_read_as_nhwc_is_each_image_of_the_batch(tmp_path, capfd):
    """A reader of the network input other than the stem's NCHW conv (here the head's pool) gets
    its image taken out of the batch and transposed: each image of a batch of 3 its own logits,
    and compiling prints nothing (TVM warns of an unchecked take)."""
    from bnncc.ops import attach_functions
    from bnncc.runtime import load
    from bnncc.targets.build import compile

    channels = 16
    net = _Net(2)
    net.x.shape = ir.Shape([ir.SymbolicDim("batch"), channels, 2, 2])
    flat = net.node("Flatten", [net.node("GlobalAveragePool", [net.x])], axis=1)
    y = net.node("QuantGemm", [flat, net.rand("w", (5, channels)), net.const("bound", np.full(channels, 3.0)),
                               net.rand("b", (5,))], DOMAIN, w_bits=8, a_bits=8, a_signed=1)
    net.graph.outputs.append(y)
    model = ir.Model(net.graph, ir_version=10)
    attach_functions(model)
    folder = compile(model, tmp_path / "head", batches=(1, 3))
    assert capfd.readouterr().err == ""
    x = np.random.default_rng(5).standard_normal((3, channels, 2, 2)).astype(np.float32)
    got, ref = load(folder)(x), _onnxruntime(model, x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_vector_channel_mean_agrees_with_onnxruntime(tmp_path):
    """Channel-mean shortcuts whose output tiles are whole vectors (64 -> 16, k = 4; 64 -> 32,
    k = 2) take the shuffle form of the x86-64 schedule (the tiny network's 72 -> 36 does not)."""
    from bnncc.runtime import load
    from bnncc.targets.build import compile
    from bnncc.targets.lower import lower
    from bnncc.targets.x86_64 import host_target

    net = _Net(32, seed=2)
    x = net.poke_conv(net.stem(8, 16), 16, 64, 1, 1)
    y = net.poke_conv(net.poke_conv(x, 64, 16, 1, 1), 16, 64, 1, 1, block=x)
    net.head(net.poke_conv(y, 64, 32, 1, 1), 32)
    model = net.model()
    assert "T.Shuffle" in lower(model, host_target()).module.script()
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got, ref = load(compile(model, tmp_path / "lib"))(x), _onnxruntime(model, x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_channel_mean_into_a_prime_channel_count_agrees_with_onnxruntime(tmp_path):
    """74 -> 37 channels (k = 2): 37 is prime and above two vectors, so the register tile holds one
    channel and the mean has no vector to shuffle (PokeBNN-1.4x's 179 channels failed to compile)."""
    from bnncc.runtime import load
    from bnncc.targets.build import compile

    net = _Net(16, seed=3)
    x = net.poke_conv(net.stem(8, 16), 16, 74, 1, 1)
    net.head(net.poke_conv(x, 74, 37, 1, 1), 37)
    model = net.model()
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    got, ref = load(compile(model, tmp_path / "lib"))(x), _onnxruntime(model, x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_larger_batches_reuse_the_one_image_kernels():
    """Every batch size runs the per-image function: the module holds one image's kernels only
    (library size)."""
    from bnncc.targets.lower import lower
    from bnncc.targets.tvm_compat import tirx
    from bnncc.targets.x86_64 import host_target

    def kernels(batches):
        module = lower(tiny_pokebnn(), host_target(), batches).module
        return sorted(gv.name_hint for gv, f in module.functions.items() if isinstance(f, tirx.PrimFunc))

    assert kernels((1, 8)) == kernels((1,))


def test_stem_quantizer_on_the_nchw_input_at_a_decision_point_agrees_with_onnxruntime(tmp_path):
    """The stem's first QuantConv quantizes the network's NCHW input itself, a vector per row: at the
    rounding threshold where a fused multiply-add would flip a level it must still agree with
    onnxruntime (identity 1x1 conv, then an unquantized mean and identity head to logits)."""
    from bnncc.ops import attach_functions
    from bnncc.runtime import load
    from bnncc.targets.build import compile

    channels, width = 4, 32
    bounds, values = _fma_sensitive_inputs(channels)
    net = _Net(1)
    net.x.shape = ir.Shape([1, channels, 1, width])
    eye = np.eye(channels, dtype=np.float32)
    stem = net.node("QuantConv", [net.x, net.const("w", eye.reshape(channels, channels, 1, 1)), net.const("bound", bounds),
                                  net.const("b", np.zeros(channels))], DOMAIN, w_bits=8, a_bits=8, a_signed=1,
                    kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], group=1)
    flat = net.node("Flatten", [net.node("GlobalAveragePool", [stem])], axis=1)
    y = net.node("QuantGemm", [flat, net.const("eye", eye), net.const("unbounded", np.zeros(channels)),
                               net.const("zero", np.zeros(channels))], DOMAIN, w_bits=8, a_bits=8, a_signed=1)
    net.graph.outputs.append(y)
    model = ir.Model(net.graph, ir_version=10)
    attach_functions(model)
    x = np.repeat(values.reshape(1, channels, 1, 1), width, axis=3)
    ref = _onnxruntime(model, x)
    assert np.all(ref == 0)  # level 0 in the reference
    got = load(compile(model, tmp_path / "stem"))(x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize(("pads", "w_bits", "height"),
                         [([0, 0, 0, 1], 8, 5), ([1, 2, 0, 0], 8, 5), ([1, 1, 1, 1], 4, 6)],
                         ids=["uneven pads right", "uneven pads top-left", "4-bit weights"])
def test_stem_conv_agrees_with_onnxruntime(tmp_path, pads, w_bits, height):
    """A stem QuantConv whose pads differ on each side (ONNX order: top, left, bottom, right): its output is
    (H + top + bottom) x (W + left + right), pooled to the logits as onnxruntime computes them. And one of
    4-bit weights (7 levels a side) and 8-bit inputs: the other tests' stems are 8/8, so the two widths
    swapped went unseen."""
    from bnncc.ops import attach_functions
    from bnncc.runtime import load
    from bnncc.targets.build import compile

    net = _Net(6, height=height)
    stem = net.node("QuantConv", [net.x, net.rand("w", (8, 3, 3, 3)), net.rand("ab", 3, 1, 3), net.rand("bias", 8)],
                    DOMAIN, w_bits=w_bits, a_bits=8, a_signed=1, kernel_shape=[3, 3], strides=[1, 1], pads=pads,
                    group=1)
    flat = net.node("Flatten", [net.node("GlobalAveragePool", [stem])], axis=1)
    y = net.node("QuantGemm", [flat, net.rand("fc", (4, 8)), net.rand("fb", 8, 1, 3), net.rand("fcb", 4)], DOMAIN,
                 w_bits=8, a_bits=8, a_signed=1)
    net.graph.outputs.append(y)
    model = ir.Model(net.graph, ir_version=10)
    attach_functions(model)
    x = np.random.default_rng(5).standard_normal((1, 3, height, 6)).astype(np.float32)
    np.testing.assert_allclose(load(compile(model, tmp_path / "stem"))(x), _onnxruntime(model, x), rtol=1e-4, atol=1e-4)


def test_head_of_4_bit_weights_and_8_bit_activations_agrees_with_onnxruntime(tmp_path):
    """The head's QuantGemm with w_bits 4 and a_bits 8: the weights on the 4-bit grid (7 levels a side), the
    pooled activations on the 8-bit one, as onnxruntime computes them (the other tests' heads are 8/8)."""
    from bnncc.ops import attach_functions
    from bnncc.runtime import load
    from bnncc.targets.build import compile

    net = _Net(4)
    flat = net.node("Flatten", [net.node("GlobalAveragePool", [net.x])], axis=1)
    y = net.node("QuantGemm", [flat, net.rand("fc", (5, 3)), net.rand("fb", 3, 1, 3), net.rand("fcb", 5)], DOMAIN,
                 w_bits=4, a_bits=8, a_signed=1)
    net.graph.outputs.append(y)
    model = ir.Model(net.graph, ir_version=10)
    attach_functions(model)
    x = np.random.default_rng(6).standard_normal((1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(load(compile(model, tmp_path / "head"))(x), _onnxruntime(model, x), rtol=1e-5, atol=1e-5)


def test_poke_convs_without_se_gate_have_no_gate_kernel_and_agree_with_onnxruntime(tmp_path):
    """tiny_basic_block_ungated: the ungated PokeConvs get no SE gate kernel and fused kernels with
    no gate parameter (the epilogue has no multiply to do), and the library agrees with onnxruntime."""
    from bnncc.runtime import load
    from bnncc.targets.build import compile
    from bnncc.targets.kernels import quant
    from bnncc.targets.lower import POKE_CONV_KERNEL, lower
    from bnncc.targets.tvm_compat import tirx
    from bnncc.targets.x86_64 import host_target

    model = tiny_basic_block_ungated()
    functions = {gv.name_hint: f for gv, f in lower(model, host_target(), (1,)).module.functions.items()
                 if isinstance(f, tirx.PrimFunc)}
    assert sum(name.startswith(quant.SE_GATE_KERNEL_NAME) for name in functions) == 1  # the gated conv's
    gate_params = sorted([p.name for p in f.params].count("gate") for name, f in functions.items()
                         if name.startswith(POKE_CONV_KERNEL))
    assert gate_params == [0, 0, 1]
    x = np.random.default_rng(7).standard_normal((4, 3, 32, 32)).astype(np.float32)
    got, ref = load(compile(model, tmp_path / "ungated"))(x), _onnxruntime(model, x)
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_block_output_overwrites_its_dead_residual():
    """tiny_pokebnn's second bottleneck ends on a block residual of its own shape that nothing reads
    later: its kernel writes the output into the residual (call_tir_inplace, without the compiler's
    no-alias promise). The first bottleneck's residual is pooled and tiled: a new tensor. The values
    are checked against onnxruntime by test_library_matches_onnxruntime."""
    from bnncc.targets.lower import lower
    from bnncc.targets.tvm_compat import tirx
    from bnncc.targets.x86_64 import host_target

    module = lower(tiny_pokebnn(), host_target(), (1,)).module
    assert module.script().count("R.call_tir_inplace(") == 1
    aliasing = [f for f in module.functions.values() if isinstance(f, tirx.PrimFunc) and not f.attrs["tirx.noalias"]]
    assert len(aliasing) == 1


@pytest.mark.parametrize("size, pool", [(66, "padded"), (32, "none")])
def test_pokeinit_stems_of_other_windows_agree_with_onnxruntime(tmp_path, size, pool):
    """poke_stem keeps a float stem's size: at 66 px its 4x4/4 window is padded (17x17 blocks), without
    a max-pool it is 2x2/2 (16x16); the in-place NCHW stem conv reads the padding as zeros. Checked
    by verify: random binary networks put some inputs at a sign's decision point, where onnxruntime
    itself moves by as much when the input moves by a few float32 epsilons."""
    import torch

    from bnncc import zoo
    from bnncc.frontend import load
    from bnncc.rewriting import rewrite
    from bnncc.targets.build import compile
    from bnncc.verification import verify

    module = zoo.resnet50(0.125, num_classes=CLASSES)
    module.maxpool = torch.nn.MaxPool2d(3, 2, 1) if pool == "padded" else torch.nn.Identity()
    float_model = load(zoo.export_onnx(module, tmp_path / "float.onnx", input_size=size, batch="symbolic"))
    poke, _ = rewrite(float_model, "pokebnn_1x", ["passes.poke_stem.mid_channels=8"])
    report = verify(compile(poke, tmp_path / "lib"), n=8, batch=2)
    assert report.ok and report.argmax_agree == report.inputs, report.failures


def test_a_manifest_json_cannot_hold_is_an_error(library, tmp_path):
    """Nesting deeper than Python's JSON reader goes (a RecursionError) and a number of more digits
    than it converts (a ValueError) were 'unexpected' errors."""
    from bnncc.runtime import load

    for text in ("[" * 100_000 + "]" * 100_000, '{"format": ' + "9" * 5000 + "}"):
        folder = _tampered(library, tmp_path)
        (folder / "model.json").write_text(text)
        with pytest.raises(BnnccError, match=r"model.json: not a JSON manifest"):
            load(folder)
        shutil.rmtree(folder)


def test_every_library_runs_every_batch_size(tmp_path):
    """Batch 1 is built into every library and listed: one compiled for batch 4 refused batch 1
    (and 2, 3, 5, ...) while holding it."""
    from bnncc.runtime import load
    from bnncc.targets.build import compile

    model = tiny_pokebnn()
    library = load(compile(model, tmp_path / "lib", batches=(4,)))
    assert sorted(library.functions) == [1, 4]
    x = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(library(x), np.concatenate([library(x[i:i + 1]) for i in range(6)]))


@pytest.mark.parametrize("at_start", ["2", "1"])
def test_a_fork_of_a_process_that_ran_a_library_on_threads_runs_it(library, tmp_path, at_start):
    """TVM's worker threads do not survive a fork, and the child's calls waited for them for ever. Such
    a child was refused, as told by TVM_NUM_THREADS when bnncc was imported; a server that set it to 2
    only later (before its first call) forked children that hung. The child's calls run on a thread of
    its own, whose pool starts afresh: the child gives the parent's logits."""
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: TVM starts no worker threads")
    script = tmp_path / "forks.py"
    script.write_text(f"""
import os, signal
import numpy as np
from bnncc.runtime import load
lib = load({str(library[0])!r})
os.environ["TVM_NUM_THREADS"] = "2"
x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
want = lib(x)
pid = os.fork()
if pid == 0:
    signal.alarm(60)
    np.testing.assert_array_equal(lib(x), want)
    os._exit(0)
print(os.waitpid(pid, 0)[1])
np.testing.assert_array_equal(lib(x), want)
""")
    env = {**os.environ, "TVM_NUM_THREADS": at_start}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "0", done.stdout + done.stderr


def test_a_fork_while_another_thread_calls_a_library_waits_for_the_call(library, tmp_path):
    """A child forked while another thread was inside a call inherited the caller's lock held, and
    its first call waited for ever (4 forks of 5). One thread, so that the fork itself is allowed."""
    import subprocess
    import sys

    script = tmp_path / "forks.py"
    script.write_text(f"""
import os, signal, threading
import numpy as np
from bnncc.runtime import load
lib = load({str(library[0])!r})
x = np.zeros((1, 3, 32, 32), np.float32)
stop = False
def calls():
    while not stop:
        lib(x)
caller = threading.Thread(target=calls)
caller.start()
statuses = []
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)
        lib(x)
        os._exit(0)
    statuses.append(os.waitpid(pid, 0)[1])
stop = True
caller.join()  # (a thread still inside a call at exit aborts the interpreter)
print(statuses)
""")
    env = {**os.environ, "TVM_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == str([0] * 8), done.stdout + done.stderr


def test_a_library_goes_to_a_spawned_worker_as_its_folder(library, tmp_path, monkeypatch):
    """A pool of spawned processes is how a fork-safe server runs a library; handing it one failed
    in pickling (the TVM module cannot be). The worker loads the folder afresh, relative paths too."""
    import multiprocessing
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    from bnncc.runtime import load

    shutil.copytree(library[0], tmp_path / "lib")
    monkeypatch.chdir(tmp_path)
    lib = load("lib")
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert pickle.loads(pickle.dumps(lib)).folder == tmp_path / "lib"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        monkeypatch.chdir("/")
        got = pool.submit(lib, x).result(timeout=120)  # the library itself is the pickled callable
    np.testing.assert_array_equal(got, lib(x))


def test_a_pickled_library_whose_folder_was_compiled_again_is_refused(library, tmp_path):
    """A library pickled (to a spawned worker) and its folder then compiled again from another network:
    unpickling loaded the new one, so the worker's logits silently came from another network than
    the caller's. It is refused; a library unpickled from an unchanged folder gives the same logits."""
    import pickle

    from bnncc.runtime import load
    from bnncc.targets.build import compile

    shutil.copytree(library[0], tmp_path / "lib")
    lib = load(tmp_path / "lib")
    x = np.random.default_rng(6).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(lib))(x), lib(x))
    pickled = pickle.dumps(lib)
    other = _Net(32, seed=9)  # tiny_pokebnn's shapes, other weights
    other.head(other.poke_conv(other.stem(8, 16), 16, 40, 1, 1), 40)
    compile(other.model(), tmp_path / "lib", batches=(1,))
    assert not np.allclose(load(tmp_path / "lib")(x), lib(x))  # the folder now holds another network
    with pytest.raises(BnnccError, match="not the library that was pickled"):
        pickle.loads(pickled)


def test_a_library_whose_manifest_holds_nan_unpickles(library, tmp_path):
    """json reads a NaN in model.json (a figure a report wrote), and NaN != NaN: the unpickled manifest
    must still count as the same."""
    import pickle

    from bnncc.runtime import load

    lib = load(_tampered(library, tmp_path, manifest=lambda m: m.update(ace=float("nan"))))
    x = np.random.default_rng(6).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(lib))(x), lib(x))


def test_a_library_dropped_is_unloaded(library):
    """A server that reloads its model (on a change of configuration) drops the old library: TVM pinned
    every library it loaded for the process's life, so each load kept another copy of model.so
    mapped (200 reloads of a ResNet-18 library grew the process by 1.1 GiB)."""
    import gc

    from bnncc.runtime import load

    def mapped() -> int:
        with open("/proc/self/maps") as f:
            return sum(line.rstrip().removesuffix(" (deleted)").endswith("/model.so") for line in f)

    x = np.zeros((1, 3, 32, 32), np.float32)
    before = mapped()
    for _ in range(3):
        lib = load(library[0])
        want = lib(x)
        assert mapped() > before
        del lib
        gc.collect()
        assert mapped() == before
    np.testing.assert_array_equal(load(library[0])(x), want)


@pytest.mark.parametrize("value, error", [
    ("abc", "TVM_NUM_THREADS='abc': expected a whole number of threads (0: TVM's default)"),
    # a process of 256 threads on 2 CPUs never exited (TVM's workers spin while they wait)
    ("{more}", "TVM_NUM_THREADS={more}: more threads than the {cpus} CPUs this process may run on (they would only "
               "slow every call and the exit); give {cpus} or fewer"),
], ids=["no-number", "more-than-the-cpus"])
def test_tvm_num_threads_that_tvm_cannot_use_well_is_one_line(value, error):
    import subprocess
    import sys

    cpus = len(os.sched_getaffinity(0))
    value, error = value.format(more=cpus + 1), error.format(more=cpus + 1, cpus=cpus)
    done = subprocess.run([sys.executable, "-m", "bnncc", "targets"], capture_output=True, text=True,
                          env={**os.environ, "TVM_NUM_THREADS": value})
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: {error}"], done.stderr


def test_inputs_that_are_no_real_numbers_are_one_line(library):
    """Complex values lost their imaginary part with a mere numpy warning; a torch tensor that
    requires grad, or a bfloat16 one, ended in torch's own errors."""
    import torch

    from bnncc.runtime import load

    lib = load(library[0])
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert np.array_equal(lib(torch.from_numpy(x).requires_grad_()), lib(x))
    for bad, message in [(x.astype(np.complex64), "an input of complex64; expected real numbers"),
                         (np.full((1, 3, 32, 32), "a"), "an input of <U1; expected real numbers"),
                         (torch.from_numpy(x).bfloat16(), "an input numpy cannot read as an array")]:
        with pytest.raises(BnnccError, match=re.escape(message)):
            lib(bad)


def test_float64_inputs_beyond_float32_are_one_line(library):
    """float64 pixels beyond float32's range became infinite in the cast to the network's float32,
    with no more than numpy's RuntimeWarning, and the library returned NaN logits; those within it
    give what onnxruntime gives on their float32 values."""
    import warnings

    from bnncc.runtime import load

    folder, model = library
    lib = load(folder)
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32))
    ref = _onnxruntime(model, x.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = lib(x)
        assert np.array_equal(got.argmax(1), ref.argmax(1))
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
        x[1, 2, 3, 4] = -1e300
        with pytest.raises(BnnccError, match=re.escape("input image 1 holds values beyond float32's range "
                                                       "(up to 1e+300)")):
            lib(x)


@pytest.mark.skipif(np.finfo(np.longdouble).maxexp <= np.finfo(np.float64).maxexp, reason="longdouble is float64")
def test_a_longdouble_input_beyond_float64_is_named_by_its_value(library):
    """The largest value went through a Python float, which is infinite beyond float64's range: a finite
    longdouble pixel of 1e4000 was said to be "up to inf"."""
    from bnncc.runtime import load

    x = np.zeros((2, 3, 32, 32), np.longdouble)
    x[1, 0, 5, 6] = np.longdouble("-1e4000")
    said = "input image 1 holds values beyond float32's range (up to 1e+4000)"
    with pytest.raises(BnnccError, match=re.escape(said)):
        load(library[0])(x)


def test_a_target_without_a_core_count_schedules_for_the_default_threads():
    """A Target written by hand (no num-cores) ended the lowering in a KeyError."""
    from bnncc.targets.lower import lower
    from bnncc.targets.tvm_compat import make_target
    from bnncc.targets.x86_64 import host_target

    plain = make_target({k: v for k, v in host_target().export().items() if k in ("kind", "mtriple", "mcpu", "mattr")})
    assert "num-cores" not in plain.attrs
    assert lower(tiny_pokebnn(), plain).classes > 0
