"""Importance estimators: each equals a plain per-layer reference on plain, residual, depthwise and MLP models."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastreg.importance import (
    ActivationImportance,
    estimate_importance,
    hamming_distance,
    keep_masks_from_scores,
    prune_global_count,
    weight_importance,
)
from fastreg.models import get_model
from fastreg.pruning import channel_groups


def depthwise_net() -> nn.Module:
    """Two depthwise-separable blocks (MobileNet-V1 style) on 3×8×8 inputs."""
    torch.manual_seed(0)
    from fastreg.models.mobilenet import MobileNetV1

    return MobileNetV1(5, 3, widths=(8, (12, 2), 12), stem=6)


MODELS = {
    "digits_cnn": (lambda: get_model("digits_cnn", 10, 1), (1, 8, 8), 10),
    "resnet20": (lambda: get_model("resnet20", 10, 3), (3, 8, 8), 10),
    "mobilenet": (depthwise_net, (3, 8, 8), 5),
    "mlp": (lambda: get_model("mlp7_linear", 10, 1, (1, 4, 4)), (1, 4, 4), 10),
}


def build(name):
    make, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = make()
    for m in model.modules():  # non-trivial BN scales, so that |γ| differs between channels
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.2, 2.0)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, *shape, generator=gen), torch.randint(0, classes, (6,), generator=gen)) for _ in range(3)]
    return model, channel_groups(model, batches[0][0][:1]), batches


def channel_map(group, name, size):
    for s in group.slices:
        if s.module == name and s.param == "weight" and s.dim == 0:
            return s.index, s.channel
    return torch.arange(size), torch.arange(size)


def reference_weight_scores(model, groups, kind):
    """Per group, per layer: Σ|w|, ‖w‖₂ of each producer filter or |γ| of each norm, added at its channel."""
    modules = dict(model.named_modules())
    out = []
    for g in groups:
        scores = torch.zeros(g.num_channels)
        layers = g.producers if kind != "bn" else [n for n in g.norms if modules[n].affine]
        for name in layers:
            w = modules[name].weight.detach()
            rows = w.reshape(w.shape[0], -1)
            per_row = {"l1": rows.abs().sum(1), "l2": rows.norm(dim=1), "bn": w.abs()}[kind]
            pos, chan = channel_map(g, name, w.shape[0])
            for p, c in zip(pos.tolist(), chan.tolist()):
                scores[c] += per_row[p]
        out.append(scores)
    return out


def reference_activation_scores(model, groups, batches, kind):
    """A ones-mask multiplies every hooked output (the group's norms, else its producers); autograd's
    gradient of the mask is d_c = Σ a·∂L/∂a. Fisher adds ½·d², Taylor |d|, batch by batch."""
    modules = dict(model.named_modules())
    totals = [torch.zeros(g.num_channels) for g in groups]
    model.train()
    for x, y in batches:
        masks, handles = [], []
        for gi, g in enumerate(groups):
            for name in g.norms or g.producers:
                m = modules[name]
                size = m.num_features if hasattr(m, "num_features") else m.weight.shape[0]
                mask = torch.ones(size, requires_grad=True)
                masks.append((gi, name, size, mask))
                shape = lambda out, mask=mask: mask.reshape(1, -1, *([1] * (out.dim() - 2)))  # noqa: E731
                handles.append(m.register_forward_hook(lambda mod, inp, out, mask=mask, shape=shape: out * shape(out)))
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, [m for *_, m in masks])
        for h in handles:
            h.remove()
        d = [torch.zeros(g.num_channels) for g in groups]
        for (gi, name, size, _), grad in zip(masks, grads):
            pos, chan = channel_map(groups[gi], name, size)
            for p, c in zip(pos.tolist(), chan.tolist()):
                d[gi][c] += grad[p]
        for gi in range(len(groups)):
            totals[gi] += 0.5 * d[gi] ** 2 if kind == "fisher" else d[gi].abs()
    return totals


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", ["l1", "l2", "bn"])
def test_weight_importance_equals_per_layer_reference(model_name, kind):
    model, groups, _ = build(model_name)
    got = weight_importance(model, groups, kind)
    want = reference_weight_scores(model, groups, kind)
    assert len(got) == len(groups)
    for g, a, b in zip(groups, got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{kind} of {g.producers}")
    if kind == "bn" and model_name != "mlp":
        assert any(bool(s.max() > 0) for s in got)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", ["fisher", "taylor"])
def test_activation_importance_equals_mask_gradient_reference(model_name, kind):
    model, groups, batches = build(model_name)
    got = estimate_importance(model, groups, kind, batches)
    want = reference_activation_scores(model, groups, batches, kind)
    for g, a, b in zip(groups, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9, msg=f"{kind} of {g.producers}")
    assert sum(float(s.sum()) for s in got) > 0


def test_residual_groups_add_every_coupled_layer():
    """ResNet-20's residual-coupled groups hold several producers; their scores add all of them."""
    model, groups, batches = build("resnet20")
    coupled = [g for g in groups if g.coupled]
    assert coupled and all(len(g.norms) > 1 for g in coupled)
    single = reference_weight_scores(model, coupled, "l1")
    per_layer = {n: m.weight.detach().reshape(m.weight.shape[0], -1).abs().sum(1) for n, m in model.named_modules()
                 if n in coupled[0].producers}
    torch.testing.assert_close(single[0], sum(per_layer.values()))


def test_accumulation_during_training_with_hooks():
    """Attached during training steps, the scorer sees each step's gradients once (one step per backward)."""
    model, groups, batches = build("digits_cnn")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scorer = ActivationImportance(model, groups, "fisher")
    with scorer.attached():
        for x, y in batches:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            scorer.step()
    with torch.no_grad():  # no hook fires outside attached() or without grad
        model(batches[0][0])
    model.load_state_dict(state)
    want = reference_activation_scores(model, groups, batches, "fisher")
    for a, b in zip(scorer.scores(), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    assert scorer.steps == 3 and not scorer._handles


def test_estimate_leaves_parameters_and_grads_alone():
    model, groups, batches = build("digits_cnn")
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    estimate_importance(model, groups, "taylor", batches)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # BN running statistics too
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments():
    model, groups, batches = build("digits_cnn")
    with pytest.raises(ValueError, match="importance must be one of"):
        estimate_importance(model, groups, "grasp")
    with pytest.raises(ValueError, match="needs batches"):
        estimate_importance(model, groups, "fisher")
    with pytest.raises(ValueError, match="batches is empty"):
        estimate_importance(model, groups, "fisher", [])


def test_masks_from_scores_prune_the_lowest():
    model, groups, _ = build("digits_cnn")
    scores = weight_importance(model, groups, "l1")
    ratios = [0.5 if g.prunable else 0.0 for g in groups]
    masks = keep_masks_from_scores(groups, ratios, scores)
    for g, s, r in zip(groups, scores, ratios):
        if r:
            keep = masks[g.producers[0]]
            assert int((~keep).sum()) == g.num_channels // 2 and s[keep].min() >= s[~keep].max()


def test_global_count_is_exact_and_keeps_one_per_layer():
    scores = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([5.0, 6.0]), torch.tensor([0.05, 9.0])]
    keep = prune_global_count(scores, 3)
    assert [k.tolist() for k in keep] == [[False, False, True], [True, True], [False, True]]
    keep = prune_global_count(scores, 1, keep)  # 1 more, from what is left; each layer keeps one
    assert [k.tolist() for k in keep] == [[False, False, True], [False, True], [False, True]]
    with pytest.raises(ValueError, match="cannot prune 1 more channels"):
        prune_global_count(scores, 1, keep)


def test_hamming_distance():
    a = [torch.tensor([True, False, True]), torch.tensor([True])]
    b = [torch.tensor([True, True, True]), torch.tensor([False])]
    assert hamming_distance(a, b) == 0.5 and hamming_distance(a, a) == 0.0


def test_per_step_fold_is_a_constant_number_of_ops_whatever_the_depth():
    """step() folds every layer's d_c into the group scores with the same ops for ResNet-20 (19 groups)
    and ResNet-56 (55): one gather, one index_add, one accumulate, two zero-fills; no per-layer loop."""
    from fastreg.bench import count_ops_by_name

    counts = []
    for depth in (20, 56):
        torch.manual_seed(0)
        model = get_model(f"resnet{depth}", 10, 3)
        x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
        groups = channel_groups(model, x[:1])
        scorer = ActivationImportance(model, groups, "fisher")
        with scorer.attached():
            F.cross_entropy(model(x), y).backward()
            counts.append(count_ops_by_name(scorer.step))
    assert counts[0] == counts[1] and sum(counts[0].values()) <= 6, counts[0]


class TokenMLP(nn.Module):
    """Linear layers on (batch, tokens, features), as in a transformer's MLP: channels on the last dim."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).mean(1)


@pytest.mark.parametrize("kind", ["fisher", "taylor"])
def test_activation_importance_of_linear_layers_on_token_sequences(kind):
    torch.manual_seed(0)
    model = TokenMLP()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 5, 6, generator=gen), torch.randint(0, 4, (3,), generator=gen)) for _ in range(2)]
    groups = channel_groups(model, batches[0][0][:1])
    (g,) = [g for g in groups if g.root == "fc1"]
    got = estimate_importance(model, [g], kind, batches)[0]
    want = torch.zeros(8)
    for x, y in batches:  # d_c: the gradient of a ones-mask on fc1's output features
        mask = torch.ones(8, requires_grad=True)
        handle = model.fc1.register_forward_hook(lambda mod, inp, out: out * mask)
        (d,) = torch.autograd.grad(F.cross_entropy(model(x), y), [mask])
        handle.remove()
        want += 0.5 * d**2 if kind == "fisher" else d.abs()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


def test_attention_heads_rank_by_weights_and_give_row_masks():
    tvm = pytest.importorskip("torchvision.models")
    from fastreg.pruning import prune

    torch.manual_seed(0)
    model = tvm.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=4, hidden_dim=16, mlp_dim=32,
                                  num_classes=3)
    x = torch.randn(1, 3, 16, 16)
    (g,) = [g for g in channel_groups(model, x) if g.heads]
    (scores,) = weight_importance(model, [g], "l1")
    w = model.get_submodule(g.root).in_proj_weight.detach()
    want = w.abs().sum(1).reshape(3, 4, 4).sum((0, 2))  # (q, k, v) × head × row
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-6)
    masks = keep_masks_from_scores([g], [0.5], [scores])
    assert masks[g.root].shape == (48,) and int((~masks[g.root]).sum()) == 24
    assert prune(model, masks, x).get_submodule(g.root).num_heads == 2
    with pytest.raises(ValueError, match="heads of .* have no output of their own"):
        ActivationImportance(model, [g], "fisher")
