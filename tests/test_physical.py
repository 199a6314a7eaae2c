"""Physical pruning: after a few TPP steps, the pruned model computes what the zeroed model computes."""
import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from fastreg.models.cifar_resnet import cifar_resnet
from fastreg.pruning import TPPLoss, channel_groups, count_params_flops, prune, zero_pruned_


pytestmark = pytest.mark.usefixtures("one_thread")


def regularize(model, crit, x, num_classes, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(steps):
        loss = crit(model(x), torch.randint(0, num_classes, (x.shape[0],)))
        opt.zero_grad()
        loss.backward()
        opt.step()


CASES = {
    # name: (builder, input shape, pruning_ratio, coupled)
    "resnet56": (lambda: cifar_resnet(56), (2, 3, 32, 32), 0.5, "skip"),
    "resnet56_coupled": (lambda: cifar_resnet(56), (2, 3, 32, 32), 0.4, "group"),
    "resnet18_coupled": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32), 0.5, "group"),
    "resnet50": (
        lambda: torchvision.models.resnet50(num_classes=10),
        (2, 3, 64, 64),
        {"*layer*.conv1": 0.5, "*layer*.conv2": 0.3},
        "skip",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prune_equals_zeroed_model(case):
    build, shape, ratio, coupled = CASES[case]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(shape)
    crit = TPPLoss(model, ratio, delta=0.5, interval=1, coupled=coupled, example_inputs=x)
    regularize(model, crit, x, 10)
    masks = crit.keep_masks
    if coupled == "group":  # residual-coupled layers were pruned, with one shared mask
        coupled_layers = [g for g in crit.groups if g.coupled and g.producers[0] in masks]
        assert coupled_layers and all(torch.equal(masks[n], masks[g.producers[0]]) for g in coupled_layers for n in g.producers)

    zeroed = copy.deepcopy(model)
    zero_pruned_(zeroed, masks, x)
    small = prune(model, masks, x)
    zeroed.eval()
    small.eval()
    with torch.no_grad():
        a, b = zeroed(x), small(x)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)

    mods = dict(small.named_modules())
    for name, keep in masks.items():
        assert mods[name].weight.shape[0] == int(keep.sum()), name
    params0, flops0 = count_params_flops(model, x)
    params1, flops1 = count_params_flops(small, x)
    assert params1 < params0 and flops1 < flops0
    assert count_params_flops(model, x) == (params0, flops0)  # the dense model is untouched


def test_resnet56_figures():
    """CIFAR ResNet-56: 0.86M params, 127M multiply-accumulates at 32×32 (1×1 projection shortcuts);
    pruning half of every block's first conv removes about half."""
    model = cifar_resnet(56)
    x = torch.randn(1, 3, 32, 32)
    params, flops = count_params_flops(model, x)
    assert params == 855_770 and flops == 127_373_962
    crit = TPPLoss(model, 0.5, example_inputs=x)
    small = prune(model, crit.keep_masks, x)
    p1, f1 = count_params_flops(small, x)
    assert 0.45 < p1 / params < 0.55 and 0.45 < f1 / flops < 0.55


def test_prune_checks_masks():
    model = cifar_resnet(20, width=8)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"keep_masks\['layer1.0.conv1'\] must have shape \[8\]"):
        prune(model, {"layer1.0.conv1": torch.ones(7, dtype=torch.bool)}, x)
    with pytest.raises(TypeError, match="bool"):
        prune(model, {"layer1.0.conv1": torch.ones(8)}, x)
    with pytest.raises(ValueError, match="no module named"):
        prune(model, {"layer9.conv1": torch.ones(8, dtype=torch.bool)}, x)
    with pytest.raises(ValueError, match="not a Conv/Linear"):
        prune(model, {"layer1.0.bn1": torch.ones(8, dtype=torch.bool)}, x)
    with pytest.raises(ValueError, match="keep at least one"):
        prune(model, {"layer1.0.conv1": torch.zeros(8, dtype=torch.bool)}, x)
    with pytest.raises(ValueError, match="model's outputs"):
        prune(model, {"fc": torch.tensor([True, False] * 5)}, x)
    keep = torch.tensor([True, False] * 4)
    with pytest.raises(ValueError, match="residual-coupled"):
        prune(model, {"layer1.0.conv2": keep, "layer1.1.conv2": keep.flip(0)}, x)


def test_prune_coupled_layer_prunes_its_group():
    model = cifar_resnet(20, width=8)
    x = torch.randn(1, 3, 16, 16)
    keep = torch.tensor([True, False] * 4)
    small = prune(model, {"layer1.0.conv2": keep}, x)
    for name in ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"):
        assert dict(small.named_modules())[name].weight.shape[0] == 4
    assert small.layer2[0].conv1.weight.shape[1] == 4 and small.layer2[0].downsample[0].weight.shape[1] == 4


def test_graph_finds_bn_and_groups():
    model = cifar_resnet(20, width=8)
    groups = {g.producers[0]: g for g in channel_groups(model, torch.randn(1, 3, 16, 16))}
    assert groups["layer2.1.conv1"].norms == ["layer2.1.bn1"] and groups["layer2.1.conv1"].internal
    stage2 = groups["layer2.0.conv2"]
    assert set(stage2.producers) == {"layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2", "layer2.2.conv2"}
    assert stage2.coupled and not stage2.internal
    assert not groups["fc"].prunable


def test_graph_tracing_leaves_bn_stats():
    model = cifar_resnet(20, width=8)
    before = copy.deepcopy(model.state_dict())
    TPPLoss(model, 0.5, example_inputs=torch.randn(2, 3, 16, 16))
    count_params_flops(model, torch.randn(2, 3, 16, 16))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mlp_with_linear_layers():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(4, 10)
    crit = TPPLoss(mlp, 0.5, delta=0.5, interval=1)  # example input inferred from the first Linear
    assert set(crit.keep_masks) == {"0", "3"}
    regularize(mlp, crit, x, 3)
    zeroed = copy.deepcopy(mlp)
    zero_pruned_(zeroed, crit.keep_masks)
    small = prune(mlp, crit.keep_masks)
    zeroed.eval()
    small.eval()
    torch.testing.assert_close(small(x), zeroed(x), atol=1e-5, rtol=1e-5)
    assert small[0].out_features == 8 and small[3].in_features == 8 and small[3].out_features == 6


# ---------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------
def test_l1_prune_matches_tpp_architecture():
    from fastreg.pruning import l1_prune

    model = cifar_resnet(20, width=8)
    x = torch.randn(1, 3, 16, 16)
    small, masks = l1_prune(model, 0.5, x)
    assert masks.keys() == TPPLoss(model, 0.5, example_inputs=x).keep_masks.keys()
    for name, keep in masks.items():
        w = dict(model.named_modules())[name].weight
        l1 = w.abs().sum((1, 2, 3))
        assert l1[~keep].max() <= l1[keep].min()
        assert dict(small.named_modules())[name].weight.shape[0] == int(keep.sum())


def test_slimming_loss_and_in_place_grad_agree():
    from fastreg.pruning import SlimmingLoss

    torch.manual_seed(0)
    a = cifar_resnet(20, width=8)
    b = copy.deepcopy(a)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    la = SlimmingLoss(a, s=0.01)(a(x), y)
    la.backward()
    crit_b = SlimmingLoss(b, s=0.01, in_loss=False)
    lb = crit_b(b(x), y)
    lb.backward()
    crit_b.apply_grad_()
    gammas = [m.weight for m in a.modules() if isinstance(m, nn.BatchNorm2d)]
    torch.testing.assert_close(la - lb, 0.01 * sum(g.abs().sum() for g in gammas))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)
    with pytest.raises(ValueError, match="BatchNorm"):
        SlimmingLoss(nn.Sequential(nn.Linear(2, 2)))


def test_slimming_prune_global_gamma_threshold():
    from fastreg.pruning import slimming_prune

    torch.manual_seed(0)
    model = cifar_resnet(20, width=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1, 1)
    x = torch.randn(1, 3, 16, 16)
    small, masks = slimming_prune(model, 0.5, x)
    mods = dict(model.named_modules())
    gammas = {n: mods[n.replace("conv1", "bn1")].weight.abs() for n in masks}
    pooled = torch.cat(list(gammas.values()))
    assert sum(int((~m).sum()) for m in masks.values()) == math.ceil(0.5 * pooled.numel())
    pruned_max = max(gammas[n][~m].max() for n, m in masks.items() if (~m).any())
    kept_min = min(gammas[n][m].min() for n, m in masks.items())
    assert pruned_max <= kept_min
    with pytest.raises(ValueError, match="one float"):
        slimming_prune(model, {"*conv1": 0.5}, x)


def test_scratch_reinit():
    from fastreg.pruning import scratch_reinit

    model = cifar_resnet(20, width=8)
    model.train()
    model(torch.randn(4, 3, 16, 16))  # BN running stats move
    fresh = scratch_reinit(model, seed=3)
    again = scratch_reinit(model, seed=3)
    for (n, a), b, c in zip(model.state_dict().items(), fresh.state_dict().values(), again.state_dict().values()):
        assert a.shape == b.shape and torch.equal(b, c), n
    assert not torch.equal(model.conv1.weight, fresh.conv1.weight)
    assert torch.equal(fresh.bn1.running_mean, torch.zeros(8))
