"""Fused per-step ops (fastreg.fused): every backend against fastreg.reference, opcheck, errors, op count.

Backends that cannot run here skip with the registry's reason (``why_unavailable``), so the tests
cover the triton kernels (under TRITON_INTERPRET=1) and the cuda kernels wherever they can run.
"""
from __future__ import annotations

import contextlib
import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastreg import _registry, fused, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Tolerances of one (or two) roundings in the tensor's dtype, values of order 1.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
MIXED = (torch.float32, torch.float16, torch.bfloat16)
# A small "model": conv, its BN γ and β, another conv, a linear, a 1×1 conv.
SHAPES = [(12, 3, 3, 3), (12,), (12,), (16, 12, 3, 3), (10, 16), (8, 10, 1, 1)]


def need(op: str, backend: str, device: str) -> None:
    why = _registry.why_unavailable(op, backend, torch.device(device))
    if why is not None:
        pytest.skip(why)


@contextlib.contextmanager
def cpp_plan_only(monkeypatch):
    """The plan objects' Python path made to fail: they take it when their C++ plan raises (it then
    raises the error naming the argument), so a test of the C++ plan must not pass through it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the plan's Python path ran: its C++ plan failed")

    with monkeypatch.context() as m:
        for name in ("_call_masked", "_call_shrink", "_call_grouped_lasso"):
            m.setattr(fused, name, refuse)
        yield


def in_cpp_if_compiled(backend: str, monkeypatch):
    """:func:`cpp_plan_only` for the compiled backends (the others run the plans' Python path)."""
    return cpp_plan_only(monkeypatch) if backend in _registry.SELF_CHECKING else contextlib.nullcontext()


def make_params(dtypes, device, shapes=SHAPES, with_grad=True):
    params = []
    for i, shape in enumerate(shapes):
        p = torch.randn(shape, device=device, dtype=dtypes[i % len(dtypes)]).requires_grad_()
        if with_grad:
            p.grad = torch.randn_like(p)
        params.append(p)
    return params


def mask(n: int, ratio: str, device) -> torch.Tensor:
    """Keep mask (True = kept) with none / one / half / all of the n slices pruned."""
    keep = torch.ones(n, dtype=torch.bool)
    if ratio == "one":
        keep[torch.randint(n, ())] = False
    elif ratio == "half":
        keep[torch.randperm(n)[: n // 2]] = False
    elif ratio == "all":
        keep[:] = False
    return keep.to(device)


def mixed_dims(params):
    """dim 1 (input channels) for every tensor with one, else 0."""
    return [1 if p.dim() > 1 else 0 for p in params]


def clone(params):
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        if p.grad is not None:
            q.grad = p.grad.clone()
        out.append(q)
    return out


def assert_close_each(actual, expected):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype, f"[{i}] dtype {a.dtype} != {e.dtype}"
        torch.testing.assert_close(a, e, **TOL[e.dtype], msg=lambda m: f"tensor [{i}]: {m}")


def coefficient(value: float, kind: str, device):
    """A float, or a 0-d float32 tensor (values in the tests are exact in float32)."""
    return value if kind == "float" else torch.tensor(value, device=device)


def reference_masked(op: str, params, masks, dims, c):
    """The reference formula (dim-0 slices) applied along dims[i] through moved-dim views."""
    views = [fused._rows_view(p, d, p.grad) for p, d in zip(params, dims)]
    with torch.no_grad():
        getattr(reference, op)(views, masks, c)


# ---------------------------------------------------------------------------------------------
# Values against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtypes", [(torch.float64,), MIXED], ids=["fp64", "mixed"])
def test_group_norms(device, backend, p, dim, dtypes):
    need("group_norms", backend, device)
    shapes = SHAPES if dim == 0 else [s for s in SHAPES if len(s) > 1]
    tensors = make_params(dtypes, device, shapes, with_grad=False)
    got = fused.group_norms(tensors, p=p, dim=dim, backend=backend)
    expected = reference.group_norms(tensors, p, dim)
    assert_close_each(got, expected)
    flat = fused.group_norms(tensors, p=p, dim=dim, flat=True, backend=backend)
    promoted = torch.float64 if torch.float64 in dtypes else torch.float32
    assert flat.dtype == promoted and flat.shape == (sum(t.shape[dim] for t in tensors),)
    segments = flat.split([t.shape[dim] for t in tensors])  # each in the promoted dtype, exactly its tensor's norms
    assert_close_each([f.to(t.dtype) for f, t in zip(segments, tensors)], expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float64,), MIXED], ids=["fp64", "mixed"])
def test_slice_norms_plan_refreshes_its_outputs(device, backend, dtypes):
    need("group_norms", backend, device)
    tensors = make_params(dtypes, device, SHAPES, with_grad=False)
    plan = fused.SliceNorms(tensors, p=1, backend=backend)
    first = plan()
    assert_close_each(first, reference.group_norms(tensors, 1, 0))
    with torch.no_grad():
        tensors[0].mul_(-3)
        tensors[-1].add_(1)
    second = plan()
    assert second is first and all(a is b for a, b in zip(second, first))  # the same tensors, refilled
    assert_close_each(second, reference.group_norms(tensors, 1, 0))
    torch.testing.assert_close(plan.flat, torch.cat([n.to(plan.flat.dtype) for n in second]))


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("dim", [0, 1])
def test_threaded_calls_ending_with_empty_slices(backend, dim):
    """Calls over more elements than the CPU kernels run on one thread (2^17), split over 2 threads,
    whose last tensors have slices of no elements (a [256, 0] linear along dim 0, a [0, 256] one along
    dim 1): those slices still get their norm 0 and saliency 0, not whatever the output memory held."""
    need("group_norms", backend, "cpu")
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(256, 128, 3, 3, generator=g), torch.randn(256, 0) if dim == 0 else torch.randn(0, 256)]
    with threads(2):
        for _ in range(3):  # fresh outputs may land on memory that held other values
            junk = torch.full((4096,), 5.0)
            del junk
            assert_close_each(fused.group_norms(tensors, dim=dim, backend=backend), reference.group_norms(tensors, 2, dim))
            assert_close_each(fused.SliceNorms(tensors, dim=dim, backend=backend)(), reference.group_norms(tensors, 2, dim))
        need("group_saliency", backend, "cpu")
        ids = [torch.arange(t.shape[dim]) for t in tensors]
        got = fused.group_saliency(tensors, [dim, dim], ids, 256, backend=backend)
        torch.testing.assert_close(got, reference.group_saliency(tensors, [dim, dim], ids, 256), **TOL[torch.float32])
        assert torch.isfinite(got).all()


def assert_matches_l2_then_shrink(params, expected, masks, coeff, factor):
    """``params`` (updated by the op under test) equal ``expected`` (their clones from before) after the
    reference's l2_grad_(coeff) then shrink_(factor) with ``masks``."""
    with torch.no_grad():
        reference.l2_grad_(expected, masks, coeff)
        reference.shrink_(expected, masks, factor)
    assert_close_each([p.grad for p in params], [p.grad for p in expected])
    assert_close_each([p.detach() for p in params], [p.detach() for p in expected])


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_threaded_in_place_ops_match_the_reference(backend):
    """The in-place ops over more elements than one thread takes (2^17), on 2 threads."""
    need("l2_grad_", backend, "cpu")
    params = make_params((torch.float32,), "cpu", [(256, 128, 3, 3), (256,), (64, 256, 1, 1), (10, 64)])
    masks = [mask(p.shape[0], "half", "cpu") for p in params]
    expected = clone(params)
    with threads(2):
        fused.l2_grad_(params, masks, 0.25, backend=backend)
        fused.shrink_(params, masks, 0.5, backend=backend)
    assert_matches_l2_then_shrink(params, expected, masks, 0.25, 0.5)


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_mask_bytes_other_than_0_and_1_are_true(backend):
    """A bool tensor's bytes may hold values other than 0 and 1 (viewed from uint8, read from a buffer):
    torch takes any non-zero byte as True (kept), and so must the kernels."""
    need("l2_grad_", backend, "cpu")
    params = make_params((torch.float32,), "cpu")
    masks = [mask(p.shape[0], "half", "cpu") for p in params]
    odd = [(m.to(torch.uint8) * 7).view(torch.bool) for m in masks]
    expected = clone(params)
    fused.l2_grad_(params, odd, 0.5, backend=backend)
    fused.PrunedSlices(params, odd, backend=backend).shrink_(0.5)
    assert_matches_l2_then_shrink(params, expected, masks, 0.5, 0.5)


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_saliency_of_a_slice_of_no_elements_is_zero(backend):
    """‖w‖₂/√|w| for |w| = 0 (the input columns of a [N, 0] weight) is taken as 0; the slice still counts
    in |g|. No NaN reaches the partition's threshold search."""
    need("group_saliency", backend, "cpu")
    tensors = [torch.randn(4, 3), torch.randn(4, 0)]
    ids = [torch.arange(4), torch.arange(4)]
    got = fused.group_saliency(tensors, [0, 0], ids, 4, backend=backend)
    torch.testing.assert_close(got, tensors[0].norm(dim=1) / 3**0.5 / 2)


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_plans_keep_a_copy_of_their_masks(backend):
    """Editing a mask after building the plan changes nothing, whether the mask was contiguous or not."""
    need("l2_grad_", backend, "cpu")
    params = make_params((torch.float32,), "cpu", [(6, 4), (6, 4)])
    table = torch.ones(6, 2, dtype=torch.bool)
    table[:3] = False
    masks = [table[:, 0].clone(), table[:, 1]]  # contiguous, and a strided column
    plan = fused.PrunedSlices(params, masks, backend=backend)
    expected = clone(params)
    with torch.no_grad():
        reference.l2_grad_(expected, [m.clone() for m in masks], 1.0)
    masks[0].fill_(True)
    table[:, 1] = True
    plan.l2_grad_(1.0)
    assert_close_each([p.grad for p in params], [p.grad for p in expected])


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_slice_norms_refuses_tensors_that_changed_shape(backend):
    need("group_norms", backend, "cpu")
    w = torch.randn(4, 3)
    plan = fused.SliceNorms([w], backend=backend)
    plan()
    w.data = w.data[:1].clone()
    with pytest.raises(RuntimeError, match="changed shape since the plan was built"):
        plan()


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_a_one_element_coefficient_of_any_shape_acts_as_a_scalar(backend):
    need("l2_grad_", backend, "cpu")
    params = make_params((torch.float32,), "cpu")
    masks = [mask(p.shape[0], "half", "cpu") for p in params]
    expected = clone(params)
    fused.l2_grad_(params, masks, torch.full((1, 1), 0.5), backend=backend)
    fused.l2_grad_(expected, masks, 0.5, backend=backend)
    assert_close_each([p.grad for p in params], [p.grad for p in expected])


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_coupled_groups_with_no_group(backend):
    """Every id −1 (num_groups 0): nothing is pruned, the updates change nothing."""
    need("group_lasso_grad_grouped_", backend, "cpu")
    params = make_params((torch.float32,), "cpu", [(4, 3)])
    before = clone(params)
    groups = fused.CoupledGroups(params, [0], [torch.full((4,), -1)], 0, backend=backend)
    groups.set_pruned(torch.zeros(0, dtype=torch.bool))
    groups.group_lasso_grad_(0.5)
    groups.shrink_(0.0)
    fused.group_lasso_grad_grouped_(params, [0], [torch.full((4,), -1)], torch.zeros(0, dtype=torch.bool), 0.5,
                                    backend=backend)
    assert_close_each([p.grad for p in params], [p.grad for p in before])
    assert_close_each([p.detach() for p in params], [p.detach() for p in before])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float64,), MIXED], ids=["fp64", "mixed"])
def test_group_saliency_coupled(device, backend, dtypes):
    need("group_saliency", backend, device)
    conv1, g1, b1, conv2, fc, conv3 = make_params(dtypes, device, with_grad=False)
    # OCSPruner groups: conv1 filter i + BN γ_i, β_i + conv2 input channel i; conv2 filter j + fc
    # input j; fc row k + conv3 input k; conv3's filters alone.
    sets = [[(conv1, 0), (g1, 0), (b1, 0), (conv2, 1)], [(conv2, 0), (fc, 1)], [(fc, 0), (conv3, 1)], [(conv3, 0)]]
    groups = fused.CoupledGroups.from_channel_sets(sets, backend=backend)
    assert groups.num_groups == 12 + 16 + 10 + 8
    got = groups.saliency()
    expected = reference.group_saliency(groups.tensors, groups.dims, groups.group_ids, groups.num_groups)
    tol = TOL[torch.float64] if dtypes == (torch.float64,) else TOL[torch.bfloat16]
    torch.testing.assert_close(got, expected.to(got.dtype), **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_group_saliency_sparse_ids(device, backend):
    """Slices outside every group (−1), empty groups (score 0), a group spread over 3 tensors."""
    need("group_saliency", backend, device)
    tensors = make_params((torch.float32,), device, [(5, 4), (3, 5), (5,)], with_grad=False)
    ids = [torch.tensor(v, device=device) for v in ([0, -1, 2, 2, 6], [0, 6, -1], [-1, 0, 0, 2, 6])]
    got = fused.group_saliency(tensors, [0, 0, 0], ids, 8, backend=backend)
    expected = reference.group_saliency(tensors, [0, 0, 0], ids, 8)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])
    assert got[[1, 3, 4, 5, 7]].eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_reductions_over_input_channels_of_wide_layers(device, backend):
    """Slices along dim 1 of layers wide enough that the CPU kernels split each over several chunks
    (≥ 1024-element runs per row: 3×3 convs over > 114 input channels, linears over > 1024), with slices
    outside every group and unpruned slices: norms, saliency and group lasso against the reference."""
    for op in ("group_norms", "group_saliency", "group_lasso_grad_"):
        need(op, backend, device)
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 300, 3, 3), (5, 260), (4, 2100), (3, 40, 2, 2)]
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    assert_close_each(fused.group_norms(params, dim=1, backend=backend), reference.group_norms(params, 2, 1))
    assert_close_each(fused.group_norms(params, p=1, dim=1, backend=backend), reference.group_norms(params, 1, 1))
    ids = [torch.randint(-1, 50, (p.shape[1],), generator=gen).to(device) for p in params]
    torch.testing.assert_close(
        fused.group_saliency(params, [1] * 4, ids, 50, backend=backend), reference.group_saliency(params, [1] * 4, ids, 50)
    )
    masks = [(torch.rand(p.shape[1], generator=gen) < 0.6).to(device) for p in params]
    expected = clone(params)
    reference_masked("group_lasso_grad_", expected, masks, [1] * 4, 0.25)
    fused.group_lasso_grad_(params, masks, 0.25, dims=1, backend=backend)
    assert_close_each([p.grad for p in params], [p.grad for p in expected])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("op", ["l2_grad_", "group_lasso_grad_"])
@pytest.mark.parametrize("ratio", ["none", "one", "half", "all"])
@pytest.mark.parametrize("coeff_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtypes", [(torch.float64,), MIXED], ids=["fp64", "mixed"])
@pytest.mark.parametrize("along", ["rows", "mixed"])
def test_masked_grad_ops(device, backend, op, ratio, coeff_kind, dtypes, along):
    need(op, backend, device)
    params = make_params(dtypes, device)
    dims = [0] * len(params) if along == "rows" else mixed_dims(params)
    masks = [mask(p.shape[d], ratio, device) for p, d in zip(params, dims)]
    expected = clone(params)
    reference_masked(op, expected, masks, dims, 0.375)
    getattr(fused, op)(params, masks, coefficient(0.375, coeff_kind, device), dims=dims, backend=backend)
    assert_close_each([p.grad for p in params], [p.grad for p in expected])
    assert_close_each([p.detach() for p in params], [p.detach() for p in expected])  # weights untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("ratio", ["none", "one", "half", "all"])
@pytest.mark.parametrize("factor", [0.875, 0.0])
@pytest.mark.parametrize("coeff_kind", ["float", "tensor"])
@pytest.mark.parametrize("along", ["rows", "mixed"])
def test_shrink(device, backend, ratio, factor, coeff_kind, along):
    need("shrink_", backend, device)
    params = make_params(MIXED + (torch.float64,), device, with_grad=False)
    dims = [0] * len(params) if along == "rows" else mixed_dims(params)
    masks = [mask(p.shape[d], ratio, device) for p, d in zip(params, dims)]
    expected = clone(params)
    with torch.no_grad():
        reference.shrink_([fused._rows_view(p, d) for p, d in zip(expected, dims)], masks, factor)
    fused.shrink_(params, masks, coefficient(factor, coeff_kind, device), dims=dims, backend=backend)
    assert_close_each([p.detach() for p in params], [p.detach() for p in expected])
    if factor == 0.0:  # the hard zero-out is exact
        for p, keep, d in zip(params, masks, dims):
            assert p.detach().movedim(d, 0)[~keep].eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("coeff_kind", ["float", "tensor"])
def test_slimming_grad(device, backend, coeff_kind):
    need("slimming_grad_", backend, device)
    gammas = make_params(MIXED + (torch.float64,), device, [(12,), (16,), (7,), (300,)])
    with torch.no_grad():
        gammas[0][3] = 0  # sign(0) = 0: no step
    expected = clone(gammas)
    reference.slimming_grad_(expected, 2**-7)
    fused.slimming_grad_(gammas, coefficient(2**-7, coeff_kind, device), backend=backend)
    assert_close_each([g.grad for g in gammas], [g.grad for g in expected])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_group_lasso_zero_norm_adds_exactly_zero(device, backend):
    """‖w_g‖ = 0: the subgradient step is exactly 0 (no NaN, no tiny values)."""
    need("group_lasso_grad_", backend, device)
    params = make_params((torch.float32, torch.float16), device, [(6, 4, 3, 3), (6,)])
    with torch.no_grad():
        params[0][2] = 0
        params[1][2] = 0
    before = [p.grad.clone() for p in params]
    masks = [torch.zeros(6, dtype=torch.bool, device=device)] * 2
    fused.group_lasso_grad_(params, masks, 1.0, backend=backend)
    for p, b in zip(params, before):
        assert torch.equal(p.grad[2], b[2])
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float64,), MIXED], ids=["fp64", "mixed"])
@pytest.mark.parametrize("coeff_kind", ["float", "tensor"])
def test_coupled_group_lasso_and_shrink(device, backend, dtypes, coeff_kind):
    need("group_lasso_grad_grouped_", backend, device)
    need("shrink_", backend, device)
    conv1, g1, b1, conv2, fc, conv3 = make_params(dtypes, device)
    sets = [[(conv1, 0), (g1, 0), (b1, 0), (conv2, 1)], [(conv2, 0), (fc, 1)], [(fc, 0), (conv3, 1)]]
    groups = fused.CoupledGroups.from_channel_sets(sets, backend=backend)
    pruned = torch.rand(groups.num_groups, device=device) < 0.5
    pruned[0] = True
    with torch.no_grad():  # a pruned group with ‖w_g‖ = 0: conv1 filter 0, γ_0, β_0, conv2 input 0
        conv1[0] = 0
        g1[0] = 0
        b1[0] = 0
        conv2[:, 0] = 0
    groups.set_pruned(pruned)
    # conv2 is listed twice (dim 1 in set 0, dim 0 in set 1): its updates add up, as in the reference.
    ref_tensors = _dedupe_like(groups.tensors, clone(groups.tensors))
    functional = _dedupe_like(groups.tensors, clone(groups.tensors))
    reference.group_lasso_grad_grouped_(ref_tensors, groups.dims, groups.group_ids, pruned, 0.0625)
    groups.group_lasso_grad_(coefficient(0.0625, coeff_kind, device))
    assert_close_each(_unique_grads(groups.tensors), _unique_grads(ref_tensors))
    fused.group_lasso_grad_grouped_(functional, groups.dims, groups.group_ids, pruned, coefficient(0.0625, coeff_kind, device),
                                    backend=backend)
    assert_close_each(_unique_grads(functional), _unique_grads(ref_tensors))

    # Kept = not in a pruned group (no group, −1, is kept): derived here, not from the plan under test.
    keep = [(ids < 0) | ~pruned[ids.clamp_min(0)] for ids in groups.group_ids]
    with torch.no_grad():
        reference.shrink_([fused._rows_view(t, d) for t, d in zip(ref_tensors, groups.dims)], keep, 0.5)
    groups.shrink_(coefficient(0.5, coeff_kind, device))
    assert_close_each([t.detach() for t in _unique(groups.tensors)], [t.detach() for t in _unique(ref_tensors)])


def _dedupe_like(tensors, clones):
    """Clones that repeat where ``tensors`` repeats (the same clone object for the same tensor)."""
    first = {}
    out = []
    for t, c in zip(tensors, clones):
        out.append(first.setdefault(id(t), c))
    return out


def _unique(tensors):
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _unique_grads(tensors):
    return [t.grad for t in _unique(tensors)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_same_tensor_along_two_dims_applies_both(device, backend):
    """One weight listed along dim 0 and dim 1: pruned row i and column j both change, element (i, j) twice."""
    need("l2_grad_", backend, device)
    w = make_params((torch.float64,), device, [(6, 5)])[0]
    rows, cols = mask(6, "half", device), mask(5, "half", device)
    (expected,) = clone([w])
    reference_masked("l2_grad_", [expected, expected], [rows, cols], [0, 1], 0.5)
    fused.l2_grad_([w, w], [rows, cols], 0.5, dims=[0, 1], backend=backend)
    torch.testing.assert_close(w.grad, expected.grad)


# ---------------------------------------------------------------------------------------------
# Memory layouts: dense tensors in any dim order are updated in place; others are read from copies
# ---------------------------------------------------------------------------------------------
def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in ``layout``: "other" = channels_last for 4-D, a column-major matrix for 2-D;
    "strided" = a non-dense view (every other element of a buffer twice as long); else contiguous."""
    if layout == "other" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "other" and t.dim() == 2:
        return t.t().contiguous().t()
    if layout == "strided":
        return torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0]
    return t.contiguous()


def laid_out_params(dtypes, device, params_layout: str, grads_layout: str, shapes=SHAPES):
    out = []
    for p in make_params(dtypes, device, shapes):
        q = relayout(p.detach(), params_layout).requires_grad_()
        q.grad = relayout(p.grad, grads_layout)
        out.append(q)
    return out


LAYOUTS = [("other", "other"), ("other", "contiguous"), ("contiguous", "other"), ("strided", "other")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("op", ["l2_grad_", "group_lasso_grad_"])
@pytest.mark.parametrize("layouts", LAYOUTS, ids=["-".join(x) for x in LAYOUTS])
@pytest.mark.parametrize("along", ["rows", "mixed"])
def test_masked_grad_ops_any_layout(device, backend, op, layouts, along):
    """channels_last / column-major parameters and gradients, in the same layout or not, and
    non-dense parameters (only read): the reference's values, the gradients keep their strides."""
    need(op, backend, device)
    params = laid_out_params((torch.float64, torch.float32), device, *layouts)
    strides = [p.grad.stride() for p in params]
    dims = [0] * len(params) if along == "rows" else mixed_dims(params)
    masks = [mask(p.shape[d], "half", device) for p, d in zip(params, dims)]
    expected = clone(params)
    reference_masked(op, expected, masks, dims, 0.375)
    getattr(fused, op)(params, masks, 0.375, dims=dims, backend=backend)
    assert_close_each([p.grad for p in params], [p.grad for p in expected])
    assert [p.grad.stride() for p in params] == strides


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("along", ["rows", "mixed"])
def test_shrink_and_coupled_ops_any_layout(device, backend, along):
    """shrink_ writes channels_last / column-major tensors in place; the coupled group lasso and the
    saliency read them (and their gradients) where they are."""
    need("shrink_", backend, device)
    need("group_lasso_grad_grouped_", backend, device)
    params = laid_out_params((torch.float32,), device, "other", "other")
    dims = [0] * len(params) if along == "rows" else mixed_dims(params)
    masks = [mask(p.shape[d], "half", device) for p, d in zip(params, dims)]
    expected = clone(params)
    data = [p.data_ptr() for p in params]
    with torch.no_grad():
        reference.shrink_([fused._rows_view(p, d) for p, d in zip(expected, dims)], masks, 0.5)
    fused.shrink_(params, masks, 0.5, dims=dims, backend=backend)
    assert_close_each([p.detach() for p in params], [p.detach() for p in expected])
    assert [p.data_ptr() for p in params] == data  # in place

    conv1, g1, b1, conv2, fc, conv3 = params
    sets = [[(conv1, 0), (g1, 0), (b1, 0), (conv2, 1)], [(conv2, 0), (fc, 1)], [(fc, 0), (conv3, 1)], [(conv3, 0)]]
    groups = fused.CoupledGroups.from_channel_sets(sets, backend=backend)
    torch.testing.assert_close(
        groups.saliency(), reference.group_saliency(groups.tensors, groups.dims, groups.group_ids, groups.num_groups),
        **TOL[torch.float32],
    )
    pruned = torch.rand(groups.num_groups, device=device) < 0.5
    ref_tensors = _dedupe_like(groups.tensors, clone(groups.tensors))
    reference.group_lasso_grad_grouped_(ref_tensors, groups.dims, groups.group_ids, pruned, 0.25)
    groups.set_pruned(pruned)
    groups.group_lasso_grad_(0.25)
    assert_close_each(_unique_grads(groups.tensors), _unique_grads(ref_tensors))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("layout", ["other", "strided"])
@pytest.mark.parametrize("dim", [0, 1])
def test_group_norms_any_layout(device, backend, layout, dim):
    need("group_norms", backend, device)
    tensors = [relayout(p.detach(), layout) for p in make_params((torch.float32,), device, [SHAPES[0]] + SHAPES[3:])]
    expected = reference.group_norms([t.contiguous() for t in tensors], 2, dim)
    assert_close_each(fused.group_norms(tensors, dim=dim, backend=backend), expected)


def random_dense(gen: torch.Generator, device) -> torch.Tensor:
    """A float64 tensor of 1–5 dims (sizes 1–4, some 1) stored in a random dim order: dense, rarely contiguous."""
    shape = [int(n) for n in torch.randint(1, 5, (int(torch.randint(1, 6, (), generator=gen)),), generator=gen)]
    order = torch.randperm(len(shape), generator=gen).tolist()
    stored = torch.randn([shape[d] for d in order], generator=gen, dtype=torch.float64)
    return stored.permute([order.index(d) for d in range(len(shape))]).to(device)  # shape `shape`, strides permuted


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_any_dim_order_and_slicing_dim(device, backend, seed):
    """Tensors of 1–5 dims in random dim orders, sliced along a random dim (size-1 dims included): the
    updates and the norms match the reference; a gradient in another dim order than its parameter too."""
    need("l2_grad_", backend, device)
    gen = torch.Generator().manual_seed(seed)
    params, dims = [], []
    for _ in range(6):
        p = random_dense(gen, device).requires_grad_()
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device)
        if torch.rand((), generator=gen) < 0.5:
            p.grad = torch.empty_like(p).copy_(p.grad)  # the parameter's dim order
        params.append(p)
        dims.append(int(torch.randint(p.dim(), (), generator=gen)))
    masks = [torch.rand(p.shape[d], generator=gen).lt(0.5).to(device) for p, d in zip(params, dims)]
    expected = clone(params)
    reference_masked("l2_grad_", expected, masks, dims, 0.25)
    fused.l2_grad_(params, masks, 0.25, dims=dims, backend=backend)
    assert_close_each([p.grad for p in params], [p.grad for p in expected])
    with torch.no_grad():
        reference.shrink_([fused._rows_view(p, d) for p, d in zip(expected, dims)], masks, 0.5)
    fused.shrink_(params, masks, 0.5, dims=dims, backend=backend)
    assert_close_each([p.detach() for p in params], [p.detach() for p in expected])
    for d in range(3):
        tensors = [p.detach() for p in params if p.dim() > d]
        if tensors:
            assert_close_each(fused.group_norms(tensors, dim=d, backend=backend), reference.group_norms(tensors, 2, d))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_non_dense_tensors_written_in_place_are_refused(device, backend):
    """A tensor the op writes must be dense (in any dim order): the error names it, on every backend."""
    need("shrink_", backend, device)
    params = laid_out_params((torch.float32,), device, "strided", "strided", SHAPES[:3])
    masks = [mask(p.shape[0], "half", device) for p in params]
    with pytest.raises(ValueError, match=r"params\[0\]\.grad is updated in place, so it must be dense in memory"):
        fused.l2_grad_(params, masks, 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"tensors\[0\] is updated in place, so it must be dense in memory"):
        fused.shrink_(params, masks, 0.5, backend=backend)
    groups = fused.CoupledGroups.from_channel_sets([[(params[0], 0), (params[1], 0), (params[2], 0)]], backend=backend)
    groups.set_pruned(~masks[0])
    with pytest.raises(ValueError, match=r"tensors\[0\] is updated in place, so it must be dense in memory"):
        groups.shrink_(0.5)
    with pytest.raises(ValueError, match=r"tensors\[0\]\.grad is updated in place, so it must be dense in memory"):
        groups.group_lasso_grad_(0.5)


def test_kernel_refuses_non_dense_written_tensors():
    """Direct op calls: the kernel names the argument too."""
    need("shrink_", "cpp", "cpu")
    t = relayout(torch.randn(4, 3), "strided")
    with pytest.raises(ValueError, match=r"tensors\[0\] is updated in place, so it must be dense in memory"):
        _registry.op("cpp", "shrink_")([t], [torch.ones(4, dtype=torch.bool)], [0], 0.5, None)
    with pytest.raises(ValueError, match=r"grads\[0\] is updated in place, so it must be dense in memory"):
        _registry.op("cpp", "l2_grad_")([t], [torch.randn(4, 3)], [torch.ones(4, dtype=torch.bool)], [0], 0.5, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_pruned_slices_follows_replaced_grads(device, backend, monkeypatch):
    """PrunedSlices reads each parameter's .grad at call time (the compiled backends through their C++
    plan, csrc/plans.cpp, and never through the Python path): a .grad replaced between steps (zero_grad(set_to_none=True), then
    backward) is the one updated, a missing one raises naming the parameter, and every op matches
    the reference step after step."""
    need("l2_grad_", backend, device)
    params = make_params((torch.float32, torch.float64), device)
    masks = [mask(p.shape[0], "half", device) for p in params]
    slices = fused.PrunedSlices(params, masks, backend=backend)
    expected = clone(params)
    for step in range(3):
        for p, e in zip(params, expected):  # a new .grad object every step, as after zero_grad + backward
            p.grad = torch.randn_like(p)
            e.grad = p.grad.clone()
        with in_cpp_if_compiled(backend, monkeypatch):
            slices.l2_grad_(0.25)
            slices.group_lasso_grad_(0.5)
            slices.shrink_(0.75)
        reference_masked("l2_grad_", expected, masks, [0] * len(params), 0.25)
        reference_masked("group_lasso_grad_", expected, masks, [0] * len(params), 0.5)
        with torch.no_grad():
            reference.shrink_([e.detach() for e in expected], masks, 0.75)
        assert_close_each([p.grad for p in params], [e.grad for e in expected])
        assert_close_each([p.detach() for p in params], [e.detach() for e in expected])
    assert isinstance(slices._cpp_plan, torch.ScriptObject) == (backend in _registry.SELF_CHECKING)
    copied = copy.deepcopy(slices)  # the copy updates its own tensors, through a plan of its own
    before = [p.grad.clone() for p in params]
    with in_cpp_if_compiled(backend, monkeypatch):
        copied.l2_grad_(1.0)
    assert_close_each([p.grad for p in params], before)
    expected = clone(copied.params)
    reference_masked("l2_grad_", expected, masks, [0] * len(params), 1.0)
    with in_cpp_if_compiled(backend, monkeypatch):
        copied.l2_grad_(1.0)
    assert_close_each([p.grad for p in copied.params], [e.grad for e in expected])
    restored, before = pickle.loads(pickle.dumps(slices)), [p.detach().clone() for p in params]
    restored.shrink_(0.5)  # its own copies of the parameters, through a plan of its own
    assert_close_each([p.detach() for p in params], before)
    with torch.no_grad():
        reference.shrink_(before, masks, 0.5)
    assert_close_each([p.detach() for p in restored.params], before)
    params[2].grad = None
    with pytest.raises(ValueError, match=r"params\[2\]\.grad is None"):
        slices.l2_grad_(0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.SELF_CHECKING)
def test_coupled_groups_cpp_plan_follows_pruned_groups_and_grads(device, backend, monkeypatch):
    """CoupledGroups' group lasso through its C++ plan: new .grad objects and a new pruned-group mask
    every step, each step against the reference; a copy works on its own tensors."""
    need("group_lasso_grad_grouped_", backend, device)
    conv1, g1, b1, conv2, fc, conv3 = make_params((torch.float64,), device)
    sets = [[(conv1, 0), (g1, 0), (b1, 0), (conv2, 1)], [(conv2, 0), (fc, 1)], [(fc, 0), (conv3, 1)]]
    groups = fused.CoupledGroups.from_channel_sets(sets, backend=backend)
    for step in range(3):
        for t in _unique(groups.tensors):
            t.grad = torch.randn_like(t)
        ref_tensors = _dedupe_like(groups.tensors, clone(groups.tensors))
        pruned = torch.rand(groups.num_groups, device=device) < 0.5
        groups.set_pruned(pruned)
        reference.group_lasso_grad_grouped_(ref_tensors, groups.dims, groups.group_ids, pruned, 0.125)
        with cpp_plan_only(monkeypatch):
            groups.group_lasso_grad_(0.125)
        assert_close_each(_unique_grads(groups.tensors), _unique_grads(ref_tensors))
    assert isinstance(groups._cpp_plan, torch.ScriptObject)
    copied = copy.deepcopy(groups)
    before = [g.clone() for g in _unique_grads(groups.tensors)]
    with cpp_plan_only(monkeypatch):
        copied.group_lasso_grad_(1.0)
    assert_close_each(_unique_grads(groups.tensors), before)
    assert not all(torch.equal(a, b) for a, b in zip(_unique_grads(copied.tensors), before))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [b for b in _registry.BACKENDS if b != "reference"])
def test_coefficient_times_tensor(device, backend):
    """The op's (float c, Tensor c_tensor) pair scales by c · c_tensor (float32 and float64 tensors)."""
    need("l2_grad_", backend, device)
    for c_dtype in (torch.float32, torch.float64):
        params = make_params((torch.float64,), device, [(4, 3)])
        keep = [mask(4, "half", device)]
        expected = clone(params)
        reference_masked("l2_grad_", expected, keep, [0], 0.25 * 3.0)
        grads = [p.grad for p in params]
        _registry.op(backend, "l2_grad_")(grads, [p.detach() for p in params], keep, [0], 0.25,
                                          torch.tensor(3.0, dtype=c_dtype, device=device))
        torch.testing.assert_close(params[0].grad, expected[0].grad)


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake tensors, autograd registration, AOT dispatch
# ---------------------------------------------------------------------------------------------
def _op_samples(device):
    params = [t.detach() for t in make_params((torch.float32, torch.float16), device, SHAPES[:4])]
    grads = [torch.randn_like(p) for p in params]
    masks = [mask(p.shape[0], "half", device) for p in params]
    dims = [0] * len(params)
    ids = [torch.arange(p.shape[0], device=device) for p in params]
    c_t = torch.tensor(0.5, device=device)
    pruned = mask(12, "half", device)
    return {
        "group_norms": [(params, 2, 0), (params, 1, 0)],
        "group_norms_flat": [(params, 2, 0), (params[:1], 1, 0)],
        "group_saliency": [(params, dims, ids, 16)],
        "l2_grad_": [(grads, params, masks, dims, 0.1, None), (grads, params, masks, dims, 0.1, c_t)],
        "shrink_": [(params, masks, dims, 0.9, None), (params, masks, dims, 2.0, c_t)],
        "group_lasso_grad_": [(grads, params, masks, dims, 0.1, c_t)],
        "group_lasso_grad_grouped_": [(grads[:3], params[:3], dims[:3], [i.clamp_max(11) for i in ids[:3]], pruned, 0.1, None)],
        "slimming_grad_": [([grads[1]], [params[1]], 0.1, None), ([grads[1]], [params[1]], 0.1, c_t)],
    }


OPS = ["group_norms", "group_norms_flat", "group_saliency", "l2_grad_", "shrink_", "group_lasso_grad_", "group_lasso_grad_grouped_", "slimming_grad_"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck(device, backend, op):
    need(op, backend, device)
    for args in _op_samples(device)[op]:
        torch.library.opcheck(_registry.op(backend, op), args)


# ---------------------------------------------------------------------------------------------
# Errors name the argument
# ---------------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    params = make_params((torch.float32,), "cpu", SHAPES[:3])
    masks = [mask(p.shape[0], "half", "cpu") for p in params]
    with pytest.raises(ValueError, match=r"keep_masks has 2 entries but params has 3"):
        fused.l2_grad_(params, masks[:2], 0.1)
    with pytest.raises(ValueError, match=r"keep_masks\[0\] must have shape \[12\]"):
        fused.l2_grad_(params, [mask(5, "half", "cpu")] + masks[1:], 0.1)
    with pytest.raises(TypeError, match=r"keep_masks\[1\] must be a torch.bool tensor, got torch.float32"):
        fused.l2_grad_(params, [masks[0], masks[1].float(), masks[2]], 0.1)
    with pytest.raises(ValueError, match=r"keep_masks\[2\] is on meta but tensors\[2\] is on cpu"):
        fused.shrink_(params, masks[:2] + [masks[2].to("meta")], 0.5)
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta but tensors\[0\] is on cpu"):
        fused.shrink_([params[0], params[1].detach().to("meta")], masks[:2], 0.5)
    params[1].grad = None
    with pytest.raises(ValueError, match=r"params\[1\]\.grad is None"):
        fused.l2_grad_(params, masks, 0.1)
    with pytest.raises(ValueError, match=r"dims\[1\] = 1 is not a dim of tensors\[1\]"):
        fused.shrink_(params, masks, 0.5, dims=[0, 1, 0])
    with pytest.raises(TypeError, match=r"factor must be a float or a one-element tensor"):
        fused.shrink_(params, masks, "0.5")
    with pytest.raises(ValueError, match=r"coeff must be a float or a one-element tensor"):
        fused.PrunedSlices(params, masks).l2_grad_(torch.ones(2))
    with pytest.raises(ValueError, match=r"p must be 1 or 2"):
        fused.group_norms(params, p=3)
    groups = fused.CoupledGroups.from_channel_sets([[(params[0], 0), (params[1], 0)]])
    with pytest.raises(RuntimeError, match=r"set_pruned"):
        groups.shrink_(0.5)
    with pytest.raises(ValueError, match=r"pruned_groups must have shape \[12\]"):
        groups.set_pruned(torch.zeros(3, dtype=torch.bool))
    for backend in ("reference", "triton"):  # (the cpp functional form checks in C++: tested with its errors)
        if _registry.why_unavailable("group_lasso_grad_grouped_", backend, "cpu") is None:
            with pytest.raises(ValueError, match=r"pruned_groups must have shape \[12\], got \(\)"):
                fused.group_lasso_grad_grouped_(params[:1], [0], [torch.arange(12)], torch.tensor(True), 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"channel_sets\[0\] mixes channel counts"):
        fused.CoupledGroups.from_channel_sets([[(params[0], 0), (params[0], 1)]])
    ids = [torch.arange(12), torch.arange(12)]
    for backend in _registry.BACKENDS:  # checked once, when the groups are made, whatever the backend
        if _registry.why_unavailable("group_saliency", backend, "cpu") is not None:
            continue
        bad = [ids[0], torch.tensor([0] * 11 + [20])]
        with pytest.raises(ValueError, match=r"group_ids\[1\] must hold group ids in \[0, 13\) or -1 \(no group\), got values in \[0, 20\]"):
            fused.group_saliency(params[:2], [0, 0], bad, 13, backend=backend)
        with pytest.raises(ValueError, match=r"group_ids\[0\] must hold group ids in \[0, 12\) or -1"):
            fused.CoupledGroups(params[:2], [0, 0], [torch.tensor([-5] + [0] * 11), ids[1]], backend=backend)


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_loose_arguments_are_refused_or_taken_as_meant(backend):
    """dims must be ints (not floats, strings or bools), p an int, float coefficients finite; any
    iterable of tensors (nn.ParameterList, dict values) and numpy scalars are taken as meant."""
    import numpy as np

    need("l2_grad_", backend, "cpu")
    params = make_params((torch.float32,), "cpu", SHAPES[:3])
    masks = [mask(p.shape[0], "half", "cpu") for p in params]
    before = [p.grad.clone() for p in params]
    for dims in ([0, 1.9, 0], [0, "1", 0], [0, True, 0], True):
        with pytest.raises(TypeError, match=r"dims must be ints"):
            fused.l2_grad_(params, masks, 0.5, dims=dims, backend=backend)
    with pytest.raises(ValueError, match=r"p must be 1 or 2 \(an int\), got 2.0"):
        fused.group_norms(params, p=2.0, backend=backend)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"coeff must be a finite number"):
            fused.l2_grad_(params, masks, bad, backend=backend)
        with pytest.raises(ValueError, match=r"factor must be a finite number"):
            fused.shrink_(params, masks, bad, backend=backend)
    assert_close_each([p.grad for p in params], before)  # nothing written by the refused calls
    plist = torch.nn.ParameterList([torch.nn.Parameter(p.detach().clone()) for p in params])
    for q, p in zip(plist, params):
        q.grad = p.grad.clone()
    expected = clone(list(plist))
    reference_masked("l2_grad_", expected, masks, [0] * 3, 0.25)
    fused.l2_grad_(plist, masks, np.float32(0.25), backend=backend)
    assert_close_each([q.grad for q in plist], [e.grad for e in expected])
    as_dict = {f"w{i}": p.detach() for i, p in enumerate(params)}
    assert_close_each(fused.group_norms(as_dict.values(), backend=backend), reference.group_norms(list(as_dict.values()), 2, 0))
    assert_close_each(fused.group_norms(params, p=np.int64(1), dim=np.int64(0), backend=backend),
                      reference.group_norms(params, 1, 0))
    with pytest.raises(ValueError, match=r"p must be 1 or 2 \(an int\), got True"):
        fused.group_norms(params, p=True, backend=backend)
    with pytest.raises(TypeError, match=r"dim must be ints, got a bool"):
        fused.group_norms(params, dim=True, backend=backend)
    with pytest.raises(TypeError, match=r"a set has no order"):
        fused.group_norms(set(params), backend=backend)


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_in_place_ops_under_torch_compile_fullgraph(backend):
    """The functional in-place ops and the plans' methods trace without a graph break and update as
    the reference does."""
    need("l2_grad_", backend, "cpu")
    torch._dynamo.reset()
    params = make_params((torch.float32,), "cpu", SHAPES[:3])
    masks = [mask(p.shape[0], "half", "cpu") for p in params]
    slices = fused.PrunedSlices(params, masks, backend=backend)
    expected = clone(params)

    def step():
        fused.l2_grad_(params, masks, 0.25, backend=backend)
        slices.group_lasso_grad_(0.5)
        fused.shrink_(params, masks, 0.75, backend=backend)
        slices.shrink_(0.5)

    torch.compile(step, fullgraph=True, backend="aot_eager")()
    reference_masked("l2_grad_", expected, masks, [0] * 3, 0.25)
    reference_masked("group_lasso_grad_", expected, masks, [0] * 3, 0.5)
    with torch.no_grad():
        reference.shrink_([e.detach() for e in expected], masks, 0.75 * 0.5)
    assert_close_each([p.grad for p in params], [e.grad for e in expected])
    assert_close_each([p.detach() for p in params], [e.detach() for e in expected])


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_inference_tensors_are_updated_only_in_inference_mode(backend):
    """As PyTorch's own in-place ops: an inference tensor is refused outside inference_mode before
    anything is written (the error names it), and updated inside it."""
    need("shrink_", backend, "cpu")
    with torch.inference_mode():
        tensors = [torch.randn(6, 3), torch.randn(6)]
    masks = [torch.arange(6) % 2 == 0] * 2  # normal tensors: the call reaches the autograd kernels
    before = [t.clone() for t in tensors]
    with pytest.raises(RuntimeError, match=r"tensors\[0\] is an inference tensor"):
        fused.shrink_(tensors, masks, 0.5, backend=backend)
    with pytest.raises(RuntimeError, match=r"params\[0\] is an inference tensor"):
        fused.PrunedSlices(tensors, masks, backend=backend).shrink_(0.5)
    assert_close_each(tensors, before)  # not written, not even once
    with torch.inference_mode():
        fused.shrink_(tensors, masks, 0.5, backend=backend)
    with torch.no_grad():
        reference.shrink_(before, masks, 0.5)
    assert_close_each(tensors, before)


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_zero_size_tensors_match_the_reference(backend):
    need("group_norms", backend, "cpu")
    tensors = [torch.randn(0, 3), torch.randn(4, 0), torch.randn(3, 2)]
    for dim in (0, 1):
        assert_close_each(fused.group_norms(tensors, dim=dim, backend=backend), reference.group_norms(tensors, 2, dim))


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_zero_dim_bn_weights_are_refused(backend):
    need("slimming_grad_", backend, "cpu")
    gamma = torch.tensor(0.5, requires_grad=True)
    gamma.grad = torch.zeros(())
    with pytest.raises((ValueError, RuntimeError), match=r"bn_weights\[0\] must have at least 1 dims"):
        fused.slimming_grad_([gamma], 1e-4, backend=backend)


def test_set_pruned_takes_a_snapshot():
    """The groups' pruned set is the one given to set_pruned, for every op, even if the caller's tensor
    changes afterwards."""
    params = make_params((torch.float64,), "cpu", SHAPES[:2])
    groups = fused.CoupledGroups.from_channel_sets([[(params[0], 0), (params[1], 0)]])
    pruned = torch.zeros(groups.num_groups, dtype=torch.bool)
    pruned[0] = True
    groups.set_pruned(pruned)
    pruned[1] = True  # after the call: not seen
    expected = clone(groups.tensors)
    snapshot = torch.zeros_like(pruned)
    snapshot[0] = True
    reference.group_lasso_grad_grouped_(expected, groups.dims, groups.group_ids, snapshot, 0.5)
    groups.group_lasso_grad_(0.5)
    assert_close_each([t.grad for t in groups.tensors], [e.grad for e in expected])


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_group_saliency_under_torch_compile_fullgraph(backend):
    need("group_saliency", backend, "cpu")
    torch._dynamo.reset()
    tensors = make_params((torch.float32,), "cpu", SHAPES[:2], with_grad=False)
    ids = [torch.arange(12), torch.arange(12)]
    got = torch.compile(lambda ts: fused.group_saliency(ts, [0, 0], ids, 12, backend=backend), fullgraph=True,
                        backend="aot_eager")(tensors)
    torch.testing.assert_close(got, reference.group_saliency(tensors, [0, 0], ids, 12))


@pytest.mark.parametrize("backend", ["cpp"])
def test_kernel_errors_name_the_argument(backend):
    """Direct op calls (no Python validation) are checked in the kernel too."""
    need("l2_grad_", backend, "cpu")
    params = [torch.randn(4, 3), torch.randn(5)]
    grads = [torch.randn(4, 3), torch.randn(6)]
    masks = [torch.ones(4, dtype=torch.bool), torch.ones(5, dtype=torch.bool)]
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \[6\] but params\[1\] has shape \[5\]"):
        _registry.op(backend, "l2_grad_")(grads, params, masks, [0, 0], 0.1, None)
    with pytest.raises(ValueError, match=r"coeff_tensor must hold one element"):
        _registry.op(backend, "l2_grad_")(grads[:1], params[:1], masks[:1], [0], 0.1, torch.ones(3))
    for bad, name in ((9, "num_groups = 4"), (-2, "num_groups = 4")):
        with pytest.raises(IndexError, match=rf"group_ids\[0\]\[1\] = {bad} is not a group id in \[0, {name}\) or -1"):
            _registry.op(backend, "group_saliency")(params[:1], [0], [torch.tensor([0, bad, 1, 2])], 4)
        with pytest.raises(IndexError, match=rf"group_ids\[0\]\[1\] = {bad} is not a group id in \[0, pruned_groups"):
            _registry.op(backend, "group_lasso_grad_grouped_")(
                grads[:1], params[:1], [0], [torch.tensor([0, bad, 1, 2])], torch.ones(4, dtype=torch.bool), 0.1, None
            )


# ---------------------------------------------------------------------------------------------
# Dispatch count: O(1) ops per call, independent of the number of layers
# ---------------------------------------------------------------------------------------------
class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_call(fn) -> int:
    with CountOps() as counter:
        fn()
    return counter.count


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_dispatched_ops_do_not_grow_with_layers(backend, monkeypatch):
    for op in ("l2_grad_", "shrink_", "group_lasso_grad_", "group_lasso_grad_grouped_", "group_norms", "group_saliency"):
        need(op, backend, "cpu")
    counts = {}
    # (the plans of the compiled backends through their C++ plan: its Python path would count the same)
    with in_cpp_if_compiled(backend, monkeypatch):
        for layers in (4, 40):
            shapes = [(8, 4, 3, 3), (8,), (8,)] * layers
            params = make_params((torch.float32, torch.float16), "cpu", shapes)
            masks = [mask(8, "half", "cpu") for _ in params]
            slices = fused.PrunedSlices(params, masks, backend=backend)
            groups = fused.CoupledGroups.from_channel_sets([[(p, 0) for p in params[i : i + 3]] for i in range(0, len(params), 3)],
                                                           backend=backend)
            groups.set_pruned(mask(groups.num_groups, "half", "cpu"))
            reg = torch.tensor(1e-3)
            counts[layers] = {
                "l2_grad_": ops_per_call(lambda: slices.l2_grad_(1e-3)),
                "l2_grad_ (tensor coeff)": ops_per_call(lambda: slices.l2_grad_(reg)),
                "shrink_": ops_per_call(lambda: slices.shrink_(0.9)),
                "group_lasso_grad_": ops_per_call(lambda: slices.group_lasso_grad_(reg)),
                "coupled group_lasso_grad_": ops_per_call(lambda: groups.group_lasso_grad_(1e-3)),
                "saliency": ops_per_call(groups.saliency),
                "group_norms": ops_per_call(lambda: fused.group_norms(params, backend=backend)),
                "group_norms flat": ops_per_call(lambda: fused.group_norms(params, flat=True, backend=backend)),
                "SliceNorms": ops_per_call(fused.SliceNorms(params, backend=backend)),
            }
            if backend in _registry.SELF_CHECKING:  # their functional in-place forms: one call too
                ids, pruned = groups.group_ids, groups.pruned_groups
                counts[layers].update({
                    "functional l2_grad_": ops_per_call(lambda: fused.l2_grad_(params, masks, reg, backend=backend)),
                    "functional shrink_": ops_per_call(lambda: fused.shrink_(params, masks, 0.9, backend=backend)),
                    "functional group_lasso_grad_": ops_per_call(lambda: fused.group_lasso_grad_(params, masks, 1e-3, backend=backend)),
                    "functional coupled group_lasso_grad_": ops_per_call(
                        lambda: fused.group_lasso_grad_grouped_(groups.tensors, groups.dims, ids, pruned, 1e-3, backend=backend)
                    ),
                    "functional slimming_grad_": ops_per_call(lambda: fused.slimming_grad_(params[1::3], reg, backend=backend)),
                })
    assert counts[4] == counts[40], counts
    assert max(counts[40].values()) <= 4, counts


# ---------------------------------------------------------------------------------------------
# Random shapes, dtypes, dims and masks
# ---------------------------------------------------------------------------------------------
def random_model(seed: int, device):
    """3–8 tensors of 1–4 dims (sizes 1–9, so single-element slices and slices of one row occur),
    random fp32/fp16/bf16/fp64, a random slicing dim and a random keep mask along it."""
    gen = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    params, dims, masks = [], [], []
    for _ in range(randint(3, 8)):
        shape = tuple(randint(1, 9) for _ in range(randint(1, 4)))
        p = torch.randn(shape, generator=gen).to(device=device, dtype=dtypes[randint(0, 3)]).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device=device, dtype=p.dtype)
        d = randint(0, p.dim() - 1)
        keep = torch.rand(shape[d], generator=gen) < float(torch.rand((), generator=gen))
        params.append(p)
        dims.append(d)
        masks.append(keep.to(device))
    return params, dims, masks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(device, backend, seed):
    for op in ("l2_grad_", "group_lasso_grad_", "shrink_", "group_norms"):
        need(op, backend, device)
    params, dims, masks = random_model(seed, device)
    for op in ("l2_grad_", "group_lasso_grad_"):
        expected = clone(params)
        reference_masked(op, expected, masks, dims, 0.375)
        getattr(fused, op)(params, masks, 0.375, dims=dims, backend=backend)
        assert_close_each([p.grad for p in params], [p.grad for p in expected])
    expected = clone(params)
    with torch.no_grad():
        reference.shrink_([fused._rows_view(p, d) for p, d in zip(expected, dims)], masks, 0.5)
    fused.shrink_(params, masks, 0.5, dims=dims, backend=backend)
    assert_close_each([p.detach() for p in params], [p.detach() for p in expected])
    assert_close_each(fused.group_norms(params, p=2, dim=0, backend=backend), reference.group_norms(params, 2, 0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float32,), MIXED], ids=["fp32", "mixed"])
def test_group_norms_outputs_are_independent(device, backend, dtypes):
    """Each call returns new tensors, and writing into one output leaves the others (and the previous
    call's) as they were, whatever memory they share."""
    need("group_norms", backend, device)
    tensors = make_params(dtypes, device, SHAPES, with_grad=False)
    first = fused.group_norms(tensors, backend=backend)
    second = fused.group_norms(tensors, backend=backend)
    expected = reference.group_norms(tensors, 2, 0)
    second[0].fill_(-1)
    second[1].mul_(0)
    assert_close_each(first, expected)
    assert_close_each(second[2:], expected[2:])
    assert (second[0] == -1).all() and (second[1] == 0).all()
    assert all(not o.requires_grad and o.dim() == 1 for o in first)


def test_every_non_differentiable_op_returning_tensors_runs_below_autograd():
    """csrc/non_differentiable.cpp lists the ops by name: every op of the registry that returns tensors
    and has no gradient (not a KERNEL_OPS pair) must be there, in both namespaces."""
    if _registry.LIBRARY_ERROR is not None:
        pytest.skip(_registry.LIBRARY_ERROR)
    kernel_ops = set(_registry.KERNEL_OPS) | set(_registry.KERNEL_OPS.values())
    for name, schema in _registry.SCHEMAS.items():
        if name in kernel_ops or schema.endswith("-> ()"):
            continue
        for q in _registry.qualnames(name):
            assert _registry.has_kernel(q, "Autograd"), f"{q} returns tensors but has no Autograd kernel"
    weights = [torch.randn(4, 3, requires_grad=True), torch.randn(5, 2, requires_grad=True)]
    norms = fused.group_norms(weights, backend="cpp")
    assert not any(n.requires_grad for n in norms) and not fused.group_norms(weights, flat=True, backend="cpp").requires_grad


# Each in-place op, called as a user would (functional form, then the plan objects' methods): what
# it writes, and the public call.
INPLACE_CALLS = {
    "l2_grad_": (lambda ps: [p.grad for p in ps], lambda ps, keep, b: fused.l2_grad_(ps, keep, 0.5, backend=b)),
    "shrink_": (lambda ps: ps, lambda ps, keep, b: fused.shrink_(ps, keep, 0.5, backend=b)),
    "group_lasso_grad_": (lambda ps: [p.grad for p in ps], lambda ps, keep, b: fused.group_lasso_grad_(ps, keep, 0.5, backend=b)),
    "slimming_grad_": (lambda ps: [p.grad for p in ps], lambda ps, keep, b: fused.slimming_grad_(ps, 0.5, backend=b)),
    "PrunedSlices.l2_grad_": (lambda ps: [p.grad for p in ps], lambda ps, keep, b: fused.PrunedSlices(ps, keep, backend=b).l2_grad_(0.5)),
    "PrunedSlices.shrink_": (lambda ps: ps, lambda ps, keep, b: fused.PrunedSlices(ps, keep, backend=b).shrink_(0.5)),
    "CoupledGroups.group_lasso_grad_": (
        lambda ps: [p.grad for p in ps],
        lambda ps, keep, b: _pruned_groups(ps, keep, b).group_lasso_grad_(0.5),
    ),
}


def _pruned_groups(params, keep, backend):
    """Each tensor's slices in groups of their own, the pruned ones marked pruned."""
    ids, start = [], 0
    for p in params:
        ids.append(torch.arange(start, start + p.shape[0]))
        start += p.shape[0]
    groups = fused.CoupledGroups(params, [0] * len(params), ids, start, backend=backend)
    groups.set_pruned(~torch.cat(keep))
    return groups


@pytest.mark.parametrize("backend", _registry.BACKENDS)
@pytest.mark.parametrize("call", list(INPLACE_CALLS))
def test_inplace_ops_bump_versions_so_autograd_sees_the_change(backend, call):
    """Like PyTorch's own in-place ops: every tensor an op writes gets a new version, so a backward
    through a graph that saved it raises instead of computing with the changed values."""
    op = call.split(".")[-1]
    need(op, backend, "cpu")
    written_of, run = INPLACE_CALLS[call]
    params = make_params((torch.float32,), "cpu", [(4, 3), (5,)])
    keep = [mask(p.shape[0], "half", "cpu") for p in params]
    written = written_of(params)
    before = [t._version for t in written]
    saved = [t.detach().requires_grad_() for t in written]  # a graph that saves the written tensors' values
    graph = sum((s * t).sum() for s, t in zip(saved, written))
    run(params, keep, backend)
    assert all(t._version > v for t, v in zip(written, before)), [(v, t._version) for t, v in zip(written, before)]
    if call.endswith("shrink_"):  # the params themselves were saved (they require grad)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            graph.backward()


def test_inplace_ops_bump_versions_without_the_compiled_library():
    """Without the compiled library the same Autograd kernels come from Python (_registry)."""
    script = (
        "import torch, fastreg\n"
        "from fastreg import _registry, fused\n"
        "assert _registry.LIBRARY_ERROR is not None\n"
        "q = torch.tensor([1.0, 2.0, 3.0], requires_grad=True); q.grad = torch.zeros(3)\n"
        "keep = [torch.tensor([True, False, False])]\n"
        "fused.shrink_([q], keep, 0.5, backend='triton'); fused.l2_grad_([q], keep, 0.5, backend='triton')\n"
        "assert (q._version, q.grad._version) == (1, 1), (q._version, q.grad._version)\n"
        "assert not fused.group_norms([q], backend='triton')[0].requires_grad\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FASTREG_LIBRARY=os.devnull + "/none", TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_group_norms_under_torch_compile_fullgraph(backend):
    need("group_norms", backend, "cpu")
    torch._dynamo.reset()
    tensors = make_params((torch.float32,), "cpu", SHAPES, with_grad=False)

    def norms(ts):
        return [n * 2 for n in fused.group_norms(ts, backend=backend)], fused.group_norms(ts, p=1, flat=True, backend=backend)

    per_layer, flat = torch.compile(norms, fullgraph=True, backend="aot_eager")(tensors)
    assert_close_each(per_layer, [2 * n for n in reference.group_norms(tensors, 2, 0)])
    torch.testing.assert_close(flat, torch.cat(reference.group_norms(tensors, 1, 0)))


# ---------------------------------------------------------------------------------------------
# Fast paths: only an argument the op refuses falls back to the checked path
# ---------------------------------------------------------------------------------------------
DEVICE_ERRORS = [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
]


def _l2_setup():
    params = [torch.randn(6, 3), torch.randn(6)]
    for p in params:
        p.grad = torch.randn_like(p)
    masks = [torch.arange(6) % 2 == 0] * 2
    expected = [p.grad + 0.5 * p * (~m).view(-1, *[1] * (p.dim() - 1)) for p, m in zip(params, masks)]
    return params, masks, expected


def _applies_then_raises(error):
    """The real op's first launch, then a device failure (as a kernel failing after it wrote)."""
    def kernel(*args):
        _registry.op("cpp", "l2_grad_")(*args)
        raise error
    return kernel


@pytest.mark.parametrize("error", DEVICE_ERRORS, ids=["oom", "cuda_error"])
def test_functional_fast_path_propagates_device_errors_without_rerunning(monkeypatch, error):
    need("l2_grad_", "cpp", "cpu")
    params, masks, expected = _l2_setup()
    monkeypatch.setattr(fused._registry, "fast_op", lambda *a, **k: _applies_then_raises(error))
    with pytest.raises(type(error), match=str(error)[:20]):
        fused.l2_grad_(params, masks, 0.5, backend="cpp")
    assert_close_each([p.grad for p in params], expected)  # applied once, not twice


@pytest.mark.parametrize("error", DEVICE_ERRORS, ids=["oom", "cuda_error"])
def test_plan_fast_path_propagates_device_errors_without_rerunning(error):
    need("l2_grad_", "cpp", "cpu")
    params, masks, expected = _l2_setup()
    plan = fused.PrunedSlices(params, masks, backend="cpp")

    class FailingPlan:
        def l2_grad_(self, c, c_tensor):
            _registry.op("cpp", "l2_grad_")([p.grad for p in params], params, masks, [0, 0], c, c_tensor)
            raise error

    plan._cpp_plan = FailingPlan()
    with pytest.raises(type(error)):
        plan.l2_grad_(0.5)
    assert_close_each([p.grad for p in params], expected)


def test_fast_path_falls_back_on_an_argument_error(monkeypatch):
    """A kernel refusing its arguments (before writing) hands over to the checked path, which applies once."""
    need("l2_grad_", "cpp", "cpu")
    params, masks, expected = _l2_setup()

    def refuses(*args):
        raise ValueError("fastreg::l2_grad_: grads[0] is not what the kernel expects")

    monkeypatch.setattr(fused._registry, "fast_op", lambda *a, **k: refuses)
    fused.l2_grad_(params, masks, 0.5, backend="cpp")
    assert_close_each([p.grad for p in params], expected)


def test_group_norms_fast_path_propagates_device_errors(monkeypatch):
    need("group_norms", "cpp", "cpu")

    def fails(*args):
        raise DEVICE_ERRORS[0]

    monkeypatch.setattr(fused._registry, "fast_op", lambda *a, **k: fails)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fused.group_norms([torch.randn(4, 3)], backend="cpp")


def test_argument_errors_are_told_from_device_errors():
    from fastreg._checks import is_argument_error

    need("l2_grad_", "cpp", "cpu")
    w, m = torch.randn(4, 3), torch.ones(4, dtype=torch.bool)
    op = _registry.op("cpp", "l2_grad_")
    for args in (([None], [w], [m], [0], 1.0, None),     # the dispatcher cannot convert the list
                 ([w], [w], [m.float()], [0], 1.0, None),  # the kernel's dtype check
                 ([w], [w], [m], [5], 1.0, None)):         # the kernel's dim check
        with pytest.raises(Exception) as err:
            op(*args)
        assert is_argument_error(err.value), repr(err.value)
    for error in DEVICE_ERRORS + [RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"), KeyboardInterrupt()]:
        assert not is_argument_error(error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_concurrent_streams_on_cuda(backend):
    """The same op on the same tensors from two streams at once: each stream's results are right
    (the triton plans keep one set of scratch buffers per stream)."""
    need("group_saliency", backend, "cuda")
    device = torch.device("cuda")
    tensors = [torch.randn(s, device=device) for s in ((256, 64, 3, 3), (512, 256), (1024,))]
    ids = [torch.arange(t.shape[0], device=device) % 7 for t in tensors]
    expected = reference.group_saliency(tensors, [0] * 3, ids, 7)
    streams = [torch.cuda.Stream(device) for _ in range(2)]
    outs = [None, None]
    torch.cuda.synchronize()
    for _ in range(3):
        for i, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                outs[i] = fused.group_saliency(tensors, [0] * 3, ids, 7, backend=backend)
        torch.cuda.synchronize()
        for out in outs:
            torch.testing.assert_close(out, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_deterministic_algorithms_reproduce_group_sums_bitwise_on_cuda(backend):
    """Under torch.use_deterministic_algorithms(True) the group totals (saliency, coupled group lasso,
    the gram penalty's per-layer sums) have a fixed summation order: two runs agree bit for bit."""
    from fastreg.gram import gram_penalty

    need("group_saliency", backend, "cuda")
    device = torch.device("cuda")
    tensors = [torch.randn(s, device=device) for s in ((128, 64, 3, 3), (128,), (256, 128))]
    ids = [torch.arange(t.shape[0], device=device) % 37 - 1 for t in tensors]
    pruned = torch.arange(37, device=device) % 2 == 0
    weights = [torch.randn(s, device=device, requires_grad=True) for s in ((256, 128, 3, 3), (512, 256, 1, 1))]
    wmasks = [torch.arange(w.shape[0], device=device) % 3 != 0 for w in weights]
    enabled = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            params = [t.clone().requires_grad_() for t in tensors]
            for p in params:
                p.grad = torch.zeros_like(p)
            fused.group_lasso_grad_grouped_(params, [0] * 3, ids, pruned, 0.5, backend=backend)
            penalty = (gram_penalty(weights, wmasks, backend=backend),)
            runs.append((fused.group_saliency(tensors, [0] * 3, ids, 37, backend=backend),
                         *[p.grad for p in params], *penalty, *torch.autograd.grad(penalty[0], weights)))
    finally:
        torch.use_deterministic_algorithms(enabled)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    torch.testing.assert_close(runs[0][0], reference.group_saliency(tensors, [0] * 3, ids, 37))
    torch.testing.assert_close(runs[0][-3], reference.gram_penalty([w.detach() for w in weights], wmasks, "decorrelate", "mean"))
