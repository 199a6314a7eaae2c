"""Models by name: shapes, parameter counts the papers quote, name handling, clear errors."""
import pytest
import torch
from torch import nn

from fastreg.models import MODELS, canonical_name, get_model


@pytest.mark.parametrize(
    "name, num_classes, in_channels, input_shape",
    [
        ("digits_cnn", 10, 1, (1, 8, 8)),
        ("mlp7_linear", 10, 1, (1, 8, 8)),
        ("resnet20", 10, 3, (3, 32, 32)),
        ("vgg19", 100, 3, (3, 32, 32)),
    ],
)
def test_forward_shape(name, num_classes, in_channels, input_shape):
    model = get_model(name, num_classes, in_channels, input_shape).eval()
    out = model(torch.randn(2, *input_shape))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def test_every_registered_name_builds():
    for name in MODELS:
        model = get_model(name, 10, 3)
        assert sum(p.numel() for p in model.parameters()) > 0, name


@pytest.mark.parametrize(
    "name, params",
    [
        ("vgg19", 20_035_018),  # the 20.04M of the CIFAR-10 VGG-19 in the slimming / TPP tables
        ("resnet18", 11_181_642),  # torchvision ResNet-18 with a 10-way classifier
        ("mobilenet_v1", 3_217_226),  # the CIFAR-10 MobileNet-V1 (32-filter stem, 13 separable blocks)
        ("resnet34_cifar", 21_282_122),  # the CIFAR-10 ResNet-34 (3×3 stem, 1×1-conv shortcuts)
        ("vgg13", 9_413_066),  # 10 convs 64…512 with BN, one Linear
    ],
)
def test_parameter_counts(name, params):
    assert sum(p.numel() for p in get_model(name, 10).parameters()) == params


def test_orthoreg_networks_by_name():
    """OrthoReg's CIFAR networks: VGG-13 has 10 convs, MobileNet-V1 13 depthwise convs, ResNet-34 33 3×3 convs."""
    convs = lambda m: [c for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    assert len(convs(get_model("VGG-13", 100))) == 10
    mobilenet = get_model("MobileNet-V1", 100)
    assert sum(c.groups == c.in_channels > 1 for c in convs(mobilenet)) == 13
    assert sum(c.kernel_size == (3, 3) for c in convs(get_model("ResNet-34-CIFAR", 100))) == 33
    for name in ("vgg13", "mobilenet_v1", "resnet34_cifar"):
        assert get_model(name, 100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_resnet56_is_cifar_resnet():
    model = get_model("ResNet-56", 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(1 for c in convs if c.kernel_size == (3, 3)) == 55  # 6n+1 3×3 convs, n = 9
    assert 0.85e6 < sum(p.numel() for p in model.parameters()) < 0.9e6


def test_mlp7_linear_is_seven_linear_layers_and_affine():
    model = get_model("MLP-7-Linear", 10, 1, (1, 8, 8))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 7 and linears[0].in_features == 64 and {l.out_features for l in linears[:-1]} == {100}
    x, y, zero = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.zeros(3, 1, 8, 8)
    # No nonlinearity: f(x + y) − f(0) = (f(x) − f(0)) + (f(y) − f(0)).
    torch.testing.assert_close(model(x + y) - model(zero), model(x) - model(zero) + model(y) - model(zero), atol=1e-5, rtol=1e-5)


def test_torchvision_resnet_other_input_channels():
    model = get_model("resnet18", 10, in_channels=1).eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_names_are_normalised():
    assert canonical_name("ResNet-56") == "resnet56"
    assert canonical_name("MLP_7_linear") == "mlp7_linear"
    assert canonical_name("VGG-19") == "vgg19"


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="model must be one of .*resnet56"):
        get_model("resnet57", 10)
    with pytest.raises(ValueError, match="num_classes"):
        get_model("resnet20", 0)
    with pytest.raises(ValueError, match="in_channels"):
        get_model("resnet20", 10, in_channels=0)
