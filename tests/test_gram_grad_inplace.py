"""fastreg.gram_penalty_grad_ (the penalty's gradient added into .grad in place): every backend against
the reference (autograd + add), a finite-difference check in float64, layouts, coefficients, opcheck,
torch.compile, errors; and what the GPU review asked of the gram paths that a CPU can check."""
from __future__ import annotations

import pytest
import torch

import fastreg
from fastreg import _registry, reference
from fastreg.bench import count_ops_by_name

from test_gram_penalty import SHAPES, SMALL, make_masks, make_weights

TARGETS = reference.TARGETS
REDUCTIONS = reference.REDUCTIONS


def need(backend: str, device: str = "cpu", op: str = "gram_penalty_grad_") -> None:
    why = _registry.why_unavailable(op, backend, torch.device(device))
    if why is not None:
        pytest.skip(why)


def masks_for(target, shapes, how="half"):
    return None if target == "identity" else make_masks(shapes, how)


def with_grads(weights, start="random"):
    """The weights as leaves whose .grad holds a data gradient (random) or nothing (None)."""
    out = []
    for w in weights:
        w = w.detach().clone().requires_grad_()
        w.grad = torch.randn_like(w) if start == "random" else None
        out.append(w)
    return out


def expected_after(weights, masks, target, reduction, coeff):
    """(penalty, grads after the call) by the oracle: autograd through the reference, plus the add."""
    leaves = [w.detach().clone().requires_grad_() for w in weights]
    penalty = coeff * reference.gram_penalty(leaves, masks, target, reduction)
    d = torch.autograd.grad(penalty.sum(), leaves)
    start = [torch.zeros_like(w) if w.grad is None else w.grad.clone() for w in weights]
    return penalty.detach(), [s + g.to(s.dtype) for s, g in zip(start, d)]


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("how", ["none", "one", "half", "all"])
def test_adds_the_reference_gradient_float64(backend, target, reduction, how):
    need(backend)
    shapes = SMALL if backend == "triton" else SHAPES
    ws = with_grads(make_weights(shapes))
    ms = masks_for(target, shapes, how)
    penalty, grads = expected_after(ws, ms, target, reduction, 0.75)
    ptrs = [w.grad.data_ptr() for w in ws]
    got = fastreg.gram_penalty_grad_(ws, ms, target=target, reduction=reduction, coeff=0.75, backend=backend)
    torch.testing.assert_close(got, penalty)
    torch.testing.assert_close([w.grad for w in ws], grads)
    assert [w.grad.data_ptr() for w in ws] == ptrs  # where they were
    assert not got.requires_grad


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
def test_missing_grad_becomes_the_penalty_gradient(backend):
    need(backend)
    ws = with_grads(make_weights(SMALL), start=None)
    ms = make_masks(SMALL, "half")
    penalty, grads = expected_after(ws, ms, "decorrelate", "mean", 1.0)
    fastreg.gram_penalty_grad_(ws, ms, backend=backend)
    torch.testing.assert_close([w.grad for w in ws], grads)


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("target", ["decorrelate", "diagonal"])
def test_float64_gradient_matches_finite_differences(backend, target):
    """Gradcheck-style, independent of autograd: ⟨added gradient, V⟩ = (f(W + εV) − f(W − εV)) / 2ε."""
    need(backend)
    ws = with_grads(make_weights(SMALL), start=None)
    ms = make_masks(SMALL, "half")
    fastreg.gram_penalty_grad_(ws, ms, target=target, backend=backend)
    f = lambda w: reference.gram_penalty(w, ms, target, "mean")  # noqa: E731
    eps = 1e-6
    for _ in range(3):
        vs = [torch.randn_like(w) for w in ws]
        plus = f([w.detach() + eps * v for w, v in zip(ws, vs)])
        minus = f([w.detach() - eps * v for w, v in zip(ws, vs)])
        directional = sum((w.grad * v).sum() for w, v in zip(ws, vs))
        torch.testing.assert_close(directional, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("coeff", [0.0, 2.5e-3, "tensor", "tensor32"])
def test_coeff_float_or_zero_dim_tensor(backend, coeff):
    need(backend)
    ws = with_grads(make_weights(SMALL))
    ms = make_masks(SMALL, "half")
    value = {"tensor": torch.tensor(-1.5, dtype=torch.float64), "tensor32": torch.tensor(3.0)}.get(coeff, coeff)
    penalty, grads = expected_after(ws, ms, "decorrelate", "sum", float(value))
    got = fastreg.gram_penalty_grad_(ws, ms, reduction="sum", coeff=value, backend=backend)
    torch.testing.assert_close(got, penalty)
    torch.testing.assert_close([w.grad for w in ws], grads)


def _layouts(kind):
    """(weight, grad) of one conv layer in the given layouts."""
    w = torch.randn(12, 5, 3, 3, dtype=torch.float64) / 6
    g = torch.randn(12, 5, 3, 3, dtype=torch.float64)
    if kind in ("both_channels_last", "weight_channels_last"):
        w = w.contiguous(memory_format=torch.channels_last)
    if kind in ("both_channels_last", "grad_channels_last"):
        g = g.contiguous(memory_format=torch.channels_last)
    w.requires_grad_()
    w.grad = g
    return w


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("kind", ["both_channels_last", "weight_channels_last", "grad_channels_last", "transposed_grad"])
def test_gradients_of_any_dense_layout_are_updated_where_they_are(backend, kind):
    need(backend)
    if kind == "transposed_grad":  # a linear layer whose gradient's rows are not blocks of memory
        w = (torch.randn(9, 6, dtype=torch.float64) / 3).requires_grad_()
        w.grad = torch.randn(6, 9, dtype=torch.float64).t()
        ws = [w, _layouts("contiguous")]
    else:
        ws = [_layouts(kind), (torch.randn(7, 4, dtype=torch.float64) / 2).requires_grad_()]
        ws[1].grad = torch.randn(7, 4, dtype=torch.float64)
    ms = make_masks([w.shape for w in ws], "half")
    strides = [w.grad.stride() for w in ws]
    ptrs = [w.grad.data_ptr() for w in ws]
    penalty, grads = expected_after(ws, ms, "decorrelate", "mean", 1.0)
    fastreg.gram_penalty_grad_(ws, ms, backend=backend)
    torch.testing.assert_close([w.grad for w in ws], grads)
    assert [w.grad.stride() for w in ws] == strides and [w.grad.data_ptr() for w in ws] == ptrs


@pytest.mark.parametrize("backend", fastreg.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lower_precision_gradients(backend, dtype):
    need(backend)
    ws32 = make_weights(SMALL, dtype=torch.float32)
    ws = [w.detach().to(dtype).requires_grad_() for w in ws32]
    for w in ws:
        w.grad = torch.randn_like(w)
    ms = make_masks(SMALL, "half")
    penalty, grads = expected_after(ws, ms, "decorrelate", "mean", 1.0)
    got = fastreg.gram_penalty_grad_(ws, ms, backend=backend)
    assert got.dtype == torch.float32
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close([w.grad.float() for w in ws], [g.float() for g in grads], **tol)


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
def test_gradients_get_their_version_bumped(backend):
    need(backend)
    ws = with_grads(make_weights(SMALL))
    versions = [w.grad._version for w in ws]
    fastreg.gram_penalty_grad_(ws, make_masks(SMALL, "half"), backend=backend)
    assert all(w.grad._version > v for w, v in zip(ws, versions))


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("target", TARGETS)
def test_opcheck(backend, target):
    need(backend)
    ws = [w.detach() for w in make_weights(SMALL)]
    grads = [torch.randn_like(w) for w in ws]
    ms = [] if target == "identity" else make_masks(SMALL, "half")
    op = getattr(torch.ops, _registry.NAMESPACES[backend]).gram_penalty_grad_.default
    for coeff_tensor in (None, torch.tensor(0.5, dtype=torch.float64)):
        torch.library.opcheck(op, (ws, ms, grads, target, "mean", 2.0, coeff_tensor))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_torch_compile_fullgraph_with_a_tensor_coeff(backend):
    need(backend)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ws = with_grads(make_weights(SMALL))
    ms = make_masks(SMALL, "half")
    start = [w.grad.clone() for w in ws]
    fastreg.gram_penalty_grad_(ws, ms, backend=backend)  # (the backend choice, cached before tracing)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(coeff):
        return fastreg.gram_penalty_grad_(ws, ms, coeff=coeff, backend=backend)

    for value in (0.5, 2.0):  # a new value reuses the graph
        for w, s in zip(ws, start):
            w.grad.copy_(s)
        penalty, grads = expected_after(ws, ms, "decorrelate", "mean", value)
        got = step(torch.tensor(value, dtype=torch.float64))
        torch.testing.assert_close(got, penalty)
        torch.testing.assert_close([w.grad for w in ws], grads)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 1


@pytest.mark.parametrize("make_args, error, match", [
    (lambda w, m: (w, [x.int() for x in m]), TypeError, r"keep_masks\[0\] must be a torch.bool"),
    (lambda w, m: (w, m[:-1]), ValueError, "keep_masks has 2 entries but weights has 3"),
    (lambda w, m: (w, [1, *m[1:]]), TypeError, r"keep_masks\[0\] must be a tensor, got int"),
    (lambda w, m: ([w[0], [w[1]], w[2]], m), TypeError, r"weights\[1\] must be a tensor, got list"),
    (lambda w, m: (w, [m[0][:-1], *m[1:]]), ValueError, r"keep_masks\[0\] must have shape"),
    (lambda w, m: ([w[0].detach().float().requires_grad_(), *w[1:]], m), TypeError, "weights must share one dtype"),
])
@pytest.mark.parametrize("backend", fastreg.BACKENDS)
def test_bad_input_names_the_argument_and_writes_nothing(make_args, error, match, backend):
    need(backend)
    ws = with_grads(make_weights(SMALL))
    before = [w.grad.clone() for w in ws]
    w_arg, m_arg = make_args(ws, make_masks(SMALL, "half"))
    with pytest.raises(error, match=match):
        fastreg.gram_penalty_grad_(w_arg, m_arg, backend=backend)
    torch.testing.assert_close([w.grad for w in ws], before)


def test_a_gradient_that_is_not_dense_names_the_argument():
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w.grad = torch.randn(6, 8, dtype=torch.float64)[:, ::2]
    with pytest.raises(ValueError, match=r"weights\[0\]\.grad is updated in place"):
        fastreg.gram_penalty_grad_([w], [torch.tensor([True, False] * 3)])


# ---------------------------------------------------------------------------------------------
# The plan of a mask set (built when the masks change, reused otherwise)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["gram_penalty", "gram_penalty_grad_"])
def test_a_mask_changed_in_place_gets_a_new_plan(op):
    need("cpp", op=op)
    ws = with_grads(make_weights(SHAPES), start=None)
    ms = make_masks(SHAPES, "half")

    def run():
        for w in ws:
            w.grad = None
        if op == "gram_penalty":
            fastreg.gram_penalty(ws, ms, backend="cpp").backward()
        else:
            fastreg.gram_penalty_grad_(ws, ms, backend="cpp")
        return [w.grad.clone() for w in ws]

    run()
    for m in ms:  # in place: same tensors, same addresses, new versions
        m.logical_not_()
    got = run()
    _, expected = expected_after(with_grads(ws, start=None), ms, "decorrelate", "mean", 1.0)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# Loss mode's backward: one multi-tensor scale by the incoming gradient, read on the device
# ---------------------------------------------------------------------------------------------
def test_backward_scales_with_one_multi_tensor_op_and_no_host_read():
    """On a device other than the CPU (meta here: the code path of CUDA tensors), the incoming gradient
    scales every layer's gradient with one _foreach_mul_(TensorList, Tensor), never read on the host."""
    need("cpp", op="gram_penalty")
    ws = [torch.empty(s, device="meta", requires_grad=True) for s in SHAPES]
    ms = [torch.ones(s[0], dtype=torch.bool, device="meta") for s in SHAPES]
    penalty = torch.ops.fastreg.gram_penalty.default(ws, ms, "decorrelate", "mean", 1.0)
    incoming = torch.full((), 2.0, device="meta")
    ops = count_ops_by_name(lambda: torch.autograd.grad(penalty, ws, incoming))
    assert "aten._local_scalar_dense.default" not in ops
    assert [k for k in ops if "mul" in k] == ["aten._foreach_mul_.Tensor"] and ops["aten._foreach_mul_.Tensor"] == 1


def test_cpu_backward_reads_no_scalar_through_the_dispatcher():
    need("cpp", op="gram_penalty")
    ws = make_weights(SHAPES)
    penalty = fastreg.gram_penalty(ws, make_masks(SHAPES, "half"), backend="cpp")
    ops = count_ops_by_name(lambda: torch.autograd.grad(penalty, ws, torch.tensor(3.0, dtype=torch.float64)))
    assert "aten._local_scalar_dense.default" not in ops


# ---------------------------------------------------------------------------------------------
# The fast paths catch argument errors only
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["gram_penalty", "gram_penalty_grad_"])
def test_fast_path_does_not_rerun_after_an_error_that_is_not_an_argument_error(op, monkeypatch):
    need("cpp", op=op)
    calls = []

    def failing_kernel(*args):
        calls.append(1)
        raise torch.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(_registry, "fast_op", lambda *a, **k: failing_kernel)
    ws = with_grads(make_weights(SMALL))
    before = [w.grad.clone() for w in ws]
    with pytest.raises(torch.OutOfMemoryError):
        getattr(fastreg, op)(ws, make_masks(SMALL, "half"), backend="cpp")
    assert len(calls) == 1
    torch.testing.assert_close([w.grad for w in ws], before)  # nothing applied by a second run


def test_fast_path_compares_no_gradient_by_value(monkeypatch):
    """The fast path looks for a missing .grad by identity: Tensor.__eq__ on every gradient (what
    `None in grads` runs) costs more than the kernels on a small model."""
    need("cpp")
    ws = with_grads(make_weights(SHAPES))
    ms = make_masks(SHAPES, "half")
    compared = []
    eq = torch.Tensor.__eq__

    def counting_eq(self, other):
        compared.append(other)
        return eq(self, other)

    monkeypatch.setattr(torch.Tensor, "__eq__", counting_eq)
    fastreg.gram_penalty_grad_(ws, ms, backend="cpp")
    assert compared == []


# ---------------------------------------------------------------------------------------------
# The Triton op validates its own arguments (called directly, past the Python checks)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, error, match", [
    ("int_masks", TypeError, r"keep_masks\[0\] must be bool"),
    ("short_mask", ValueError, r"keep_masks\[1\] must have shape"),
    ("mixed_dtypes", TypeError, "weights must share one dtype"),
    ("meta_mask", ValueError, r"keep_masks\[0\].* on "),
    ("empty_weight", ValueError, r"weights\[2\] is empty"),
])
@pytest.mark.parametrize("op", ["gram_penalty_and_grads", "gram_penalty_grad_"])
def test_triton_op_called_directly_validates_its_arguments(bad, error, match, op):
    need("triton", op="gram_penalty")
    ws = [w.detach() for w in make_weights(SMALL)]
    ms = make_masks(SMALL, "half")
    if bad == "int_masks":
        ms = [m.int() for m in ms]
    elif bad == "short_mask":
        ms[1] = ms[1][:-1]
    elif bad == "mixed_dtypes":
        ws[1] = ws[1].float()
    elif bad == "meta_mask":
        ms[0] = ms[0].to("meta")
    elif bad == "empty_weight":
        ws[2] = ws[2][:0]
        ms[2] = ms[2][:0]
    kernel = getattr(torch.ops.fastreg_triton, op).default
    args = (ws, ms, [torch.zeros_like(w) for w in ws]) if op == "gram_penalty_grad_" else (ws, ms)
    with pytest.raises(error, match=match):
        if op == "gram_penalty_grad_":
            kernel(*args, "decorrelate", "mean", 1.0, None)
        else:
            kernel(*args, "decorrelate", "mean", 1.0, True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_launches_on_the_weights_device():
    ws = [w.detach().to("cuda:1").requires_grad_() for w in make_weights(SMALL, dtype=torch.float32)]
    ms = [m.to("cuda:1") for m in make_masks(SMALL, "half")]
    with torch.cuda.device(0):
        got = fastreg.gram_penalty_grad_(ws, ms, backend="triton")
    expected, grads = expected_after([w.cpu() for w in ws], [m.cpu() for m in ms], "decorrelate", "mean", 1.0)
    torch.testing.assert_close(got.cpu(), expected.float())
