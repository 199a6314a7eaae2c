"""CIFAR ResNets (He et al. 2016, §4.2): ResNet-20 / 56 / 110 = 6n+2 layers, 3 stages of n basic
blocks with 16·w, 32·w, 64·w filters (w = width / 16).

When a block changes shape (stride 2 or more filters) its shortcut is a 1×1 convolution + BatchNorm
(option B), so the whole network is traceable and physically prunable by a dependency graph.
Module names follow the TPP code: ``conv1, bn1, layer{1,2,3}.{i}.conv1/bn1/conv2/bn2,
layer*.{i}.downsample.{0,1}, fc``, so its pruning-ratio patterns (``*layer*.conv1:0.5``) apply.
"""
from __future__ import annotations

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
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        if width < 1:
            raise ValueError(f"width must be a positive number of filters, got {width}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        planes = width
        stages = []
        for stage, mult in enumerate((1, 2, 4)):
            blocks = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(planes, width * mult, stride))
                planes = width * mult
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class CifarResNet34(CifarResNet):
    """ResNet-34 for CIFAR (OrthoReg's ResNet-34): a 3×3 stem of 64 filters (no max-pool), then 3, 4, 6, 3
    basic blocks of 64, 128, 256, 512 filters (stride 2 at the start of stages 2–4), average pooling and
    one Linear; names ``conv1, bn1, layer{1..4}.{i}.conv1/bn1/conv2/bn2/downsample, fc``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, blocks=(3, 4, 6, 3), width: int = 64):
        nn.Module.__init__(self)  # (a CifarResNet for the family's init; its own stages)
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
    """CIFAR ResNet-``depth`` (20, 56, 110, ...: 6n+2) with ``width`` filters in the first stage."""
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, width=width)
