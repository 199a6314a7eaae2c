"""OCSPruner: saliency, global partition, Jaccard stability schedule, group lasso and shrink."""
import copy
import math

import pytest
import torch
from torch import nn

from fastreg import reference
from fastreg.models.cifar_resnet import cifar_resnet
from fastreg.pruning import OCSPruner, count_params_flops, jaccard

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # (drawn at import: its own seed)


pytestmark = pytest.mark.usefixtures("one_thread")


def resnet():
    torch.manual_seed(0)
    return cifar_resnet(20, num_classes=5, width=8)


def test_saliency_matches_reference_per_group():
    model = resnet()
    pruner = OCSPruner(model, 0.5, example_inputs=X)
    sal = pruner.saliency()
    mods = dict(model.named_modules())
    for off, g in zip(pruner._offsets, pruner.groups):
        tensors, dims, ids = [], [], []
        for s in g.slices:
            t = getattr(mods[s.module], s.param).detach()
            gid = torch.full((t.shape[s.dim],), -1, dtype=torch.long)
            gid[s.index] = s.channel
            tensors.append(t), dims.append(s.dim), ids.append(gid)
        expected = reference.group_saliency(tensors, dims, ids, g.num_channels)
        torch.testing.assert_close(sal[off : off + g.num_channels], expected)
    # residual-coupled groups are candidates by default, the classifier never
    assert any(g.coupled for g in pruner.groups) and all("fc" not in g.producers for g in pruner.groups)


@pytest.mark.parametrize("metric", ["params", "flops", "channels"])
def test_partition_reaches_target_with_smallest_threshold(metric):
    model = resnet()
    pruner = OCSPruner(model, 0.4, example_inputs=X, metric=metric)
    sal = pruner.saliency()
    masks = pruner.partition(sal)
    pruned = torch.cat([~m for m in masks])
    dense = pruner.cost(torch.zeros_like(pruned))
    assert pruner.cost(pruned) <= dense * 0.6
    assert all(m.any() for m in masks)  # every layer keeps a channel
    # one global threshold: every pruned channel scores below every kept unprotected one ...
    kept_unprotected = []
    for off, g, m in zip(pruner._offsets, pruner.groups, masks):
        s = sal[off : off + g.num_channels]
        kept_unprotected.append(s[m & (torch.arange(g.num_channels) != s.argmax())])
    assert sal[pruned].max() < torch.cat(kept_unprotected).min()
    # ... and it is the smallest such threshold: keeping the most salient pruned channel misses the target
    restored = pruned.clone()
    restored[torch.where(pruned, sal, -1.0).argmax()] = False
    assert pruner.cost(restored) > dense * 0.6


def test_params_cost_model_is_exact():
    model = resnet()
    pruner = OCSPruner(model, 0.5, example_inputs=X, metric="params")
    masks = pruner.partition()
    pruner.masks = masks
    small = pruner_prune_now(pruner)
    layer_weights = sum(m.weight.numel() for m in small.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert layer_weights == pruner.cost(torch.cat([~m for m in masks]))
    p0, f0 = count_params_flops(model, X)
    p1, f1 = count_params_flops(small, X)
    assert p1 < p0 * 0.55 and f1 < f0


def pruner_prune_now(pruner):
    pruner.phase = "prune"
    return pruner.prune()


def test_unreachable_target_and_bad_arguments():
    model = resnet()
    with pytest.raises(ValueError, match="unreachable"):
        OCSPruner(model, 0.999, example_inputs=X).partition()
    with pytest.raises(ValueError, match=r"target_ratio must be in \[0, 1\)"):
        OCSPruner(model, 1.0, example_inputs=X)
    with pytest.raises(ValueError, match="metric"):
        OCSPruner(model, 0.5, metric="latency", example_inputs=X)
    with pytest.raises(ValueError, match="skip pattern"):
        OCSPruner(model, 0.5, skip=["*attn*"], example_inputs=X)
    with pytest.raises(ValueError, match="no prunable layer"):
        OCSPruner(nn.Sequential(nn.Linear(3, 2)), 0.5)
    for name in ("start_tol", "prune_tol", "lam_init", "lam_delta"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
            OCSPruner(model, 0.5, example_inputs=X, **{name: -1e-4})


def test_schedule_defaults_are_the_papers():
    """Table 8 of the OCSPruner paper: τ = 1e-4, ε = 1e-3, λ0 = 1e-4, δ = 1e-4, Δt = 1 (CIFAR); the trainer's
    --ocs-* flags default to the same values."""
    import inspect

    from fastreg.train import Config

    defaults = {k: p.default for k, p in inspect.signature(OCSPruner).parameters.items()}
    paper = dict(start_tol=1e-4, prune_tol=1e-3, lam_init=1e-4, lam_delta=1e-4, lam_interval=1, window=5)
    assert {k: defaults[k] for k in paper} == paper
    assert {k: getattr(Config(), "ocs_" + k) for k in paper} == paper


def test_jaccard():
    a = [torch.tensor([1, 1, 0, 0], dtype=torch.bool), torch.tensor([1, 0], dtype=torch.bool)]
    b = [torch.tensor([1, 0, 1, 0], dtype=torch.bool), torch.tensor([1, 0], dtype=torch.bool)]
    assert jaccard(a, b) == pytest.approx((1 / 3 + 1) / 2)
    assert jaccard(a, a) == 1.0


def test_schedule_start_lambda_and_prune_epoch():
    """Feed partitions by hand: stability rises, plateaus (start), then reaches 1 − ε (prune)."""
    model = resnet()
    r, tau, eps, lam0, delta = 2, 0.05, 0.01, 0.02, 0.1
    pruner = OCSPruner(model, 0.5, example_inputs=X, window=r, start_tol=tau, prune_tol=eps, lam_init=lam0, lam_delta=delta)
    base = [torch.arange(g.num_channels) % 2 == 0 for g in pruner.groups]  # half kept everywhere

    def flipped(k):  # k filters of group 0 swapped between kept and pruned: lower Jaccard
        masks = [m.clone() for m in base]
        kept, pruned = masks[0].nonzero().flatten(), (~masks[0]).nonzero().flatten()
        for i in range(k):
            masks[0][kept[i]], masks[0][pruned[i]] = False, True
        return masks

    sequence = [flipped(3), base, flipped(2), base, flipped(1), base, flipped(1), base, base, base, base, base]
    phases, lams = [], []
    for masks in sequence:
        phases.append(pruner.record_partition(masks))
        lams.append(pruner.lam)
    J = pruner.jaccard_history
    avg = [None if t + 1 < r else sum(J[t - r + 1 : t + 1]) / r for t in range(len(J))]  # over history index
    start = next(t for t in range(len(J)) if avg[t] is not None and t - r >= 0 and avg[t - r] is not None and avg[t] - avg[t - r] <= tau)
    start_epoch = start + 1  # history index t is the Jaccard of epochs t and t + 1
    assert phases[start_epoch] == "sparsify" and all(p == "dense" for p in phases[:start_epoch])
    assert pruner.start_epoch == start_epoch
    prune_epoch = next(t + 1 for t in range(start, len(J)) if t > start and avg[t] >= 1 - eps)
    assert phases[prune_epoch] == "prune" and all(p == "sparsify" for p in phases[start_epoch:prune_epoch])
    expected_lam, lam = [], lam0  # λ_{t_start} = λ0, then λ_t = λ_{t−1} + δ·⌊(t − t_start)/Δt⌋
    for t in range(start_epoch, prune_epoch + 1):
        lam += delta * (t - start_epoch)
        expected_lam.append(lam)
    assert all(lam == 0 for lam in lams[:start_epoch])
    assert lams[start_epoch : prune_epoch + 1] == pytest.approx(expected_lam)
    assert 0 < start_epoch < prune_epoch < len(sequence) - 1, phases


@pytest.mark.parametrize("lasso", ["slice", "group"])
def test_group_lasso_and_shrink_act_on_pruned_slices_only(lasso):
    model = resnet()
    pruner = OCSPruner(model, 0.5, example_inputs=X, window=1, start_tol=1.0, lasso=lasso)
    while pruner.phase == "dense":
        pruner.end_epoch()
    assert pruner.phase == "sparsify" and pruner.lam == 1e-4  # λ_{t_start} = λ0 (the paper's 1e-4)
    pruner.lam = 0.3
    before = copy.deepcopy(model)
    loss = model(X).square().mean()
    model.zero_grad()
    loss.backward()
    mods, ref_mods = dict(model.named_modules()), dict(before.named_modules())
    grad = {(n, p): getattr(mods[n], p).grad.clone() for g in pruner.groups for s in g.slices for n, p in [(s.module, s.param)]}
    weight = {(n, p): getattr(ref_mods[n], p).detach().clone() for (n, p) in grad}
    # independently, slice by slice: every slice of every pruned channel (filters, biases, BN γ/β,
    # consumer input columns) gets λ·slice/‖slice‖ (or /‖all slices of the channel‖) ...
    for g, keep in zip(pruner.groups, pruner.masks):
        for c in (~keep).nonzero().flatten().tolist():
            members = [
                (s, int(pos)) for s in g.slices for pos, ch in zip(s.index.tolist(), s.channel.tolist()) if ch == c
            ]
            group_norm = math.sqrt(sum(float(weight[(s.module, s.param)].select(s.dim, pos).square().sum()) for s, pos in members))
            for s, pos in members:
                v = weight[(s.module, s.param)].select(s.dim, pos)
                norm = float(v.norm()) if lasso == "slice" else group_norm
                if norm > 0:
                    grad[(s.module, s.param)].select(s.dim, pos).add_(0.3 * v / norm)
    pruner.apply_grad_()
    for (n, p), expected in grad.items():
        torch.testing.assert_close(getattr(mods[n], p).grad, expected, msg=lambda m: f"{n}.{p}: {m}")
    # ... and is multiplied by 1 − λ·lr (twice where a pruned row meets a pruned column)
    factor = 1 - 0.3 * 0.1
    for g, keep in zip(pruner.groups, pruner.masks):
        for s in g.slices:
            for pos, ch in zip(s.index.tolist(), s.channel.tolist()):
                if not keep[ch]:
                    weight[(s.module, s.param)].select(s.dim, pos).mul_(factor)
    pruner.shrink_(lr=0.1)
    for (n, p), expected in weight.items():
        torch.testing.assert_close(getattr(mods[n], p).detach(), expected, msg=lambda m: f"{n}.{p}: {m}")


def test_end_to_end_one_cycle():
    model = resnet()
    pruner = OCSPruner(model, 0.5, example_inputs=X, window=1, start_tol=1.0, prune_tol=0.5, lam_delta=0.5, metric="flops")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    phase = "dense"
    for epoch in range(6):
        for _ in range(2):
            loss = nn.functional.cross_entropy(model(torch.randn(X.shape)), torch.randint(0, 5, (2,)))
            opt.zero_grad()
            loss.backward()
            pruner.apply_grad_()
            opt.step()
            pruner.shrink_(opt.param_groups[0]["lr"])
        phase = pruner.end_epoch()
        if phase == "prune":
            break
    assert phase == "prune"
    state = pruner.state_dict()
    small = pruner.prune()
    assert pruner.phase == "finetune"
    _, f0 = count_params_flops(model, X)
    _, f1 = count_params_flops(small, X)
    assert f1 <= f0 * 0.55  # conv/linear MACs cut by ≥ 50 % (BN etc. make up the rest)
    other = OCSPruner(copy.deepcopy(model), 0.5, example_inputs=X, window=1)
    other.load_state_dict(state)
    assert other.phase == "prune" and other.keep_masks.keys() == pruner.keep_masks.keys()
    assert math.isclose(other.lam, pruner.lam)
