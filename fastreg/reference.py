"""The formulas of fastreg, in plain PyTorch: the oracle every backend and test compares against.

Every function here is the short, obvious version of one line of math (see DESIGN.md §1).
They are written for clarity, not speed; all are differentiable where the math is.

Notation: a layer weight ``w`` (conv N×C×k×k or linear N×D) is viewed as W ∈ R^{N×D}, one row
per output filter; ``keep`` is an N-long bool mask (True = kept); P = pruned rows, K = kept rows;
G = W Wᵀ.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import Tensor

TARGETS = ("decorrelate", "diagonal", "identity")
REDUCTIONS = ("mean", "sum", "none")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32/fp16/bf16) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def promoted_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype every tensor of the list converts to without loss (fp16 with bf16: float32)."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def as_rows(w: Tensor) -> Tensor:
    """View a layer weight as N×D: one row per output filter."""
    return w.reshape(w.shape[0], math.prod(w.shape[1:]))  # (not -1: ambiguous for a zero-size weight)


# ---------------------------------------------------------------------------------------------
# §1.1 gram penalties
# ---------------------------------------------------------------------------------------------
def gram_error(w: Tensor, keep: Tensor | None, target: str) -> Tensor:
    """E for one layer, G = W Wᵀ:
    decorrelate: G ⊙ (1 − m mᵀ) (TPP);  diagonal: G − diag(m) (OPP);  identity: G − I.
    """
    W = as_rows(w).to(accumulate_dtype(w.dtype))
    G = W @ W.T
    if target == "identity":
        return G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    m = keep.to(G.dtype)
    if target == "decorrelate":
        return G * (1 - torch.outer(m, m))
    if target == "diagonal":
        return G - torch.diag(m)
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def gram_penalty(
    weights: Sequence[Tensor],
    keep_masks: Sequence[Tensor] | None = None,
    target: str = "decorrelate",
    reduction: str = "mean",
) -> Tensor:
    """Σ_l ΣE_l² (sum), Σ_l ΣE_l²/N_l² (mean: the official code's ``mse_loss``), or the per-layer
    vector [ΣE_l²]_l (none)."""
    masks = [None] * len(weights) if keep_masks is None or target == "identity" else keep_masks
    per_layer = []
    for w, keep in zip(weights, masks):
        sq = gram_error(w, keep, target).square().sum()
        if reduction == "mean":
            sq = sq / w.shape[0] ** 2
        per_layer.append(sq)
    out = torch.stack(per_layer)
    return out if reduction == "none" else out.sum()


def gram_penalty_official(weights: Sequence[Tensor], keep_masks: Sequence[Tensor], target: str = "decorrelate") -> Tensor:
    """The original TPP code's loop (``opp_scheme v5`` / ``v5_2``): full gram, target rows zeroed
    one index at a time, ``mse_loss`` per layer, summed. Used as the 'official' benchmark
    provider and as an independent check of :func:`gram_penalty` with reduction='mean'."""
    total = 0.0
    for w, keep in zip(weights, keep_masks):
        W = as_rows(w)
        G = W @ W.T
        pruned = (~keep).nonzero().flatten().tolist()
        if target == "decorrelate":
            T = G.detach().clone()  # kept×kept entries are their own target: error 0 there
            for i in pruned:
                T[i, :] = 0
                T[:, i] = 0
        elif target == "diagonal":
            T = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
            for i in pruned:
                T[i, i] = 0
        else:
            raise ValueError(f"target must be 'decorrelate' or 'diagonal', got {target!r}")
        total = total + torch.nn.functional.mse_loss(G, T, reduction="mean")
    return total


def gram_penalty_grad(w: Tensor, keep: Tensor | None, target: str) -> Tensor:
    """∂(ΣE²)/∂W = 4 E W (E symmetric), reshaped like ``w``."""
    W = as_rows(w).to(accumulate_dtype(w.dtype))
    return (4 * gram_error(w, keep, target) @ W).reshape(w.shape)


def gram_side_flops(target: str, n: int, D: int, pruned: int) -> tuple[int, int]:
    """Matrix-product flops of one n×D layer's penalty and gradient on each side (DESIGN.md §1.1), as
    (N-side, D-side); the compiled backends run each layer on the cheaper one (csrc/gram_penalty.h):
    decorrelate (q = ``pruned`` rows): A = W_P Wᵀ, ∇W_P = 4 A W, ∇W_K = 4 A[:, K]ᵀ W_P → (6qn − 2q²)·D, or
    S = W_Pᵀ W_P, R = W_Kᵀ W_K, ∇W_P = 4 W_P (S + R), ∇W_K = 4 W_K S → 4nD²;
    diagonal / identity: E = W Wᵀ − diag(m), ∇W = 4 E W → 4n²D, or S = Wᵀ W, ∇W = 4 (W S − diag(m) W) → 4nD²."""
    if target == "decorrelate":
        return (6 * pruned * n - 2 * pruned * pruned) * D, 4 * n * D * D
    return 4 * n * n * D, 4 * n * D * D


# ---------------------------------------------------------------------------------------------
# §1.2–1.4 per-step ops over all tensors (norms, saliency, in-place gradient terms)
# ---------------------------------------------------------------------------------------------
def _slices(t: Tensor, dim: int) -> Tensor:
    """The slices of ``t`` along ``dim`` as rows: shape [t.shape[dim], numel / t.shape[dim]]."""
    rest = t.shape[:dim] + t.shape[dim + 1 :]
    return t.movedim(dim, 0).reshape(t.shape[dim], math.prod(rest))


def group_norms(tensors: Sequence[Tensor], p: int = 2, dim: int = 0) -> list[Tensor]:
    """‖slice‖_p for every slice along ``dim`` of every tensor (dim 0: filters, dim 1: inputs)."""
    return [
        torch.linalg.vector_norm(_slices(t, dim).to(accumulate_dtype(t.dtype)), ord=p, dim=1).to(t.dtype)
        for t in tensors
    ]


def group_saliency(
    tensors: Sequence[Tensor], dims: Sequence[int], group_ids: Sequence[Tensor], num_groups: int
) -> Tensor:
    """OCSPruner group saliency S(g) = (Σ_{w∈g} ‖w‖₂/√|w|) / |g|.

    Slice j of ``tensors[i]`` along ``dims[i]`` belongs to group ``group_ids[i][j]`` (−1: none);
    |w| is the slice's element count, |g| the number of slices in the group. Groups with no
    slice score 0; a slice of no elements (|w| = 0) adds 0 to the sum and 1 to |g|.
    """
    acc = accumulate_dtype(tensors[0].dtype) if tensors else torch.float32
    device = tensors[0].device if tensors else None
    total = torch.zeros(num_groups, dtype=acc, device=device)
    count = torch.zeros(num_groups, dtype=acc, device=device)
    for t, d, ids in zip(tensors, dims, group_ids):
        rows = _slices(t, d).to(acc)
        score = torch.linalg.vector_norm(rows, dim=1) / math.sqrt(max(rows.shape[1], 1))
        sel = ids >= 0
        total.index_add_(0, ids[sel], score[sel])
        count.index_add_(0, ids[sel], torch.ones_like(score[sel]))
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def _pruned(t: Tensor, keep: Tensor) -> Tensor:
    """Bool mask of the pruned slices along dim 0, broadcastable to ``t``."""
    return (~keep).reshape((-1,) + (1,) * (t.dim() - 1))


@torch.no_grad()
def l2_grad_(params: Sequence[Tensor], keep_masks: Sequence[Tensor], coeff) -> None:
    """GReg / TPP Eq. 5: p.grad[P] += coeff · p[P]  (dim-0 slices; weights, biases, BN γ and β)."""
    for p, keep in zip(params, keep_masks):
        p.grad.add_(torch.where(_pruned(p, keep), p, 0).mul(coeff).to(p.grad.dtype))


@torch.no_grad()
def shrink_(tensors: Sequence[Tensor], keep_masks: Sequence[Tensor], factor) -> None:
    """OCSPruner Eq. 9: t[P] *= factor (factor = 1 − λ·lr; 0 = hard zero-out)."""
    for t, keep in zip(tensors, keep_masks):
        t.copy_(torch.where(_pruned(t, keep), t * factor, t))


@torch.no_grad()
def group_lasso_grad_(params: Sequence[Tensor], keep_masks: Sequence[Tensor], lam) -> None:
    """OCSPruner Eq. 8 per slice: grad[g] += λ · w_g / ‖w_g‖₂ for pruned dim-0 slices g; 0 where ‖w_g‖ = 0."""
    for p, keep in zip(params, keep_masks):
        rows = _slices(p, 0).to(accumulate_dtype(p.dtype))
        norm = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        unit = torch.where(norm > 0, rows / norm.clamp_min(torch.finfo(rows.dtype).tiny), 0)
        step = torch.where((~keep)[:, None], unit, 0).reshape(p.shape) * lam
        p.grad.add_(step.to(p.grad.dtype))


@torch.no_grad()
def group_lasso_grad_grouped_(
    params: Sequence[Tensor], dims: Sequence[int], group_ids: Sequence[Tensor], pruned_groups: Tensor, lam
) -> None:
    """Group lasso over coupled groups: ‖w_g‖₂ over every slice of g in every tensor;
    grad[slice] += λ · slice / ‖w_g‖₂ for slices of pruned groups (``pruned_groups[g]`` True)."""
    acc = accumulate_dtype(params[0].dtype)
    sq = torch.zeros(pruned_groups.shape[0], dtype=acc, device=pruned_groups.device)
    for p, d, ids in zip(params, dims, group_ids):
        sel = ids >= 0
        sq.index_add_(0, ids[sel], _slices(p, d).to(acc).square().sum(1)[sel])
    norm = sq.sqrt()
    for p, d, ids in zip(params, dims, group_ids):
        if not pruned_groups.numel():  # no groups: nothing is pruned
            continue
        g = ids.clamp_min(0)
        active = (ids >= 0) & pruned_groups[g] & (norm[g] > 0)
        scale = torch.where(active, lam / norm[g].clamp_min(torch.finfo(acc).tiny), 0)
        step = _slices(p, d).to(acc) * scale[:, None]
        shape = p.movedim(d, 0).shape
        p.grad.add_(step.reshape(shape).movedim(0, d).to(p.grad.dtype))


@torch.no_grad()
def slimming_grad_(bn_weights: Sequence[Tensor], s) -> None:
    """Network slimming (Liu et al. 2017): grad(γ) += s · sign(γ)."""
    for g in bn_weights:
        g.grad.add_(torch.sign(g).mul(s).to(g.grad.dtype))


# ---------------------------------------------------------------------------------------------
# §1.4 metrics
# ---------------------------------------------------------------------------------------------
def orthogonality(w: Tensor) -> Tensor:
    """Degree of orthogonality (OrthoReg): ‖diag(G)‖_F / ‖G‖_F, 1 for orthogonal filters."""
    W = as_rows(w).to(accumulate_dtype(w.dtype))
    G = W @ W.T
    return torch.linalg.vector_norm(torch.diagonal(G)) / torch.linalg.matrix_norm(G)


def l1_keep_mask(w: Tensor, ratio: float) -> Tensor:
    """L1-norm filter ranking (Li et al. 2017): prune the ⌊ratio·N⌋ filters of smallest Σ|w|."""
    n = w.shape[0]
    k = int(math.floor(ratio * n))
    keep = torch.ones(n, dtype=torch.bool, device=w.device)
    if k > 0:
        keep[as_rows(w).abs().sum(1).argsort()[:k]] = False
    return keep


# ---------------------------------------------------------------------------------------------
# Per-group coefficients (Torch-Pruning's regularizing pruners). Slice j of tensors[i] along dims[i]
# belongs to group group_ids[i][j] (−1: none).
# ---------------------------------------------------------------------------------------------
def group_sq_sums(tensors: Sequence[Tensor], dims: Sequence[int], group_ids: Sequence[Tensor], num_groups: int) -> Tensor:
    """Σ ‖slice‖₂² over the slices of each group: a [num_groups] vector (float32; float64 for float64 tensors[0])."""
    acc = accumulate_dtype(tensors[0].dtype)
    total = torch.zeros(num_groups + 1, dtype=acc, device=tensors[0].device)  # (slot num_groups: no group)
    for t, d, ids in zip(tensors, dims, group_ids):
        total.index_add_(0, torch.where(ids >= 0, ids, num_groups), _slices(t, d).to(acc).square().sum(1))
    return total[:num_groups]


@torch.no_grad()
def l2_grad_grouped_(params: Sequence[Tensor], dims: Sequence[int], group_ids: Sequence[Tensor], group_coeffs: Tensor,
                     coeff) -> None:
    """grad[slice] += coeff · group_coeffs[g] · slice for every slice of a group g; slices of no group or
    of a group whose coefficient is 0 are left as they are."""
    for p, d, ids in zip(params, dims, group_ids):
        k = torch.where(ids >= 0, group_coeffs.double()[ids.clamp_min(0)], 0)
        rows = _slices(p, d).to(accumulate_dtype(p.dtype))
        step = torch.where((k != 0)[:, None], rows * (k * coeff).to(rows.dtype)[:, None], 0)
        p.grad.add_(step.reshape(p.movedim(d, 0).shape).movedim(0, d).to(p.grad.dtype))


def group_norm_gamma(importance: Tensor, segment_offsets: Tensor, alpha: float, guard: bool = True) -> Tensor:
    """DepGraph's group-norm weights within each segment k = [o_k, o_{k+1}) of ``importance`` (before the
    square root): imp = √x, γ = α^((max_k imp − imp) / (max_k imp − min_k imp)). A segment holding a NaN
    gets γ = 0 (left alone); one of equal importances γ = 1 (``guard``) or NaN (the unguarded 0/0).
    (Segment reductions by scatter: no host sync.)"""
    imp = importance.double().sqrt()
    lengths = segment_offsets.diff()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=imp.device), lengths, output_size=imp.numel())
    hi = imp.new_full(lengths.shape, -math.inf).scatter_reduce(0, seg, imp, "amax")[seg]
    lo = imp.new_full(lengths.shape, math.inf).scatter_reduce(0, seg, imp, "amin")[seg]
    has_nan = imp.new_zeros(lengths.shape).scatter_add(0, seg, imp.isnan().double())[seg] > 0
    gamma = torch.where(hi > lo, alpha ** ((hi - imp) / (hi - lo)), 1.0 if guard else math.nan)
    return torch.where(has_nan, 0.0, gamma).to(importance.dtype)
