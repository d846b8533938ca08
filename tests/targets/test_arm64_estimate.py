"""The llvm-mca estimator (bnncc.targets.estimate) on a tiny arm64 binary conv library: hot loop,
trip count against hand-computed values, and cycles from llvm-mca."""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
import pytest
import tvm

from bnncc import report
from bnncc.domain import DOMAIN
from bnncc.errors import BnnccError
from bnncc.targets import arm64, estimate
from bnncc.targets import tvm_compat as tc
from bnncc.targets.kernels import binary_conv as bc

pytestmark = pytest.mark.skipif(not estimate.available() or shutil.which(arm64.CROSS_CXX) is None,
                                reason="needs llvm-19 and g++-aarch64-linux-gnu (apt)")


@pytest.fixture(scope="module")
def conv_library(tmp_path_factory):
    """A 3x3 binary conv, 8x8 px, 64 -> 64 channels, stride 1, as an arm64 library (symbol ``main``)."""
    func = bc.binary_conv2d_func(1, 8, 8, 64, 64, 3, 1)
    target = arm64.arm64_target(cores=1)
    executable = tc.compile_module(tvm.IRModule({"main": arm64.schedule(func, target)}), target)
    return arm64.export_arm64(executable, tmp_path_factory.mktemp("conv") / "conv.so")


def test_binary_conv_hot_loop_trip_count(conv_library):
    code = estimate.kernel_code(estimate.disassemble(conv_library), "main")  # the PrimFunc's global symbol
    # 8*8 outputs x 64 channels x 9 taps x 2 words of 32 bits
    bits = 8 * 8 * 64 * 9 * 2 * 32
    assert bits == 2_359_296
    loop = estimate.estimate_binary(code, bits, "aarch64", "neoverse-n1")
    # the hot loop popcounts whole 128-bit vectors: cnt v.16b only
    assert loop.work_per_iteration % 128 == 0 and loop.work_per_iteration >= 128
    assert loop.iterations * loop.work_per_iteration == bits
    assert 0 < loop.cycles_per_iteration < 10 * loop.instructions
    # a 3x3 NEON loop does at least one bMAC per cycle and no more than the core's peak (2 cnt.16b / cycle)
    assert bits / (2 * 128) <= loop.hot_cycles < loop.cycles <= bits
    # the NEON register tile is one pixel x 64 channels (arm64.NEON): 64 tiles, each one chunk of all
    # 18 steps (2 words x 9 taps); the loop that holds the whole reduction, the tile loop, runs once a
    # tile, and the task loop around it (a row of one channel tile, shared by the threads) once a row
    assert [level.passes for level in loop.around[-2:]] == [8 * 8, 8]
    assert all(level.passes * level.cycles_per_pass == pytest.approx(level.cycles) for level in loop.around)
    with pytest.raises(BnnccError, match="does not divide"):
        estimate.estimate_binary(code, bits + 32, "aarch64", "cortex-a76")


def test_the_neon_hot_loop_is_one_word_of_64_channels_in_registers(conv_library):
    # LLVM unrolled the 2 words of a 64-channel tap whole: 32 weight vectors a pass beside the 16
    # accumulators spilled to the stack in the hot loop (PokeBNN-1x's 3x3 kernels, stage 1: 62.5 cycles
    # a pass on neoverse-n1 where one word's 16 eor + 16 cnt + 16 add take 24 on its two vector pipes)
    code = estimate.kernel_code(estimate.disassemble(conv_library), "main")
    hot = max(estimate.innermost_loops(code), key=estimate.binary_bits)
    assert estimate.binary_bits(hot) == 64 * 32
    assert [i.mnemonic for i in hot].count("cnt") == 16
    assert not [i for i in hot if re.search(r"\bsp\b", i.operands)]  # no stack access


def test_loops_and_work_by_hand():
    code = [estimate.Instruction(0x10, "ldr", "q0, [x1], #16"),
            estimate.Instruction(0x14, "eor", "v1.16b, v0.16b, v2.16b"),
            estimate.Instruction(0x18, "cnt", "v1.16b, v1.16b"),
            estimate.Instruction(0x1c, "uadalp", "v3.8h, v1.16b"),
            estimate.Instruction(0x20, "subs", "x2, x2, #0x1"),
            estimate.Instruction(0x24, "b.ne", "0x10 <k+0x10>"),
            estimate.Instruction(0x28, "fmla", "v4.4s, v5.4s, v6.4s"),
            estimate.Instruction(0x2c, "fmla", "v7.4s, v5.4s, v6.4s"),
            estimate.Instruction(0x30, "b.ne", "0x28 <k+0x28>"),
            estimate.Instruction(0x34, "b", "0x10 <k+0x10>")]  # an outer loop holding both
    loops = estimate.innermost_loops(code)
    assert [[i.address for i in loop] for loop in loops] == [[0x10, 0x14, 0x18, 0x1c, 0x20, 0x24], [0x28, 0x2c, 0x30]]
    assert [estimate.binary_bits(loop) for loop in loops] == [128, 0]
    assert [estimate.mac_lanes(loop) for loop in loops] == [0, 8]
    # x86: a vpopcntd counts its register's bits, a vpshufb nibble lookup half of them
    x86 = _code(["vpopcntd %zmm1, %zmm2", "vpshufb %zmm3, %zmm4, %zmm5", "vpshufb %ymm3, %ymm4, %ymm5"])
    assert [estimate.binary_bits([i]) for i in x86] == [512, 256, 128]
    assert estimate.trip_count(8 * 8 * 64 * 9 * 64, 2048) == 1152
    loop = estimate.estimate_macs(code, 100, "aarch64", "cortex-a76")
    assert (loop.work_per_iteration, loop.iterations) == (8, 13)  # ceil(100 / 8)


def _code(lines: list[str]) -> list[estimate.Instruction]:
    """Instructions 4 bytes apart from ``"mnemonic operands"`` lines."""
    return [estimate.Instruction(0x100 + 4 * k, *(line.split(" ", 1) + [""])[:2]) for k, line in enumerate(lines)]


@pytest.mark.parametrize("lines, trips", [
    # aarch64: a counter set before the loop, counted down to zero by subs
    (["mov w27, #0x8", "eor v0.16b, v1.16b, v2.16b", "subs x27, x27, #0x1", "b.ne 0x104 <k+0x4>"], 8),
    # aarch64: counted up to a bound by add and cmp (a vector add between them sets no flags)
    (["mov x26, xzr", "add x26, x26, #0x4", "add v0.4s, v0.4s, v1.4s", "cmp x26, #0x20", "b.ne 0x104 <k+0x4>"], 8),
    # x86: a negative offset counted up to zero
    (["movq $-0x20, %rsi", "vpaddd %zmm1, %zmm2, %zmm2", "addq $0x4, %rsi", "jne 0x104 <k+0x4>"], 8),
    # x86: xor to zero, inc, compare with a constant
    (["xorl %r12d, %r12d", "incq %r12", "cmpq $0x3, %r12", "jne 0x104 <k+0x4>"], 3),
    # a bound in a register (a thread's task range): unknown
    (["mov x7, xzr", "add x7, x7, #0x1", "cmp x7, x9", "b.ne 0x104 <k+0x4>"], None),
    # a counter set from memory before the loop: unknown
    (["ldr x7, [sp]", "subs x7, x7, #0x1", "b.ne 0x104 <k+0x4>"], None),
])
def test_loop_trip_count_by_hand(lines, trips):
    code = _code(lines)
    assert estimate.loop_trip_count(code, 1, len(code) - 1) == trips


def test_loops_around_the_hot_loop_by_hand():
    """A tile loop (bound in a register) holding a chunk loop (3 passes) that holds two hot loops of
    4 iterations each and the widening: 2 tiles x 3 chunks x 8 hot iterations."""
    code = _code(["mov x7, xzr",                                          # 0x100; the tile loop from 0x104
                  "mov x8, xzr", "movi v0.2d, #0",                        # 0x104; the chunk loop from 0x108
                  "mov w9, #0x4", "ld1r {v1.4s}, [x0]", "ldr q2, [x1]", "eor v3.16b, v1.16b, v2.16b",  # hot 1 from 0x110
                  "cnt v3.16b, v3.16b", "add v0.4s, v0.4s, v3.4s", "subs x9, x9, #0x1", "b.ne 0x110 <k>",
                  "mov w9, #0x4", "ld1r {v1.4s}, [x0]", "ldr q2, [x1]", "eor v3.16b, v1.16b, v2.16b",  # hot 2 from 0x130
                  "cnt v3.16b, v3.16b", "add v0.4s, v0.4s, v3.4s", "subs x9, x9, #0x1", "b.ne 0x130 <k>",
                  "uaddlp v4.8h, v0.16b", "uadalp v5.4s, v4.8h",           # 0x150 widening
                  "add x8, x8, #0x1", "cmp x8, #0x3", "b.ne 0x108 <k>",
                  "str q5, [x2]", "add x7, x7, #0x1", "cmp x7, x10", "b.ne 0x104 <k>"])
    loop = estimate.estimate_binary(code, 2 * 3 * 8 * 128, "aarch64", "neoverse-n1")
    assert (loop.work_per_iteration, loop.iterations) == (128, 48)
    chunk, tile = loop.around
    # the chunk's own code: movi, the two counter sets, the widening, its counter and branch
    assert (chunk.passes, chunk.instructions) == (6, 8)
    assert (tile.passes, tile.instructions) == (2, 5)  # mov x8, str, its counter and branch
    assert loop.cycles == pytest.approx(loop.hot_cycles + chunk.cycles + tile.cycles)


def _library_folder(conv_library, folder):
    """A library folder as `bnncc compile` writes it, holding the one conv as layer ``conv``."""
    folder.mkdir()
    shutil.copyfile(conv_library, folder / "model.so")
    (folder / "model.json").write_text(json.dumps({"instructions": {"conv": {"kernel": "main"}}}))
    x = ir.Value(name="x", shape=ir.Shape([1, 64, 8, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", shape=ir.Shape([64, 64, 3, 3]), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(np.ones((64, 64, 3, 3), np.float32), name="w"))
    node = ir.Node(DOMAIN, "PokeConv", [x, w], name="conv")
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], name="g")
    ir.save(ir.Model(graph, ir_version=10), folder / "model.onnx")
    return folder


def test_report_of_an_arm64_library(conv_library, tmp_path):
    """report.md and report.json of an arm64 build carry the labelled estimate, the same bytes twice."""
    layers = [SimpleNamespace(name="conv/binary", op_type="BinaryConv", macs=8 * 8 * 64 * 9 * 64)]
    folder = _library_folder(conv_library, tmp_path / "lib")
    figures = estimate.library_estimate(folder, layers)
    (row,) = figures["layers"]
    assert figures["label"] == "estimated, Cortex-A76 at 2.4 GHz by llvm-mca's neoverse-n1 model"
    assert row["iterations"] * row["bits_per_iteration"] == 2_359_296
    assert row["hot_cycles"] == pytest.approx(row["iterations"] * row["cycles_per_iteration"])
    assert figures["binary_cycles"] == row["cycles"] > row["hot_cycles"]  # the loops around the hot loop count
    assert estimate.library_estimate(folder, layers) == figures  # deterministic
    lines = "\n".join(report._estimate_lines(figures))
    assert "(estimated, Cortex-A76 at 2.4 GHz by llvm-mca's neoverse-n1 model)" in lines
    assert "| `conv/binary` | `main` | 2,359,296 |" in lines
    missing = report.arm64_estimate(SimpleNamespace(deployed=SimpleNamespace(cost=SimpleNamespace(layers=layers))),
                                    tmp_path / "nothing")
    assert missing["skipped"].startswith("no estimate:")


def test_host_cpu_is_a_model_llvm_mca_schedules_with():
    """The calibration's model of this CPU: LLVM's own name of it, which llvm-mca accepts (an
    unknown -mcpu would make it fall back to a generic model with a warning)."""
    import platform

    name = estimate.host_cpu()
    assert name and name != "generic"
    if platform.machine() == "x86_64":
        assert estimate.cycles_per_iteration([estimate.Instruction(0, "addq", "$0x1, %rax")], "x86_64", name) > 0


def test_a_file_llvm_objdump_cannot_read_is_one_line_of_its_words(tmp_path):
    """llvm-objdump's failure was shown as a Python list: "failed: ['.../llvm-objdump: error: ...']"."""
    (tmp_path / "model.so").write_text("not a library")
    with pytest.raises(BnnccError) as refused:
        estimate.disassemble(tmp_path / "model.so")
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'model.so'}: llvm-objdump failed: {estimate.LLVM_BIN}/llvm-objdump: error:")
    assert message.endswith("The file was not recognized as a valid object file")
    assert "[" not in message and "\n" not in message


def test_an_llvm_mca_that_names_no_version_skips_the_estimate(conv_library, tmp_path, monkeypatch):
    """library_estimate read LLVM's version from `llvm-mca --version` unchecked: an llvm-mca whose
    output names none (a failed run, another build's banner) ended convert's report with an
    AttributeError, where any other estimator failure is the report's "skipped" note."""
    import subprocess

    layers = [SimpleNamespace(name="conv/binary", op_type="BinaryConv", macs=8 * 8 * 64 * 9 * 64)]
    folder = _library_folder(conv_library, tmp_path / "lib")
    run = subprocess.run

    def banner_without_version(command, *args, **kwargs):
        if command[-1] == "--version":
            return subprocess.CompletedProcess(command, 0, "LLVM (http://llvm.org/)\n", "")
        return run(command, *args, **kwargs)

    monkeypatch.setattr(estimate.subprocess, "run", banner_without_version)
    deployed = SimpleNamespace(deployed=SimpleNamespace(cost=SimpleNamespace(layers=layers)))
    assert report.arm64_estimate(deployed, folder) == {
        "skipped": "no estimate: llvm-mca --version names no version"}
