"""Fully connected networks: TPP's MLP-7-Linear analysis network and the small digits CNN.

MLP-7-Linear (TPP, ICLR 2023, §3): 7 Linear layers, 100 units wide, with *no* nonlinearity
between them, so the input–output Jacobian is the product of the weight matrices and its mean
singular value (mean JSV) measures trainability exactly. ``activation="relu"`` gives MLP-7-ReLU.
"""
from __future__ import annotations

from torch import Tensor, nn

ACTIVATIONS = {"linear": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """``depth`` Linear layers: in_features → width → … → width → num_classes."""

    def __init__(self, in_features: int, num_classes: int = 10, depth: int = 7, width: int = 100, activation: str = "linear"):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        features = in_features
        for _ in range(depth - 1):
            layers += [nn.Linear(features, width), ACTIVATIONS[activation]()]
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.flatten(1))


def mlp7_linear(num_classes: int = 10, in_features: int = 784, width: int = 100) -> MLP:
    return MLP(in_features, num_classes, depth=7, width=width, activation="linear")


class DigitsCNN(nn.Module):
    """A small CNN for 8×8 inputs: two stages of two conv3×3-BN-ReLU, a max-pool between them,
    global average pooling and a Linear (≈ 70k params, ≈ 2.5 MFLOPs per 8×8 image)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
