"""fastreg.gram_penalty: every backend against fastreg.reference (values and gradients), gradcheck,
opcheck, torch.compile, errors. Backends that cannot run here skip with the registry's reason."""
from __future__ import annotations

import os

import pytest
import torch

import fastreg
from fastreg import _registry, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TARGETS = reference.TARGETS
REDUCTIONS = reference.REDUCTIONS


def need(backend: str, device: str = "cpu") -> None:
    why = _registry.why_unavailable("gram_penalty", backend, torch.device(device))
    if why is not None:
        pytest.skip(why)


# Layer shapes: conv and linear, N > D (D-side cheaper), N < D (N-side), equal shapes (batched).
SHAPES = [(8, 3, 3, 3), (16, 8, 3, 3), (16, 8, 3, 3), (5, 7), (12, 20), (32, 6), (3, 2, 1, 1), (1, 9)]
SMALL = [(6, 2, 2, 2), (4, 5), (7, 3)]  # for the slow interpreter and gradcheck


def make_masks(shapes, how: str, device="cpu", generator=None):
    masks = []
    for s in shapes:
        n = s[0]
        m = torch.ones(n, dtype=torch.bool)
        if how == "one":
            m[torch.randint(n, (1,), generator=generator)] = False
        elif how == "half":
            m[torch.randperm(n, generator=generator)[: n // 2]] = False
        elif how == "all":
            m[:] = False
        elif how == "random":
            m = torch.rand(n, generator=generator) < 0.5
        masks.append(m.to(device))
    return masks


def make_weights(shapes, dtype=torch.float64, device="cpu"):
    return [(torch.randn(s, dtype=torch.float64) / s[0] ** 0.5).to(dtype=dtype, device=device).requires_grad_() for s in shapes]


def value_and_grads(fn, weights):
    out = fn(weights)
    loss = out.sum() if out.dim() else out
    grads = torch.autograd.grad(loss, weights, allow_unused=True)
    return out.detach(), [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]


# ---------------------------------------------------------------------------------------------
# The reference itself: its formulas agree with an independent derivation.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["decorrelate", "diagonal"])
def test_reference_mean_equals_official_loop(target):
    ws = make_weights(SHAPES)
    ms = make_masks(SHAPES, "random")
    a = reference.gram_penalty(ws, ms, target, "mean")
    b = reference.gram_penalty_official(ws, ms, target)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, ws)
    gb = torch.autograd.grad(b, ws)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("target", TARGETS)
def test_reference_closed_form_gradient(target):
    ws = make_weights(SHAPES)
    ms = make_masks(SHAPES, "half")
    _, grads = value_and_grads(lambda w: reference.gram_penalty(w, ms, target, "sum"), ws)
    for w, m, g in zip(ws, ms, grads):
        torch.testing.assert_close(g, reference.gram_penalty_grad(w.detach(), m, target))


def test_reference_decorrelate_error_is_pruned_rows_and_columns():
    w = torch.randn(6, 4, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, False, True])
    E = reference.gram_error(w, keep, "decorrelate")
    G = w @ w.T
    kk = keep[:, None] & keep[None, :]
    assert torch.all(E[kk] == 0)
    torch.testing.assert_close(E[~kk], G[~kk])


# ---------------------------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("how", ["none", "one", "half", "all"])
def test_matches_reference_float64(backend, device, target, reduction, how):
    need(backend, device)
    shapes = SMALL if backend == "triton" and device == "cpu" else SHAPES
    ws = make_weights(shapes, device=device)
    ms = make_masks(shapes, how, device)
    got, got_g = value_and_grads(lambda w: fastreg.gram_penalty(w, ms, target=target, reduction=reduction, backend=backend), ws)
    exp, exp_g = value_and_grads(lambda w: reference.gram_penalty(w, ms, target, reduction), ws)
    assert got.dtype == torch.float64 and got.shape == exp.shape
    torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)
    for g, e in zip(got_g, exp_g):
        assert g.shape == e.shape and g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("target", TARGETS)
def test_matches_reference_random_shapes_float32(backend, target):
    need(backend)
    gen = torch.Generator().manual_seed(1)
    rounds = 2 if backend == "triton" else 6
    for _ in range(rounds):
        L = int(torch.randint(1, 5, (1,), generator=gen))
        shapes = []
        for _ in range(L):
            n = int(torch.randint(1, 40 if backend != "triton" else 12, (1,), generator=gen))
            if torch.rand(1, generator=gen) < 0.5:
                shapes.append((n, int(torch.randint(1, 6, (1,), generator=gen)), 3, 3))
            else:
                shapes.append((n, int(torch.randint(1, 70, (1,), generator=gen))))
        ws = make_weights(shapes, torch.float32)
        ms = make_masks(shapes, "random", generator=gen)
        got, got_g = value_and_grads(lambda w: fastreg.gram_penalty(w, ms, target=target, backend=backend), ws)
        exp, exp_g = value_and_grads(lambda w: reference.gram_penalty([x.double() for x in w], ms, target, "mean"), ws)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-5)
        for g, e in zip(got_g, exp_g):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(backend, dtype):
    need(backend)
    ws = make_weights(SMALL, dtype)
    ms = make_masks(SMALL, "half")
    got, got_g = value_and_grads(lambda w: fastreg.gram_penalty(w, ms, backend=backend), ws)
    exp, exp_g = value_and_grads(lambda w: reference.gram_penalty([x.double() for x in w], ms, "decorrelate", "mean"), ws)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exp, rtol=2e-3, atol=1e-4)
    for g, e, w in zip(got_g, exp_g, ws):
        assert g.dtype == dtype
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(g.double(), e.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
def test_no_pruned_rows_contribute_zero_and_all_pruned_works(backend):
    need(backend)
    ws = make_weights(SMALL)
    keep_all = make_masks(SMALL, "none")
    out, grads = value_and_grads(lambda w: fastreg.gram_penalty(w, keep_all, reduction="none", backend=backend), ws)
    assert torch.all(out == 0) and all(torch.all(g == 0) for g in grads)
    prune_all = make_masks(SMALL, "all")
    out, _ = value_and_grads(lambda w: fastreg.gram_penalty(w, prune_all, reduction="none", backend=backend), ws)
    # every row pruned: E = G, so the per-layer (unnormalised) penalty is ‖W Wᵀ‖²
    for o, w in zip(out, ws):
        W = w.detach().reshape(w.shape[0], -1)
        torch.testing.assert_close(o, (W @ W.T).square().sum())


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("n, D, kept", [(256, 64, 32), (96, 16, 16)])
def test_diagonal_near_its_minimum_in_float32(backend, n, D, kept):
    """OPP's ``diagonal`` drives kept rows to orthonormal and pruned rows to 0, a penalty near 0. With
    |K| ≤ D that minimum is reachable, and a formula that subtracts terms of size |K| (the D-side's
    ‖WᵀW‖² − 2Σ_K‖w_i‖² + |K|) would return rounding noise, even a negative sum of squares."""
    need(backend)
    q, _ = torch.linalg.qr(torch.randn(D, kept, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    w = torch.zeros(n, D, dtype=torch.float64)
    w[:kept] = q.T + 1e-6 * torch.randn(kept, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keep, w32 = torch.arange(n) < kept, w.float()
    exp = reference.gram_penalty([w32.double()], [keep], "diagonal", "sum")  # of the float32 weights, in float64
    got = fastreg.gram_penalty([w32], [keep], target="diagonal", reduction="sum", backend=backend)
    assert got >= 0
    torch.testing.assert_close(got.double(), exp, rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("target", ["decorrelate", "diagonal"])
def test_mask_bytes_other_than_0_and_1_are_true(backend, target):
    """A bool tensor's bytes may hold values other than 0 and 1 (viewed from uint8, read from a buffer,
    left uninitialised); torch takes any non-zero byte as True, and so must every kernel."""
    need(backend)
    ws = make_weights(SHAPES)
    masks = make_masks(SHAPES, "half", generator=torch.Generator().manual_seed(3))
    odd = [(m.to(torch.uint8) * torch.randint(1, 256, m.shape, dtype=torch.int32).to(torch.uint8)).view(torch.bool)
           for m in masks]
    assert any(int(b) > 1 for m in odd for b in m.view(torch.uint8))
    got, got_g = value_and_grads(lambda w: fastreg.gram_penalty(w, odd, target=target, reduction="none", backend=backend), ws)
    exp, exp_g = value_and_grads(lambda w: reference.gram_penalty(w, masks, target, "none"), ws)
    torch.testing.assert_close(got, exp)
    torch.testing.assert_close(got_g, exp_g)


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
def test_forward_mode_ad_raises_rather_than_a_zero_tangent(backend):
    need(backend)
    ws, ms = [w.detach() for w in make_weights(SMALL)], make_masks(SMALL, "half")
    tangents = [torch.randn_like(w) for w in ws]
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda *w: fastreg.gram_penalty(list(w), ms, backend=backend), tuple(ws), tuple(tangents))


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
def test_no_gradient_work_without_grad(backend):
    need(backend)
    ws = [w.detach() for w in make_weights(SMALL)]
    ms = make_masks(SMALL, "half")
    out, grads = _registry.op(backend, "gram_penalty_and_grads")(ws, ms, "decorrelate", "mean", 1.0, False)
    assert grads == []
    torch.testing.assert_close(out, reference.gram_penalty(ws, ms))


# The C++ autograd kernel (csrc/gram_penalty_autograd.cpp) scales the gradients gram_penalty_and_grads
# returned in place on the first backward; a second one (retain_graph) recomputes them.
@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_twice_with_retain_graph(backend, reduction):
    need(backend)
    ws = make_weights(SMALL)
    ms = make_masks(SMALL, "half")
    out = fastreg.gram_penalty(ws, ms, reduction=reduction, backend=backend)
    g1, g2 = torch.rand_like(out) + 0.5, torch.rand_like(out) - 2.0
    first = torch.autograd.grad(out, ws, g1, retain_graph=True)
    second = torch.autograd.grad(out, ws, g2)
    ref = reference.gram_penalty(ws, ms, "decorrelate", reduction)
    for g, got in ((g1, first), (g2, second)):
        for a, b in zip(got, torch.autograd.grad(ref, ws, g, retain_graph=True)):
            torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(out, ws, g1)


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
def test_double_backward_raises(backend):
    need(backend)
    ws = make_weights(SMALL)
    out = fastreg.gram_penalty(ws, make_masks(SMALL, "half"), backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, ws, create_graph=True)


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("after_a_backward", [False, True])
def test_in_place_change_since_the_forward_raises(backend, after_a_backward):
    """As autograd's saved tensors (and the reference backend): a weight modified in place since the
    forward raises in the backward — the first one (the compiled backends computed the gradients in
    the forward already) or a second one with retain_graph (they recompute from the saved weights)."""
    need(backend)
    ws = make_weights(SMALL)
    out = fastreg.gram_penalty(ws, make_masks(SMALL, "half"), backend=backend)
    if after_a_backward:
        out.backward(retain_graph=True)
    with torch.no_grad():
        ws[1].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
def test_in_place_change_of_a_weight_whose_gradient_is_not_asked_for(backend):
    """A frozen weight, or one left out of autograd.grad's inputs, may change before the backward."""
    need(backend)
    ws = make_weights(SMALL)
    ws[2].requires_grad_(False)
    ms = make_masks(SMALL, "half")
    out = fastreg.gram_penalty(ws, ms, backend=backend)
    expected = torch.autograd.grad(fastreg.gram_penalty(ws, ms, backend="reference"), ws[:2])
    with torch.no_grad():
        ws[2].mul_(2)
    out2 = fastreg.gram_penalty(ws, ms, backend=backend)
    out.backward()
    torch.testing.assert_close([w.grad for w in ws[:2]], list(expected))
    with torch.no_grad():
        ws[1].mul_(2)
    (g0,) = torch.autograd.grad(out2, ws[:1])
    torch.testing.assert_close(g0, expected[0])


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
def test_op_is_differentiable_and_plain_below_autograd(backend):
    need(backend)
    ws = make_weights(SMALL)
    ms = make_masks(SMALL, "half")
    op = _registry.op(backend, "gram_penalty")
    out = op(ws, ms, "decorrelate", "sum")
    expected = reference.gram_penalty(ws, ms, "decorrelate", "sum")
    for a, b in zip(torch.autograd.grad(out, ws), torch.autograd.grad(expected, ws)):
        torch.testing.assert_close(a, b)
    with torch.inference_mode():  # autograd keys excluded: the CompositeExplicitAutograd kernel
        value = op([w.detach() for w in ws], ms, "decorrelate", "sum")
    assert not value.requires_grad
    torch.testing.assert_close(value, expected.detach())


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("coeff", [0.0, 2.5e-3, -1.5])
def test_coeff_scales_value_and_gradients(backend, device, reduction, coeff):
    """gram_penalty(..., coeff=c) = c · gram_penalty(...), gradients included (folded into the kernels)."""
    need(backend, device)
    ws = make_weights(SMALL, device=device)
    for target in TARGETS:
        ms = make_masks(SMALL, "half", device)
        got, got_g = value_and_grads(
            lambda w: fastreg.gram_penalty(w, ms, target=target, reduction=reduction, coeff=coeff, backend=backend), ws)
        exp, exp_g = value_and_grads(lambda w: coeff * reference.gram_penalty(w, ms, target, reduction), ws)
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)
        for g, e in zip(got_g, exp_g):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
def test_coeff_in_a_loss_added_as_is(backend):
    """``loss = other + gram_penalty(..., coeff=c)``: the penalty's node gets an incoming gradient of 1
    and hands on the kernel's (already scaled) gradients as they are."""
    need(backend)
    ws = make_weights(SMALL)
    ms = make_masks(SMALL, "half")
    pen = fastreg.gram_penalty(ws, ms, coeff=7.0, backend=backend)
    grads = torch.autograd.grad(pen + 1.0, ws)
    exp = torch.autograd.grad(7.0 * reference.gram_penalty(ws, ms), ws)
    for g, e in zip(grads, exp):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("coeff, error, match", [(float("nan"), ValueError, "coeff must be finite"),
                                                 (float("inf"), ValueError, "coeff must be finite"),
                                                 (True, TypeError, "coeff must be a Python float"),
                                                 (torch.tensor(2.0), TypeError, "multiply the result instead")])
def test_bad_coeff_names_the_argument(coeff, error, match):
    ws = make_weights(SMALL)
    with pytest.raises(error, match=match):
        fastreg.gram_penalty(ws, make_masks(SMALL, "half"), coeff=coeff)


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(backend, target, reduction):
    need(backend)
    ws = make_weights(SMALL)
    ms = make_masks(SMALL, "half")
    fast = backend == "triton"
    assert torch.autograd.gradcheck(
        lambda *w: fastreg.gram_penalty(list(w), ms, target=target, reduction=reduction, coeff=0.75, backend=backend),
        tuple(ws),
        fast_mode=fast,
    )


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("target", TARGETS)
def test_opcheck(backend, target):
    device = "cuda" if backend == "cuda" else "cpu"
    need(backend, device)
    penalty, kernel = _registry.op(backend, "gram_penalty"), _registry.op(backend, "gram_penalty_and_grads")
    for reduction in REDUCTIONS:
        for dtype in (torch.float32, torch.float64):
            ws = make_weights(SMALL, dtype, device)
            ms = [] if target == "identity" else make_masks(SMALL, "half", device)
            torch.library.opcheck(penalty, (ws, ms, target, reduction))  # autograd, AOT forward + backward
            torch.library.opcheck(penalty, (ws, ms, target, reduction, 0.25))
            torch.library.opcheck(kernel, ([w.detach() for w in ws], ms, target, reduction, 1.0, True))
    ws = [w.detach() for w in make_weights(SMALL, torch.float32, device)]
    torch.library.opcheck(kernel, (ws, make_masks(SMALL, "one", device), "decorrelate", "mean", -3.0, False))
    # other layouts: the gradients are contiguous on every backend, as the fake says
    odd = [w.to(memory_format=torch.channels_last) if w.dim() == 4 else w.T.contiguous().T for w in ws]
    ms = [] if target == "identity" else make_masks(SMALL, "half", device)
    torch.library.opcheck(kernel, (odd, ms, target, "mean", 1.0, True))
    torch.library.opcheck(penalty, ([w.requires_grad_() for w in odd], ms, target, "mean"))


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(backend, reduction):
    need(backend)
    torch._dynamo.reset()
    ws = make_weights(SMALL, torch.float32)
    ms = make_masks(SMALL, "half")

    def step(weights):
        out = fastreg.gram_penalty(weights, ms, reduction=reduction, backend=backend)
        weighted = fastreg.gram_penalty(weights, ms, reduction=reduction, coeff=0.5, backend=backend)
        return out.sum() * 2.0 + weighted.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, got_g = value_and_grads(compiled, ws)
    exp, exp_g = value_and_grads(step, ws)
    torch.testing.assert_close(got, exp)
    torch.testing.assert_close(got_g, exp_g)


@pytest.mark.parametrize("backend", ["cpp"])
def test_torch_compile_inductor(backend):
    need(backend)
    torch._dynamo.reset()
    ws = make_weights(SMALL, torch.float32)
    ms = make_masks(SMALL, "half")
    fn = torch.compile(lambda w: fastreg.gram_penalty(w, ms, backend=backend), fullgraph=True)
    got, got_g = value_and_grads(fn, ws)
    exp, exp_g = value_and_grads(lambda w: reference.gram_penalty(w, ms), ws)
    torch.testing.assert_close(got, exp)
    torch.testing.assert_close(got_g, exp_g)
    # channels_last / transposed weights: the compiled graph trusts the fake's strides
    odd = [(w.detach().to(memory_format=torch.channels_last) if w.dim() == 4 else w.detach().T.contiguous().T).requires_grad_()
           for w in ws]
    got, got_g = value_and_grads(fn, odd)
    torch.testing.assert_close(got, exp)
    torch.testing.assert_close(got_g, exp_g)


# ---------------------------------------------------------------------------------------------
# Registration, backend choice, errors
# ---------------------------------------------------------------------------------------------
def test_cuda_kernels_registered_when_built_with_cuda():
    """setup.py builds the .cu files whenever torch is a CUDA build and nvcc exists (no GPU needed)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import build_env

    if _registry.LIBRARY_ERROR is not None:
        pytest.skip(_registry.LIBRARY_ERROR)
    if torch.version.cuda is None or build_env.nvcc_path() is None or os.environ.get("FASTREG_CUDA") == "0":
        pytest.skip("this build has no CUDA toolchain, so no CUDA kernels were compiled")
    kernel_ops = [_registry.KERNEL_OPS.get(op, op) for op in _registry.SCHEMAS if op not in _registry.KERNEL_OPS.values()]
    for op in kernel_ops:  # every op the backends implement: gram_penalty_and_grads and the per-step ops
        for key in ("CPU", "CUDA"):
            assert _registry.has_kernel(f"fastreg::{op}", key), f"fastreg::{op} has no {key} kernel"


def test_a_library_built_for_other_schemas_is_refused_not_loaded(tmp_path):
    """Loading a library built for other op schemas would abort the process (its kernel registrations
    throw in static initialisers): `import fastreg` reads the library's schema stamp first, warns and
    lets the reference backend serve."""
    import subprocess
    import sys

    stale = tmp_path / "libstale.so"
    stale.write_bytes(b"\x7fELF ... fastreg-schema-digest:0123456789abcdef; ...")
    script = (
        "import torch, fastreg\n"
        "from fastreg import _registry\n"
        "print(_registry.LIBRARY_ERROR)\n"
        "print(fastreg.choose_backend('gram_penalty', torch.device('cpu')))\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], env=dict(os.environ, FASTREG_LIBRARY=str(stale)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    error, backend = done.stdout.strip().splitlines()[-2:]
    assert "was built against other op schemas (its stamp: 0123456789abcdef" in error and backend == "reference"


def test_the_compiled_library_is_loaded_and_registered():
    """A library that failed to load must fail the suite, not turn the compiled backends' tests into
    skips. Only a build made without it on purpose (FASTREG_NO_EXTENSION=1, set when testing too)
    may run without it."""
    if os.environ.get("FASTREG_NO_EXTENSION") == "1":
        pytest.skip("FASTREG_NO_EXTENSION=1: built without the compiled extension")
    assert _registry.LIBRARY_ERROR is None, _registry.LIBRARY_ERROR
    assert _registry.why_unavailable("gram_penalty", "cpp", "cpu") is None


def test_the_compiled_library_carries_the_schema_stamp():
    if _registry.LIBRARY_ERROR is not None:
        pytest.skip(_registry.LIBRARY_ERROR)
    import importlib.util

    path = os.environ.get("FASTREG_LIBRARY") or importlib.util.find_spec("fastreg._C").origin
    assert _registry._schema_stamp(path) == _registry.schema_digest()


def test_automatic_choice_and_env_override(monkeypatch):
    """FASTREG_BACKEND is read at import and by refresh_availability(), and then overrides the automatic
    choice (of the public functions' fast paths too), never an explicit backend."""
    cpu = torch.device("cpu")
    try:
        monkeypatch.delenv("FASTREG_BACKEND", raising=False)  # (a user's own setting would decide otherwise)
        _registry.refresh_availability()
        auto = fastreg.choose_backend("gram_penalty", cpu)
        assert auto == ("cpp" if _registry.why_unavailable("gram_penalty", "cpp", cpu) is None else "reference")
        tensors = [torch.ones(2, 3)]
        if auto != "reference":  # the fast paths take the compiled op
            assert _registry.fast_op("group_norms", tensors) is _registry.op(auto, "group_norms")
        monkeypatch.setenv("FASTREG_BACKEND", "reference")
        assert fastreg.choose_backend("gram_penalty", cpu) == auto  # not re-read on every call
        _registry.refresh_availability()
        assert fastreg.choose_backend("gram_penalty", cpu) == "reference"
        # The fast paths follow it: no compiled op, and the public function runs the reference.
        assert _registry.self_checking_op("group_norms", cpu) is None and _registry.fast_op("group_norms", tensors) is None
        calls = []
        monkeypatch.setattr(reference, "group_norms", lambda *a: calls.append(a) or [torch.zeros(2)])
        fastreg.group_norms(tensors)
        assert len(calls) == 1
        if auto != "reference":
            assert fastreg.choose_backend("gram_penalty", cpu, auto) == auto
            assert _registry.self_checking_op("group_norms", cpu, auto) is _registry.op(auto, "group_norms")
    finally:
        monkeypatch.undo()
        _registry.refresh_availability()


def test_refresh_during_a_choice_leaves_no_stale_choice(monkeypatch):
    """A refresh_availability() that lands while another thread is making a first choice (simulated: the
    refresh runs inside that choice's availability checks) must not leave the old choice cached."""
    cpu = torch.device("cpu")
    try:
        monkeypatch.delenv("FASTREG_BACKEND", raising=False)
        _registry.refresh_availability()
        auto = fastreg.choose_backend("group_norms", cpu)
        _registry._CHOICE.clear()
        _registry._SELF_CHECKING_OP.clear()
        why = _registry.why_unavailable
        refreshed = []

        def racing_why(*args):
            if not refreshed:  # the other thread: the user switches to the reference backend
                refreshed.append(True)
                monkeypatch.setenv("FASTREG_BACKEND", "reference")
                _registry.refresh_availability()
            return why(*args)

        monkeypatch.setattr(_registry, "why_unavailable", racing_why)
        assert fastreg.choose_backend("group_norms", cpu) == auto  # decided under the old setting
        assert refreshed and ("group_norms", cpu, None) not in _registry._CHOICE
        assert fastreg.choose_backend("group_norms", cpu) == "reference"  # the next call sees the refresh
        assert _registry.self_checking_op("group_norms", cpu) is None
    finally:
        monkeypatch.undo()
        _registry.refresh_availability()


def test_explicit_backend_that_cannot_run_raises():
    ws = make_weights(SMALL)
    ms = make_masks(SMALL, "half")
    with pytest.raises(fastreg.BackendUnavailable, match="backend='cuda' cannot run"):
        fastreg.gram_penalty(ws, ms, backend="cuda")
    with pytest.raises(fastreg.BackendUnavailable, match="backend must be one of"):
        fastreg.gram_penalty(ws, ms, backend="fortran")


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda w, m: ([], m), ValueError, "weights must not be empty"),
        (lambda w, m: (w, m[:-1]), ValueError, "keep_masks has 2 entries but weights has 3"),
        (lambda w, m: (w, [m[0][:-1]] + m[1:]), ValueError, r"keep_masks\[0\] must have shape \[6\]"),
        (lambda w, m: (w, [m[0].int()] + m[1:]), TypeError, r"keep_masks\[0\] must be a torch.bool tensor"),
        (lambda w, m: (w, [m[0].to("meta")] + m[1:]), ValueError, r"keep_masks\[0\] is on meta"),
        (lambda w, m: ([torch.randn(5)] + w[1:], m), ValueError, r"weights\[0\] must have at least 2 dims"),
        (lambda w, m: ([w[0].float()] + w[1:], m), TypeError, "weights must share one dtype"),
        (lambda w, m: ([w[0].long()] + w[1:], m), TypeError, r"weights\[0\] must be a floating tensor"),
        (lambda w, m: (w[0], m), TypeError, "weights must be a list of tensors"),
        (lambda w, m: ([w], m), TypeError, r"weights\[0\] must be a tensor, got list"),
        (lambda w, m: (w, None), ValueError, "keep_masks is required"),
        (lambda w, m: ([torch.randn(0, 3, dtype=w[0].dtype)] + w[1:], [torch.zeros(0, dtype=torch.bool)] + m[1:]),
         ValueError, r"weights\[0\] is empty \(shape \(0, 3\)\)"),
        (lambda w, m: (w[:1] + [torch.randn(4, 0, 3, dtype=w[0].dtype)] + w[2:], m), ValueError, r"weights\[1\] is empty"),
    ],
)
@pytest.mark.parametrize("backend", fastreg.BACKENDS)
def test_bad_input_names_the_argument(make_args, error, match, backend):
    need(backend)
    ws = [w.detach() for w in make_weights(SMALL)]
    ms = make_masks(SMALL, "half")
    weights, masks = make_args(ws, ms)
    with pytest.raises(error, match=match):
        fastreg.gram_penalty(weights, masks, backend=backend)


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
def test_identity_checks_masks_it_is_given(backend):
    """target='identity' uses no masks, but a list given anyway is checked (a wrong one is a mistake)."""
    need(backend)
    ws = make_weights(SMALL)
    ms = make_masks(SMALL, "half")
    with pytest.raises(ValueError, match=r"keep_masks\[0\] must have shape \[6\]"):
        fastreg.gram_penalty(ws, [ms[0][:-1]] + ms[1:], target="identity", backend=backend)
    torch.testing.assert_close(fastreg.gram_penalty(ws, ms, target="identity", backend=backend),
                               fastreg.gram_penalty(ws, target="identity", backend=backend))


def test_bad_target_and_reduction():
    ws = make_weights(SMALL)
    ms = make_masks(SMALL, "half")
    with pytest.raises(ValueError, match="target must be one of"):
        fastreg.gram_penalty(ws, ms, target="orthogonal")
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastreg.gram_penalty(ws, ms, reduction="max")


def test_identity_needs_no_masks():
    ws = make_weights(SMALL)
    out = fastreg.gram_penalty(ws, target="identity", reduction="sum")
    exp = sum(((w.reshape(w.shape[0], -1) @ w.reshape(w.shape[0], -1).T - torch.eye(w.shape[0], dtype=w.dtype)) ** 2).sum() for w in ws)
    torch.testing.assert_close(out, exp)
