"""Attention-head pruning: HeadPrunedAttention computes what nn.MultiheadAttention computes (all heads kept)
and what it computes with the removed heads zeroed; a ViT's heads form one group per attention module,
pruned only when a dict pattern names the module, by TPP, L1, OCSPruner and the Torch-Pruning drop-in."""
import copy

import pytest
import torch
from torch import nn

import fastreg
from fastreg.pruning import OCSPruner, channel_groups, l1_prune
from fastreg.pruning.attention import HeadPrunedAttention, remove_heads_
from test_zoo import assert_same_outputs

tvm = pytest.importorskip("torchvision.models")

E, H = 16, 4
HEADS = {"*mlp.0": 0.5, "*self_attention": 0.5}


def _inputs(batch_first: bool, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, E, generator=g, dtype=dtype)
    kv = torch.randn(2, 7, E, generator=g, dtype=dtype)
    return (q, kv) if batch_first else (q.transpose(0, 1), kv.transpose(0, 1))


def _masks():
    g = torch.Generator().manual_seed(1)
    bool_mask = torch.rand(5, 7, generator=g) > 0.7
    bool_mask[:, 0] = False  # (no fully masked row)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -2:] = True
    return [
        {},
        {"attn_mask": bool_mask},
        {"attn_mask": torch.randn(5, 7, generator=g, dtype=torch.float64)},
        {"attn_mask": torch.randn(2 * H, 5, 7, generator=g, dtype=torch.float64), "average_attn_weights": False},
        {"key_padding_mask": padding},
        {"attn_mask": bool_mask, "key_padding_mask": padding, "average_attn_weights": False},
    ]


def _zero_heads(module: nn.MultiheadAttention, pruned: list[int]) -> nn.MultiheadAttention:
    out = copy.deepcopy(module)
    d = module.head_dim
    with torch.no_grad():
        for h in pruned:
            for third in range(3):
                rows = slice(third * E + h * d, third * E + (h + 1) * d)
                out.in_proj_weight[rows] = 0
                out.in_proj_bias[rows] = 0
    return out


@pytest.mark.parametrize("batch_first", [False, True])
def test_all_heads_kept_equals_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=torch.float64)
    same = HeadPrunedAttention.from_attention(mha, torch.ones(H, dtype=torch.bool))
    q, kv = _inputs(batch_first)
    for kw in _masks():
        out, weights = mha(q, kv, kv, **kw)
        out2, weights2 = same(q, kv, kv, **kw)
        torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-12, msg=str(kw))
        torch.testing.assert_close(weights2, weights, rtol=1e-12, atol=1e-12, msg=str(kw))
    one = (lambda t: t[:, 0]) if not batch_first else (lambda t: t[0])  # unbatched (L, E) inputs
    torch.testing.assert_close(same(one(q), one(kv), one(kv))[0], mha(one(q), one(kv), one(kv))[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_first", [False, True])
def test_removed_heads_compute_what_zeroed_heads_compute(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=torch.float64)
    keep = torch.tensor([True, False, True, False])
    zeroed = _zero_heads(mha, [1, 3])
    pruned = HeadPrunedAttention.from_attention(mha, keep)
    assert pruned.num_heads == 2 and pruned.source_heads == (0, 2)
    assert pruned.in_proj.weight.shape == (3 * 2 * mha.head_dim, E) and pruned.out_proj.weight.shape == (E, 2 * mha.head_dim)
    q, kv = _inputs(batch_first)
    for kw in _masks():
        kw = {k: v for k, v in kw.items() if k != "average_attn_weights"}
        a, _ = zeroed(q, kv, kv, need_weights=False, **kw)
        b, none = pruned(q, kv, kv, need_weights=False, **kw)
        assert none is None
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=str(kw))
    # the kept heads' gradients are the zeroed module's too
    a, _ = zeroed(q, kv, kv, need_weights=False)
    b, _ = pruned(q, kv, kv, need_weights=False)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(pruned.out_proj.weight.grad, zeroed.out_proj.weight.grad[:, torch.cat([torch.arange(0, 4), torch.arange(8, 12)])])


def test_macs_of_all_heads_equal_multihead_attention_count():
    class Wrap(nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    x = torch.randn(2, 5, E)
    for batch_first in (False, True):
        mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
        full = HeadPrunedAttention.from_attention(mha, torch.ones(H, dtype=torch.bool))
        half = HeadPrunedAttention.from_attention(mha, torch.tensor([True, False, True, False]))
        p0, f0 = fastreg.count_params_flops(Wrap(mha), x)
        assert fastreg.count_params_flops(Wrap(full), x) == (p0, f0)
        p1, f1 = fastreg.count_params_flops(Wrap(half), x)
        assert p1 == p0 - 3 * E * E // 2 - 3 * E // 2 - E * E // 2 and f1 < f0


def test_heads_that_cannot_be_removed_say_why():
    for mha, why in ((nn.MultiheadAttention(E, H, kdim=8, vdim=8), "separate q/k/v"),
                     (nn.MultiheadAttention(E, H, add_bias_kv=True), "add_bias_kv"),
                     (nn.MultiheadAttention(E, 1), "single head")):
        with pytest.raises(ValueError, match=why):
            HeadPrunedAttention.from_attention(mha, torch.ones(mha.num_heads, dtype=torch.bool))
    mha = nn.MultiheadAttention(E, H)
    with pytest.raises(ValueError, match="keep_heads must be a bool mask over the 4 heads"):
        HeadPrunedAttention.from_attention(mha, torch.zeros(H, dtype=torch.bool))
    with pytest.raises(ValueError, match="not an nn.MultiheadAttention"):
        remove_heads_(nn.Sequential(nn.Linear(2, 2)), "0", torch.ones(2, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ a ViT
def _vit(**kw):
    torch.manual_seed(0)
    m = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=H, hidden_dim=2 * E, mlp_dim=64,
                              num_classes=10, **kw)
    nn.init.normal_(m.heads.head.weight, std=0.5)
    return m, torch.randn(2, 3, 32, 32)


ATTN = "encoder.layers.encoder_layer_0.self_attention"


def test_vit_heads_form_one_group_per_attention_module():
    model, x = _vit()
    heads = [g for g in channel_groups(model, x) if g.heads]
    assert [g.root for g in heads] == [ATTN, ATTN.replace("_0", "_1")]
    g = heads[0]
    assert g.prunable and g.num_channels == H and g.producers == [ATTN] and g.consumers == [f"{ATTN}.out_proj"]
    d = 2 * E // H
    rows = g.filter_slice(ATTN)
    assert rows.param == "in_proj_weight" and rows.index.tolist() == list(range(3 * 2 * E))
    assert rows.channel.tolist() == [(r % (2 * E)) // d for r in range(3 * 2 * E)]
    assert {(s.param, s.role) for s in g.slices} == {("in_proj_weight", "filter"), ("in_proj_bias", "output"), ("weight", "input")}
    # a float ratio leaves the heads alone; a pattern naming the attention module prunes ⌈r·H⌉ heads of each
    assert ATTN not in fastreg.TPPLoss(model, 0.5, example_inputs=x).layers
    crit = fastreg.TPPLoss(model, HEADS, example_inputs=x)
    mask = crit.keep_masks[ATTN].view(3, H, d)
    assert (mask == mask[:, :, :1]).all() and (mask == mask[:1]).all() and int((~mask[0, :, 0]).sum()) == 2
    bad = dict(crit.keep_masks)
    bad[ATTN] = bad[ATTN].clone()
    bad[ATTN][0] = not bool(bad[ATTN][0])
    with pytest.raises(ValueError, match="rows of each attention head must be all kept or all pruned"):
        fastreg.prune(model, bad, x)
    with pytest.raises(ValueError, match=r"must have shape \[96\] \(the q, k, v rows of in_proj_weight\)"):
        fastreg.prune(model, {ATTN: torch.ones(H, dtype=torch.bool)}, x)


def _pruned_heads(model):
    return [m.num_heads for m in model.modules() if isinstance(m, HeadPrunedAttention)]


def test_vit_tpp_with_heads_backends_agree_and_zeroed_equals_pruned(one_thread):
    model, x = _vit()
    labels = torch.tensor([1, 3])
    out = {}
    for backend in ("cpp", "reference"):
        m = copy.deepcopy(model).train()
        crit = fastreg.TPPLoss(m, HEADS, example_inputs=x, delta=0.5, interval=1, backend=backend)
        crit.iteration = 1
        torch.manual_seed(1)
        loss = crit(m(x), labels)
        loss.backward()
        out[backend] = loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert ATTN in crit.layers
    torch.testing.assert_close(out["cpp"][0], out["reference"][0], rtol=1e-5, atol=0)
    for n, g in out["reference"][1].items():
        torch.testing.assert_close(out["cpp"][1][n], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-12, msg=n)
    # the in-place mode adds the same gradients
    m2 = copy.deepcopy(model).train()
    crit2 = fastreg.TPPLoss(m2, HEADS, example_inputs=x, delta=0.5, interval=1, in_loss=False)
    crit2.iteration = 1
    torch.manual_seed(1)
    crit2(m2(x), labels).backward()
    crit2.apply_grad_()
    torch.testing.assert_close(m2.get_parameter(f"{ATTN}.in_proj_weight").grad, out["reference"][1][f"{ATTN}.in_proj_weight"],
                               rtol=1e-4, atol=1e-6)

    fastreg.zero_pruned_(m, crit.keep_masks, x)
    pruned = fastreg.prune(m, crit.keep_masks, x)
    assert _pruned_heads(pruned) == [2, 2]
    assert_same_outputs(m, pruned, x)


def test_vit_l1_and_ocs_prune_heads(one_thread):
    model, x = _vit()
    small, masks = l1_prune(model, HEADS, x)
    assert _pruned_heads(small) == [2, 2]
    zeroed = copy.deepcopy(model)
    fastreg.zero_pruned_(zeroed, masks, x)
    assert_same_outputs(zeroed, small, x)

    assert not any(g.heads for g in OCSPruner(copy.deepcopy(model), 0.3, example_inputs=x).groups)
    m = copy.deepcopy(model)
    pruner = OCSPruner(m, 0.3, example_inputs=x, heads=True)
    assert sum(g.heads for g in pruner.groups) == 2
    masks = pruner.partition()
    state = pruner.state_dict()
    state.update(phase="prune", masks=masks)
    pruner.load_state_dict(state)
    fastreg.zero_pruned_(m, pruner.keep_masks, x)
    assert_same_outputs(m, pruner.prune(), x)


def test_vit_torch_pruning_tpp_pruner_removes_heads(one_thread):
    from fastreg.torch_pruning import TPPPruner

    model, x = _vit()
    pruner = TPPPruner(model, x, pruning_ratio=HEADS)
    assert ATTN in pruner.criterion.layers
    with pytest.raises(ValueError, match="call step\\(\\) without interactive"):
        pruner.step(interactive=True)
    zeroed = copy.deepcopy(model)
    fastreg.zero_pruned_(zeroed, pruner.criterion.keep_masks, x)
    pruner.step()
    assert _pruned_heads(model) == [2, 2]
    assert_same_outputs(zeroed, model, x)


def test_swin_window_attention_macs_match_its_matrix_products():
    """The counted MACs of torchvision's Swin attention (projections through F.linear) are its matrix
    products as FlopCounterMode sees them, plus the convention's per-token bias, q scaling and softmax terms."""
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    from fastreg.pruning.macs import shifted_window_attention_macs

    torch.manual_seed(0)
    attn = ShiftedWindowAttention(16, [4, 4], [2, 2], num_heads=2).eval()
    x = torch.randn(2, 8, 8, 16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        attn(x)
    attn.__flops__ = 0
    shifted_window_attention_macs(attn, (x,), None)
    macs = attn.__dict__.pop("__flops__")
    tokens, pairs, inner = 2 * 8 * 8, 2 * 8 * 8 * 16, 16
    extra = tokens * inner + 3 * tokens * inner + 2 * pairs + tokens * 16
    assert macs - extra == counter.get_total_flops() // 2
    assert fastreg.count_params_flops(nn.Sequential(attn), x)[1] == macs // 2  # (per input: a batch of 2)


def test_attention_with_separate_projections_has_no_head_group():
    from fastreg.importance import weight_importance

    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv, self.out = nn.Linear(8, E), nn.Linear(8, 12), nn.Linear(E, 3)
            self.attn = nn.MultiheadAttention(E, H, kdim=12, vdim=12, batch_first=True)

        def forward(self, x):
            kv = self.kv(x)
            return self.out(self.attn(self.q(x), kv, kv)[0]).mean(1)

    model, x = CrossAttention(), torch.randn(2, 5, 8)
    groups = channel_groups(model, x)
    assert not any(g.heads for g in groups)
    assert len(weight_importance(model, groups, "l1")) == len(groups)
    with pytest.raises(ValueError, match="keep_masks: the heads of 'attn' cannot be pruned: its q, k, v projections are separate"):
        fastreg.prune(model, {"attn": torch.ones(3 * E, dtype=torch.bool)}, x)
