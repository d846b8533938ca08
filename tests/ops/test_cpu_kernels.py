"""The fused CPU training kernels (bnncc/ops/cpu_kernels.c) against the torch compositions they
replace (BNNCC_CPU_KERNELS=0), which the other tests here check against onnxruntime: values and
input gradients bitwise, per-channel parameter sums to float tolerance; batch norm against
torch's in float64."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from bnncc.ops import OPS, cpu_kernels
from bnncc.ops.quant import act_quantize, act_quantize_backward, weight_grid

# Without a C compiler the kernels are not built and the ops run their torch compositions; with
# one, a failed build fails these tests.
pytestmark = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")),
                                reason="no C compiler (gcc): the fused CPU kernels are not built")


def channels_last(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).contiguous(memory_format=torch.channels_last)


def both_paths(monkeypatch, fn):
    """fn() with the kernels, then with the torch composition."""
    assert cpu_kernels.kernels_for(torch.zeros(2, 3)) is not None, "the kernels did not build (gcc?)"
    fused = fn()
    monkeypatch.setenv("BNNCC_CPU_KERNELS", "0")
    composed = fn()
    monkeypatch.delenv("BNNCC_CPU_KERNELS")
    return fused, composed


@pytest.mark.parametrize("shape", [(3, 20, 7, 5), (128, 64, 8, 8)])
def test_dprelu_kernels_match_the_torch_composition(monkeypatch, shape):
    x = channels_last(*shape) if len(shape) == 4 else torch.randn(*shape)
    params = [torch.randn(shape[1], generator=torch.Generator().manual_seed(i)) for i in range(1, 5)]
    x[(0, slice(0, 3)) + (0,) * (x.dim() - 2)] = params[0][:3]  # t == 0 exactly: the slope switches there
    grad = torch.randn_like(x)

    def run():
        xs = x.clone().requires_grad_()
        ps = [p.clone().requires_grad_() for p in params]
        y = OPS["DPReLU"].torch(xs, *ps)
        y.backward(grad)
        return y.detach(), xs.grad, [p.grad for p in ps]

    (y, dx, dps), (y_ref, dx_ref, dps_ref) = both_paths(monkeypatch, run)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    for got, want in zip(dps, dps_ref):  # sums of N*H*W terms, added up in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("signed, relu", [(1, False), (0, False), (0, True)])
@pytest.mark.parametrize("shape", [(4, 24, 5, 3), (128, 70)])
def test_activation_quantizer_kernels_match_the_torch_composition(monkeypatch, shape, signed, relu):
    bound = torch.rand(shape[1], generator=torch.Generator().manual_seed(1)) * 2 + 0.1
    bound[::5] = -1.0  # uncalibrated channels pass through
    x = channels_last(*shape, scale=2.0) if len(shape) == 4 else torch.randn(*shape) * 2
    # values on the grid's edges: exact half levels (the floor's tie) and the clip bounds
    x[(slice(0, 4), 1) + (0,) * (x.dim() - 2)] = torch.tensor([0.5, -0.5, 1.0, -1.0]) * bound[1] / 7
    grad = torch.randn_like(x)

    def run():
        q = act_quantize(x, bound, 4, signed, relu)
        return q, act_quantize_backward(grad, x, bound, 4, signed, relu)

    (q, dx), (q_ref, dx_ref) = both_paths(monkeypatch, run)
    assert torch.equal(q, q_ref)
    assert torch.equal(dx, dx_ref)
    assert 0 < int((dx == 0).sum()) < dx.numel()  # both clipped and passed elements were tested


@pytest.mark.parametrize("shape, layout", [((64, 512, 1, 1), torch.contiguous_format),
                                           ((32, 16, 3, 3), torch.channels_last), ((10, 7), torch.contiguous_format)])
def test_weight_quantizer_kernel_matches_the_torch_composition(monkeypatch, shape, layout):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=layout)
    w[1] = 0.0  # an all-zero output channel: scale 1, all levels 0
    q, q_ref = both_paths(monkeypatch, lambda: weight_grid(w, 4))
    assert torch.equal(q, q_ref) and q.stride() == w.stride()


def test_kernels_run_only_where_their_layout_holds(monkeypatch):
    assert cpu_kernels.kernels_for(channels_last(2, 8, 3, 3)) is not None
    assert cpu_kernels.kernels_for(torch.randn(2, 8, 3, 3)) is None  # NCHW: channels not innermost
    assert cpu_kernels.kernels_for(torch.randn(2, 8, dtype=torch.float64)) is None
    assert cpu_kernels.weight_kernels_for(torch.randn(8, 4, 3, 3)) is not None
    assert cpu_kernels.weight_kernels_for(torch.randn(4, 8).t()) is None  # rows not dense
    monkeypatch.setenv("BNNCC_CPU_KERNELS", "0")
    assert cpu_kernels.kernels_for(torch.randn(2, 8)) is None


def test_binarize_kernels_match_the_torch_composition(monkeypatch):
    from bnncc.ops.binarize import binarize_weights

    x = channels_last(16, 24, 6, 6, scale=3.0)
    x[0, :6, 0, 0] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.5, -2.5])  # zeros give +B/2; |x| = B clips
    grad = channels_last(16, 24, 6, 6, seed=1)
    w = torch.randn(24, 24, 3, 3, generator=torch.Generator().manual_seed(2))
    w[0, 0, 0, :2] = torch.tensor([0.0, -0.0])

    def run():
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = OPS["BinarizeAct"].torch(xs, 2.5)
        y.backward(grad)
        wb = binarize_weights(ws)
        wb.backward(torch.ones_like(wb))
        return y.detach(), xs.grad, wb.detach(), ws.grad

    (y, dx, wb, dw), (y_ref, dx_ref, wb_ref, dw_ref) = both_paths(monkeypatch, run)
    assert torch.equal(y, y_ref) and y.stride() == x.stride()
    assert set(y.unique().tolist()) == {-1.25, 1.25}
    assert torch.equal(dx, dx_ref) and 0 < int((dx == 0).sum()) < dx.numel()
    assert dx[0, 4, 0, 0] == 0 and dx[0, 5, 0, 0] == 0  # the clip bound itself passes no gradient
    assert torch.equal(wb, wb_ref) and torch.equal(dw, dw_ref)
    assert wb[0, 0, 0, 0] > 0 and wb[0, 0, 0, 1] > 0


@pytest.mark.parametrize("shape", [(128, 64, 8, 8), (6, 5, 3, 3), (128, 40)])
def test_batch_norm_kernels_match_float64_batch_norm(shape):
    """Against torch's batch norm in float64 (torch's float32 one is further off on the channel
    with a large mean: at the first shape 1e-3 relative on its gamma gradient, ours 6e-7)."""
    from bnncc.ops.batch_norm import batch_norm_train

    x = channels_last(*shape, seed=3) if len(shape) == 4 else torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    x[:, 1] += 1000.0  # a mean far above the spread: the variance must not cancel
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    grad = grad.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else grad
    assert cpu_kernels.kernels_for(x) is not None

    def run(train, dtype):
        c = shape[1]
        xs = x.to(dtype).clone().requires_grad_()
        gamma = torch.linspace(0.5, 1.5, c, dtype=dtype).requires_grad_()
        beta = torch.linspace(-1, 1, c, dtype=dtype).requires_grad_()
        running_mean, running_var = torch.full((c,), 0.5, dtype=dtype), torch.full((c,), 2.0, dtype=dtype)
        y = train(xs, running_mean, running_var, gamma, beta, 0.1, 1e-5)
        y.backward(grad.to(dtype))
        return [t.double() for t in (y.detach(), xs.grad, gamma.grad, beta.grad, running_mean, running_var)]

    def torch_train(x, running_mean, running_var, gamma, beta, momentum, eps):
        return torch.nn.functional.batch_norm(x, running_mean, running_var, gamma, beta, True, momentum, eps)

    # 1e-4: a float32 mean near 1000 is itself 3e-5 off
    for ours, exact in zip(run(batch_norm_train, torch.float32), run(torch_train, torch.float64)):
        torch.testing.assert_close(ours, exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))


@pytest.mark.parametrize("ci, co, method", [(64, 16, "tile"), (24, 10, "tile"), (16, 64, "tile"), (12, 40, "tile")])
def test_reshape_add_channel_kernels_match_the_torch_composition(monkeypatch, ci, co, method):
    """Group mean (Ci > Co, with dropped channels when Co does not divide Ci) and tile (Ci < Co,
    with a partial last block): the same adds in the same order, so the same bits."""
    from bnncc.ops.reshape_add import match_channels

    r = channels_last(8, ci, 5, 3)
    grad = channels_last(8, co, 5, 3, seed=1)

    def run():
        rs = r.clone().requires_grad_()
        out = match_channels(rs, co, method)
        out.backward(grad)
        return out.detach(), rs.grad

    (out, dr), (out_ref, dr_ref) = both_paths(monkeypatch, run)
    assert torch.equal(out, out_ref) and torch.equal(dr, dr_ref)
    assert out.is_contiguous(memory_format=torch.channels_last) and dr.stride() == r.stride()


def test_gated_dprelu_with_shortcuts_matches_the_torch_composition(monkeypatch):
    """A PokeConv's block in evaluation: x + local shortcut (group mean) + block shortcut (tile),
    DPReLU, SE gate; its batch norm the identity (running mean 0, variance 1, epsilon 0)."""
    from bnncc.ops.dprelu import normed_gated_dprelu

    x, local, block = channels_last(8, 16, 4, 4), channels_last(8, 32, 4, 4, seed=1), channels_last(8, 8, 4, 4, seed=2)
    params = [torch.randn(16, generator=torch.Generator().manual_seed(i)) for i in range(3, 7)]
    gate = torch.rand(8, 16, generator=torch.Generator().manual_seed(7))[:, :, None, None]
    grad = channels_last(8, 16, 4, 4, seed=8)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, local, block, gate, *params)]
        xs, ls, bs, gs, *ps = leaves
        identity = (torch.ones(16), torch.zeros(16), torch.zeros(16), torch.ones(16))
        y = normed_gated_dprelu(xs, *identity, *ps, gs, ls, bs, methods=("tile", "tile"), momentum=0.1, eps=0.0,
                                training=False)
        y.backward(grad)
        return y.detach(), [t.grad for t in leaves]

    (y, grads), (y_ref, grads_ref) = both_paths(monkeypatch, run)
    assert torch.equal(y, y_ref)
    for got, want in zip(grads[:3], grads_ref[:3]):  # x and both shortcuts: elementwise, bitwise
        assert torch.equal(got, want)
    for got, want in zip(grads[3:], grads_ref[3:]):  # the gate's and the parameters' sums
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_se_gate_squeeze_kernel_is_the_float64_mean_rounded_once(monkeypatch):
    r = channels_last(16, 40, 7, 7, seed=9, scale=3.0)
    r[:, 3] += 100.0  # float32 sums of 49 values near 100 lose bits; double ones do not
    bound = torch.rand(40, generator=torch.Generator().manual_seed(10)) + 0.5
    bound[::7] = -1.0
    lib = cpu_kernels.kernels_for(r)
    assert lib is not None
    m, q = cpu_kernels.mean_quantize_acts(lib, r, bound, 4, signed=1)
    expected = r.double().mean(dim=(2, 3)).float()
    torch.testing.assert_close(m, expected, rtol=1.2e-7, atol=0)  # within one rounding
    assert torch.equal(q, act_quantize(m, bound, 4, 1))


def test_se_gate_kernels_match_the_torch_composition(monkeypatch):
    ci, co = 64, 48
    g = torch.Generator().manual_seed(11)
    r = channels_last(32, ci, 4, 4, seed=12)
    weights = [torch.randn(ci // 8, ci, 1, 1, generator=g), torch.randn(ci // 8, generator=g),
               torch.randn(co, ci // 8, 1, 1, generator=g), torch.randn(co, generator=g)]
    bound1, bound2 = torch.rand(ci, generator=g) + 0.2, torch.full((ci // 8,), 6.0)
    bound1[3] = -1.0  # an uncalibrated channel passes through
    grad = torch.randn(32, co, 1, 1, generator=g)

    def run():
        leaves = [t.clone().requires_grad_() for t in (r, *weights)]
        rs, w1, b1, w2, b2 = leaves
        y = OPS["SEGate"].torch(rs, w1, bound1, b1, w2, bound2, b2, w_bits=4, a_bits=4)
        y.backward(grad)
        return y.detach(), [t.grad for t in leaves]

    (y, grads), (y_ref, grads_ref) = both_paths(monkeypatch, run)
    # the kernel's mean rounds once where torch's float32 mean may round at each add: values and
    # gradients agree to float tolerance as long as no quantization level flips (none does here)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, grads_ref):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_batch_norm_folded_into_the_gated_dprelu_matches_the_torch_composition(monkeypatch):
    """A PokeConv's conv output through its batch norm, shortcut adds, DPReLU and SE gate, as the
    torch view runs them in training: one autograd node against F.batch_norm and the ops."""
    from bnncc.ops.dprelu import normed_gated_dprelu

    x, local = channels_last(8, 16, 4, 4, scale=3.0), channels_last(8, 32, 4, 4, seed=1)
    x[:, 2] += 50.0  # a channel whose mean is far from 0
    norm = [torch.rand(16, generator=torch.Generator().manual_seed(2)) + 0.5, torch.randn(16)]
    params = [torch.randn(16, generator=torch.Generator().manual_seed(i)) for i in range(3, 7)]
    gate = torch.rand(8, 16, generator=torch.Generator().manual_seed(7))[:, :, None, None]
    grad = channels_last(8, 16, 4, 4, seed=8)

    def run():
        running = [torch.zeros(16), torch.ones(16)]
        leaves = [t.clone().requires_grad_() for t in (x, local, gate, *norm, *params)]
        xs, ls, gs, gamma, beta, *ps = leaves
        y = normed_gated_dprelu(xs, gamma, beta, *running, *ps, gs, ls, methods=("tile",), momentum=0.1, eps=1e-5,
                                training=True)
        y.backward(grad)
        return y.detach(), [t.grad for t in leaves], running

    (y, grads, running), (y_ref, grads_ref, running_ref) = both_paths(monkeypatch, run)
    # batch statistics in double here, float32 in torch's batch norm
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    for got, want in zip(running, running_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_failed_build_caches_nothing_and_training_falls_back(tmp_path, monkeypatch, caplog):
    """A compiler that fails leaves no library in the cache (a later run would load an empty file),
    and one that cannot be run is a warning, like no compiler at all."""
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake && exit 0\necho 'cc: error' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("BNNCC_CACHE", str(tmp_path / "cache"))
    for compiler in (failing, tmp_path / "missing-cc"):
        monkeypatch.setenv("CC", str(compiler))
        cpu_kernels._library.cache_clear()
        try:
            assert cpu_kernels._library() is None
        finally:
            cpu_kernels._library.cache_clear()
    assert not list((tmp_path / "cache").rglob("*.so")), "a failed build left a library in the cache"
    assert "failed" in caplog.text and "missing-cc" in caplog.text


def _cache_a_file(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("BNNCC_CACHE", str(tmp_path / "cache"))


def _no_home(tmp_path, monkeypatch):
    monkeypatch.delenv("BNNCC_CACHE", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))


@pytest.mark.parametrize("make_cache, said", [(_cache_a_file, "cannot write there"), (_no_home, "HOME is unset")])
def test_a_cache_folder_that_cannot_be_had_is_a_warning_and_training_falls_back(tmp_path, monkeypatch, caplog,
                                                                                 make_cache, said):
    """A full or read-only cache folder (a CI container's home) ended `bnncc finetune` with
    "libbnncc_cpu-*.so: cannot write there" at its first step, and so did no home folder at all (HOME unset,
    no passwd entry: a container run as another user), where no compiler at all is a warning."""
    make_cache(tmp_path, monkeypatch)
    monkeypatch.setenv("CC", shutil.which("true"))  # (any compiler: the cache fails before it runs)
    cpu_kernels._library.cache_clear()
    try:
        assert cpu_kernels._library() is None
    finally:
        cpu_kernels._library.cache_clear()
    assert said in caplog.text and "torch compositions" in caplog.text


def test_a_damaged_library_in_the_cache_is_built_again(tmp_path, monkeypatch):
    """A kernel library cut short in the cache ended training with "OSError: ...: file too short"."""
    built = Path(cpu_kernels._library()._name)  # (its name is the key: this source, compiler and CPU)
    monkeypatch.setenv("BNNCC_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "cpu-kernels").mkdir(parents=True)
    (tmp_path / "cache" / "cpu-kernels" / built.name).write_bytes(built.read_bytes()[:3000])
    cpu_kernels._library.cache_clear()
    try:
        x = channels_last(4, 8, 3, 3)
        y, y_ref = both_paths(monkeypatch, lambda: OPS["BinarizeAct"].torch(x, 2.0))
        assert torch.equal(y, y_ref)
    finally:
        cpu_kernels._library.cache_clear()


def test_a_compiler_that_fails_on_the_kernels_is_one_log_line(monkeypatch, tmp_path, caplog):
    """The compiler's several lines of errors were logged as they were, below the warning."""
    from bnncc.ops import cpu_kernels

    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'k.c:1: error: one' >&2\n"
                        "echo 'k.c:2: error: two' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("BNNCC_CACHE", str(tmp_path / "cache"))
    cpu_kernels._library.cache_clear()
    try:
        assert cpu_kernels._library() is None
    finally:
        cpu_kernels._library.cache_clear()
    [record] = [r for r in caplog.records if "failed" in r.getMessage()]
    assert record.getMessage().endswith("torch compositions: k.c:1: error: one k.c:2: error: two"), record.getMessage()
