"""Pruning ratios, importance and keep masks: the original code's rules, and clear errors."""
import math

import pytest
import torch
from torch import nn

from fastreg import reference
from fastreg.models.cifar_resnet import cifar_resnet
from fastreg.pruning import TPPLoss, channel_groups, num_pruned, resolve_ratios, select_keep_masks

X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # (drawn at import: its own seed)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = cifar_resnet(20, width=8)
    return model, channel_groups(model, X)


def ratios_by_layer(groups, ratios):
    return {n: r for g, r in zip(groups, ratios) for n in g.producers}


def test_num_pruned_is_ceil_capped():
    assert num_pruned(0.5, 15) == 8  # ⌈7.5⌉
    assert num_pruned(0.3, 16) == 5  # ⌈4.8⌉
    assert num_pruned(0.999, 16) == 15  # ⌈15.98⌉ capped at ⌊0.995·16⌋
    assert num_pruned(0.0, 16) == 0


def test_float_ratio_reaches_block_internal_layers(resnet):
    model, groups = resnet
    by_layer = ratios_by_layer(groups, resolve_ratios(groups, 0.5))
    assert {n for n, r in by_layer.items() if r > 0} == {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)}
    coupled = ratios_by_layer(groups, resolve_ratios(groups, 0.5, coupled="group"))
    assert coupled["layer2.0.downsample.0"] == 0.5 and coupled["conv1"] == 0.5 and coupled["fc"] == 0


def test_patterns_last_match_wins_and_skip(resnet):
    model, groups = resnet
    spec = {"*layer*.conv1": 0.5, "layer2.*.conv1": 0.25}
    by_layer = ratios_by_layer(groups, resolve_ratios(groups, spec, skip=["layer3.0.*"]))
    assert by_layer["layer1.1.conv1"] == 0.5 and by_layer["layer2.1.conv1"] == 0.25
    assert by_layer["layer3.0.conv1"] == 0 and by_layer["layer3.1.conv1"] == 0.5
    as_string = resolve_ratios(groups, "*layer*.conv1:0.5, layer2.*.conv1:0.25", skip=["layer3.0.*"])
    assert as_string == resolve_ratios(groups, spec, skip=["layer3.0.*"])


@pytest.mark.parametrize(
    "ratio, kwargs, error, match",
    [
        (1.0, {}, ValueError, r"pruning_ratio must be in \[0, 1\), got 1.0"),
        (-0.1, {}, ValueError, r"pruning_ratio must be in \[0, 1\)"),
        ({"*conv1": 1.5}, {}, ValueError, r"pruning_ratio\['\*conv1'\] must be in \[0, 1\)"),
        ("0.5", {}, ValueError, "pattern:ratio"),
        (True, {}, TypeError, "pruning_ratio must be a number"),
        ({"*attention*": 0.5}, {}, ValueError, "matches no Conv/Linear layer"),
        ({"layer1.0.conv2": 0.5}, {}, ValueError, "coupled='group'"),
        ({"fc": 0.5}, {}, ValueError, "model's outputs"),
        (0.5, {"skip": ["*nothing*"]}, ValueError, "skip pattern '\\*nothing\\*' matches no"),
        (0.5, {"coupled": "all"}, ValueError, "coupled must be one of"),
        ({"layer1.0.conv2": 0.5, "layer1.1.conv2": 0.3}, {"coupled": "group"}, ValueError, "different ratios"),
    ],
)
def test_bad_ratios_raise(resnet, ratio, kwargs, error, match):
    _, groups = resnet
    with pytest.raises(error, match=match):
        resolve_ratios(groups, ratio, **kwargs)


def test_no_prunable_layer():
    with pytest.raises(ValueError, match="no prunable layer"):
        TPPLoss(nn.Sequential(nn.Linear(4, 2)), 0.5)
    with pytest.raises(ValueError, match="no Conv/Linear layer"):
        TPPLoss(nn.Sequential(nn.ReLU()), 0.5)


def test_l1_masks_are_smallest_mean_abs_filters(resnet):
    model, groups = resnet
    ratios = resolve_ratios(groups, 0.3)
    masks = select_keep_masks(model, groups, ratios)
    mods = dict(model.named_modules())
    for g, r, keep in zip(groups, ratios, masks):
        if r == 0:
            assert keep is None
            continue
        w = mods[g.producers[0]].weight
        k = math.ceil(0.3 * w.shape[0])
        assert int((~keep).sum()) == k
        expected = torch.ones_like(keep)
        expected[w.abs().mean((1, 2, 3)).argsort()[:k]] = False
        assert torch.equal(keep, expected)
        if k == math.floor(0.3 * w.shape[0]):  # where ⌈⌉ = ⌊⌋, the reference L1 ranking agrees
            assert torch.equal(keep, reference.l1_keep_mask(w, 0.3))


def test_l2_and_callable_importance(resnet):
    model, groups = resnet
    ratios = resolve_ratios(groups, 0.5)
    mods = dict(model.named_modules())
    l2 = select_keep_masks(model, groups, ratios, importance="l2")
    rev = select_keep_masks(model, groups, ratios, importance=lambda name, m: -m.weight.detach().flatten(1).norm(dim=1))
    for g, r, a, b in zip(groups, ratios, l2, rev):
        if r:
            norms = mods[g.producers[0]].weight.flatten(1).norm(dim=1)
            assert norms[~a].max() <= norms[a].min()  # l2 prunes the smallest norms
            assert norms[~b].min() >= norms[b].max()  # the callable's scores rule
    with pytest.raises(ValueError, match="importance must be one of"):
        select_keep_masks(model, groups, ratios, importance="taylor")
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        select_keep_masks(model, groups, ratios, importance=lambda name, m: torch.ones(3))


def test_global_scope_matches_original_threshold_rule(resnet):
    model, groups = resnet
    ratios = resolve_ratios(groups, 0.4)
    masks = select_keep_masks(model, groups, ratios, scope="global")
    mods = dict(model.named_modules())
    scores = [mods[g.producers[0]].weight.abs().mean((1, 2, 3)) for g, r in zip(groups, ratios) if r]
    pooled = torch.cat(scores)
    k = min(math.ceil(0.4 * pooled.numel()), pooled.numel() - 1)
    threshold = pooled.sort().values[k]
    got = [m for m in masks if m is not None]
    for s, keep in zip(scores, got):
        below = s < threshold
        if int(below.sum()) <= int(0.995 * s.numel()):  # else capped at ⌊0.995·N⌋
            assert torch.equal(keep, ~below)
    assert sum(int((~m).sum()) for m in got) == k  # no ties in random weights


def test_coupled_group_mask_uses_group_saliency(resnet):
    model, groups = resnet
    ratios = resolve_ratios(groups, 0.5, coupled="group")
    masks = select_keep_masks(model, groups, ratios)
    mods = dict(model.named_modules())
    g, keep = next((g, m) for g, m in zip(groups, masks) if g.coupled and m is not None)
    # independent S(g): every coupled slice (filters, BN γ/β, consumers' input columns), by hand
    tensors, dims, ids = [], [], []
    for n in g.producers:
        tensors.append(mods[n].weight), dims.append(0), ids.append(torch.arange(g.num_channels))
    for n in g.norms:
        for t in (mods[n].weight, mods[n].bias):
            tensors.append(t), dims.append(0), ids.append(torch.arange(g.num_channels))
    for n in g.consumers:
        tensors.append(mods[n].weight), dims.append(1), ids.append(torch.arange(g.num_channels))
    saliency = reference.group_saliency([t.detach() for t in tensors], dims, ids, g.num_channels)
    expected = torch.ones_like(keep)
    expected[saliency.argsort()[: math.ceil(0.5 * g.num_channels)]] = False
    assert torch.equal(keep, expected)
