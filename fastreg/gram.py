"""``fastreg.gram_penalty``: the masked gram-matrix penalty of TPP / OPP / kernel orthogonality.

The op returns the per-layer penalty and, in the same pass, ∂penalty_l/∂W_l (the kernels
reuse the products of the forward pass: DESIGN.md §1.1). Backward only scales those saved
gradients by the incoming gradient, so a forward+backward costs one fused kernel call plus
one multi-tensor multiply, whatever the number of layers.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _registry, reference
from ._checks import check_choice, check_masks, check_tensor_list


def penalty_dtype(weights: Sequence[Tensor]) -> torch.dtype:
    return reference.accumulate_dtype(weights[0].dtype)


@_registry.register_fake("gram_penalty")
def _fake(weights, keep_masks, target, reduction, need_grad):
    out = weights[0].new_empty(() if reduction != "none" else (len(weights),), dtype=penalty_dtype(weights))
    grads = [torch.empty_like(w) for w in weights] if need_grad else []
    return out, grads


def _setup_context(ctx, inputs, output):
    weights, keep_masks, target, reduction, need_grad = inputs
    ctx.set_materialize_grads(False)  # the saved-gradient outputs get no incoming gradient: no zeros
    ctx.n_masks = len(keep_masks)
    ctx.reduction = reduction
    # The gradients are op outputs: mark them non-differentiable (no grad_fn, so holding them on
    # ctx makes no reference cycle) and keep them as attributes — save_for_backward would
    # pack/unpack every one of them (two detach ops per layer per step).
    ctx.mark_non_differentiable(*output[1])
    ctx.grads = output[1]


def _backward(ctx, grad_penalty, _grad_grads):
    if grad_penalty is None:  # grads are not materialized: no incoming gradient, none to pass on
        return [None] * len(ctx.grads), [None] * ctx.n_masks, None, None, None
    grads = list(ctx.grads)
    if not grads:
        raise RuntimeError("fastreg.gram_penalty: backward through a call made with need_grad=False")
    if ctx.reduction == "none":
        scaled = torch._foreach_mul(grads, list(grad_penalty.unbind()))
    else:
        scaled = torch._foreach_mul(grads, grad_penalty)
    return list(scaled), [None] * ctx.n_masks, None, None, None


_registry.register_autograd("gram_penalty", _backward, _setup_context)


def gram_penalty(
    weights: Sequence[Tensor],
    keep_masks: Sequence[Tensor] | None = None,
    *,
    target: str = "decorrelate",
    reduction: str = "mean",
    backend: str | None = None,
) -> Tensor:
    """Σ_l penalty_l over every layer in one call, penalty_l = Σ E_l² (``sum``) or Σ E_l²/N_l² (``mean``).

    E = G ⊙ (1 − m mᵀ) (``decorrelate``, TPP), G − diag(m) (``diagonal``, OPP) or G − I
    (``identity``, kernel orthogonality), G = W Wᵀ with W the layer weight viewed as N×D.
    ``reduction="none"`` returns the per-layer vector [Σ E_l²]_l, shape [L]. Differentiable in every weight.
    fp16/bf16 weights accumulate in float32; the result is float64 for float64 weights, else float32.
    """
    weights = check_tensor_list("weights", weights, min_dim=2)
    check_choice("target", target, reference.TARGETS)
    check_choice("reduction", reduction, reference.REDUCTIONS)
    if len({w.dtype for w in weights}) > 1:
        raise TypeError(f"weights must share one dtype, got {sorted({str(w.dtype) for w in weights})}")
    if target == "identity":
        masks = []
    elif keep_masks is None:
        raise ValueError(f"keep_masks is required for target={target!r} (only 'identity' takes none)")
    else:
        masks = check_masks("keep_masks", keep_masks, weights, "weights")

    chosen = _registry.choose_backend("gram_penalty", weights[0].device, backend)
    if chosen == "reference":
        return reference.gram_penalty(weights, masks or None, target, reduction).to(penalty_dtype(weights))
    need_grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
    out, _ = _registry.op(chosen, "gram_penalty")(weights, masks, target, reduction, need_grad)
    return out
