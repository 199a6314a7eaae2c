"""TPPLoss / TPPPruner against an independent re-implementation of the original TPP code's step."""
import copy

import pytest
import torch
from torch import nn

import fastreg
from fastreg import _registry, reference
from fastreg.models.cifar_resnet import cifar_resnet
from fastreg.pruning import TPPLoss, TPPPruner, count_params_flops, reg_schedule

X16 = (4, 3, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_net():
    """Convs with biases, each followed by a BN (named so the test knows the pairs by hand)."""
    torch.manual_seed(1)
    net = nn.Sequential()
    net.add_module("c1", nn.Conv2d(3, 8, 3, padding=1, bias=True))
    net.add_module("b1", nn.BatchNorm2d(8))
    net.add_module("r1", nn.ReLU())
    net.add_module("c2", nn.Conv2d(8, 12, 3, padding=1, bias=True))
    net.add_module("b2", nn.BatchNorm2d(12))
    net.add_module("r2", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(12, 5))
    with torch.no_grad():  # non-trivial BN affine parameters
        for bn in (net.b1, net.b2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net, {"c1": "b1", "c2": "b2"}


def resnet20_net():
    torch.manual_seed(2)
    net = cifar_resnet(20, num_classes=5, width=8)
    pairs = {f"layer{s}.{b}.conv1": f"layer{s}.{b}.bn1" for s in (1, 2, 3) for b in range(3)}
    return net, pairs


def official_loss_and_grads(model, pairs, keep, x, y, reg, lw, target):
    """The original opp_pruner step: CE + lw·reg·Σ mse_loss(G, G with pruned rows/cols zeroed),
    backward, then grad += reg·w on pruned filters, biases and the next BN's γ, β."""
    mods = dict(model.named_modules())
    names = list(keep)
    loss = nn.functional.cross_entropy(model(x), y)
    if reg > 0:
        loss = loss + lw * reg * reference.gram_penalty_official([mods[n].weight for n in names], [keep[n] for n in names], target)
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for n in names:
            pr = (~keep[n]).float()
            m, bn = mods[n], mods[pairs[n]]
            m.weight.grad += reg * pr.view(-1, *[1] * (m.weight.dim() - 1)) * m.weight
            if m.bias is not None:
                m.bias.grad += reg * pr * m.bias
            bn.weight.grad += reg * pr * bn.weight
            bn.bias.grad += reg * pr * bn.bias
    return loss.detach()


def assert_matches_original(make, l2_in_loss, target, backend=None, steps=14):
    """Train two copies side by side, TPPLoss vs the original step, comparing every gradient."""
    net, pairs = make()
    ref = copy.deepcopy(net)
    kw = dict(lw=1000.0, delta=0.02, interval=3, ceiling=0.07, target=target, l2_in_loss=l2_in_loss, backend=backend)
    crit = TPPLoss(net, 0.5, example_inputs=torch.randn(X16), **kw)
    assert set(crit.keep_masks) == set(pairs)
    keep = {n: crit.keep_masks[n].clone() for n in pairs}
    opt_a = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    opt_b = torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9)
    seen = []
    for k in range(steps):  # reg 0, 0, 0, .02, ..., capped at .07 from k = 12
        x, y = torch.randn(X16), torch.randint(0, 5, (4,))
        loss_a = crit(net(x), y)
        opt_a.zero_grad()
        loss_a.backward()
        if not l2_in_loss:
            crit.apply_l2_()
        expected_reg = min(0.07, 0.02 * (k // 3))
        assert crit.reg == expected_reg and crit.iteration == k + 1
        loss_b = official_loss_and_grads(ref, pairs, keep, x, y, expected_reg, 1000.0, target)
        if not l2_in_loss:  # with l2_in_loss the value also carries ½·reg·‖·_P‖² (test_loss_value_...)
            torch.testing.assert_close(loss_a.detach(), loss_b, rtol=1e-5, atol=1e-5)
        for (name, pa), pb in zip(net.named_parameters(), ref.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"iter {k} {name}: {m}")
        opt_a.step()
        opt_b.step()
        seen.append(expected_reg)
    return seen


@pytest.mark.parametrize("make", [small_net, resnet20_net], ids=["convs_with_bias", "resnet20"])
@pytest.mark.parametrize("l2_in_loss", [True, False], ids=["l2_in_loss", "l2_in_place"])
@pytest.mark.parametrize("target", ["decorrelate", "diagonal"])
def test_objective_matches_original_code_across_schedule(make, l2_in_loss, target):
    seen = assert_matches_original(make, l2_in_loss, target)
    assert seen[0] == 0 and 0 < seen[5] < 0.07 and seen[-1] == 0.07


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
def test_objective_matches_original_code_on_every_backend(backend):
    why = _registry.why_unavailable("gram_penalty", backend, "cpu")
    if why:
        pytest.skip(why)
    assert_matches_original(resnet20_net, False, "decorrelate", backend=backend, steps=8)


def test_eval_mode_calls_do_not_advance():
    net, _ = small_net()
    crit = TPPLoss(net, 0.5, delta=0.1, interval=1, example_inputs=torch.randn(X16))
    x, y = torch.randn(X16), torch.randint(0, 5, (4,))
    for _ in range(3):
        crit(net(x), y)
    assert crit.iteration == 3 and crit.reg == pytest.approx(0.2)
    net.eval()
    crit(net(x), y)
    assert crit.iteration == 3 and crit.reg == pytest.approx(0.2)


def test_loss_value_is_base_plus_terms():
    net, pairs = small_net()
    crit = TPPLoss(net, 0.5, delta=0.3, interval=1, lw=10.0, example_inputs=torch.randn(X16))
    x, y = torch.randn(X16), torch.randint(0, 5, (4,))
    crit(net(x), y)  # k = 0: reg 0
    loss = crit(net(x), y)  # k = 1: reg .3
    mods = dict(net.named_modules())
    ce = nn.functional.cross_entropy(net(x), y)
    gram = reference.gram_penalty_official([mods[n].weight for n in pairs], [crit.keep_masks[n] for n in pairs])
    l2 = 0.0
    for n, b in pairs.items():
        pr = ~crit.keep_masks[n]
        for t in (mods[n].weight, mods[n].bias, mods[b].weight, mods[b].bias):
            l2 = l2 + t[pr].square().sum()
    torch.testing.assert_close(loss, ce + 10.0 * 0.3 * gram + 0.5 * 0.3 * l2, rtol=1e-5, atol=1e-5)


def test_reg_schedule_formula():
    assert [reg_schedule(k, 0.25, 2, 0.6) for k in range(8)] == [0, 0, 0.25, 0.25, 0.5, 0.5, 0.6, 0.6]


def run_steps(net, crit, opt, batches):
    for x, y in batches:
        loss = crit(net(x), y)
        opt.zero_grad()
        loss.backward()
        if not crit.l2_in_loss:
            crit.apply_l2_()
        opt.step()


@pytest.mark.parametrize("l2_in_loss", [True, False])
def test_resume_from_state_dict_continues_identical_trajectory(l2_in_loss):
    net, _ = resnet20_net()
    kw = dict(delta=0.05, interval=2, l2_in_loss=l2_in_loss, example_inputs=torch.randn(X16))
    batches = [(torch.randn(X16), torch.randint(0, 5, (4,))) for _ in range(8)]
    crit = TPPLoss(net, 0.5, **kw)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    run_steps(net, crit, opt, batches[:5])
    saved = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict(), "crit": crit.state_dict()})
    run_steps(net, crit, opt, batches[5:])

    fresh, _ = resnet20_net()  # new process: fresh model, masks recomputed, then restored
    fresh.load_state_dict(saved["model"])
    crit2 = TPPLoss(fresh, 0.5, **kw)
    crit2.load_state_dict(saved["crit"])
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    assert crit2.iteration == 5 and all(torch.equal(crit2.keep_masks[n], m) for n, m in saved["crit"]["_extra_state"]["keep_masks"].items())
    run_steps(fresh, crit2, opt2, batches[5:])
    assert crit2.iteration == crit.iteration and crit2.reg == crit.reg
    for (n, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def test_apply_l2_errors():
    net, _ = small_net()
    crit = TPPLoss(net, 0.5, example_inputs=torch.randn(X16))
    with pytest.raises(RuntimeError, match="l2_in_loss=False"):
        crit.apply_l2_()


def test_bad_arguments():
    net, _ = small_net()
    with pytest.raises(ValueError, match="target"):
        TPPLoss(net, 0.5, target="orthogonal", example_inputs=torch.randn(X16))
    with pytest.raises(ValueError, match="interval"):
        TPPLoss(net, 0.5, interval=0, example_inputs=torch.randn(X16))
    with pytest.raises(ValueError, match=r"pruning_ratio must be in \[0, 1\)"):
        TPPLoss(net, 1.0, example_inputs=torch.randn(X16))
    crit = TPPLoss(net, 0.5, example_inputs=torch.randn(X16))
    state = crit.state_dict()
    state["_extra_state"]["keep_masks"]["c1"] = torch.ones(5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"keep_masks\['c1'\] must have shape \[8\]"):
        crit.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
def pruned_slices_zero(net, pruner, groups):
    mods = dict(net.named_modules())
    for g, keep in groups:
        pr = ~keep
        for n in g.producers:
            if mods[n].weight[pr].abs().sum() != 0:
                return False
        for n in g.norms:
            if mods[n].weight[pr].abs().sum() != 0 or mods[n].bias[pr].abs().sum() != 0:
                return False
    return True


def test_pipeline_phases_zeroing_and_pruning():
    net, _ = resnet20_net()
    num_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules())  # 22
    pruner = TPPPruner(
        net, 0.5, delta=0.5, interval=1, ceiling=1.0, stabilize_iters=num_layers + 2, zero_interval=1,
        finetune_iters=2, example_inputs=torch.randn(X16),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    phases = []
    while pruner.phase != "prune":
        x, y = torch.randn(X16), torch.randint(0, 5, (4,))
        loss = pruner(net(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.apply_l2_()
        opt.step()
        k = pruner.iteration
        phases.append(pruner.step())
        if pruner.phase == "stabilize":
            elapsed = k - pruner.stabilize_start
            for g, keep in pruner.criterion._group_masks:
                zero = pruned_slices_zero(net, pruner, [(g, keep)])
                assert zero == (elapsed >= (g.order + 1)), (k, g.producers)
    # reg 0, .5, 1 → stabilize starts at k = 2 and lasts stabilize_iters steps
    assert phases[:2] == ["regularize", "regularize"] and phases[2] == "stabilize"
    assert len(phases) == 2 + num_layers + 2 + 1 and pruner.stabilize_start == 2
    with pytest.raises(RuntimeError, match="prune"):
        pruner(net(torch.randn(X16)), torch.randint(0, 5, (4,)))
    net.eval()
    x = torch.randn(X16)
    dense_out = net(x)
    small = pruner.prune()
    small.eval()
    torch.testing.assert_close(small(x), dense_out, atol=1e-5, rtol=1e-5)
    p0, f0 = count_params_flops(net, torch.randn(X16))
    p1, f1 = count_params_flops(small, torch.randn(X16))
    assert p1 < p0 and f1 < f0
    assert pruner.phase == "finetune"
    small.train()
    for _ in range(2):
        logits, y = small(torch.randn(X16)), torch.randint(0, 5, (4,))
        loss = pruner(logits, y)
        assert torch.equal(loss, nn.functional.cross_entropy(logits, y))  # the plain base loss when fine-tuning
        pruner.step()
    assert pruner.phase == "done"


def test_pipeline_state_dict_roundtrip():
    net, _ = resnet20_net()
    kw = dict(delta=0.5, interval=1, stabilize_iters=30, zero_interval=1, example_inputs=torch.randn(X16))
    pruner = TPPPruner(net, 0.5, **kw)
    for _ in range(4):
        pruner(net(torch.randn(X16)), torch.randint(0, 5, (4,)))
        pruner.step()
    other = TPPPruner(copy.deepcopy(net), 0.5, **kw)
    other.load_state_dict(pruner.state_dict())
    assert (other.phase, other.iteration, other.stabilize_start, other.reg) == ("stabilize", 4, 2, 1.0)


def test_pipeline_warns_about_layers_zeroed_after_a_short_stabilize():
    """Too short a stabilize phase runs (as the original code), naming the pruned layers it cannot zero."""
    net, _ = resnet20_net()
    with pytest.warns(UserWarning, match=r"pruned without being zeroed first: layer1\.0\.conv1"):
        pruner = TPPPruner(net, 0.5, stabilize_iters=100, zero_interval=100, example_inputs=torch.randn(X16))
    assert pruner.unzeroed_layers[0] == "layer1.0.conv1" and pruner.phase == "regularize"


def test_follows_the_model_to_another_dtype():
    net, pairs = small_net()
    crit = TPPLoss(net, 0.5, delta=0.5, interval=1, l2_in_loss=False, example_inputs=torch.randn(X16))
    net.double()
    x, y = torch.randn(X16, dtype=torch.float64), torch.randint(0, 5, (4,))
    for _ in range(2):
        loss = crit(net(x), y)
        net.zero_grad()
        loss.backward()
        crit.apply_l2_()
    assert loss.dtype == torch.float64 and crit._pruned_scale[0].dtype == torch.float64


def test_pipeline_resume_mid_stabilize_continues_identical_trajectory():
    kw = dict(delta=0.5, interval=1, lw=1.0, stabilize_iters=30, zero_interval=1, l2_in_loss=False, example_inputs=torch.randn(X16))
    batches = [(torch.randn(X16), torch.randint(0, 5, (4,))) for _ in range(12)]

    def train(net, pruner, opt, part):
        for x, y in part:
            loss = pruner(net(x), y)
            opt.zero_grad()
            loss.backward()
            pruner.apply_l2_()
            opt.step()
            pruner.step()

    net, _ = resnet20_net()
    pruner = TPPPruner(net, 0.5, **kw)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    train(net, pruner, opt, batches[:6])  # regularize 2 steps, then 4 stabilize steps (layers zeroed)
    assert pruner.phase == "stabilize"
    saved = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()})
    train(net, pruner, opt, batches[6:])

    fresh, _ = resnet20_net()
    fresh.load_state_dict(saved["model"])
    pruner2 = TPPPruner(fresh, 0.5, **kw)
    pruner2.load_state_dict(saved["pruner"])
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.01, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    train(fresh, pruner2, opt2, batches[6:])
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert (pruner2.phase, pruner2.iteration) == (pruner.phase, pruner.iteration)
    for (n, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("l2_in_loss", [True, False], ids=["l2_in_loss", "l2_in_place"])
def test_compiled_step_follows_the_schedule_without_recompiling(l2_in_loss, dtype):
    """A torch.compile'd loss with TPPLoss in it: the same losses and gradients as eager over a schedule
    whose reg changes every 2 steps (0, 0, .02, .02, .04, ...), compiled on the first call only (reg is
    read by the graph as a tensor, the schedule runs eagerly), at the model's precision."""
    from torch._dynamo.testing import CompileCounter

    net, _ = small_net()
    net.to(dtype)
    twin = copy.deepcopy(net)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    kw = dict(lw=100.0, delta=0.02, interval=2, ceiling=0.05, l2_in_loss=l2_in_loss, example_inputs=torch.randn(X16, dtype=dtype))
    crit, eager = TPPLoss(net, 0.5, **kw), TPPLoss(twin, 0.5, **kw)
    counter = CompileCounter()
    torch._dynamo.reset()
    step = torch.compile(lambda x, y: crit(net(x), y), backend=counter)
    frames = None
    for k in range(8):
        x, y = torch.randn(X16, dtype=dtype), torch.randint(0, 5, (4,))
        got, want = step(x, y), eager(twin(x), y)
        net.zero_grad(), twin.zero_grad()
        got.backward(), want.backward()
        if not l2_in_loss:
            crit.apply_l2_(), eager.apply_l2_()
        assert crit.iteration == eager.iteration == k + 1 and crit.reg == eager.reg == min(0.05, 0.02 * (k // 2))
        torch.testing.assert_close(got.detach(), want.detach(), **tol)
        for (name, a), b in zip(net.named_parameters(), twin.parameters()):
            torch.testing.assert_close(a.grad, b.grad, **tol, msg=lambda m: f"step {k} {name}: {m}")
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames, f"recompiled at step {k} (reg {crit.reg})"
    assert frames > 0


def test_l2_term_value_and_gradcheck():
    """TPPLoss.l2_term(coeff) = coeff · ½ Σ ‖param[P]‖² over the pruned slices, with gradient coeff · param on
    them and 0 elsewhere (torch.autograd.gradcheck in float64)."""
    net, _ = small_net()
    net.double()
    crit = TPPLoss(net, 0.5, example_inputs=torch.randn(X16, dtype=torch.float64))
    params, masks = crit._l2_params, crit._l2_masks
    expected = 0.5 * 0.3 * sum(float((p.detach()[~m] ** 2).sum()) for p, m in zip(params, masks))
    assert float(crit.l2_term(0.3).detach()) == pytest.approx(expected, rel=1e-12)
    leaves = [p.detach().clone().requires_grad_() for p in params]
    crit._l2_params = leaves  # (the same term over copies gradcheck may perturb)
    assert torch.autograd.gradcheck(lambda *ps: crit.l2_term(0.3), leaves)
