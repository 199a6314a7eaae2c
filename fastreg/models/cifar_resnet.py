"""CIFAR ResNets (He et al. 2016, §4.2): ResNet-20 / 56 / 110 = 6n+2 layers, 3 stages of n basic
blocks with 16·w, 32·w, 64·w filters (w = width / 16).

When a block changes shape (stride 2 or more filters) its shortcut is a 1×1 convolution + BatchNorm
(option B), so the whole network is traceable and physically prunable by a dependency graph.
Module names follow the TPP code: ``conv1, bn1, layer{1,2,3}.{i}.conv1/bn1/conv2/bn2,
layer*.{i}.downsample.{0,1}, fc``, so its pruning-ratio patterns (``*layer*.conv1:0.5``) apply.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), 3×3 convolutions."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """A 3×3 stem of ``width`` filters (no max-pool), then stages of ``blocks[s]`` basic blocks of
    width·2^s filters (stride 2 at the start of every stage but the first), average pooling and one
    Linear; names ``conv1, bn1, layer{1,2,...}.{i}.conv1/bn1/conv2/bn2/downsample, fc``."""

    def __init__(self, blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be a positive number of filters, got {width}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        planes = width
        for stage, count in enumerate(blocks):
            layers = []
            for i in range(count):
                layers.append(BasicBlock(planes, width * 2**stage, 2 if stage > 0 and i == 0 else 1))
                planes = width * 2**stage
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """CIFAR ResNet-``depth`` (20, 56, 110, ...: 6n+2): 3 stages of n blocks, ``width`` filters in the first."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
    return CifarResNet(((depth - 2) // 6,) * 3, num_classes=num_classes, in_channels=in_channels, width=width)


def cifar_resnet34(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-34 for CIFAR (OrthoReg's): 3, 4, 6, 3 blocks of 64, 128, 256, 512 filters."""
    return CifarResNet((3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, width=64)
