"""The compiled (C++ CPU) gram_penalty kernel, called directly as ``torch.ops.fastreg.gram_penalty``:
its per-layer N-side / D-side choice, the batching of equal-shape layers, the reused workspace,
dtype handling and input checks — each against fastreg.reference (values and per-layer gradients).

The kernel's epilogue arithmetic (gram_term, assemble_grad in csrc/gram_penalty.h) is the same code
the CUDA kernels run, so these tests also cover the CUDA backend's arithmetic."""
from __future__ import annotations

import pytest
import torch

from fastreg import _registry, reference

why = _registry.why_unavailable("gram_penalty", "cpp", torch.device("cpu"))
pytestmark = pytest.mark.skipif(why is not None, reason=str(why))


def op(weights, masks, target, reduction="sum", need_grad=True, coeff=1.0):
    return torch.ops.fastreg.gram_penalty_and_grads(weights, [] if target == "identity" else masks, target, reduction, coeff,
                                                    need_grad)


def expected(weights, masks, target, reduction):
    """Per-layer (reduction='none') or summed penalty and per-layer gradients from the reference."""
    masks = [None] * len(weights) if target == "identity" else masks
    value = reference.gram_penalty(weights, None if target == "identity" else masks, target, reduction)
    grads = []
    for w, m in zip(weights, masks):
        g = reference.gram_penalty_grad(w, m, target)
        grads.append((g / w.shape[0] ** 2 if reduction == "mean" else g).to(w.dtype))
    return value, grads


def pruned_mask(n: int, p: int, generator=None) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=generator)[:p]] = False
    return keep


def assert_matches_reference(weights, masks, target, reduction, rtol=1e-9, atol=1e-10):
    got, got_grads = op(weights, masks, target, reduction)
    exp, exp_grads = expected(weights, masks, target, reduction)
    torch.testing.assert_close(got, exp.to(got.dtype), rtol=rtol, atol=atol)
    assert len(got_grads) == len(weights)
    for g, e, w in zip(got_grads, exp_grads, weights):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)


# (n, D, p): each target's N-side and D-side are both taken (asserted by the flop model below).
SIDE_CASES = {
    "decorrelate": [(12, 40, 6), (64, 8, 32), (64, 8, 1), (10, 10, 9), (7, 3, 7)],
    "diagonal": [(12, 40, 6), (64, 8, 32), (9, 9, 4), (5, 2, 0)],
    "identity": [(12, 40, 0), (64, 8, 0), (1, 5, 0), (6, 1, 0)],
}


def side(target: str, n: int, D: int, p: int) -> str:
    """The side csrc/gram_penalty.h's choose_side takes: the cheaper one, except that diagonal / identity
    take the D-side only with more kept rows than D (where Σ E² ≥ |K| − D ≥ 1, see there)."""
    nf, df = reference.gram_side_flops(target, n, D, p)
    return "D" if df < nf and (target == "decorrelate" or n - p > D) else "N"


@pytest.mark.parametrize("target", list(SIDE_CASES))
def test_cases_cover_both_sides(target):
    assert {side(target, n, D, p) for n, D, p in SIDE_CASES[target]} == {"N", "D"}


@pytest.mark.parametrize("target", list(SIDE_CASES))
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_each_side_matches_reference(target, reduction):
    g = torch.Generator().manual_seed(1)
    for n, D, p in SIDE_CASES[target]:
        w = torch.randn(n, D, dtype=torch.float64, generator=g) / D**0.5
        assert_matches_reference([w], [pruned_mask(n, p, g)], target, reduction)


@pytest.mark.parametrize("target", ["decorrelate", "diagonal", "identity"])
def test_batched_equal_shapes_with_different_masks(target):
    """Equal-shape layers form one batched group only when their pruned counts match; interleave
    several groups and other shapes and check every layer's value and gradient."""
    g = torch.Generator().manual_seed(2)
    shapes = [(16, 4, 3, 3), (8, 5), (16, 4, 3, 3), (32, 2, 1, 1), (16, 4, 3, 3), (8, 5), (16, 4, 3, 3), (32, 2, 1, 1)]
    pruned = [8, 3, 8, 16, 1, 3, 16, 0]
    ws = [torch.randn(s, dtype=torch.float64, generator=g) for s in shapes]
    ms = [pruned_mask(s[0], p, g) for s, p in zip(shapes, pruned)]
    assert_matches_reference(ws, ms, target, "none")
    assert_matches_reference(ws, ms, target, "mean")


@pytest.mark.parametrize("target", ["decorrelate", "diagonal", "identity"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_cpu_layer_path(target, dtype):
    """The CPU kernel's three ways to run a layer, side by side in one call: a small fp32/fp64
    N-side layer at |P| = n/2 runs in its own row order (no permuted copy, the gradient GEMM
    writes the output), one with |P| = 1 runs permuted (fewer flops), and a layer over 16 MFLOP
    runs alone on every thread (256×512, |P| = 128)."""
    g = torch.Generator().manual_seed(5)
    shapes, pruned = [(16, 16, 3, 3), (16, 16, 3, 3), (32, 8, 2, 2), (256, 512)], [8, 1, 16, 128]
    ws = [(torch.randn(s, generator=g, dtype=torch.float64) / (s[1] * 9) ** 0.5).to(dtype) for s in shapes]
    ms = [pruned_mask(s[0], p, g) for s, p in zip(shapes, pruned)]
    tol = {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert_matches_reference(ws, ms, target, "none", **tol)
    assert_matches_reference(ws, ms, target, "mean", **tol)


def test_no_pruned_rows_is_zero_and_all_pruned_matches():
    ws = [torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64)]
    ms = [torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)]
    per_layer, grads = op(ws, ms, "decorrelate", "none")
    assert per_layer[0].item() == 0 and torch.count_nonzero(grads[0]) == 0
    assert_matches_reference(ws, ms, "decorrelate", "none")


def test_need_grad_false_returns_no_gradients():
    ws = [torch.randn(5, 3), torch.randn(4, 2, 2, 2)]
    ms = [pruned_mask(5, 2), pruned_mask(4, 1)]
    value, grads = op(ws, ms, "decorrelate", "mean", need_grad=False)
    assert grads == []
    torch.testing.assert_close(value, reference.gram_penalty(ws, ms, "decorrelate", "mean"))


def test_non_contiguous_weights():
    base = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    channels_last = base.to(memory_format=torch.channels_last)
    transposed = torch.randn(7, 10, dtype=torch.float64).t()  # 10×7 view
    ws = [channels_last, transposed]
    ms = [pruned_mask(8, 3), pruned_mask(10, 4)]
    assert_matches_reference(ws, ms, "decorrelate", "sum")
    assert_matches_reference(ws, ms, "diagonal", "sum")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_accumulates_in_float32(dtype):
    g = torch.Generator().manual_seed(3)
    shapes = [(16, 4, 3, 3), (32, 8), (64, 4)]
    ws = [(torch.randn(s, generator=g) / s[0] ** 0.5).to(dtype) for s in shapes]
    ms = [pruned_mask(s[0], s[0] // 2, g) for s in shapes]
    for target in ("decorrelate", "diagonal", "identity"):
        value, grads = op(ws, ms, target, "mean")
        assert value.dtype == torch.float32
        exp, exp_grads = expected([w.float() for w in ws], ms, target, "mean")
        torch.testing.assert_close(value, exp, rtol=1e-4, atol=1e-5)
        for gr, e, w in zip(grads, exp_grads, ws):
            assert gr.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(gr.float(), e.to(dtype).float(), rtol=tol, atol=tol * e.abs().max().item())


def test_workspace_reuse_keeps_results_independent():
    """The CPU kernel reuses one scratch buffer per thread across calls: results of an earlier call
    must not change, and calls of different sizes and dtypes must stay correct."""
    g = torch.Generator().manual_seed(4)
    big = [torch.randn(64, 48, generator=g, dtype=torch.float64)]
    small = [torch.randn(6, 5, generator=g)]
    mb, msm = [pruned_mask(64, 20, g)], [pruned_mask(6, 2, g)]
    v1, g1 = op(big, mb, "decorrelate")
    v1c, g1c = v1.clone(), [x.clone() for x in g1]
    op(small, msm, "diagonal")
    op(big, mb, "identity")
    torch.testing.assert_close(v1, v1c, rtol=0, atol=0)
    torch.testing.assert_close(g1, g1c, rtol=0, atol=0)
    assert_matches_reference(big, mb, "decorrelate", "sum")
    assert_matches_reference(small, msm, "diagonal", "sum", rtol=1e-5, atol=1e-6)


def test_gradients_are_tensors_of_their_own():
    """The per-layer gradients come out of one allocation, but each has its own storage (no output
    aliases another), starts on a 64-byte boundary, and outlives the others."""
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(8, 3, 3, 3, generator=g), torch.randn(5, 7, generator=g), torch.randn(16, 8, 1, 1, generator=g)]
    masks = [pruned_mask(w.shape[0], 2, g) for w in weights]
    _, grads = op(weights, masks, "decorrelate")
    _, want = expected(weights, masks, "decorrelate", "sum")
    assert len({x.untyped_storage().data_ptr() for x in grads}) == len(grads)
    assert all(x.data_ptr() % 64 == 0 and x.is_contiguous() and x.shape == w.shape for x, w in zip(grads, weights))
    grads[0].fill_(7)
    kept = grads[2]
    del grads[:2]
    torch.testing.assert_close(kept, want[2])
    with pytest.raises(RuntimeError):
        kept.resize_(1000)  # the segment cannot grow into its neighbours


@pytest.mark.parametrize(
    "weights, masks, target, reduction, match",
    [
        ([torch.randn(4, 3)], [torch.ones(5, dtype=torch.bool)], "decorrelate", "mean", r"keep_masks\[0\] must have shape \[4\]"),
        ([torch.randn(4, 3)], [torch.ones(4)], "decorrelate", "mean", r"keep_masks\[0\] must be bool"),
        ([torch.randn(4, 3)], [], "decorrelate", "mean", "keep_masks has 0 masks"),
        ([torch.randn(4)], [torch.ones(4, dtype=torch.bool)], "decorrelate", "mean", r"weights\[0\] must have at least 2 dims"),
        ([torch.randn(4, 3)], [torch.ones(4, dtype=torch.bool)], "orthogonal", "mean", "target must be"),
        ([torch.randn(4, 3)], [torch.ones(4, dtype=torch.bool)], "diagonal", "avg", "reduction must be"),
        ([torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)], [], "identity", "sum", "share one dtype"),
    ],
)
def test_kernel_checks_its_inputs(weights, masks, target, reduction, match):
    """Argument errors are ValueError / TypeError (the only errors the Python fast paths catch)."""
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.fastreg.gram_penalty_and_grads(weights, masks, target, reduction, 1.0, True)
    with pytest.raises((ValueError, TypeError), match=match):  # the differentiable op, through its autograd kernel
        torch.ops.fastreg.gram_penalty([w.requires_grad_() for w in weights], masks, target, reduction)
