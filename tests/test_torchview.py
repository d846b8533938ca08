"""The torch view of ONNX graphs, checked against onnxruntime and hand-computed values."""

from __future__ import annotations

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
