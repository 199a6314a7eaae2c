"""MobileNet-V1 for CIFAR (Howard et al. 2017; OrthoReg's CIFAR variant for 32×32 inputs).

A 3×3 conv of 32 filters (stride 1), then 13 depthwise-separable blocks — depthwise 3×3 conv
(stride 1 or 2) + BN + ReLU, pointwise 1×1 conv + BN + ReLU — with 64, 128, 128, 256, 256,
512 ×6, 1024, 1024 output channels (stride 2 at 128, 256, 512 and the first 1024), global average
pooling and one Linear.
"""
from __future__ import annotations

from torch import Tensor, nn

MOBILENET_V1_CIFAR = (64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024)


class DepthwiseSeparable(nn.Module):
    """relu(bn2(pointwise(relu(bn1(depthwise(x))))))."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, in_planes, 3, stride, 1, groups=in_planes, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv2 = nn.Conv2d(in_planes, planes, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths=MOBILENET_V1_CIFAR, stem: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        blocks, planes = [], stem
        for w in widths:
            out, stride = (w, 1) if isinstance(w, int) else w
            blocks.append(DepthwiseSeparable(planes, out, stride))
            planes = out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def mobilenet_v1(num_classes: int = 10, in_channels: int = 3) -> MobileNetV1:
    return MobileNetV1(num_classes, in_channels)
