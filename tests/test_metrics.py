"""Metrics: mean JSV against closed forms, orthogonality against fastreg.reference, counts."""
import math

import pytest
import torch
from torch import nn

from fastreg import metrics, reference
from fastreg.models import get_model


def test_mean_jsv_of_linear_map_is_mean_singular_value():
    layer = nn.Linear(12, 5, bias=True)
    x = torch.randn(4, 12)
    expected = torch.linalg.svdvals(layer.weight.detach().double()).mean()
    assert metrics.mean_jsv(layer, x) == pytest.approx(float(expected), rel=1e-6)


def test_mean_jsv_of_mlp7_linear_is_that_of_the_weight_product():
    model = get_model("mlp7_linear", 10, 1, (1, 8, 8))
    product = torch.eye(64, dtype=torch.float64)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            product = m.weight.detach().double() @ product
    expected = torch.linalg.svdvals(product).mean()
    assert metrics.mean_jsv(model, torch.randn(3, 1, 8, 8)) == pytest.approx(float(expected), rel=1e-5)


def test_mean_jsv_scales_linearly():
    layer = nn.Linear(6, 6, bias=False)
    x = torch.randn(2, 6)
    base = metrics.mean_jsv(layer, x)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    assert metrics.mean_jsv(layer, x) == pytest.approx(3 * base, rel=1e-6)


def test_jacobians_vmap_match_per_sample_autograd():
    model = get_model("digits_cnn", 10, 1)
    model.train()
    model(torch.randn(16, 1, 8, 8))  # non-trivial BN running stats
    x = torch.randn(3, 1, 8, 8)
    jac = metrics.input_output_jacobians(model, x)
    assert model.training  # restored
    model.eval()
    for i in range(3):
        expected = torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0)).squeeze(0), x[i]).reshape(10, 64)
        torch.testing.assert_close(jac[i], expected, atol=1e-5, rtol=1e-4)


def test_jacobians_in_chunks_equal_all_at_once():
    model = get_model("digits_cnn", 10, 1)
    x = torch.randn(5, 1, 8, 8)
    whole = metrics.input_output_jacobians(model, x)
    chunked = metrics.input_output_jacobians(model, x, max_elements=64 * 4)  # 4 output rows, 1 sample at a time
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)


def test_orthogonality_per_layer_matches_reference():
    model = get_model("digits_cnn", 10, 1)
    got = metrics.orthogonality_per_layer(model)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(got) == set(convs)
    for name, m in convs.items():
        assert got[name] == pytest.approx(float(reference.orthogonality(m.weight.detach())), rel=1e-6)
        assert 0 < got[name] <= 1 + 1e-6


def test_orthogonality_is_one_for_orthogonal_filters():
    layer = nn.Linear(16, 8)
    nn.init.orthogonal_(layer.weight)
    assert metrics.orthogonality_per_layer(layer)[""] == pytest.approx(1.0, abs=1e-5)


def test_accuracy_counts_argmax_hits():
    model = nn.Identity()
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.2, 0.1]])
    labels = torch.tensor([0, 1, 1, 1])
    assert metrics.top1_accuracy(model, [(logits, labels)]) == (2, 4)
    assert metrics.accuracy(model, [(logits[:2], labels[:2]), (logits[2:], labels[2:])]) == 0.5


def test_params_flops_of_known_layers():
    params, flops = metrics.params_flops(nn.Linear(64, 10, bias=False), torch.randn(1, 64))
    assert (params, flops) == (640, 640)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    params, flops = metrics.params_flops(conv, torch.randn(1, 3, 8, 8))
    assert params == 8 * 3 * 9 and flops == 8 * 3 * 9 * 64


def test_sparsity_and_speedup():
    assert metrics.sparsity(200, 50) == 0.75
    assert metrics.speedup(300, 100) == 3.0
    assert math.isinf(metrics.speedup(1, 0))


def test_filter_norms_are_l1_of_rows():
    layer = nn.Linear(4, 3)
    norms = metrics.filter_norms(layer)[""]
    torch.testing.assert_close(norms, layer.weight.detach().abs().sum(1))
