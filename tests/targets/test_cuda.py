"""cuda: the binary conv GPU schedule, CUDA C with popcount intrinsics and shared memory, nvcc builds
the library without a GPU; running it against the reference only where a CUDA device exists."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnncc.targets import cuda, x86_64
from bnncc.targets.kernels import binary_conv
from bnncc.targets.tvm_compat import compile_module

import relax_sample as sample

needs_nvcc = pytest.mark.skipif(cuda.find_nvcc() is None, reason="needs nvcc (a CUDA toolkit)")
needs_device = pytest.mark.skipif(not cuda.has_cuda_device(), reason="needs a CUDA device")


def test_rules_apply_to_cuda_targets_only():
    func = binary_conv.binary_conv2d_func(1, 6, 6, 40, 12, 3, 2)
    assert cuda.schedule(func, x86_64.host_target()) is None
    scheduled = cuda.schedule(func, cuda.cuda_target())
    assert scheduled.attrs["tirx.is_scheduled"]
    text = scheduled.script()
    for axis in ("blockIdx.x", "blockIdx.y", "threadIdx.x", "threadIdx.y"):
        assert axis in text
    assert '"shared"' in text


def test_generated_source_uses_popc_and_shared_memory():
    mod, _ = sample.build(cuda.cuda_target(), cuda.schedule)
    source = cuda.inspect_cuda_source(compile_module(mod, cuda.cuda_target()))
    conv = source[source.index("binary_conv2d_kernel"):]
    conv = conv[:conv.index("\n}\n")]
    assert "__popc(" in conv and "__shared__" in conv and "__syncthreads()" in conv


@needs_nvcc
def test_compile_pokebnn_for_cuda_builds_with_nvcc(tmp_path, cli):
    """`bnncc compile --target cuda` writes model.so, its CUDA C and nvcc's fatbin (ELF fat binary magic)."""
    import onnx_ir as ir

    from test_lower import tiny_pokebnn

    ir.save(tiny_pokebnn(), tmp_path / "tiny.onnx")
    code, out, err = cli("compile", tmp_path / "tiny.onnx", "--target", "cuda", "-o", tmp_path / "lib")
    assert code == 0, err
    folder = tmp_path / "lib"
    assert json.loads((folder / "model.json").read_text())["target"]["name"] == "cuda"
    assert "__popc(" in (folder / "model.cu").read_text()
    assert (folder / "model.fatbin").read_bytes()[:4] == bytes.fromhex("50ed55ba")  # fatbin magic 0xBA55ED50
    assert (folder / "model.so").stat().st_size > 0


@needs_nvcc
@needs_device
def test_pokebnn_on_cuda_agrees_with_onnxruntime(tmp_path):
    from bnncc.targets.build import compile
    from bnncc.verification import verify
    from test_lower import tiny_pokebnn

    folder = compile(tiny_pokebnn(), tmp_path / "tiny_cuda", target="cuda", batches=(1, 8))
    report = verify(folder, n=16, batch=8)
    assert report.ok, report.failures


@needs_nvcc
@needs_device
def test_sample_module_on_cuda_is_exact(tmp_path):
    mod, expect = sample.build(cuda.cuda_target(), cuda.schedule)
    library = cuda.export_cuda(compile_module(mod, cuda.cuda_target()), tmp_path / "sample.so")
    x = np.random.default_rng(7).standard_normal((sample.ROWS, 16)).astype(np.float32)
    np.testing.assert_array_equal(cuda.load_vm(library)(sample.FUNCTION, x), expect(x))
