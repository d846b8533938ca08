"""Float ResNets with random weights for tests and demos, and their ONNX export.

No pretrained weights can be downloaded here, so every model is torchvision's own definition
(``ResNet`` with ``Bottleneck`` or ``BasicBlock`` blocks, built by its ``_make_layer``) with seeded
random weights.
BatchNorm statistics and affine parameters are randomised too: with the default (mean 0, var 1,
gamma 1, beta 0) a wrong BN fold would go unnoticed.

``width`` scales the stem width (64) and the stage widths (64, 128, 256, 512) alike:
``round(64 * width)`` and so on, at least 1; the bottleneck expansion stays 4 (basic blocks: 1).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Literal

import onnx_ir as ir
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from bnncc.errors import BnnccError
from bnncc.fileio import atomic_path

__all__ = ["ARCHITECTURES", "resnet18", "resnet34", "resnet50", "resnet101", "randomize_batchnorm", "export_onnx"]

logger = logging.getLogger(__name__)

STAGE_WIDTHS = (64, 128, 256, 512)
STEM_WIDTH = 64


def resnet18(width: float = 1.0, num_classes: int = 1000, in_channels: int = 3, *, seed: int = 0) -> ResNet:
    """ResNet-18 (2, 2, 2, 2 basic blocks), random weights and BN statistics, in eval mode."""
    return _resnet(BasicBlock, (2, 2, 2, 2), width, num_classes, in_channels, seed)


def resnet34(width: float = 1.0, num_classes: int = 1000, in_channels: int = 3, *, seed: int = 0) -> ResNet:
    """ResNet-34 (3, 4, 6, 3 basic blocks), random weights and BN statistics, in eval mode."""
    return _resnet(BasicBlock, (3, 4, 6, 3), width, num_classes, in_channels, seed)


def resnet50(width: float = 1.0, num_classes: int = 1000, in_channels: int = 3, *, seed: int = 0) -> ResNet:
    """ResNet-50 v1.5 (3, 4, 6, 3 bottlenecks), random weights and BN statistics, in eval mode."""
    return _resnet(Bottleneck, (3, 4, 6, 3), width, num_classes, in_channels, seed)


def resnet101(width: float = 1.0, num_classes: int = 1000, in_channels: int = 3, *, seed: int = 0) -> ResNet:
    """ResNet-101 v1.5 (3, 4, 23, 3 bottlenecks), random weights and BN statistics, in eval mode."""
    return _resnet(Bottleneck, (3, 4, 23, 3), width, num_classes, in_channels, seed)


# name -> builder, for the commands and benches that take an architecture by name
ARCHITECTURES = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101}


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _resnet(block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], width: float, num_classes: int,
            in_channels: int, seed: int) -> ResNet:
    """torchvision's ResNet with the stem and stages rebuilt at ``width`` through ``_make_layer``."""
    if width <= 0:
        raise BnnccError(f"zoo: width must be positive, got {width}")
    torch.manual_seed(seed)
    model = ResNet(block, list(layers), num_classes=num_classes)
    stem = _scaled(STEM_WIDTH, width)
    model.conv1 = nn.Conv2d(in_channels, stem, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(stem)
    model.inplanes = stem
    model.layer1 = model._make_layer(block, _scaled(STAGE_WIDTHS[0], width), layers[0])
    model.layer2 = model._make_layer(block, _scaled(STAGE_WIDTHS[1], width), layers[1], stride=2)
    model.layer3 = model._make_layer(block, _scaled(STAGE_WIDTHS[2], width), layers[2], stride=2)
    model.layer4 = model._make_layer(block, _scaled(STAGE_WIDTHS[3], width), layers[3], stride=2)
    model.fc = nn.Linear(_scaled(STAGE_WIDTHS[3], width) * block.expansion, num_classes)
    randomize_batchnorm(model, seed)
    return model.eval()


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm2d random statistics and affine parameters (seeded), in place.

    gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1), running mean ~ N(0, 0.1), running var ~ U(0.5, 2):
    far enough from the identity that folding must use all four, close enough that activations
    stay in range through 50+ layers.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            c = bn.num_features
            bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=gen) * 0.1)
            bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
    return module


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    exporter: Literal["legacy", "dynamo"] = "legacy",
    input_size: int = 224,
    batch: Literal["fixed", "symbolic"] = "fixed",
    opset: int | None = None,
) -> Path:
    """Export ``module`` (eval mode) on a (1, C, input_size, input_size) input; return the path.

    ``legacy`` is the TorchScript exporter (``dynamo=False``), which folds BN into the convs;
    ``dynamo`` is ``torch.export`` at opset 18 (``opset`` overrides), BN kept, weights saved as
    external data in ``<name>.data`` beside the model. ``symbolic`` names the batch dimension
    ``batch``. The input is called ``input`` and the output ``logits``. Files appear atomically.
    """
    path = Path(path)
    module = module.eval()
    in_channels = next(m for m in module.modules() if isinstance(m, nn.Conv2d)).in_channels
    example = (torch.randn(1, in_channels, input_size, input_size, generator=torch.Generator().manual_seed(0)),)
    start = time.perf_counter()
    if exporter == "legacy":
        _export_legacy(module, example, path, batch, opset)
    elif exporter == "dynamo":
        _export_dynamo(module, example, path, batch, opset or 18)
    else:
        raise BnnccError(f"zoo: unknown exporter {exporter!r}; expected 'legacy' or 'dynamo'")
    logger.info("exported %s with %s in %.1f s", path, exporter, time.perf_counter() - start)
    return path


def _export_legacy(module: nn.Module, example: tuple, path: Path, batch: str, opset: int | None) -> None:
    dynamic_axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if batch == "symbolic" else None
    # The TorchScript exporter is chosen on purpose (it folds BN): silence its deprecation notice.
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            example,
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=dynamic_axes,
        )


def _export_dynamo(module: nn.Module, example: tuple, path: Path, batch: str, opset: int) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if batch == "symbolic" else None
    program = torch.onnx.export(
        module,
        example,
        dynamo=True,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )
    data_name = path.name + ".data"
    # Save into a scratch folder beside the target, then move the data and then the model into
    # place: each file appears whole, and the model never points at a missing data file.
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        ir.save(program.model, Path(scratch) / path.name, external_data=data_name)
        os.replace(Path(scratch) / data_name, path.parent / data_name)
        os.replace(Path(scratch) / path.name, path)
