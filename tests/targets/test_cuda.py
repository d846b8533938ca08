"""cuda: the binary conv GPU schedule, CUDA C with popcount intrinsics and shared memory, nvcc builds
the library without a GPU with the device code inside model.so (checked with cuobjdump -sass); running it
against the reference only where a CUDA device exists."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnncc.errors import BnnccError

from bnncc.targets import cuda, cuda_blob, cuda_mma, x86_64
from bnncc.targets.kernels import binary_conv, bitpack
from bnncc.targets.tvm_compat import compile_module

import relax_sample as sample

needs_nvcc = pytest.mark.skipif(cuda.find_nvcc() is None, reason="needs nvcc (a CUDA toolkit)")
needs_device = pytest.mark.skipif(not cuda.has_cuda_device(), reason="needs a CUDA device")
needs_cuobjdump = pytest.mark.skipif(cuda.find_cuobjdump() is None, reason="needs cuobjdump and nvdisasm (test extras)")


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


FATBIN_MAGIC = bytes.fromhex("50ed55ba")  # 0xBA55ED50, little-endian


def _blob(*modules: tuple[bytes, bytes | None]) -> bytes:
    """An imports blob (layout in cuda.py) of (kind, bytes) entries, bytes None for "_lib"."""
    def pack(data: bytes) -> bytes:
        return struct.pack("<Q", len(data)) + data

    body = struct.pack("<QQQQQ", 2, 0, 1, 1, 1)  # import tree: row pointers [0, 1], children [1]
    for kind, data in modules:
        body += pack(kind) + (b"" if data is None else pack(data))
    return pack(body)


def _cuda_module(fmt: bytes, code: bytes) -> bytes:
    """A CUDA module's bytes with one kernel "k" of two pointer arguments and blockIdx.x / threadIdx.x."""
    def pack(data: bytes) -> bytes:
        return struct.pack("<Q", len(data)) + data

    table = (struct.pack("<Q", 1) + pack(b"k") + pack(b"k") + struct.pack("<Q", 2) + bytes.fromhex("0340010003400100")
             + struct.pack("<Q", 2) + pack(b"blockIdx.x") + pack(b"threadIdx.x") + struct.pack("<Qii", 2, 0, 0))
    return pack(fmt) + table + pack(code)


def test_embed_fatbins_swaps_cuda_c_for_the_compiled_code_only():
    vm = b"vm bytecode and weights"
    blob = _blob((b"relax.VMExecutable", vm), (b"_lib", None), (b"cuda", _cuda_module(b"cuda", b"__global__ k")))
    sources = []
    out = cuda_blob.embed_fatbins(blob, lambda source: sources.append(source) or FATBIN_MAGIC + b"code")
    assert sources == ["__global__ k"]
    modules = cuda_blob.blob_modules(out)
    assert modules[:2] == [("relax.VMExecutable", vm), ("_lib", b"")]
    assert modules[2] == ("cuda", _cuda_module(b"fatbin", FATBIN_MAGIC + b"code"))
    assert cuda_blob.cuda_module_parts(modules[2][1]).kernels == ["k"]
    assert cuda_blob.embed_fatbins(out, lambda source: pytest.fail("compiled twice")) == out


def test_a_blob_in_another_format_is_refused():
    blob = _blob((b"cuda", _cuda_module(b"cuda", b"x") + b"trailing"))
    with pytest.raises(BnnccError, match="left after its code"):
        cuda_blob.embed_fatbins(blob, lambda source: b"")
    with pytest.raises(BnnccError, match="not TVM 0.27's format"):
        cuda_blob.blob_modules(blob + b"\0")


def _compile_tiny(tmp_path, cli, arch: str, monkeypatch, model=None):
    """``model`` (default: test_lower's tiny_pokebnn) compiled for CUDA ``arch``: the library folder."""
    import onnx_ir as ir

    from test_lower import tiny_pokebnn

    monkeypatch.setenv(cuda.ARCH_ENV, arch)
    ir.save(model or tiny_pokebnn(), tmp_path / "tiny.onnx")
    code, out, err = cli("compile", tmp_path / "tiny.onnx", "--target", "cuda", "-o", tmp_path / arch)
    assert code == 0, err
    return tmp_path / arch


@needs_nvcc
def test_compile_pokebnn_for_cuda_puts_the_device_code_in_model_so(tmp_path, cli, monkeypatch):
    """One library: model.so holds the VM (replaying CUDA graphs), the host code and nvcc's fatbin;
    nothing beside it but the manifest and the reference graph."""
    folder = _compile_tiny(tmp_path, cli, "sm_90", monkeypatch)
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx", "model.so"]
    manifest = json.loads((folder / "model.json").read_text())
    assert manifest["target"]["name"] == "cuda" and manifest["functions"] == {"1": "batch_1"}
    modules = dict(cuda_blob.library_modules(folder / "model.so"))
    assert set(modules) == {"relax.VMExecutable", "_lib", "cuda"}
    module = cuda_blob.cuda_module_parts(modules["cuda"])
    assert module.fmt == "fatbin" and module.code[:4] == FATBIN_MAGIC
    assert manifest["cuda"] == {"arch": "sm_90", "cuda_graphs": True, "tensor_cores": False,
                                "device_code": "fatbin in model.so"}
    assert b"vm.builtin.cuda_graph.run_or_capture" in modules["relax.VMExecutable"]


@pytest.mark.parametrize("arch", ["90", "sm90", "compute_90"])
def test_an_arch_that_is_no_sm_name_is_refused_before_any_work(tmp_path, cli, monkeypatch, arch):
    """BNNCC_CUDA_ARCH=90 failed in TVM after the lowering, as an unexpected ValueError, exit 1."""
    import onnx_ir as ir

    from test_lower import tiny_pokebnn

    monkeypatch.setenv(cuda.ARCH_ENV, arch)
    ir.save(tiny_pokebnn(), tmp_path / "tiny.onnx")
    code, _, err = cli("compile", tmp_path / "tiny.onnx", "--target", "cuda", "-o", tmp_path / "lib")
    assert code == 2 and err.strip() == (f"error: BNNCC_CUDA_ARCH='{arch}': expected sm_ and a compute capability, "
                                         f"e.g. sm_90 (H100) or sm_80 (A100)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


@needs_nvcc
def test_an_arch_that_nvcc_cannot_build_for_is_refused_before_any_work(tmp_path, cli, monkeypatch):
    """nvcc refused an arch it lacks (CUDA 13 has no sm_70) only at the end of the build, after the
    lowering (in convert after the fine-tune); compile and convert now ask it first."""
    import onnx_ir as ir

    from bnncc.targets import registry
    from test_lower import tiny_pokebnn

    monkeypatch.setenv(cuda.ARCH_ENV, "sm_90a")  # a variant of a listed arch (nvcc lists sm_90 only)
    registry.get("cuda", build=True)
    monkeypatch.setenv(cuda.ARCH_ENV, "sm_10")  # no toolkit of this century builds for it
    ir.save(tiny_pokebnn(), tmp_path / "tiny.onnx")
    code, _, err = cli("compile", tmp_path / "tiny.onnx", "--target", "cuda", "-o", tmp_path / "lib")
    codes = subprocess.run([cuda.find_nvcc(), "--list-gpu-code"], capture_output=True, text=True).stdout.split()
    assert code == 2 and err.strip() == (f"error: {cuda.find_nvcc()} cannot build for sm_10 (BNNCC_CUDA_ARCH); "
                                         f"it builds for {', '.join(codes)}: set BNNCC_CUDA_ARCH to one of those, "
                                         f"or use a CUDA toolkit that has sm_10")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


@needs_nvcc
def test_cuda_graphs_can_be_left_out(tmp_path, cli, monkeypatch):
    monkeypatch.setenv(cuda.GRAPHS_ENV, "0")
    folder = _compile_tiny(tmp_path, cli, "sm_90", monkeypatch)
    assert json.loads((folder / "model.json").read_text())["cuda"]["cuda_graphs"] is False
    assert b"cuda_graph" not in dict(cuda_blob.library_modules(folder / "model.so"))["relax.VMExecutable"]


def _kernels(sass: str) -> dict[str, str]:
    """Kernel name -> its SASS, from ``cuobjdump -sass`` output."""
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    return dict(zip(parts[1::2], parts[2::2]))


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_device_code_is_machine_code_for_the_arch(tmp_path, cli, monkeypatch, arch):
    """cuobjdump -sass of the embedded fatbin: machine code for ``arch``, every kernel of the function
    table in it, one binary conv kernel (POPC in its SASS) per PokeConv of the tiny network (6)."""
    folder = _compile_tiny(tmp_path, cli, arch, monkeypatch)
    module = cuda_blob.cuda_module_parts(dict(cuda_blob.library_modules(folder / "model.so"))["cuda"])
    sass = cuda.sass(module.code)
    assert f"arch = {arch}" in sass
    kernels = _kernels(sass)
    assert set(kernels) == set(module.kernels)
    convs = {name for name in kernels if name.startswith("poke_conv_") and "POPC" in kernels[name]}
    assert len({re.match(r"poke_conv_\d+", name).group() for name in convs}) == 6


@needs_nvcc
@needs_cuobjdump
def test_poke_convs_without_se_gate_compile_for_cuda(tmp_path, cli, monkeypatch):
    """test_lower's tiny_basic_block_ungated through the same CUDA rules: a binary conv kernel (POPC)
    per PokeConv (3), and SE gate kernels only for the one gated conv."""
    from test_lower import tiny_basic_block_ungated

    folder = _compile_tiny(tmp_path, cli, "sm_90", monkeypatch, tiny_basic_block_ungated())
    module = cuda_blob.cuda_module_parts(dict(cuda_blob.library_modules(folder / "model.so"))["cuda"])
    kernels = _kernels(cuda.sass(module.code))
    convs = {name for name in kernels if name.startswith("poke_conv_") and "POPC" in kernels[name]}
    assert len({re.match(r"poke_conv_\d+", name).group() for name in convs}) == 3
    assert len({re.match(r"se_gate_\d+", name).group() for name in kernels if name.startswith("se_gate_")}) == 1


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tensor_core_convs_are_1bit_mma_for_the_arch(tmp_path, cli, monkeypatch, arch):
    """With BNNCC_CUDA_MMA=1 each PokeConv's popcount stage is a kernel of its own on the tensor cores:
    cuobjdump -sass shows BMMA ... AND.POPC in exactly one kernel per PokeConv of the tiny network (6)
    and no other PokeConv kernel counting bits on the CUDA cores; model.json says so."""
    monkeypatch.setenv(cuda.MMA_ENV, "1")
    folder = _compile_tiny(tmp_path, cli, arch, monkeypatch)
    assert json.loads((folder / "model.json").read_text())["cuda"]["tensor_cores"] is True
    module = cuda_blob.cuda_module_parts(dict(cuda_blob.library_modules(folder / "model.so"))["cuda"])
    kernels = _kernels(cuda.sass(module.code))
    assert set(kernels) == set(module.kernels)
    mma = sorted(name for name, code in kernels.items() if "BMMA.168256.AND.POPC" in code)
    assert len(mma) == 6 and all(re.fullmatch(r"poke_conv_\d+_kernel", name) for name in mma), mma
    assert not [name for name, code in kernels.items() if name.startswith("poke_conv_") and name not in mma
                and "POPC" in code]


def test_tensor_core_popcount_keeps_everything_after_p():
    """The rewritten PrimFunc: same parameters, one opaque tensor-core block instead of pad and
    popcount, the integer result and epilogue blocks as they were; the call gets the conv's geometry."""
    func = binary_conv.binary_conv2d_func(2, 7, 7, 64, 24, 3, 2)
    rewritten = cuda_mma.tensor_core_popcount(func)
    assert [str(p) for p in rewritten.params] == [str(p) for p in func.params]
    text = rewritten.script()
    assert 'T.sblock("tensor_core_popcount")' in text and 'T.sblock("popcount")' not in text and 'T.sblock("pad")' not in text
    # n, h, w, words, cout, k, stride, pad top, pad left (SAME: 0 before, 1 after), ho, wo
    assert 'bnncc_bmma_conv", x.data, weights.data, popcount.data, 2, 7, 7, 2, 24, 3, 2, 1, 1, 4, 4)' in text
    assert 'T.sblock("binary_conv2d")' in text
    assert cuda_mma.tensor_core_popcount(bitpack.sign_bitpack_func(1, 2, 2, 40)) is None


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_b1_peak_probe_uses_the_1bit_and_popc_mma(tmp_path, arch):
    """The GPU bench's peak probe (bench/gpu_b1_peak.cu) assembles to BMMA ... AND.POPC for ``arch``."""
    import subprocess

    probe = Path(__file__).resolve().parents[2] / "bench" / "gpu_b1_peak.cu"
    subprocess.run([cuda.find_nvcc(), "-cubin", f"-arch={arch}", "-o", str(tmp_path / "p.cubin"), str(probe)], check=True)
    assert "BMMA.168256.AND.POPC" in cuda.sass((tmp_path / "p.cubin").read_bytes())


@needs_nvcc
@pytest.mark.skipif(cuda.has_cuda_device(), reason="checks the message on a machine without a GPU")
def test_a_cuda_library_without_a_gpu_is_one_line(tmp_path, cli, monkeypatch):
    folder = _compile_tiny(tmp_path, cli, "sm_90", monkeypatch)
    code, out, err = cli("verify", folder)
    # no driver (this machine): said as such; a driver without a GPU: CUDA's own words
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "a cuda library needs an NVIDIA GPU and its driver" in err or "CUDA" in err, err


@needs_nvcc
@needs_device
@pytest.mark.parametrize("network", ["tiny_pokebnn", "tiny_basic_block_ungated"])
def test_pokebnn_on_cuda_agrees_with_onnxruntime(tmp_path, network):
    """A bottleneck network, and basic blocks with PokeConvs without SE gate."""
    import test_lower
    from bnncc.targets.build import compile
    from bnncc.verification import verify

    folder = compile(getattr(test_lower, network)(), tmp_path / network, target="cuda", batches=(1, 8))
    report = verify(folder, n=16, batch=8)
    assert report.ok, report.failures


@needs_nvcc
@needs_device
def test_sample_module_on_cuda_is_exact(tmp_path):
    mod, expect = sample.build(cuda.cuda_target(), cuda.schedule)
    library = cuda.export_cuda(compile_module(mod, cuda.cuda_target()), tmp_path / "sample.so")
    x = np.random.default_rng(7).standard_normal((sample.ROWS, 16)).astype(np.float32)
    np.testing.assert_array_equal(cuda.load_vm(library)(sample.FUNCTION, x), expect(x))


@needs_nvcc
def test_tensor_core_conv_indexing_agrees_with_the_host_emulated(tmp_path):
    """bench/gpu_bconv.cu (the tensor-core binary conv on its own) run on the host: its fragment
    indexing, the AND-to-XOR rebuild and the SAME padding against a direct popcount of x ^ w, for
    the ResNet-50 layer kinds it times on the GPU (its mma emulated by the fragment layout that
    bench/gpu_b1_peak.cu checks on the device)."""
    import subprocess

    source = Path(__file__).resolve().parents[2] / "bench" / "gpu_bconv.cu"
    subprocess.run([cuda.find_nvcc(), "-O1", "-arch=sm_90", "-o", str(tmp_path / "bconv"), str(source)], check=True)
    lines = subprocess.run([str(tmp_path / "bconv"), "--emulate"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == 6 and all(" check ok (0 of " in line for line in lines), lines


# A libcuda.so.1 with no driver behind it: every entry point that TVM's CUDA runtime links against
# answers CUDA_ERROR_NO_DEVICE (100), so that the runtime loads on a machine without a GPU.
_STUB_DRIVER = """
#define STUB(name) int name(void) { return 100; }
STUB(cuDeviceGetName) STUB(cuFuncSetAttribute) STUB(cuGetErrorName) STUB(cuGetErrorString) STUB(cuLaunchKernelEx)
STUB(cuModuleGetFunction) STUB(cuModuleLoadData) STUB(cuModuleUnload) STUB(cuTensorMapEncodeTiled)
"""

_LOAD_WITH_RUNTIME_ALONE = """
import ctypes, json, sys
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
import tvm_ffi
from bnncc.targets import cuda_runtime
cuda_runtime.load_runtime()
module = tvm_ffi.load_module(sys.argv[2])
module["vm_load_executable"]()
device_code = module.imports[0].imports[0]
kernels = json.loads(sys.argv[3])
print(json.dumps({"kinds": [module.kind, module.imports[0].kind, device_code.kind], "tvm": "tvm" in sys.modules,
                  "found": [k for k in kernels if device_code.implements_function(k)],
                  "made_up": device_code.implements_function("no_such_kernel"),
                  "device": cuda_runtime.cuda_device_exists()}))
"""


@needs_nvcc
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (for a stub CUDA driver)")
@pytest.mark.skipif(cuda.has_cuda_device(), reason="checks the load without a GPU")
def test_library_loads_with_tvm_runtime_alone(tmp_path, cli, monkeypatch):
    """In a process that never imports tvm (no compiler): TVM's runtime libraries load model.so, its
    VM and its CUDA module, which holds every kernel of the function table (the fatbin swap kept
    TVM's format), over a stub driver; the runtime then reports no device."""
    import subprocess
    import sys

    monkeypatch.setenv(cuda.MMA_ENV, "1")
    folder = _compile_tiny(tmp_path, cli, "sm_90", monkeypatch)
    kernels = cuda_blob.cuda_module_parts(dict(cuda_blob.library_modules(folder / "model.so"))["cuda"]).kernels
    (tmp_path / "stub.c").write_text(_STUB_DRIVER)
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp_path / "libcuda.so.1"),
                    str(tmp_path / "stub.c")], check=True)
    done = subprocess.run([sys.executable, "-c", _LOAD_WITH_RUNTIME_ALONE, str(tmp_path / "libcuda.so.1"),
                           str(folder / "model.so"), json.dumps(kernels)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert loaded == {"kinds": ["relax.VMExecutable", "library", "cuda"], "tvm": False, "found": kernels,
                      "made_up": False, "device": False}


def test_gpu_bench_stage_replaces_an_earlier_stage_only(tmp_path, monkeypatch):
    """bench/gpu_prepare.py removed its --stage folder whatever it held: `--stage ~/results` took the
    user's files. It replaces an earlier stage, and refuses a folder with anything else in it."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    import gpu_prepare  # bench/gpu_prepare.py

    def build_libraries(work, stage, arch):  # the stage cleared: the minutes of building are not needed here
        raise RuntimeError("building")

    monkeypatch.setattr(gpu_prepare, "build_libraries", build_libraries)
    results = tmp_path / "results"
    (results / "lib").mkdir(parents=True)
    (results / "notes.txt").write_text("mine")
    monkeypatch.setattr(sys, "argv", ["gpu_prepare.py", "--stage", str(results)])
    with pytest.raises(SystemExit, match=r"results: holds notes.txt, which no stage holds"):
        gpu_prepare.main()
    assert (results / "notes.txt").read_text() == "mine" and (results / "lib").is_dir()
    (results / "notes.txt").unlink()
    (results / "stage.json").write_text("{}")
    with pytest.raises(RuntimeError, match="building"):
        gpu_prepare.main()
    assert results.is_dir() and not any(results.iterdir())


def test_gpu_bench_stage_may_be_a_link_to_the_stage_folder(tmp_path, monkeypatch):
    """`--stage .gpu` where .gpu is a link to a folder on a larger disk: an earlier stage there ended
    bench/gpu_prepare.py in "OSError: Cannot call rmtree on a symbolic link"."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    import gpu_prepare  # bench/gpu_prepare.py

    def build_libraries(work, stage, arch):  # the stage cleared: the minutes of building are not needed here
        (stage / "stage.json").write_text("{}")
        raise RuntimeError("building")

    monkeypatch.setattr(gpu_prepare, "build_libraries", build_libraries)
    (tmp_path / "disk" / "lib").mkdir(parents=True)
    (tmp_path / "disk" / "lib" / "model.so").write_bytes(b"earlier")
    (tmp_path / "link").symlink_to(tmp_path / "disk")
    monkeypatch.setattr(sys, "argv", ["gpu_prepare.py", "--stage", str(tmp_path / "link")])
    with pytest.raises(RuntimeError, match="building"):
        gpu_prepare.main()
    assert (tmp_path / "link").is_symlink() and [p.name for p in (tmp_path / "link").iterdir()] == ["stage.json"]


def test_gpu_bench_refuses_reference_inputs_of_no_whole_batch(tmp_path, monkeypatch, capsys):
    """bench/gpu_prepare.py -n 8 staged 8 reference inputs, and gpu_run.py's check at batch 64 then had
    none to run ("need at least one array to concatenate" on the GPU machine): refused at once."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    import gpu_prepare  # bench/gpu_prepare.py

    def build_libraries(work, stage, arch):  # (not reached: the minutes of building are not needed here)
        raise RuntimeError("building")

    monkeypatch.setattr(gpu_prepare, "build_libraries", build_libraries)
    monkeypatch.setattr(sys, "argv", ["gpu_prepare.py", "--stage", str(tmp_path / "stage"), "-n", "8"])
    with pytest.raises(SystemExit) as exit_info:
        gpu_prepare.main()
    assert exit_info.value.code == 2
    assert "-n 8: the reference inputs must be a multiple of 64" in capsys.readouterr().err
    assert not (tmp_path / "stage").exists()
