"""The CIFAR ResNet (He et al., CVPR 2016, §4.2) in the form AugLocal trains it.

Layout and initialisation follow AugLocal's reference code (ChenxiangMA/AugLocal,
``networks/resnet.py``): a 3x3 stem conv + batch norm + ReLU, stages of basic blocks
(two 3x3 convs with batch norm), the first block of every stage after the first halving
the resolution and doubling the channels, a 1x1 conv + batch norm projection where a
block changes shape, global average pooling and a linear classifier; convs drawn from
N(0, 2 / (k * k * out_channels)), batch norm scales 1 and shifts 0.

The units are the residual blocks; the stem belongs to the first, so the first block of
a pipeline reads the images itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.data.spec import InputSpec
from strategies.config import ResNetConfig
from strategies.models.units import Shape

Shortcut = Literal["projection", "zero_pad"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """He et al.'s option A: subsample by the stride, pad the new channels with zeros
    (no weights)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        shortcut: Shortcut = "projection",
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if shortcut == "zero_pad" and out_channels >= in_channels:
                self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(out_channels),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def stem(in_channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(_conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU())


def classifier(channels: int, num_classes: int) -> nn.Sequential:
    """Global average pooling, then the linear classifier."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def initialise(module: nn.Module) -> nn.Module:
    """The reference code's initialisation (He et al. fan-out normal for convs)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def build(model: ResNetConfig, spec: InputSpec) -> list[nn.Module]:
    """The residual blocks (the stem inside the first), then the pooled classifier."""
    channels = model.width
    units: list[nn.Module] = []
    for stage in range(model.stages):
        width = model.width * 2**stage
        for block in range(model.stage_blocks()):
            stride = 2 if stage > 0 and block == 0 else 1
            units.append(initialise(BasicBlock(channels, width, stride, model.shortcut)))
            channels = width
    units[0] = nn.Sequential(initialise(stem(spec.shape[0], model.width)), units[0])
    return [*units, classifier(channels, spec.num_classes)]


def rebuild_units(
    model: ResNetConfig,
    spec: InputSpec,
    chosen: Sequence[int],
    shape: Shape,
    shapes: Sequence[Shape],
) -> list[nn.Module]:
    """AugLocal's aux-net layers (reference ``AuxNetwork``, config ``unifSamp``): for each
    chosen block a fresh basic block with that block's output channels and a projection
    shortcut where the shape changes. Downsampling the chosen blocks did on the way is
    owed and paid one stride-2 block at a time, as the reference does with its
    ``num_pool`` count."""
    units: list[nn.Module] = []
    channels, size = shape[0], shape[1]
    for unit in chosen:
        out_channels, target = shapes[unit][0], shapes[unit][1]
        stride = 2 if target < size else 1  # a side the network halved (rounding up)
        units.append(initialise(BasicBlock(channels, out_channels, stride, "projection")))
        channels, size = out_channels, math.ceil(size / stride)
    return units
