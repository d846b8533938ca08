"""The torch view of ONNX graphs, checked against onnxruntime and hand-computed values."""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torchvision.models.resnet import Bottleneck, ResNet

from bnncc.errors import BnnccError
from bnncc.torchview import to_torch, write_back
from tiny_poke import bnncc_model, tiny_poke_model


def _ort_run(model: ir.Model, *inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs)))[0]


def _assert_close_to_reference(ours: np.ndarray, ref: np.ndarray) -> None:
    """Same argmax per row, and max |ours - ref| within 1e-4 of the reference logit range."""
    assert (ours.argmax(1) == ref.argmax(1)).all()
    assert np.abs(ours - ref).max() <= 1e-4 * np.ptp(ref)


@pytest.fixture(scope="module")
def float_resnet(tmp_path_factory) -> ir.Model:
    """A narrow bottleneck ResNet (one block per stage), exported the classic way (BN folded)."""
    torch.manual_seed(0)
    net = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16).eval()
    path = tmp_path_factory.mktemp("float") / "resnet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, torch.randn(1, 3, 64, 64), str(path), dynamo=False,
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}})
    return ir.load(path)


def test_float_resnet_matches_onnxruntime(float_resnet):
    module = to_torch(float_resnet).eval()
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = module(x).numpy()
    _assert_close_to_reference(ours, _ort_run(float_resnet, x.numpy()))


def test_float_resnet_batch_dimension_is_free(float_resnet):
    module = to_torch(float_resnet).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = module(x)
        single = module(x[1:2])
    assert whole.shape == (3, 10)
    torch.testing.assert_close(single[0], whole[1], rtol=1e-5, atol=1e-5)


def test_float_resnet_gradients_reach_every_parameter(float_resnet):
    module = to_torch(float_resnet)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    module(x).logsumexp(1).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # every float initializer of the float graph is a parameter
    assert len(list(module.parameters())) == len(float_resnet.graph.initializers)


def test_parameter_names_are_sanitised_and_map_back(float_resnet):
    module = to_torch(float_resnet)
    assert module.initializer_names["fc_weight"] == "fc.weight"
    for attr, name in module.initializer_names.items():
        assert attr.isidentifier() and name in float_resnet.graph.initializers
    # stable: a second conversion gives the same names
    assert to_torch(float_resnet).initializer_names == module.initializer_names


def test_float_write_back_round_trip(float_resnet):
    model = ir.from_proto(ir.to_proto(float_resnet))
    module = to_torch(model)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module(x).logsumexp(1).sum().backward()
    optimizer.step()
    assert not torch.equal(before["fc_weight"], module.fc_weight)

    write_back(module, model)
    module.eval()
    with torch.no_grad():
        ours = module(x).numpy()
    ref = _ort_run(model, x.numpy())
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.ptp(ref))
    # the model holds a copy: training further does not change it
    with torch.no_grad():
        module.fc_weight.add_(1.0)
    assert not np.allclose(model.graph.initializers["fc.weight"].const_value.numpy(), module.fc_weight.detach().numpy())


def test_write_back_takes_the_module_torch_compile_wraps(float_resnet):
    """torch.compile's wrapper names the parameters "_orig_mod.<name>": write_back failed with a KeyError."""
    model = ir.from_proto(ir.to_proto(float_resnet))
    module = to_torch(model).eval()
    with torch.no_grad():
        module.fc_weight.mul_(-2.0)
    write_back(torch.compile(module), model)  # the wrapper only: nothing is compiled before it runs
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = module(x).numpy()
    ref = _ort_run(model, x.numpy())
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.ptp(ref))


def _bn_model(eps: float = 1e-3) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """Conv(3x3, pads 0,0,1,1) -> BatchNormalization -> Relu -> MaxPool -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)
    init = {
        "w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "b": rng.normal(size=4).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, size=4).astype(np.float32),
        "beta": rng.normal(size=4).astype(np.float32),
        "mean": rng.normal(size=4).astype(np.float32),
        "var": rng.uniform(0.5, 2, size=4).astype(np.float32),
        "fc/w": rng.normal(size=(5, 4)).astype(np.float32),
        "fc/b": rng.normal(size=5).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3],
                         strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"],
                         name="bn", epsilon=eps),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[0, 0, 1, 1]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc/w", "fc/b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [onnx.numpy_helper.from_array(v, k) for k, v in init.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return ir.from_proto(proto), init


def test_batch_norm_eval_matches_onnxruntime_and_stats_are_buffers():
    model, _ = _bn_model()
    module = to_torch(model).eval()
    assert {n for n, _ in module.named_buffers()} == {"mean", "var"}
    assert {n for n, _ in module.named_parameters()} == {"w", "b", "gamma", "beta", "fc_w", "fc_b"}
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = module(x).numpy()
    _assert_close_to_reference(ours, _ort_run(model, x.numpy()))


def test_batch_norm_trains_with_batch_statistics_and_updates_running_stats():
    model, init = _bn_model(eps=1e-3)
    module = to_torch(model).train()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    conv = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)),
                                      torch.from_numpy(init["w"]), torch.from_numpy(init["b"]), 2).numpy()
    batch_mean = conv.mean(axis=(0, 2, 3))
    batch_var = conv.var(axis=(0, 2, 3))  # biased: used to normalise
    n = conv.size // conv.shape[1]
    with torch.no_grad():
        ours = module(x).numpy()
    # running <- 0.9 running + 0.1 batch (ONNX momentum 0.9), variance unbiased
    np.testing.assert_allclose(module.mean.numpy(), 0.9 * init["mean"] + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(module.var.numpy(), 0.9 * init["var"] + 0.1 * batch_var * n / (n - 1),
                               rtol=1e-5, atol=1e-6)
    # the train-mode output normalises with the batch statistics
    normalised = (conv - batch_mean[:, None, None]) / np.sqrt(batch_var[:, None, None] + 1e-3)
    bn = normalised * init["gamma"][:, None, None] + init["beta"][:, None, None]
    pooled = torch.nn.functional.max_pool2d(
        torch.nn.functional.pad(torch.from_numpy(np.maximum(bn, 0)), (0, 1, 0, 1), value=-np.inf), 3, 2)
    expected = pooled.mean((2, 3)).numpy() @ init["fc/w"].T + init["fc/b"]
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_unsupported_op_names_the_node():
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], name="soft")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(BnnccError, match="'soft'.*Softmax"):
        to_torch(model)


def test_write_back_rejects_a_different_model():
    model, _ = _bn_model()
    module = to_torch(model)
    other, _ = _bn_model()
    del other.graph.initializers["gamma"]
    with pytest.raises(BnnccError, match="'gamma'"):
        write_back(module, other)


@pytest.mark.parametrize("kind", ["path", "proto"])
def test_write_back_names_the_fix_for_a_path_or_a_model_proto(kind, tmp_path):
    """As to_torch does: write_back(module, "m.onnx") failed with "AttributeError: 'str' object has no
    attribute 'graph'", onnx.load's ModelProto with "AttributeError: initializers"."""
    model, _ = _bn_model()
    ir.save(model, tmp_path / "m.onnx")
    given = str(tmp_path / "m.onnx") if kind == "path" else onnx.load(tmp_path / "m.onnx")
    with pytest.raises(TypeError, match=f"^expected an onnx_ir.Model as bnncc.load returns, got "
                                        f"{type(given).__name__}: load the file with bnncc.load"):
        write_back(to_torch(model), given)


def test_write_back_that_refuses_a_model_leaves_it_as_it_was():
    """The check ran initializer by initializer, writing as it went: a model whose head had another
    width got the module's conv and BN weights before the error, half one network, half another."""
    model, _ = _bn_model()
    module = to_torch(model)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    other, init = _bn_model()
    wide = np.zeros((5, 8), np.float32)
    other.graph.initializers["fc/w"].const_value = ir.tensor(wide, name="fc/w")
    with pytest.raises(BnnccError, match="'fc/w' has shape"):
        write_back(module, other)
    for name, array in init.items():
        expected = wide if name == "fc/w" else array
        np.testing.assert_array_equal(other.graph.initializers[name].const_value.numpy(), expected, err_msg=name)


# --- torchview's own plumbing for ai.bnncc ops, with stand-in torch ops --------------------------
# These stand-ins replace the torch face of registered ops by float maths so that the expected
# values are plain numpy; the real ops are checked against onnxruntime further below.


class _StandIns:
    """``stand_ins[op] = fn`` replaces the torch face of the registered op ``op`` for one test."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __setitem__(self, name, fn):
        import dataclasses

        from bnncc.ops import OPS

        self.monkeypatch.setitem(OPS, name, dataclasses.replace(OPS[name], torch=fn))


@pytest.fixture
def stand_in_ops(monkeypatch):
    return _StandIns(monkeypatch)


def _float_quant_conv(x, w, bound, b, *, group=1, quantize_weights=True, **attrs):
    """Stand-in QuantConv (1x1 only): float conv; records that every bound is the -1 sentinel."""
    assert (bound == -1).all(), "calibration must observe float activations"
    return torch.nn.functional.conv2d(x, w, b, groups=group)


def _float_se_gate(r, w1, bound1, b1, w2, bound2, b2, **attrs):
    """Stand-in SEGate: hard-sigmoid(conv(relu(conv(mean_HW r))))."""
    g = torch.relu(_float_quant_conv(r.mean((2, 3), keepdim=True), w1, bound1, b1))
    return torch.clamp(_float_quant_conv(g, w2, bound2, b2) + 3, 0, 6) / 6


def test_calibration_sets_mean_of_max_bounds(stand_in_ops):
    stand_in_ops["QuantConv"] = _float_quant_conv
    stand_in_ops["SEGate"] = _float_se_gate
    rng = np.random.default_rng(7)
    init = {
        "w1": rng.normal(size=(2, 8, 1, 1)).astype(np.float32), "b1": rng.normal(size=2).astype(np.float32),
        "w2": rng.normal(size=(8, 2, 1, 1)).astype(np.float32), "b2": rng.normal(size=8).astype(np.float32),
        "bound1": np.full(8, 2.0, np.float32), "bound2": np.full(2, 2.0, np.float32),
        "wq": rng.normal(size=(3, 8, 1, 1)).astype(np.float32), "bq": np.zeros(3, np.float32),
        "boundq": np.full(8, 2.0, np.float32),
    }
    model = bnncc_model(
        [helper.make_node("SEGate", ["x", "w1", "bound1", "b1", "w2", "bound2", "b2"], ["g"],
                          domain="ai.bnncc", w_bits=4, a_bits=4),
         helper.make_node("Mul", ["x", "g"], ["m"]),
         helper.make_node("QuantConv", ["m", "wq", "boundq", "bq"], ["y"], domain="ai.bnncc",
                          w_bits=8, a_bits=8, a_signed=1, kernel_shape=[1, 1], strides=[1, 1],
                          pads=[0, 0, 0, 0], group=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])], init)
    module = to_torch(model)
    assert set(module.bound_names) == {"bound1", "bound2", "boundq"}
    assert {n for n, _ in module.named_buffers()} == {"bound1", "bound2", "boundq"}

    batches = [rng.normal(size=(3, 8, 4, 4)).astype(np.float32) for _ in range(4)]
    batches[0][:, 5] = 0.0  # channel 5 first seen in batch 1: its EMA starts there
    batches[2][:, 6] = 0.0  # an all-zero channel does not pull channel 6 towards 0
    module.calibrate_bounds(torch.from_numpy(b) for b in batches)

    def mean_of_max(observed: list[np.ndarray]) -> np.ndarray:
        ema, seen = np.zeros_like(observed[0]), np.zeros(observed[0].shape, bool)
        for m in observed:
            valid = m > 0
            ema = np.where(valid, np.where(seen, ema + 0.1 * (m - ema), m), ema)
            seen |= valid
        return np.where(seen, ema, -1.0)  # never nonzero: left float

    def w(name):
        return init[name][:, :, 0, 0]

    def int4(v):  # the SE gate's 4-bit weights (spec.md QuantConv), which bound2's observer uses
        s = 7 / np.abs(v).max(axis=1, keepdims=True)
        return np.clip(np.floor(v * s + 0.5), -7, 7) / s

    pooled = [b.mean(axis=(2, 3)) for b in batches]
    hidden = [np.maximum(p @ int4(w("w1")).T + init["b1"], 0) for p in pooled]
    gate_hidden = [np.maximum(p @ w("w1").T + init["b1"], 0) for p in pooled]  # the stand-in gate's
    gate = [np.clip(h @ w("w2").T + init["b2"] + 3, 0, 6) / 6 for h in gate_hidden]
    gated = [b * g[:, :, None, None] for b, g in zip(batches, gate)]
    expect = {
        "bound1": mean_of_max([np.abs(p).max(0) for p in pooled]),
        "bound2": mean_of_max([h.max(0) for h in hidden]),
        "boundq": mean_of_max([np.abs(m).max(axis=(0, 2, 3)) for m in gated]),
    }
    for name, value in expect.items():
        np.testing.assert_allclose(getattr(module, name).numpy(), value, rtol=1e-5, err_msg=name)
    # write_back carries the calibrated bounds into the model
    write_back(module, model)
    np.testing.assert_allclose(model.graph.initializers["boundq"].const_value.numpy(), expect["boundq"], rtol=1e-5)


def _sign_conv(x, w, *, quantize_weights=True, **attrs):
    """Stand-in BinaryConv (1x1): conv with sign(W) or, with the switch off, with W."""
    return torch.nn.functional.conv2d(x, torch.where(w >= 0, 1.0, -1.0) if quantize_weights else w)


def test_weight_quantization_switch(stand_in_ops):
    stand_in_ops["BinaryConv"] = _sign_conv
    w = np.random.default_rng(8).normal(size=(2, 3, 1, 1)).astype(np.float32)
    model = bnncc_model(
        [helper.make_node("BinaryConv", ["x", "w"], ["y"], domain="ai.bnncc", kernel_shape=[1, 1],
                          strides=[1, 1], clip_bound=3.0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 2, 2])], {"w": w})
    module = to_torch(model)
    x = torch.randn(2, 3, 2, 2)
    signed = torch.nn.functional.conv2d(x, torch.from_numpy(np.where(w >= 0, 1.0, -1.0).astype(np.float32)))
    torch.testing.assert_close(module(x), signed)
    module.set_weight_quantization(False)
    torch.testing.assert_close(module(x), torch.nn.functional.conv2d(x, torch.from_numpy(w)))
    module.set_weight_quantization(True)
    torch.testing.assert_close(module(x), signed)

    stand_in_ops["BinaryConv"] = lambda x, w, **attrs: x
    with pytest.raises(BnnccError, match="quantize_weights"):
        to_torch(model).set_weight_quantization(False)


# --- a PokeBNN-style graph with every ai.bnncc op, against onnxruntime ---------------------------


@pytest.fixture
def real_ops():
    import bnncc.ops as ops

    return ops


def _with_functions(ops, model: ir.Model) -> ir.Model:
    attached = ops.attach_functions(model)
    return model if attached is None else attached


# the PokeConv with its SE gate ("block" overload) and without ("block_ungated")
_WITH_AND_WITHOUT_SE_GATE = pytest.mark.parametrize("se_gate", [True, False], ids=["gated", "ungated"])


def _calibrated_poke(ops, se_gate: bool) -> tuple[ir.Model, torch.nn.Module]:
    model = tiny_poke_model(se_gate)
    module = to_torch(model)
    gen = torch.Generator().manual_seed(12)
    module.calibrate_bounds(torch.randn(8, 3, 16, 16, generator=gen) for _ in range(3))
    write_back(module, model)
    return _with_functions(ops, model), module


# Tolerance: both runs compute the same fake-quant maths in float32; only accumulation order
# differs (~1e-6 relative). A quantizer input that lands within that distance of a decision
# boundary would flip one level; the fixed seeds keep every input far from one, so the outputs agree
# to float rounding and 1e-4 of the logit range is a wide margin that a real semantic difference
# (one wrong padding cell, sign(0), a missing shortcut) exceeds.


@_WITH_AND_WITHOUT_SE_GATE
def test_poke_graph_matches_onnxruntime(real_ops, se_gate):
    model, module = _calibrated_poke(real_ops, se_gate)
    assert all((module.get_buffer(n) > 0).any() for n in module.bound_names)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(13))
    module.eval()
    with torch.no_grad():
        ours = module(x).numpy()
    _assert_close_to_reference(ours, _ort_run(model, x.numpy()))


@_WITH_AND_WITHOUT_SE_GATE
def test_poke_graph_module_saves_and_loads_whole(real_ops, se_gate, tmp_path):
    """torch.save pickles the module with its plan: a lambda among the SE gate's bound observers made
    it fail ("Can't pickle <function <lambda>>"), where the float graph's module saved."""
    model, module = _calibrated_poke(real_ops, se_gate)
    torch.save(module, tmp_path / "module.pt")
    loaded = torch.load(tmp_path / "module.pt", weights_only=False).eval()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        ours = loaded(x).numpy()
    _assert_close_to_reference(ours, _ort_run(model, x.numpy()))
    loaded.calibrate_bounds([x])  # the loaded module's observers work
    assert all((loaded.get_buffer(n) > 0).any() for n in loaded.bound_names)


@_WITH_AND_WITHOUT_SE_GATE
def test_poke_graph_gradients_reach_every_parameter(real_ops, se_gate):
    _, module = _calibrated_poke(real_ops, se_gate)
    # eval mode: in train mode a per-channel bias right before a BN gets an exactly-zero gradient
    module.eval()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(14))
    module(x).logsumexp(1).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(b.requires_grad for b in module.buffers())


@_WITH_AND_WITHOUT_SE_GATE
def test_poke_graph_write_back_round_trip(real_ops, se_gate):
    model, module = _calibrated_poke(real_ops, se_gate)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    module.train()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(15))
    running_var = module.poke_bn_split_var.clone()
    module(x).logsumexp(1).sum().backward()
    optimizer.step()
    assert not torch.equal(running_var, module.poke_bn_split_var)

    write_back(module, model)
    module.eval()
    with torch.no_grad():
        ours = module(x).numpy()
    _assert_close_to_reference(ours, _ort_run(model, x.numpy()))


@_WITH_AND_WITHOUT_SE_GATE
def test_poke_graph_fused_kernels_train_like_the_torch_composition(real_ops, se_gate, monkeypatch):
    from bnncc.ops.poke_conv import poke_conv

    _, module = _calibrated_poke(real_ops, se_gate)
    # the whole PokeConv is one step (its batch norm, shortcuts, DPReLU and gate Mul one fused call)
    assert [step.fn for step in module._plan].count(poke_conv) == 1
    # the trainer's layout, where the fused CPU kernels run
    module.to(memory_format=torch.channels_last).train()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(16)).contiguous(
        memory_format=torch.channels_last)

    start = {name: b.clone() for name, b in module.named_buffers()}

    def step():
        module.zero_grad()
        module.load_state_dict(start, strict=False)  # the same running statistics before each
        y = module(x)
        y.logsumexp(1).sum().backward()
        return y.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}, dict(module.named_buffers())

    y, grads, buffers = step()
    buffers = {name: b.clone() for name, b in buffers.items()}
    monkeypatch.setenv("BNNCC_CPU_KERNELS", "0")
    y_ref, grads_ref, buffers_ref = step()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, buffer in buffers.items():  # the batch norms' running statistics
        torch.testing.assert_close(buffer, buffers_ref[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(b, start[name]) for name, b in buffers.items())
    scale = max(float(g.abs().max()) for g in grads_ref.values())
    # per-channel sums add up in another order (the kernels' in double blocks, torch's pairwise in
    # float32; a zero may come out as 1e-7): the negative slope's gradient, a sum over the batch's
    # pixels, differs by up to 1.8e-5 of 0.41 here, float32's rounding of such a sum
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=2e-6 * scale)


def test_an_input_of_another_shape_than_the_graphs_is_refused_as_onnxruntime_refuses_it(real_ops):
    """The stem's quantizer broadcast a one-channel batch to the three channels the graph takes: the torch
    view gave logits where onnxruntime (the reference) and the library refuse the input; a numpy array
    failed inside, naming an attribute 'is_cpu'."""
    model = _with_functions(real_ops, tiny_poke_model())
    module = to_torch(model).eval()
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        _assert_close_to_reference(module(torch.from_numpy(x)).numpy(), session.run(None, {"x": x})[0])
        images = torch.from_numpy(x)
        # (the slice of channel 0 is a view: the torch composition ran, and broadcast it)
        for wrong in (images[:, :1], images[:, :1].contiguous(), images.permute(0, 2, 3, 1), images[0]):
            with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument):
                session.run(None, {"x": np.ascontiguousarray(wrong.numpy())})
            with pytest.raises(BnnccError, match=rf"^input 'x' of shape {re.escape(str(tuple(wrong.shape)))}; "
                                                 r"the graph takes \(N, 3, 16, 16\)$"):
                module(wrong)
        with pytest.raises(TypeError, match=r"^input 'x': expected a torch.Tensor, got ndarray$"):
            module(x)


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_an_empty_batch_is_refused_in_one_line(real_ops, kernels, monkeypatch):
    """A batch of 0 images failed inside: a ZeroDivisionError in the fused kernels, a reshape of 0 elements
    into (0, -1) in the torch compositions."""
    monkeypatch.setenv("BNNCC_CPU_KERNELS", kernels)
    module = to_torch(_with_functions(real_ops, tiny_poke_model()))
    for mode in (module.eval, module.train):
        mode()
        with pytest.raises(BnnccError, match=r"^input 'x' of shape \(0, 3, 16, 16\) holds no values; "):
            module(torch.zeros(0, 3, 16, 16))



def test_a_graph_of_a_fixed_batch_runs_any_batch_as_the_docstring_says(real_ops):
    """A PokeBNN file whose input is (1, 3, H, W), as a fixed-batch export gives it (read_pokebnn keeps it), was
    refused at the first step of finetune's batches of 8: "input 'x' of shape (8, 3, 16, 16); the graph takes
    (1, 3, 16, 16)". The batch stays free; the other dims are still the graph's."""
    model = _with_functions(real_ops, tiny_poke_model())
    model.graph.inputs[0].shape = ir.Shape([1, 3, 16, 16])
    model.graph.outputs[0].shape = ir.Shape([1, 10])
    module = to_torch(model).eval()
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ours = module(torch.from_numpy(x)).numpy()
        with pytest.raises(BnnccError, match=r"^input 'x' of shape \(3, 1, 16, 16\); the graph takes "
                                             r"\(N, 3, 16, 16\)$"):
            module(torch.from_numpy(x[:, :1]))
    # onnxruntime runs the graph's batch of 1, image by image
    _assert_close_to_reference(ours, np.concatenate([_ort_run(model, x[i:i + 1]) for i in range(len(x))]))
