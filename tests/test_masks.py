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


def test_num_pruned_ignores_float_rounding_of_the_product():
    """0.07·100 = 7.000000000000001 in floats: ⌈·⌉ of it would prune 8 of 100 filters at ratio 0.07."""
    from fractions import Fraction

    assert num_pruned(0.07, 100) == 7
    assert num_pruned(0.14, 50) == 7
    assert num_pruned(1 / 3, 3) == 1 and num_pruned(0.1 + 0.2, 10) == 3
    for percent in range(100):
        for n in range(1, 300):
            exact = math.ceil(Fraction(percent, 100) * n)
            assert num_pruned(percent / 100, n) == min(exact, int(0.995 * n)), (percent, n)


def tied_resnet(value: float):
    """The resnet with every block-internal conv1 filled with one value: all their L1 scores tie."""
    torch.manual_seed(0)
    model = cifar_resnet(20, width=8)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("conv1") and name.startswith("layer"):
                m.weight.fill_(value)
    return model, channel_groups(model, X)


def test_global_scope_prunes_exactly_k_when_scores_tie():
    """More than k candidates tie at the threshold: exactly the k first of the stable order (equal scores in
    pooled order) are pruned, then the per-layer cap applies; the old rule, `score < sorted[k]`, pruned nothing."""
    from fastreg.pruning.masks import global_pruned_counts

    zeros_first = [torch.tensor([0.0, 0, 0, 0, 1, 1]), torch.tensor([0.0, 0, 2, 2])]
    assert global_pruned_counts(zeros_first, 0.5) == [4, 1]  # k = 5 of the 6 zeros: the first five
    model, groups = tied_resnet(0.01)
    ratios = resolve_ratios(groups, 0.4)
    masks = [m for m in select_keep_masks(model, groups, ratios, scope="global") if m is not None]
    assert [m.numel() for m in masks] == [8] * 3 + [16] * 3 + [32] * 3  # k = ⌈0.4·168⌉ = 68 tied candidates
    # in model order: 8 + 8 + 8 + 16 + 16 + 12 = 68, each layer then capped at ⌊0.995·N⌋ (7 of 8, 15 of 16)
    assert [int((~m).sum()) for m in masks] == [7, 7, 7, 15, 15, 12, 0, 0, 0]
    assert all(torch.equal(m, torch.arange(m.numel()) >= int((~m).sum())) for m in masks)  # lowest indices first


def test_slimming_prunes_exactly_k_when_gammas_tie_at_zero():
    """Network slimming drives many BN γ to exactly 0: with more than k zeros, k channels are still pruned."""
    from fastreg.pruning import slimming_prune

    torch.manual_seed(0)
    model = cifar_resnet(20, width=8)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d) and name.startswith("layer") and name.endswith("bn1"):
                m.weight.uniform_(0.5, 1.0)
                m.weight[: m.num_features * 3 // 4] = 0.0  # 126 of the 168 candidates at γ = 0
    small, masks = slimming_prune(model, 0.5, X)
    pruned = {n: ~m for n, m in masks.items()}
    assert sum(int(p.sum()) for p in pruned.values()) == 84  # ⌈0.5·168⌉
    mods = dict(model.named_modules())
    assert all(mods[n.replace("conv1", "bn1")].weight[p].abs().max() == 0 for n, p in pruned.items() if p.any())
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


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
