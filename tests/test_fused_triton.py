"""Kernel-level tests of the Triton multi-tensor ops (fastreg/kernels/multi_tensor.py), called through
``torch.ops.fastreg_triton`` and compared with fastreg.reference: every op, fp32/fp64/fp16/bf16,
mask ratios none / one / half / all pruned, coefficients as floats and 0-d tensors, slices along
dim 0 and 1, memory layouts, the plan cache, errors, opcheck, and compilation for a GPU target.
Runs on CPU under TRITON_INTERPRET=1 (tests/conftest.py); sizes are kept small for the interpreter.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastreg import _registry, reference
from fastreg.kernels import multi_tensor as mt

ops = torch.ops.fastreg_triton


def norms(tensors, p, dim):
    """The op's norms, one tensor per input; checked against its flat form (the same values)."""
    out = ops.group_norms(tensors, p, dim)
    flat = ops.group_norms_flat(tensors, p, dim)
    assert flat.dtype == reference.promoted_dtype(tensors)
    torch.testing.assert_close(flat, torch.cat([o.to(flat.dtype) for o in out]), rtol=0, atol=0)
    return out
if _registry.why_unavailable("l2_grad_", "triton", torch.device("cpu")) is not None:
    pytest.skip(_registry.why_unavailable("l2_grad_", "triton", torch.device("cpu")), allow_module_level=True)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# conv, linear, more slices than one tile (BLOCK_R), longer slices than one tile (BLOCK_K), BN vector
SHAPES = [(8, 3, 3, 3), (5, 7), (70, 3), (3, 130), (6,)]
SHAPES_2D = [s for s in SHAPES if len(s) > 1]
# error allowed against the reference run in the same dtype (fp16/bf16: one rounding step)
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


def make(shapes, dtype, layout="contiguous"):
    out = []
    for s in shapes:
        t = torch.randn(s, dtype=torch.float64)
        if layout == "channels_last" and len(s) == 4:
            t = t.to(memory_format=torch.channels_last)
        elif layout == "transposed" and len(s) == 2:
            t = t.T.contiguous().T
        elif layout == "strided":  # not dense: a view of every other element of a larger tensor
            out.append(torch.randn((2 * s[0],) + tuple(s[1:]), dtype=torch.float64).to(dtype)[::2])
            continue  # (.to(dtype) of the view would make it contiguous)
        out.append(t.to(dtype))
    return out


def make_masks(tensors, how, dims=None):
    masks = []
    for i, t in enumerate(tensors):
        n = t.shape[0 if dims is None else dims[i]]
        m = torch.ones(n, dtype=torch.bool)
        if how == "one":
            m[torch.randint(n, (1,))] = False
        elif how == "half":
            m[torch.randperm(n)[: n // 2]] = False
        elif how == "all":
            m[:] = False
        masks.append(m)
    return masks


def coefficient(value, kind):
    """(what the op gets: c, c_tensor), what the reference gets."""
    if kind == "float":
        return (value, None), value
    t = torch.tensor(value / 2, dtype=torch.float32)  # effective c · c_tensor = value
    return (2.0, t), t * 2.0


def reference_inplace(fn, grads, params, dims, *args):
    """Run a reference in-place gradient op on dim-`dims` slices via dim-0 views (writes go through)."""
    views = []
    for g, p, d in zip(grads, params, dims):
        v = p.detach().movedim(d, 0)
        v.grad = g.movedim(d, 0)
        views.append(v)
    fn(views, *args)


def assert_lists_close(actual, expected, dtype):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"tensor {i}: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
        torch.testing.assert_close(a, e, **TOL[dtype], msg=lambda m: f"tensor {i}: {m}")


# ---------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dim", [0, 1])
def test_group_norms(dtype, p, dim):
    tensors = make(SHAPES if dim == 0 else SHAPES_2D, dtype)
    out = norms(tensors, p, dim)
    assert_lists_close(out, reference.group_norms(tensors, p, dim), dtype)
    if dtype in (torch.float16, torch.bfloat16):  # error ≤ 2× that of the same math in that dtype (+ 1 ulp)
        exact = reference.group_norms([t.double() for t in tensors], p, dim)
        for o, e, t in zip(out, exact, tensors):
            torch_err = (torch.linalg.vector_norm(t.movedim(dim, 0).reshape(t.shape[dim], -1), ord=p, dim=1).double() - e).abs()
            ulp = e.abs() * torch.finfo(dtype).eps
            assert ((o.double() - e).abs() <= 2 * torch_err + ulp).all()


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided"])
@pytest.mark.parametrize("dim", [0, 1])
def test_group_norms_layouts(layout, dim):
    tensors = make(SHAPES_2D, torch.float32, layout)
    assert_lists_close(norms(tensors, 2, dim), reference.group_norms(tensors, 2, dim), torch.float32)


def test_group_norms_mixed_dtypes_keep_order():
    dtypes = [torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.float32]
    tensors = [make([s], d)[0] for s, d in zip(SHAPES, dtypes)]
    assert ops.group_norms_flat(tensors, 2, 0).dtype == torch.float64  # the promoted dtype
    out = norms(tensors, 2, 0)
    for i, (o, e) in enumerate(zip(out, reference.group_norms(tensors, 2, 0))):
        assert o.dtype == dtypes[i]
        torch.testing.assert_close(o, e, **TOL[dtypes[i]])


def test_group_norms_empty_and_zero():
    tensors = [torch.zeros(4, 5), torch.zeros(3, 0), torch.zeros(0, 2)]
    out = norms(tensors, 2, 0)
    assert [o.shape[0] for o in out] == [4, 3, 0]
    assert all((o == 0).all() for o in out)
    # (the dispatcher needs a tensor to choose a kernel)
    assert mt.group_norms([], 2, 0) == [] and mt.group_norms_flat([], 2, 0).numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_group_saliency(dtype):
    tensors = make(SHAPES, dtype)
    dims = [0, 1, 0, 1, 0]
    num_groups = 9  # some groups get no slice: score 0
    ids = [torch.randint(-1, num_groups - 2, (t.shape[d],)) for t, d in zip(tensors, dims)]
    out = ops.group_saliency(tensors, dims, ids, num_groups)
    expected = reference.group_saliency(tensors, dims, ids, num_groups)
    assert out.dtype == expected.dtype == reference.accumulate_dtype(dtype)
    torch.testing.assert_close(out, expected, **TOL[torch.float64 if dtype == torch.float64 else torch.float32])
    assert (out[-2:] == 0).all()


def test_group_saliency_mixed_dtypes_and_layouts():
    tensors = [make([(8, 3, 3, 3)], torch.float32, "channels_last")[0], make([(5, 7)], torch.float16)[0],
               make([(6, 4)], torch.float32, "strided")[0]]
    dims = [1, 0, 1]
    ids = [torch.arange(t.shape[d]) % 4 for t, d in zip(tensors, dims)]
    torch.testing.assert_close(ops.group_saliency(tensors, dims, ids, 4), reference.group_saliency(tensors, dims, ids, 4))


# ---------------------------------------------------------------------------------------------
# In-place updates
# ---------------------------------------------------------------------------------------------
MASKS = ["none", "one", "half", "all"]
COEFFS = ["float", "tensor"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", MASKS)
@pytest.mark.parametrize("coef", COEFFS)
@pytest.mark.parametrize("op", ["l2_grad_", "group_lasso_grad_"])
def test_masked_grad_ops(op, dtype, how, coef):
    params = make(SHAPES, dtype)
    dims = [0] * len(params)
    if op == "group_lasso_grad_" and how == "half":
        params[0][1] = 0  # a zero slice: its step is exactly 0 whether pruned or not
    masks = make_masks(params, how)
    grads = make(SHAPES, dtype)
    before = [g.clone() for g in grads]
    expected = [g.clone() for g in grads]
    (c, c_tensor), ref_coef = coefficient(0.37, coef)
    getattr(ops, op)(grads, params, masks, dims, c, c_tensor)
    reference_inplace(getattr(reference, op), expected, params, dims, masks, ref_coef)
    assert_lists_close(grads, expected, dtype)
    for g, b, m in zip(grads, before, masks):
        assert torch.equal(g[m], b[m])  # kept slices untouched


@pytest.mark.parametrize("op", ["l2_grad_", "group_lasso_grad_"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "grads_contiguous"])
def test_masked_grad_ops_dim1_and_layouts(op, layout):
    """Slices along dim 1 and 0, params and grads in one layout (direct), or in different ones
    (channels_last / transposed params with contiguous grads: through a copy of the params)."""
    params = make(SHAPES_2D, torch.float32, "channels_last" if layout == "grads_contiguous" else layout)
    if layout == "grads_contiguous":
        params[1] = params[1].T.contiguous().T
        grads = [torch.randn(p.shape) for p in params]
    else:
        grads = [torch.randn_like(p) for p in params]  # randn_like keeps the layout (strides)
    dims = [1, 0, 1, 0]
    masks = make_masks(params, "half", dims)
    expected = [g.clone() for g in grads]
    getattr(ops, op)(grads, params, masks, dims, 0.5, None)
    reference_inplace(getattr(reference, op), expected, params, dims, masks, 0.5)
    assert_lists_close(grads, expected, torch.float32)


def test_group_lasso_exactly_zero_for_zero_slices():
    params = [torch.zeros(4, 6), torch.randn(3, 5)]
    params[1][2] = 0
    grads = [torch.randn(4, 6), torch.randn(3, 5)]
    before = [g.clone() for g in grads]
    ops.group_lasso_grad_(grads, params, [torch.zeros(4, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)], [0, 0], 1.0, None)
    assert torch.equal(grads[0], before[0])
    assert torch.equal(grads[1][2], before[1][2])
    assert not torch.equal(grads[1][0], before[1][0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", MASKS)
@pytest.mark.parametrize("coef", COEFFS)
def test_shrink(dtype, how, coef):
    tensors = make(SHAPES, dtype)
    masks = make_masks(tensors, how)
    expected = [t.clone() for t in tensors]
    (c, c_tensor), ref_coef = coefficient(0.75, coef)
    ops.shrink_(tensors, masks, [0] * len(tensors), c, c_tensor)
    reference.shrink_(expected, masks, ref_coef)
    assert_lists_close(tensors, expected, dtype)


def test_shrink_zero_factor_dim1_and_non_dense_target():
    """Factor 0 zeroes the pruned slices (TPP stabilize phase); a non-dense target is refused, naming
    it (as the C++ kernels do): a copy written back would lose the update of a tensor listed twice."""
    tensors = make(SHAPES_2D, torch.float32) + make([(6, 4)], torch.float32, "channels_last")
    dims = [1, 0, 1, 0, 1]
    masks = make_masks(tensors, "half", dims)
    expected = [t.clone() for t in tensors]
    ops.shrink_(tensors, masks, dims, 0.0, None)
    reference.shrink_([e.movedim(d, 0) for e, d in zip(expected, dims)], masks, 0.0)
    assert_lists_close(tensors, expected, torch.float32)
    for t, m, d in zip(tensors, masks, dims):
        assert (t.movedim(d, 0)[~m] == 0).all()
    strided = torch.randn(12, 4)[::2]  # not dense
    with pytest.raises(ValueError, match=r"tensors\[1\] is updated in place, so it must be dense in memory"):
        ops.shrink_([tensors[0], strided], [masks[0], make_masks([strided], "half")[0]], [1, 0], 0.5, None)
    with pytest.raises(ValueError, match=r"grads\[0\] is updated in place, so it must be dense in memory"):
        ops.l2_grad_([strided, strided], [strided.clone()] * 2, [torch.zeros(6, dtype=torch.bool),
                     torch.zeros(4, dtype=torch.bool)], [0, 1], 1.0, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("coef", COEFFS)
def test_group_lasso_grouped(dtype, coef):
    params = make(SHAPES, dtype)
    dims = [0, 1, 0, 1, 0]
    num_groups = 7
    ids = [torch.randint(-1, num_groups, (p.shape[d],)) for p, d in zip(params, dims)]
    pruned_groups = torch.rand(num_groups) < 0.6
    pruned_groups[0] = True
    params[0][ids[0] == 0] = 0  # group 0 may still get weight from other tensors; zero it everywhere
    for p, d, g in zip(params[1:], dims[1:], ids[1:]):
        p.movedim(d, 0)[g == 0] = 0
    grads = make(SHAPES, dtype)
    expected = [g.clone() for g in grads]
    (c, c_tensor), ref_coef = coefficient(0.3, coef)
    ops.group_lasso_grad_grouped_(grads, params, dims, ids, pruned_groups, c, c_tensor)
    views = []
    for g, p in zip(expected, params):
        v = p.detach().view_as(p)
        v.grad = g
        views.append(v)
    reference.group_lasso_grad_grouped_(views, dims, ids, pruned_groups, ref_coef)
    assert_lists_close(grads, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coef", COEFFS)
def test_slimming(dtype, coef):
    gammas = make([(6,), (70,), (130,)], dtype)
    gammas[0][2] = 0  # sign(0) = 0
    grads = make([(6,), (70,), (130,)], dtype)
    expected = [g.clone() for g in grads]
    (c, c_tensor), ref_coef = coefficient(1e-2, coef)
    ops.slimming_grad_(grads, gammas, c, c_tensor)
    reference_inplace(reference.slimming_grad_, expected, gammas, [0, 0, 0], ref_coef)
    assert_lists_close(grads, expected, dtype)


def test_mixed_dtypes_in_one_call():
    dtypes = [torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.float32]
    params = [make([s], d)[0] for s, d in zip(SHAPES, dtypes)]
    grads = [make([s], d)[0] for s, d in zip(SHAPES, dtypes)]
    masks = make_masks(params, "half")
    expected = [g.clone() for g in grads]
    ops.l2_grad_(grads, params, masks, [0] * 5, 0.25, None)
    reference_inplace(reference.l2_grad_, expected, params, [0] * 5, masks, 0.25)
    for g, e, d in zip(grads, expected, dtypes):
        torch.testing.assert_close(g, e, **TOL[d])


# ---------------------------------------------------------------------------------------------
# Plans: cached per set of inputs; mask values are read on every call
# ---------------------------------------------------------------------------------------------
def test_write_waves():
    a, b, c = torch.zeros(2), torch.zeros(2), torch.zeros(2)
    assert mt._write_waves([a, b, a, a, c, b]) == [[0, 1, 4], [2, 5], [3]]
    assert mt._write_waves([a, b, c]) == [[0, 1, 2]]


@pytest.mark.parametrize("op", ["l2_grad_", "shrink_", "group_lasso_grad_", "group_lasso_grad_grouped_"])
def test_a_tensor_listed_twice_is_never_written_twice_in_one_launch(op, monkeypatch):
    """On a GPU the programs of one launch run concurrently: two entries writing the same tensor there
    would race. Every plan that updates holds each written tensor once (the interpreter runs programs
    one at a time, so only the plans show it here); the result is the reference's, in list order."""
    updated = []
    plan = mt._plan

    def recording_plan(key, check, xs, dsts, vecs, dims, device, need_reduce, need_update):
        if need_update:
            updated.append([d.data_ptr() for d in dsts])
        return plan(key, check, xs, dsts, vecs, dims, device, need_reduce, need_update)

    monkeypatch.setattr(mt, "_plan", recording_plan)
    w, v = torch.randn(6, 4, 3, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    params, dims = [w, w, v, w], [0, 1, 0, 2]
    grads = [torch.randn_like(w), None, torch.randn_like(v), None]
    grads[1] = grads[3] = grads[0]
    expected = [g.clone() for g in grads]
    expected[1] = expected[3] = expected[0]
    expected_params = [w.clone(), None, v.clone(), None]
    expected_params[1] = expected_params[3] = expected_params[0]
    if op == "group_lasso_grad_grouped_":
        ids = [torch.arange(6), torch.arange(4), torch.arange(4), torch.tensor([0, 1, 2])]
        pruned = torch.tensor([True, False, True, True, False, False])
        ops.group_lasso_grad_grouped_(grads, params, dims, ids, pruned, 0.5, None)
        reference_inplace(lambda views, *a: reference.group_lasso_grad_grouped_(views, [0] * 4, *a),
                          expected, expected_params, dims, ids, pruned, 0.5)
    else:
        masks = [make_masks([t], "half", [d])[0] for t, d in zip(params, dims)]
        if op == "shrink_":
            ops.shrink_(params, masks, dims, 0.5, None)
            with torch.no_grad():
                reference.shrink_([t.movedim(d, 0) for t, d in zip(expected_params, dims)], masks, 0.5)
            expected, grads = expected_params, params
        else:
            getattr(ops, op)(grads, params, masks, dims, 0.5, None)
            reference_inplace(getattr(reference, op), expected, expected_params, dims, masks, 0.5)
    assert updated and all(len(set(ptrs)) == len(ptrs) for ptrs in updated), updated
    assert_lists_close([grads[0], grads[2]], [expected[0], expected[2]], torch.float64)


def test_plan_cached_and_masks_read_every_call():
    params = make(SHAPES, torch.float32)
    grads = [torch.zeros_like(p) for p in params]
    masks = make_masks(params, "one")
    first_masks = [m.clone() for m in masks]
    ops.l2_grad_(grads, params, masks, [0] * 5, 1.0, None)
    plans = dict(mt._PLANS)
    for m in masks:  # change the masks in place: same addresses, new values
        m[:] = False
    ops.l2_grad_(grads, params, masks, [0] * 5, 1.0, None)
    assert mt._PLANS.keys() == plans.keys() and all(mt._PLANS[k] is plans[k] for k in plans)
    expected = [torch.zeros_like(p) for p in params]
    reference_inplace(reference.l2_grad_, expected, params, [0] * 5, first_masks, 1.0)
    reference_inplace(reference.l2_grad_, expected, params, [0] * 5, masks, 1.0)
    assert_lists_close(grads, expected, torch.float32)


def test_int64_offsets(monkeypatch):
    """Tensors of 2³⁰+ elements get int64 element offsets: the same results (limit lowered here)."""
    monkeypatch.setattr(mt, "INT32_INDEX_LIMIT", 0)
    monkeypatch.setattr(mt, "_PLANS", {})
    params = make(SHAPES, torch.float32)
    grads = make(SHAPES, torch.float32)
    masks = make_masks(params, "half")
    expected = [g.clone() for g in grads]
    ops.l2_grad_(grads, params, masks, [0] * 5, 0.5, None)
    assert all(group.index == mt.tl.int64 for plan in mt._PLANS.values() for group in plan)
    reference_inplace(reference.l2_grad_, expected, params, [0] * 5, masks, 0.5)
    assert_lists_close(grads, expected, torch.float32)


def test_plan_key_includes_layout():
    """Same storage, same shape, different strides (W vs Wᵀ of a square matrix): a different plan."""
    w = torch.randn(6, 6)
    torch.testing.assert_close(norms([w], 2, 0)[0], w.norm(dim=1))
    torch.testing.assert_close(norms([w.T], 2, 0)[0], w.norm(dim=0))


# ---------------------------------------------------------------------------------------------
# Errors name the argument
# ---------------------------------------------------------------------------------------------
def test_errors():
    params = make(SHAPES_2D, torch.float32)
    grads = [torch.zeros_like(p) for p in params]
    masks = make_masks(params, "half")
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        ops.group_norms(params, 3, 0)
    with pytest.raises(ValueError, match=r"dim = 2 is not a dim of tensors\[1\]"):
        ops.group_norms(params, 2, 2)
    bad = list(masks)
    bad[1] = bad[1].int()
    with pytest.raises(TypeError, match=r"keep_masks\[1\] must be a torch.bool"):
        ops.l2_grad_(grads, params, bad, [0] * 4, 1.0, None)
    bad[1] = masks[1][:-1]
    with pytest.raises(ValueError, match=r"keep_masks\[1\] must have shape \[5\]"):
        ops.shrink_(params, bad, [0] * 4, 1.0, None)
    with pytest.raises(ValueError, match=r"grads\[2\] has shape"):
        ops.group_lasso_grad_(grads[:2] + [grads[3], grads[2]], params, masks, [0] * 4, 1.0, None)
    with pytest.raises(ValueError, match="coefficient tensor must hold one element"):
        ops.l2_grad_(grads, params, masks, [0] * 4, 1.0, torch.ones(2))
    with pytest.raises(TypeError, match=r"group_ids\[0\] must be a torch.int64"):
        ops.group_saliency(params, [0] * 4, [m.int() for m in masks], 3)


# ---------------------------------------------------------------------------------------------
# opcheck (schema; fake tensors when fastreg.fused registered the fake implementations)
# ---------------------------------------------------------------------------------------------
def _opcheck_utils():
    try:
        import fastreg.fused  # noqa: F401  (registers the fake implementations)
    except ImportError:
        return ("test_schema",)
    return ("test_schema", "test_faketensor")


def test_opcheck():
    utils = _opcheck_utils()
    params = make(SHAPES_2D, torch.float32)
    grads = [torch.randn_like(p) for p in params]
    masks = make_masks(params, "half")
    dims = [0] * len(params)
    ids = [torch.arange(p.shape[0]) % 3 for p in params]
    cases = [
        (ops.group_norms.default, (params, 2, 1)),
        (ops.group_norms_flat.default, (params, 2, 1)),
        (ops.group_saliency.default, (params, dims, ids, 3)),
        (ops.l2_grad_.default, (grads, params, masks, dims, 0.5, torch.tensor(2.0))),
        (ops.shrink_.default, ([p.clone() for p in params], masks, dims, 0.5, None)),
        (ops.group_lasso_grad_.default, (grads, params, masks, dims, 0.5, None)),
        (ops.group_lasso_grad_grouped_.default, (grads, params, dims, ids, torch.tensor([True, False, True]), 0.5, None)),
        (ops.slimming_grad_.default, ([torch.randn(6)], [torch.randn(6)], 0.5, None)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=utils)


# ---------------------------------------------------------------------------------------------
# The kernels compile for a GPU (sm_80) without one: the compiler is stricter than the interpreter
# ---------------------------------------------------------------------------------------------
COMPILE_SCRIPT = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from fastreg.kernels import multi_tensor as mt

    def compile(fn, signature, constexprs):
        signature = dict(signature, **{k: "constexpr" for k in constexprs})
        triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", 80, 32))

    X, ACC, A = tl.bfloat16, tl.float32, "fp32"
    for select in (0, 1, 2):
        compile(mt._slice_partials_kernel, dict(tensors="*i64", work="*i32", partials="*fp32", pruned_groups="*i1",
                num_groups="i32"), dict(P=2, SELECT=select, X=X, ACC=ACC, BLOCK_R=mt.BLOCK_R, BLOCK_K=mt.BLOCK_K))
    for mode in (1, 2, 3, 4):
        compile(mt._finish_slices_kernel, dict(tensors="*i64", slice_tensor="*i32", n_slices="i32", partials="*fp32",
                out="*bf16", groups="*fp32", num_groups="i32", slice_groups="*i64"),
                dict(MODE=mode, ACC=ACC, BLOCK_S=mt.BLOCK_S, PER_SLICE=False))
    for mode in (3, 4):  # the deterministic form: each slice's share and group
        compile(mt._finish_slices_kernel, dict(tensors="*i64", slice_tensor="*i32", n_slices="i32", partials="*fp32",
                out="*fp32", groups="*fp32", num_groups="i32", slice_groups="*i64"),
                dict(MODE=mode, ACC=ACC, BLOCK_S=mt.BLOCK_S, PER_SLICE=True))
    for mode, select in ((0, 1), (1, 1), (2, 1), (3, 2), (4, 0)):
        compile(mt._update_kernel, dict(tensors="*i64", work="*i32", slice_norms="*fp32", groups="*fp32",
                pruned_groups="*i1", num_groups="i32", coef="fp64", coef_tensor="*fp32"),
                dict(MODE=mode, SELECT=select, HAS_COEF_TENSOR=True, X=X, DST=X, ACC=ACC, INDEX=tl.int32, BLOCK=mt.BLOCK))
    compile(mt._update_kernel, dict(tensors="*i64", work="*i32", slice_norms="*fp64", groups="*fp64",
            pruned_groups="*i1", num_groups="i32", coef="fp64", coef_tensor="*fp64"),
            dict(MODE=2, SELECT=1, HAS_COEF_TENSOR=False, X=tl.float64, DST=tl.float64, ACC=tl.float64, INDEX=tl.int64,
                 BLOCK=mt.BLOCK))
    compile(mt._group_mean_kernel, dict(groups="*fp64", out="*fp64", num_groups="i32"),
            dict(ACC=tl.float64, BLOCK_G=mt.BLOCK_G))
    print("compiled")
""")


def test_kernels_compile_for_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("no ptxas to compile Triton kernels for a GPU target")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


@pytest.fixture
def deterministic_algorithms():
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


class _LaunchSpy:
    """Wraps a Triton kernel; records the PER_SLICE flag of every launch."""

    def __init__(self, kernel):
        self.kernel, self.per_slice = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if kwargs["MODE"] in (mt.SALIENCY, mt.GROUP_SQUARES):
                self.per_slice.append(kwargs.get("PER_SLICE", False))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_group_reductions_under_deterministic_algorithms(deterministic_algorithms, monkeypatch):
    """No atomic adds: each slice's share is summed per group by index_add_, in a fixed order."""
    spy = _LaunchSpy(mt._finish_slices_kernel)
    monkeypatch.setattr(mt, "_finish_slices_kernel", spy)
    tensors = make(SHAPES, torch.float32) + make([(4, 5)], torch.float16)
    dims = [0, 1, 0, 1, 0, 1]
    num_groups = 6
    ids = [torch.randint(-1, num_groups, (t.shape[d],)) for t, d in zip(tensors, dims)]
    first = ops.group_saliency(tensors, dims, ids, num_groups)
    torch.testing.assert_close(first, reference.group_saliency(tensors, dims, ids, num_groups))
    assert torch.equal(ops.group_saliency(tensors, dims, ids, num_groups), first)
    pruned = torch.tensor([True, False, True, True, False, True])
    grads = make(SHAPES, torch.float32) + make([(4, 5)], torch.float16)
    expected = [g.clone() for g in grads]
    ops.group_lasso_grad_grouped_(grads, tensors, dims, ids, pruned, 0.3, None)
    views = []
    for g, p in zip(expected, tensors):
        v = p.detach().view_as(p)
        v.grad = g
        views.append(v)
    reference.group_lasso_grad_grouped_(views, dims, ids, pruned, 0.3)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, **TOL[g.dtype])
    assert spy.per_slice and all(spy.per_slice), spy.per_slice  # two dtype groups, two ops


def test_group_reductions_default_to_atomics(monkeypatch):
    spy = _LaunchSpy(mt._finish_slices_kernel)
    monkeypatch.setattr(mt, "_finish_slices_kernel", spy)
    tensors = make(SHAPES, torch.float32)
    ids = [torch.arange(t.shape[0]) % 3 for t in tensors]
    ops.group_saliency(tensors, [0] * len(tensors), ids, 3)
    assert spy.per_slice == [False]

