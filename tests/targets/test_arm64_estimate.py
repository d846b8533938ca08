"""The llvm-mca estimator (bnncc.targets.estimate) on a tiny arm64 binary conv library: hot loop,
trip count against hand-computed values, and cycles from llvm-mca."""

from __future__ import annotations

import shutil

import pytest
import tvm

from bnncc.errors import BnnccError
from bnncc.targets import arm64, estimate
from bnncc.targets import tvm_compat as tc
from bnncc.targets.kernels import binary_conv as bc

pytestmark = pytest.mark.skipif(not estimate.available() or shutil.which(arm64.CROSS_CXX) is None,
                                reason="needs llvm-19 and g++-aarch64-linux-gnu (apt)")


def test_binary_conv_hot_loop_trip_count(tmp_path):
    # 3x3 binary conv, 8x8 px, 64 -> 64 channels, stride 1: 8*8 outputs x 64 channels x 9 taps x 2 words
    func = bc.binary_conv2d_func(1, 8, 8, 64, 64, 3, 1)
    target = arm64.arm64_target(cores=1)
    executable = tc.compile_module(tvm.IRModule({"main": arm64.schedule(func, target)}), target)
    library = arm64.export_arm64(executable, tmp_path / "conv.so")
    code = estimate.kernel_code(estimate.disassemble(library), "main")  # the PrimFunc's global symbol
    bits = 8 * 8 * 64 * 9 * 2 * 32
    assert bits == 2_359_296
    loop = estimate.estimate_binary(code, bits, "aarch64", "cortex-a76")
    # the hot loop popcounts whole 128-bit vectors: cnt v.16b only
    assert loop.work_per_iteration % 128 == 0 and loop.work_per_iteration >= 128
    assert loop.iterations * loop.work_per_iteration == bits
    assert 0 < loop.cycles_per_iteration < 10 * loop.instructions
    # a 3x3 NEON loop does at least one bMAC per cycle and no more than the core's peak (2 cnt.16b / cycle)
    assert bits / (2 * 128) <= loop.cycles <= bits
    with pytest.raises(BnnccError, match="does not divide"):
        estimate.estimate_binary(code, bits + 32, "aarch64", "cortex-a76")


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
    assert estimate.trip_count(8 * 8 * 64 * 9 * 64, 2048) == 1152
    loop = estimate.estimate_macs(code, 100, "aarch64", "cortex-a76")
    assert (loop.work_per_iteration, loop.iterations) == (8, 13)  # ceil(100 / 8)
