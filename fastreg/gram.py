"""``fastreg.gram_penalty``: the masked gram-matrix penalty of TPP / OPP / kernel orthogonality.

Two ops: ``gram_penalty`` (the penalty, differentiable) and the backends' kernel op
``gram_penalty_and_grads``, which returns the penalty and, in the same pass, ∂penalty_l/∂W_l (the
kernels reuse the products of the forward pass: DESIGN.md §1.1). The autograd kernel of
``gram_penalty`` (C++) keeps those gradients and its backward only scales them in place by the
incoming gradient, so a forward+backward costs one fused kernel call plus at most one multi-tensor
multiply, whatever the number of layers, with no Python in the autograd and no per-layer tensor
handed to Python.

``gram_penalty_grad_`` is the same penalty as one in-place call after ``backward()``: the kernels add
coeff · ∂penalty_l/∂W_l straight into every ``.grad`` (GEMMs with β = 1, epilogues that add), with no
gradient tensor per layer and no autograd node at all.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _registry, reference
from ._checks import check_choice, check_coeff, check_masks, check_tensor_list, check_writable, is_argument_error
from .fused import _split_coeff


def penalty_dtype(weights: Sequence[Tensor]) -> torch.dtype:
    return reference.accumulate_dtype(weights[0].dtype)


@_registry.register_fake("gram_penalty_and_grads")
def _fake(weights, keep_masks, target, reduction, coeff, need_grad):
    # Also the Meta kernel, which a call mixing meta and real tensors reaches: check as the kernels do.
    check_tensor_list("weights", weights, min_dim=2)
    if keep_masks:
        check_masks("keep_masks", keep_masks, weights, "weights")
    out = weights[0].new_empty(() if reduction != "none" else (len(weights),), dtype=penalty_dtype(weights))
    # (contiguous whatever the weight's layout, as every backend returns them)
    grads = [w.new_empty(w.shape) for w in weights] if need_grad else []
    return out, grads


@_registry.register_fake("gram_penalty")
def _fake_penalty(weights, keep_masks, target, reduction, coeff=1.0):
    return _fake(weights, keep_masks, target, reduction, coeff, False)[0]


# The differentiable op gram_penalty and its autograd: csrc/gram_penalty_autograd.cpp, C++ kernels for
# both namespaces over the backends' gram_penalty_and_grads.


def gram_penalty(
    weights: Sequence[Tensor],
    keep_masks: Sequence[Tensor] | None = None,
    *,
    target: str = "decorrelate",
    reduction: str = "mean",
    coeff: float = 1.0,
    backend: str | None = None,
) -> Tensor:
    """coeff · Σ_l penalty_l over every layer in one call, penalty_l = Σ E_l² (``sum``) or Σ E_l²/N_l² (``mean``).

    E = G ⊙ (1 − m mᵀ) (``decorrelate``, TPP), G − diag(m) (``diagonal``, OPP) or G − I
    (``identity``, kernel orthogonality), G = W Wᵀ with W the layer weight viewed as N×D.
    ``reduction="none"`` returns the per-layer vector [coeff · Σ E_l²]_l, shape [L]. Differentiable in every weight.
    ``coeff`` (e.g. TPP's lw·reg) is folded into the kernels: the gradients come out scaled, so a loss
    that adds the result as it is costs no extra pass over them (``coeff * gram_penalty(...)`` costs one).
    Under torch.compile a float ``coeff`` is a constant of the graph: a coefficient that changes during
    training recompiles for every new value there, so multiply the result by it instead.
    fp16/bf16 weights accumulate in float32; the result is float64 for float64 weights, else float32.
    """
    if (type(weights) in (list, tuple) and weights and target in reference.TARGETS and reduction in reference.REDUCTIONS
            and type(coeff) in (float, int)):
        # Fast path (every training step): the C++ kernels check every argument themselves, for far
        # less than the Python checks below. An argument error falls through to the checked path, which
        # raises the error naming the argument; any other error (out of memory, a CUDA error) propagates.
        try:
            kernel = _registry.fast_op("gram_penalty", weights, backend)
            if kernel is not None and (keep_masks is None) == (target == "identity"):
                return kernel(weights, [] if target == "identity" else keep_masks, target, reduction, coeff)
        except Exception as err:
            if not is_argument_error(err):
                raise
    weights, masks = _checked_arguments(weights, keep_masks, target, reduction)
    coeff = check_coeff("coeff", coeff)
    chosen = _registry.choose_backend("gram_penalty", weights[0].device, backend)
    if chosen == "reference":
        return (coeff * reference.gram_penalty(weights, masks or None, target, reduction)).to(penalty_dtype(weights))
    return _registry.op(chosen, "gram_penalty")(weights, masks, target, reduction, coeff)


def _checked_arguments(weights, keep_masks, target, reduction) -> tuple[list[Tensor], list[Tensor]]:
    """The weights and the masks the kernels take ([] for ``identity``), every argument checked."""
    weights = check_tensor_list("weights", weights, min_dim=2)
    check_choice("target", target, reference.TARGETS)
    check_choice("reduction", reduction, reference.REDUCTIONS)
    if len({w.dtype for w in weights}) > 1:
        raise TypeError(f"weights must share one dtype, got {sorted({str(w.dtype) for w in weights})}")
    for i, w in enumerate(weights):
        if w.numel() == 0:
            raise ValueError(f"weights[{i}] is empty (shape {tuple(w.shape)}): a layer needs at least one row and one column")
    if target == "identity":
        masks = []
        if keep_masks is not None:  # not used, but checked: a wrong list is a mistake worth hearing about
            check_masks("keep_masks", keep_masks, weights, "weights")
    elif keep_masks is None:
        raise ValueError(f"keep_masks is required for target={target!r} (only 'identity' takes none)")
    else:
        masks = check_masks("keep_masks", keep_masks, weights, "weights")
    return weights, masks


@_registry.register_fake("gram_penalty_grad_")
def _fake_grad_(weights, keep_masks, grads, target, reduction, coeff, coeff_tensor):
    out = _fake(weights, keep_masks, target, reduction, coeff, False)[0]
    if len(grads) != len(weights):
        raise ValueError(f"gram_penalty_grad_: grads has {len(grads)} tensors but weights has {len(weights)}")
    for i, (g, w) in enumerate(zip(grads, weights)):
        if g.shape != w.shape or g.dtype != w.dtype or g.device != w.device:
            raise ValueError(f"gram_penalty_grad_: grads[{i}] must match weights[{i}] in shape, dtype and device")
    return out


def gram_penalty_grad_(
    weights: Sequence[Tensor],
    keep_masks: Sequence[Tensor] | None = None,
    *,
    target: str = "decorrelate",
    reduction: str = "mean",
    coeff: float | Tensor = 1.0,
    backend: str | None = None,
) -> Tensor:
    """``W_l.grad += coeff · ∂penalty/∂W_l`` for every layer, in place; returns the penalty of
    :func:`gram_penalty` (coeff · Σ_l penalty_l, or the per-layer vector for ``reduction="none"``), a
    tensor on the weights' device (no host sync).

    The whole regularizer as one call after ``loss.backward()``: the kernels add into the gradients
    themselves (GEMMs with β = 1, epilogues that add), so no gradient tensor per layer is made and no
    autograd node runs. A zero gradient is created where ``.grad`` is None; gradients of any dense layout
    (contiguous, channels_last) are updated where they are. ``coeff`` is a float or a one-element tensor
    (a schedule kept on the device never syncs, and under torch.compile never recompiles). Arguments and
    errors as :func:`gram_penalty`. Backends ``cpp``, ``cuda``, ``triton``; ``reference`` is autograd on
    :func:`fastreg.reference.gram_penalty` plus an add.
    """
    if (type(weights) in (list, tuple) and weights and target in reference.TARGETS and reduction in reference.REDUCTIONS
            and (keep_masks is None) == (target == "identity") and not torch.compiler.is_compiling()):
        # Fast path, as gram_penalty's (the kernels check every argument, and write nothing before).
        try:
            kernel = _registry.fast_op("gram_penalty_grad_", weights, backend)
            if kernel is not None:
                grads = [w.grad for w in weights]
                # (not `None in grads`: that calls Tensor.__eq__(None) on every gradient, ≈10 µs each)
                if all(g is not None for g in grads):
                    c, c_tensor = _split_coeff("coeff", coeff, weights[0].device)
                    return kernel(weights, [] if keep_masks is None else keep_masks, grads, target, reduction, c, c_tensor)
        except Exception as err:
            if not is_argument_error(err):
                raise
    weights, masks = _checked_arguments(weights, keep_masks, target, reduction)
    c, c_tensor = _split_coeff("coeff", coeff, weights[0].device)
    with torch.no_grad():
        for w in weights:
            if w.grad is None:
                w.grad = torch.zeros_like(w)  # (in the weight's layout, as autograd would make it)
    grads = [w.grad for w in weights]
    check_writable("weights", grads, ".grad")
    chosen = _registry.choose_backend("gram_penalty_grad_", weights[0].device, backend)
    if chosen == "reference":
        return _reference_grad_(weights, masks, grads, target, reduction, c if c_tensor is None else c * c_tensor)
    return _registry.op(chosen, "gram_penalty_grad_")(weights, masks, grads, target, reduction, c, c_tensor)


def _reference_grad_(weights, masks, grads, target, reduction, coeff) -> Tensor:
    """The oracle: autograd through :func:`fastreg.reference.gram_penalty`, each gradient added into grads."""
    with torch.enable_grad():
        leaves = [w.detach().requires_grad_() for w in weights]
        penalty = coeff * reference.gram_penalty(leaves, masks or None, target, reduction)
        if reduction == "none":
            d = torch.autograd.grad(penalty.sum(), leaves)
        else:
            d = torch.autograd.grad(penalty, leaves)
    with torch.no_grad():
        for g, dg in zip(grads, d):
            g.add_(dg.to(g.dtype))
    return penalty.detach().to(penalty_dtype(weights))
