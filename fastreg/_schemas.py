"""The op schemas of fastreg, written once: :mod:`fastreg._registry` defines them with torch.library,
and the build stamps their digest into the compiled library (``-DFASTREG_SCHEMA_DIGEST``, from
``tools/build_env.py``), so that a library built from other schemas is refused with a warning at
import instead of aborting the process. This module imports nothing but :mod:`hashlib`: the build reads
it without importing torch or fastreg."""
import hashlib

# name -> schema (arguments and returns). Optional float-or-tensor coefficients are passed as
# (float c, Tensor? c_tensor): the kernel uses c · c_tensor when the tensor is given, so a
# schedule kept on the device never forces a host sync.
SCHEMAS = {
    # §1.1: the penalty (differentiable; autograd in csrc/gram_penalty_autograd.cpp) over the backends'
    # kernel op, which also returns ∂penalty_l/∂W_l (reduction applied) per layer when need_grad.
    # coeff: a factor on the penalty (so on its gradients too), folded into the kernels.
    "gram_penalty": "(Tensor[] weights, Tensor[] keep_masks, str target, str reduction, float coeff=1.0) -> Tensor",
    "gram_penalty_and_grads": "(Tensor[] weights, Tensor[] keep_masks, str target, str reduction, float coeff,"
    " bool need_grad) -> (Tensor, Tensor[])",
    # The same penalty, returned, with coeff · coeff_tensor · ∂penalty_l/∂W_l added into grads[l] in place
    # (any dense layout) by the kernels themselves: no per-layer gradient tensor.
    "gram_penalty_grad_": "(Tensor[] weights, Tensor[] keep_masks, Tensor(a!)[] grads, str target, str reduction,"
    " float coeff, Tensor? coeff_tensor) -> Tensor",
    # §1.2–1.4: per-step ops over every tensor of a model.
    # The norms of every tensor's slices: one tensor per input in its dtype (group_norms), or all of
    # them concatenated in list order in the tensors' promoted dtype (group_norms_flat).
    "group_norms": "(Tensor[] tensors, int p, int dim) -> Tensor[]",
    "group_norms_flat": "(Tensor[] tensors, int p, int dim) -> Tensor",
    "group_saliency": "(Tensor[] tensors, int[] dims, Tensor[] group_ids, int num_groups) -> Tensor",
    # Masked in-place ops: keep_masks[i] (bool, True = kept) runs along dims[i] of tensor i
    # (0: output filters / rows, 1: input channels / columns); only the pruned slices change.
    "l2_grad_": "(Tensor(a!)[] grads, Tensor[] params, Tensor[] keep_masks, int[] dims, float coeff,"
    " Tensor? coeff_tensor) -> ()",
    "shrink_": "(Tensor(a!)[] tensors, Tensor[] keep_masks, int[] dims, float factor, Tensor? factor_tensor) -> ()",
    "group_lasso_grad_": "(Tensor(a!)[] grads, Tensor[] params, Tensor[] keep_masks, int[] dims, float lam,"
    " Tensor? lam_tensor) -> ()",
    # Coupled groups: slice j of params[i] along dims[i] is in group group_ids[i][j] (int64, -1: none).
    "group_lasso_grad_grouped_": "(Tensor(a!)[] grads, Tensor[] params, int[] dims, Tensor[] group_ids,"
    " Tensor pruned_groups, float lam, Tensor? lam_tensor) -> ()",
    "slimming_grad_": "(Tensor(a!)[] grads, Tensor[] bn_weights, float s, Tensor? s_tensor) -> ()",
    # Per-group coefficients (Torch-Pruning's regularizing pruners), slices grouped as above:
    # Σ ‖slice‖² of every group; grad[slice] += coeff · group_coeffs[group] · slice; DepGraph's γ per segment.
    "group_sq_sums": "(Tensor[] tensors, int[] dims, Tensor[] group_ids, int num_groups) -> Tensor",
    "l2_grad_grouped_": "(Tensor(a!)[] grads, Tensor[] params, int[] dims, Tensor[] group_ids, Tensor group_coeffs,"
    " float coeff, Tensor? coeff_tensor) -> ()",
    "group_norm_gamma": "(Tensor importance, Tensor segment_offsets, float alpha, bool guard) -> Tensor",
}


def schema_digest(schemas: dict[str, str] = SCHEMAS) -> str:
    """16 hex digits of the SHA-256 of every ``name(schema)``, in name order."""
    text = "\n".join(f"{name}{schema}" for name, schema in sorted(schemas.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
