"""fastreg.torch_pruning: every gradient of the fused drop-ins equals Torch-Pruning 1.6.1's own
``regularize()`` (or differs exactly by the documented fixes), and the per-group ops equal their reference."""
import copy

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

import fastreg
from fastreg import _registry, fused, reference
from fastreg import torch_pruning as ftp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---------------------------------------------------------------------------------------------
# The per-group ops against their reference
# ---------------------------------------------------------------------------------------------
def _grouped_case(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 4, 3, 3, generator=g, dtype=dtype), torch.randn(8, 6, generator=g, dtype=dtype),
               torch.randn(6, generator=g, dtype=dtype), torch.randn(8, 6, generator=g, dtype=dtype)]
    dims = [0, 1, 0, 0]
    ids = [torch.tensor([0, 1, 2, -1, 4, 5]), torch.tensor([0, 1, 2, 3, -1, 5]), torch.tensor([5, 4, 3, 2, 1, 0]),
           torch.tensor([6, 7, 8, 9, 10, 11, -1, 6])]
    return tensors, dims, ids, 12


def _backends(op):
    return [b for b in ("reference", "cpp") if _registry.why_unavailable(op, b, "cpu") is None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_sq_sums_equals_reference(dtype):
    tensors, dims, ids, n = _grouped_case(dtype)
    expected = torch.zeros(n, dtype=torch.float64)
    for t, d, i in zip(tensors, dims, ids):
        for j, gid in enumerate(i.tolist()):
            if gid >= 0:
                expected[gid] += t.double().select(d, j).square().sum()
    for backend in _backends("group_sq_sums"):
        got = fused.GroupedSlices(tensors, dims, ids, n, backend=backend).sq_sums()
        assert got.dtype == reference.accumulate_dtype(dtype)
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l2_grad_grouped_equals_the_slice_by_slice_formula(dtype):
    tensors, dims, ids, n = _grouped_case(dtype)
    coeffs = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    coeffs[3] = 0.0  # a zero coefficient leaves its slices alone, even NaN ones
    for backend in _backends("l2_grad_grouped_"):
        params = [t.clone().requires_grad_() for t in tensors]
        params[2].data[2] = float("nan")  # (its group, 3, has coefficient 0)
        for p in params:
            p.grad = torch.ones_like(p)
        expected = [p.grad.clone().double() for p in params]
        for e, p, d, i in zip(expected, params, dims, ids):
            for j, gid in enumerate(i.tolist()):
                if gid >= 0 and coeffs[gid] != 0:
                    e.select(d, j).add_(0.5 * coeffs[gid] * p.detach().double().select(d, j))
        fused.GroupedSlices(params, dims, ids, n, backend=backend).l2_grad_(coeffs.to(dtype), 0.5)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad.double(), e, rtol=1e-6, atol=1e-6)


def _row_and_column_case(dtype):
    """A conv weight sliced along dim 0 once and along dim 1 twice, a linear weight along both dims: what a
    pruned network's plan lists (each such tensor is read once per call, rows and columns together)."""
    g = torch.Generator().manual_seed(1)
    conv, linear = torch.randn(6, 5, 3, 3, generator=g).to(dtype), torch.randn(7, 6, generator=g).to(dtype)
    tensors, dims = [conv, conv, conv, linear, linear], [0, 1, 1, 0, 1]
    ids = [torch.tensor([0, 1, 2, -1, 4, 5]), torch.tensor([6, 7, -1, 3, 8]), torch.tensor([-1, 9, 9, -1, 10]),
           torch.tensor([11, 11, 12, 3, -1, 13, 0]), torch.tensor([0, 1, 2, 3, 4, 5])]
    return tensors, dims, ids, 14


def _slice_by_slice(tensors, dims, ids, fn):
    for t, d, i in zip(tensors, dims, ids):
        for j, gid in enumerate(i.tolist()):
            if gid >= 0:
                fn(t, d, j, gid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_row_and_column_slicings_of_one_tensor_equal_the_slice_by_slice_formulas(dtype):
    tensors, dims, ids, n = _row_and_column_case(dtype)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    expected_sq = torch.zeros(n, dtype=torch.float64)
    _slice_by_slice(tensors, dims, ids, lambda t, d, j, gid: expected_sq.__setitem__(
        gid, expected_sq[gid] + t.double().select(d, j).square().sum()))
    coeffs = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    coeffs[[3, 4]] = 0.0  # zero coefficients leave their slices alone, NaN ones included
    for backend in _backends("l2_grad_grouped_"):
        got_sq = fused.GroupedSlices(tensors, dims, ids, n, backend=backend).sq_sums()
        torch.testing.assert_close(got_sq.double(), expected_sq, **tol)
        conv, linear = (t.clone().requires_grad_() for t in (tensors[0], tensors[3]))
        conv.data[3, 3, 1, 1] = float("nan")  # every slice through these two has coefficient 0 or no group
        conv.data[4, 3, 0, 0] = float("nan")
        conv.data[3, 1, 0, 0] = float("nan")  # its column's group (7) has a coefficient: the NaN spreads
        params = [conv, conv, conv, linear, linear]
        for p in (conv, linear):
            p.grad = torch.ones_like(p)
        expected = {id(p): p.grad.double().clone() for p in (conv, linear)}

        def add(t, d, j, gid):
            if coeffs[gid] != 0:
                expected[id(t)].select(d, j).add_(0.5 * coeffs[gid] * t.detach().double().select(d, j))
        _slice_by_slice(params, dims, ids, add)
        fused.GroupedSlices(params, dims, ids, n, backend=backend).l2_grad_(coeffs.to(reference.accumulate_dtype(dtype)), 0.5)
        for p in (conv, linear):
            torch.testing.assert_close(p.grad.double(), expected[id(p)], equal_nan=True, **tol)
        assert conv.grad[3, 3, 1, 1] == 1 and conv.grad[4, 3, 0, 0] == 1  # (left as they are)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_large_row_and_column_slicings_equal_the_float64_formulas(dtype):
    """Rows longer than the kernels' unrolled loop and prefetch distance (a 3×3 conv of 160 input channels:
    5.6 KiB per float32 row), the rows' ragged tail, and 1-D tensors (one element per slice)."""
    g = torch.Generator().manual_seed(2)
    conv = torch.randn(37, 160, 3, 3, generator=g).to(dtype)
    bn = torch.randn(37, generator=g).to(dtype)
    n = 37 + 160
    tensors, dims = [conv, conv, bn], [0, 1, 0]
    ids = [torch.arange(37), 37 + torch.arange(160), torch.arange(37).flip(0)]
    ids[1][::7] = -1
    c64, b64 = conv.double(), bn.double()
    expected_sq = torch.zeros(n, dtype=torch.float64)
    expected_sq[:37] += c64.square().sum((1, 2, 3))
    expected_sq[37:][ids[1][ids[1] >= 0] - 37] += c64.square().sum((0, 2, 3))[ids[1] >= 0]
    expected_sq[:37] += b64.square().flip(0)
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else dict(rtol=1e-6, atol=1e-6)
    coeffs = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    coeffs[5] = 0.0
    for backend in _backends("l2_grad_grouped_"):
        got = fused.GroupedSlices(tensors, dims, ids, n, backend=backend).sq_sums()
        torch.testing.assert_close(got.double(), expected_sq, **tol)
        conv_p, bn_p = conv.clone().requires_grad_(), bn.clone().requires_grad_()
        conv_p.grad, bn_p.grad = torch.ones_like(conv_p), torch.ones_like(bn_p)
        col_c = torch.where(ids[1] >= 0, coeffs[ids[1].clamp(min=0)], 0.0)
        expected_conv = 1 + 0.5 * (coeffs[:37].view(-1, 1, 1, 1) + col_c.view(1, -1, 1, 1)) * c64
        expected_bn = 1 + 0.5 * coeffs[ids[2]] * b64
        fused.GroupedSlices([conv_p, conv_p, bn_p], dims, ids, n, backend=backend).l2_grad_(
            coeffs.to(reference.accumulate_dtype(dtype)), 0.5)
        torch.testing.assert_close(conv_p.grad.double(), expected_conv, **tol)
        torch.testing.assert_close(bn_p.grad.double(), expected_bn, **tol)


@pytest.mark.skipif(_registry.LIBRARY_ERROR is not None, reason="the compiled library is not built")
def test_grouped_kernels_name_the_first_bad_group_id():
    tensors = [torch.randn(40, 3), torch.randn(50)]
    ids = [torch.arange(40), torch.arange(50)]
    ids[1][37], ids[1][45] = 99, -2
    with pytest.raises(RuntimeError, match=r"group_ids\[1\]\[37\] = 99"):
        torch.ops.fastreg.group_sq_sums.default(tensors, [0, 0], ids, 60)
    params = [t.clone().requires_grad_() for t in tensors]
    grads = [torch.zeros_like(t) for t in tensors]
    with pytest.raises(RuntimeError, match=r"group_ids\[1\]\[37\] = 99"):
        torch.ops.fastreg.l2_grad_grouped_.default(grads, params, [0, 0], ids, torch.ones(60), 1.0, None)
    assert all(bool((g == 0).all()) for g in grads)  # refused before any write


def test_group_norm_gamma_equals_reference_and_guards_equal_importances():
    imp = torch.tensor([4.0, 1.0, 9.0, 2.0, 2.0, 1.0, float("nan")])
    offsets = torch.tensor([0, 3, 5, 6, 7])
    expected = torch.tensor([16 ** ((3 - 2) / 2), 16.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    for backend in _backends("group_norm_gamma"):
        torch.testing.assert_close(fused.group_norm_gamma(imp, offsets, 16.0, backend=backend), expected)
        unguarded = fused.group_norm_gamma(imp, offsets, 16.0, guard=False, backend=backend)
        assert unguarded[3:6].isnan().all() and unguarded[6] == 0  # TP's 0/0, and a NaN segment skipped


def test_grouped_ops_reject_bad_arguments():
    tensors, dims, ids, n = _grouped_case()
    with pytest.raises(ValueError, match="group_ids\\[1\\]"):
        fused.GroupedSlices(tensors, dims, [ids[0], ids[1] + 20, ids[2], ids[3]], n)
    with pytest.raises(ValueError, match="group_coeffs"):
        fused.GroupedSlices([t.requires_grad_() for t in tensors], dims, ids, n).l2_grad_(torch.ones(3))
    if "cpp" in _backends("group_norm_gamma"):
        with pytest.raises(RuntimeError, match="segment_offsets"):
            fused.group_norm_gamma(torch.ones(4), torch.tensor([0, 3]), 2.0, backend="cpp")


@pytest.mark.skipif(_registry.LIBRARY_ERROR is not None, reason="the compiled library is not built")
def test_grouped_ops_pass_opcheck():
    tensors, dims, ids, n = _grouped_case()
    params = [t.clone().requires_grad_() for t in tensors]
    grads = [torch.randn_like(p) for p in params]
    torch.library.opcheck(torch.ops.fastreg.group_sq_sums.default, (tensors, dims, ids, n))
    torch.library.opcheck(torch.ops.fastreg.l2_grad_grouped_.default, (grads, params, dims, ids, torch.rand(n), 0.5, None))
    torch.library.opcheck(torch.ops.fastreg.group_norm_gamma.default, (torch.rand(7), torch.tensor([0, 3, 7]), 4.0, True))


# ---------------------------------------------------------------------------------------------
# The drop-ins against Torch-Pruning's regularize()
# ---------------------------------------------------------------------------------------------
def _vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                                mlp_dim=64, num_classes=10)


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "vit": _vit,
}


def _classifier(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 10]


@pytest.fixture(scope="module", params=list(MODELS))
def model_case(request):
    torch.manual_seed(0)
    model = MODELS[request.param]()
    with torch.no_grad():  # BN γ away from 1, so that sign(γ) and the BN terms are not uniform
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1, 1)
                m.bias.uniform_(-1, 1)
    return request.param, model, torch.randn(1, 3, 32, 32)


def _pair(model, x, tp_cls, ours_cls, **kwargs):
    """(TP's pruner, ours) on two copies of the model with the same weights and the same data gradients."""
    models = [copy.deepcopy(model), copy.deepcopy(model)]
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    pruners = []
    for m, cls in zip(models, (tp_cls, ours_cls)):
        pruners.append(cls(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                           ignored_layers=_classifier(m), **kwargs))
        for p, gr in zip(m.parameters(), grads):
            p.grad = gr.clone()
    return models, pruners, grads


def _assert_grads_equal(tp_model, ours_model, data_grads, expected_extra=None):
    changed = 0
    for (name, p_tp), p_ours, g0 in zip(tp_model.named_parameters(), ours_model.parameters(), data_grads):
        expected = p_tp.grad if expected_extra is None or name not in expected_extra else p_tp.grad + expected_extra[name]
        torch.testing.assert_close(p_ours.grad, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        changed += not torch.equal(p_ours.grad, g0)
    assert changed > 0  # the regularizer did something


def _bn_growing_terms(model, pruner, bias=False):
    """GrowingReg's BatchNorm term as Torch-Pruning means it (grad[idxs] += reg_c · γ[idxs]), which its
    ``grad.data[idxs].add_`` loses: per parameter name."""
    names = {p: n for n, p in model.named_parameters()}
    extra = {}
    for group in pruner._groups:
        if pruner.estimate_importance(group) is None:
            continue
        reg = pruner.group_reg[group]
        for k, (dep, idxs) in enumerate(group):
            layer = dep.layer
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.affine and layer not in pruner.ignored_layers:
                c = reg[list(group[k].root_idxs)]
                for param in [layer.weight] + ([layer.bias] if bias else []):
                    term = extra.setdefault(names[param], torch.zeros_like(param))
                    term[list(idxs)] += c * param.detach()[list(idxs)]
    return extra


def test_group_norm_pruner_equals_torch_pruning(model_case):
    name, model, x = model_case
    (m_tp, m_ours), (p_tp, p_ours), g0 = _pair(model, x, tp.pruner.GroupNormPruner, ftp.GroupNormPruner, reg=0.1)
    p_tp.regularize(m_tp)
    p_ours.regularize(m_ours)
    _assert_grads_equal(m_tp, m_ours, g0)
    # bias=True and an explicit alpha, as Torch-Pruning takes them
    p_tp.regularize(m_tp, alpha=3.0, bias=True)
    p_ours.regularize(m_ours, alpha=3.0, bias=True)
    _assert_grads_equal(m_tp, m_ours, g0)


def test_group_norm_pruner_uses_its_alpha_unless_compat(model_case):
    """TP ignores the constructor's alpha (regularize's default α = 16); fastreg uses 2^alpha, and
    torch_pruning_compat=True reproduces TP."""
    name, model, x = model_case
    (m_tp, m_ours), (p_tp, p_ours), g0 = _pair(model, x, tp.pruner.GroupNormPruner, ftp.GroupNormPruner, reg=0.1, alpha=2)
    p_tp.regularize(m_tp, alpha=4.0)
    p_ours.regularize(m_ours)
    _assert_grads_equal(m_tp, m_ours, g0)
    (m_tp, m_ours), (p_tp, p_ours), g0 = _pair(model, x, tp.pruner.GroupNormPruner,
                                               lambda *a, **k: ftp.GroupNormPruner(*a, torch_pruning_compat=True, **k),
                                               reg=0.1, alpha=2)
    p_tp.regularize(m_tp)
    p_ours.regularize(m_ours)
    _assert_grads_equal(m_tp, m_ours, g0)


def test_group_norm_pruner_with_an_importance_it_cannot_fuse(model_case):
    """Any other importance is called group by group, as Torch-Pruning does: same gradients."""
    name, model, x = model_case
    if name != "resnet18":
        pytest.skip("one model suffices for the per-group path")
    models = [copy.deepcopy(model), copy.deepcopy(model)]
    imp = tp.importance.GroupMagnitudeImportance(p=1, normalizer="standarization")
    p_tp = tp.pruner.GroupNormPruner(models[0], x, importance=imp, reg=0.1, ignored_layers=_classifier(models[0]))
    p_ours = ftp.GroupNormPruner(models[1], x, importance=imp, reg=0.1, ignored_layers=_classifier(models[1]))
    g0 = [torch.randn_like(p) for p in model.parameters()]
    for m in models:
        for p, g in zip(m.parameters(), g0):
            p.grad = g.clone()
    p_tp.regularize(models[0])
    p_ours.regularize(models[1])
    _assert_grads_equal(models[0], models[1], g0)


@pytest.mark.parametrize("bias", [False, True])
def test_growing_reg_pruner_equals_torch_pruning_plus_its_lost_batchnorm_term(model_case, bias):
    name, model, x = model_case
    if bias and name != "resnet18":
        pytest.skip("bias=True on one model suffices")
    for compat in (True, False):
        ours = lambda *a, **k: ftp.GrowingRegPruner(*a, torch_pruning_compat=compat, **k)  # noqa: E731
        (m_tp, m_ours), (p_tp, p_ours), g0 = _pair(model, x, tp.pruner.GrowingRegPruner, ours, reg=1e-2, delta_reg=0.5)
        for p in (p_tp, p_ours):
            p.update_reg()  # non-uniform per-channel coefficients
            p.update_reg()
        p_ours.regularize(m_ours, bias=bias)  # (fastreg first: TP's call would not change what it reads)
        extra = None if compat else _bn_growing_terms(m_tp, p_tp, bias)
        p_tp.regularize(m_tp, bias=bias)
        _assert_grads_equal(m_tp, m_ours, g0, extra)


def test_growing_reg_update_regularizer_keeps_grown_coefficients_unless_compat(model_case):
    name, model, x = model_case
    if name != "resnet18":
        pytest.skip("one model suffices")
    for compat, grown in ((False, True), (True, False)):
        pruner = ftp.GrowingRegPruner(copy.deepcopy(model), x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      reg=1e-2, delta_reg=0.5, torch_pruning_compat=compat)
        pruner.update_reg()
        pruner.update_regularizer()
        values = torch.cat(list(pruner.group_reg.values()))
        assert bool((values > 1e-2 + 1e-6).any()) == grown


@pytest.mark.parametrize("group_lasso", [False, True])
def test_bn_scale_pruner_equals_torch_pruning(model_case, group_lasso):
    name, model, x = model_case
    (m_tp, m_ours), (p_tp, p_ours), g0 = _pair(model, x, tp.pruner.BNScalePruner, ftp.BNScalePruner, reg=0.1,
                                               group_lasso=group_lasso)
    p_ours.regularize(m_ours)
    if name == "vit":  # no BatchNorm: nothing to regularize (TP's group lasso raises a TypeError there)
        assert all(torch.equal(p.grad, g) for p, g in zip(m_ours.parameters(), g0))
        return
    p_tp.regularize(m_tp)
    _assert_grads_equal(m_tp, m_ours, g0)
    p_tp.regularize(m_tp, reg=0.3)
    p_ours.regularize(m_ours, reg=0.3)
    _assert_grads_equal(m_tp, m_ours, g0)


def test_bn_scale_pruner_skips_missing_grads_and_takes_a_tensor_reg(model_case):
    name, model, x = model_case
    if name != "resnet18":
        pytest.skip("one model suffices")
    (m_tp, m_ours), (p_tp, p_ours), g0 = _pair(model, x, tp.pruner.BNScalePruner, ftp.BNScalePruner, reg=0.1)
    for m in (m_tp, m_ours):
        m.bn1.weight.grad = None
    for reg in (None, torch.tensor(0.3, dtype=torch.float64)):
        p_tp.regularize(m_tp, reg=reg)
        p_ours.regularize(m_ours, reg=reg)
    assert m_ours.bn1.weight.grad is None
    for m in (m_tp, m_ours):
        m.bn1.weight.grad = torch.zeros_like(m.bn1.weight)
    g0 = [g if g is not None else torch.zeros_like(p) for g, p in zip(g0, m_ours.parameters())]
    _assert_grads_equal(m_tp, m_ours, g0)


@pytest.mark.skipif(_registry.LIBRARY_ERROR is not None, reason="the compiled library is not built")
def test_bn_scale_sign_plan_follows_the_grads_in_float64():
    """The C++ plan of the BatchNorm weights reads every .grad at each call: grads dropped, re-created or
    replaced between calls; float64, against the reference slimming term."""
    model = torchvision.models.resnet18(num_classes=10).double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    pruner = ftp.BNScalePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                               ignored_layers=_classifier(model), reg=0.1)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        bns[2].weight[:5] = 0  # sign(0) = 0: no step

    def check(reg):
        expected = [None if m.weight.grad is None else m.weight.grad.clone() for m in bns]
        for m, e in zip(bns, expected):
            if e is not None:
                e.add_(torch.sign(m.weight.detach()) * reg)
        pruner.regularize(model, reg=reg)
        for m, e in zip(bns, expected):
            assert (m.weight.grad is None) == (e is None)
            if e is not None:
                torch.testing.assert_close(m.weight.grad, e, rtol=1e-12, atol=1e-12)

    check(0.25)
    assert pruner._plans[("sign plan", id(model))] is not None  # the plan ran
    bns[0].weight.grad, bns[4].weight.grad = None, None
    check(0.5)
    bns[0].weight.grad = torch.zeros_like(bns[0].weight)
    bns[1].weight.grad = torch.randn(bns[1].weight.shape, generator=g, dtype=torch.float64)  # a new tensor
    check(2.0**-7)
    for m in bns:
        m.weight.grad = None
    check(1.0)  # no grad at all: nothing to do


def test_pruning_results_are_torch_pruning_s(model_case):
    """step() is Torch-Pruning's: the same channels go."""
    name, model, x = model_case
    if name not in ("resnet18", "mobilenet_v2"):
        pytest.skip("two CNNs suffice")
    (m_tp, m_ours), (p_tp, p_ours), _ = _pair(model, x, tp.pruner.GroupNormPruner, ftp.GroupNormPruner, reg=0.1)
    p_tp.step()
    p_ours.step()
    assert [p.shape for p in m_tp.parameters()] == [p.shape for p in m_ours.parameters()]
    for a, b in zip(m_tp.parameters(), m_ours.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# TPPPruner: TPPLoss's objective in Torch-Pruning's loop
# ---------------------------------------------------------------------------------------------
def test_tpp_pruner_objective_equals_tpp_loss_and_step_prunes_through_torch_pruning():
    from fastreg.models import get_model

    torch.manual_seed(0)
    model = get_model("resnet56", 10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    m_loss, m_tp = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(delta=0.05, interval=1, lw=10.0)
    criterion = fastreg.TPPLoss(m_loss, 0.5, example_inputs=x[:1], **kw)
    pruner = ftp.TPPPruner(m_tp, x[:1], pruning_ratio=0.5, **kw)
    assert pruner.criterion.keep_masks.keys() == criterion.keep_masks.keys()
    ce = nn.CrossEntropyLoss()
    for _ in range(3):  # reg = 0, 0.05, 0.1
        for m in (m_loss, m_tp):
            m.zero_grad()
        criterion(m_loss(x), y).backward()
        ce(m_tp(x), y).backward()
        pruner.regularize(m_tp)
        for (n, a), b in zip(m_loss.named_parameters(), m_tp.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda s: f"{n}: {s}")
    assert pruner.criterion.reg == criterion.reg == pytest.approx(0.1)
    expected = fastreg.prune(m_loss, criterion.keep_masks, x[:1])
    pruner.step()
    assert [p.shape for p in m_tp.parameters()] == [p.shape for p in expected.parameters()]
    before = [p.grad.clone() for p in m_tp.parameters() if p.grad is not None]
    pruner.regularize(m_tp)  # pruned: nothing more to add
    assert all(torch.equal(a, p.grad) for a, p in zip(before, [p for p in m_tp.parameters() if p.grad is not None]))


def test_torch_pruning_benchmark_smoke(capsys):
    """benchmarks/bench_torch_pruning.py: both providers agree (run() checks before timing), each
    drop-in's call dispatches at most 4 ops against Torch-Pruning's hundreds, and the floor peers ran over
    the tensors the call changed."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "bench_torch_pruning.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("bench_torch_pruning", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(smoke=True)
    assert {r["pruner"] for r in rows} == set(bench.PRUNERS)
    for r in rows:
        assert r["fastreg_ops"] <= 4 and r["tp_ops"] > 10 * r["fastreg_ops"], r
        assert r["tensors"] > 0 and r["mb"] > 0 and r["floor_ms"] > 0 and r["foreach_ms"] > 0, r  # the peers ran
    assert "| ResNet-20 | GroupNorm |" in capsys.readouterr().out


def test_group_norm_pruner_guards_a_group_of_equal_importances():
    """Equal importances in a group: TP divides 0 by 0 (NaN gradients); fastreg uses γ = 1 there, and
    torch_pruning_compat=True gives TP's NaNs."""
    def net():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1))
        with torch.no_grad():
            m[0].weight.copy_(torch.randn(1, 3, 3, 3).expand(4, 3, 3, 3))  # 4 equal filters, BN γ = 1: equal norms
            m[3].weight.copy_(torch.randn(5, 1, 1, 1).expand(5, 4, 1, 1))
        return m

    x = torch.randn(1, 3, 8, 8)
    results = {}
    for name, cls in (("tp", tp.pruner.GroupNormPruner), ("ours", ftp.GroupNormPruner),
                      ("compat", lambda *a, **k: ftp.GroupNormPruner(*a, torch_pruning_compat=True, **k))):
        m = net()
        pruner = cls(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=0.1, ignored_layers=[m[3]])
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        pruner.regularize(m)
        results[name] = m[0].weight.grad
    assert results["tp"].isnan().all() and results["compat"].isnan().all()
    torch.testing.assert_close(results["ours"], 0.1 * net()[0].weight.detach())  # γ = 1


def test_torch_pruning_loop_example():
    """examples/torch_pruning_loop.py, one epoch: Torch-Pruning's loop runs with either pruner, both prune
    the model to the same layer shapes (half of each group's channels), and the report says so."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "examples" / "torch_pruning_loop.py"
    spec = importlib.util.spec_from_file_location("torch_pruning_loop_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.compare(epochs=1, finetune_epochs=0)
    ours, theirs = results["fastreg"], results["Torch-Pruning"]
    assert ours["shapes"] == theirs["shapes"]
    assert ours["params"][0] == theirs["params"][0] and ours["params"][1] < 0.5 * ours["params"][0]
    for r in results.values():
        assert 0.0 <= r["acc_pruned"] <= 1.0 and r["acc_trained"] > 0.5 and r["reg_ms"] > 0
    assert "the same pruned layer shapes" in example.report(results)
