"""Models by name: ``get_model("resnet56", num_classes=10)``.

| name | network |
|---|---|
| ``resnet20`` / ``resnet56`` / ``resnet110`` | CIFAR ResNets (He et al. 2016, 3 stages of 16/32/64 filters) |
| ``vgg13`` / ``vgg19`` | VGG-13 / VGG-19 with BatchNorm for CIFAR |
| ``mobilenet_v1`` | MobileNet-V1 for CIFAR (depthwise-separable blocks, 32×32 inputs) |
| ``resnet34_cifar`` | ResNet-34 for CIFAR (3×3 stem, no max-pool: OrthoReg's ResNet-34) |
| ``mlp7_linear`` | TPP's MLP-7-Linear analysis network (7 Linear layers, width 100, no nonlinearity) |
| ``resnet18`` / ``resnet34`` / ``resnet50`` | torchvision ImageNet ResNets (randomly initialised) |
| ``digits_cnn`` | a small CNN for the bundled 8×8 digits |

Names are case-insensitive and ignore ``-`` / ``_`` (``ResNet-56`` = ``resnet56``,
``MLP-7-Linear`` = ``mlp7_linear``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from torch import nn

from .mlp import MLP, DigitsCNN, mlp7_linear
from .mobilenet import MobileNetV1, mobilenet_v1
from .vgg import VGG, vgg13, vgg19


def _cifar_resnet(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, input_shape: Sequence[int]) -> nn.Module:
        from .cifar_resnet import cifar_resnet

        return cifar_resnet(depth, num_classes=num_classes, in_channels=in_channels)

    return build


def _torchvision_resnet(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, input_shape: Sequence[int]) -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return model

    return build


def _mlp7(num_classes: int, in_channels: int, input_shape: Sequence[int]) -> nn.Module:
    return mlp7_linear(num_classes, in_features=math.prod(input_shape))


def _vgg19(num_classes: int, in_channels: int, input_shape: Sequence[int]) -> nn.Module:
    return vgg19(num_classes, in_channels)


def _vgg13(num_classes: int, in_channels: int, input_shape: Sequence[int]) -> nn.Module:
    return vgg13(num_classes, in_channels)


def _mobilenet_v1(num_classes: int, in_channels: int, input_shape: Sequence[int]) -> nn.Module:
    return mobilenet_v1(num_classes, in_channels)


def _resnet34_cifar(num_classes: int, in_channels: int, input_shape: Sequence[int]) -> nn.Module:
    from .cifar_resnet import cifar_resnet34

    return cifar_resnet34(num_classes, in_channels)


def _digits_cnn(num_classes: int, in_channels: int, input_shape: Sequence[int]) -> nn.Module:
    return DigitsCNN(num_classes, in_channels)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": _cifar_resnet(20),
    "resnet56": _cifar_resnet(56),
    "resnet110": _cifar_resnet(110),
    "vgg13": _vgg13,
    "vgg19": _vgg19,
    "mobilenet_v1": _mobilenet_v1,
    "resnet34_cifar": _resnet34_cifar,
    "mlp7_linear": _mlp7,
    "resnet18": _torchvision_resnet("resnet18"),
    "resnet34": _torchvision_resnet("resnet34"),
    "resnet50": _torchvision_resnet("resnet50"),
    "digits_cnn": _digits_cnn,
}


def canonical_name(name: str) -> str:
    """``"ResNet-56"`` → ``"resnet56"``; raises ValueError naming the known models."""
    key = name.lower().replace("-", "").replace("_", "")
    for known in MODELS:
        if known.replace("_", "") == key:
            return known
    raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")


def get_model(name: str, num_classes: int, in_channels: int = 3, input_shape: Sequence[int] | None = None) -> nn.Module:
    """Build the model ``name`` for ``num_classes`` classes and ``in_channels`` input channels.

    ``input_shape`` (C, H, W) sizes the input layer of MLPs (default: 1×28×28 MNIST when
    ``in_channels`` is 1, else 3×32×32).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if input_shape is None:
        input_shape = (in_channels, 28, 28) if in_channels == 1 else (in_channels, 32, 32)
    return MODELS[canonical_name(name)](num_classes, in_channels, tuple(input_shape))


__all__ = ["MODELS", "MLP", "DigitsCNN", "MobileNetV1", "VGG", "canonical_name", "get_model", "mlp7_linear", "mobilenet_v1", "vgg13", "vgg19"]
