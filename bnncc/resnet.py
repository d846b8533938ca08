"""The structure of a bottleneck or basic-block ResNet, as the front end recognises it in a canonical graph.

A plain data structure: node names and shapes, nothing that holds the graph itself. Passes and
``bnncc inspect`` read it; ``bnncc.frontend.recognize`` builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Stem", "Bottleneck", "BasicBlock", "Block", "Head", "ResNet"]


@dataclass(frozen=True)
class Stem:
    conv: str  # node name of the 7x7 stride-2 Conv
    relu: str
    pool: str | None  # the 3x3 stride-2 MaxPool
    out_channels: int
    out_size: tuple[int, int]  # spatial size after the pool
    stride: int  # the conv's times the pool's


@dataclass(frozen=True)
class Bottleneck:
    stage: int  # 0-based
    index: int  # 0-based within the stage
    convs: tuple[str, str, str]  # 1x1 reduce, 3x3, 1x1 expand
    relus: tuple[str, str]  # after conv 1 and conv 2
    shortcut: str | None  # projection Conv node, or None for an identity shortcut
    add: str
    out_relu: str
    input: str  # name of the value entering the block
    in_channels: int
    mid_channels: int
    out_channels: int
    stride: int
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    stride_on_3x3: bool  # v1.5 (torchvision) puts the stride on the 3x3, v1 on the first 1x1


@dataclass(frozen=True)
class BasicBlock:
    """A ResNet-18/34 block: two 3x3 convs, a Relu between them, the residual Add, a Relu."""

    stage: int  # 0-based
    index: int  # 0-based within the stage
    convs: tuple[str, str]  # 3x3 (carries the block's stride in torchvision), 3x3
    relu: str  # after conv 1
    shortcut: str | None  # projection Conv node, or None for an identity shortcut
    add: str
    out_relu: str
    input: str  # name of the value entering the block
    in_channels: int
    mid_channels: int  # output channels of the first conv (equal to out_channels in ResNet-18/34)
    out_channels: int
    stride: int
    in_size: tuple[int, int]
    out_size: tuple[int, int]


Block = Bottleneck | BasicBlock


@dataclass(frozen=True)
class Head:
    pool: str  # GlobalAveragePool
    flatten: str | None
    fc: str  # Gemm
    in_features: int
    num_classes: int


@dataclass(frozen=True)
class ResNet:
    input_name: str
    input_shape: tuple[int | str, ...]  # (N, C, H, W); N may be symbolic
    output_name: str
    stem: Stem
    stages: tuple[tuple[Block, ...], ...]  # all Bottleneck or all BasicBlock
    head: Head
    notes: tuple[str, ...] = field(default=())

    @property
    def blocks(self) -> tuple[Block, ...]:
        return tuple(b for stage in self.stages for b in stage)
