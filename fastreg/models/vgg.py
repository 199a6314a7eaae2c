"""VGG-13 / VGG-19 for CIFAR (conv-BN-ReLU stacks, max-pool between stages, one linear classifier).

The network-slimming / TPP CIFAR variant: 16 3×3 convs with widths
64,64 | 128,128 | 256×4 | 512×4 | 512×4, BatchNorm after every conv, a 2×2 max-pool after the
first four stages, global average pooling and a single Linear. Built for 32×32 inputs. VGG-13
(OrthoReg's CIFAR network): the same with widths 64,64 | 128,128 | 256,256 | 512,512 | 512,512.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

VGG13_WIDTHS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))
VGG19_WIDTHS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)


class VGG(nn.Module):
    """Stages of conv3×3-BN-ReLU; ``stages`` lists the conv widths of each stage."""

    def __init__(self, stages: Sequence[Sequence[int]] = VGG19_WIDTHS, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for index, widths in enumerate(stages):
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            if index < len(stages) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg19(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(VGG19_WIDTHS, num_classes, in_channels)


def vgg13(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(VGG13_WIDTHS, num_classes, in_channels)
