"""fastreg: fast, exact structured-pruning regularizers for PyTorch.

    criterion = fastreg.TPPLoss(model, pruning_ratio=0.5)
    loss = criterion(model(x), y); loss.backward()

Layers of the package:
- :mod:`fastreg.reference` — every formula in plain PyTorch (the oracle);
- :mod:`fastreg._registry` — op schemas (defined once), compiled-library loading, backend choice;
- ops, one call covering every layer, backends ``reference`` / ``cpp`` / ``triton`` / ``cuda``:
  :func:`gram_penalty` (:mod:`fastreg.gram`) and the fused per-step ops of :mod:`fastreg.fused`;
- :mod:`fastreg.pruning` — TPPLoss / TPPPruner / OCSPruner, masks, physical pruning, baselines;
- :mod:`fastreg.cli`, :mod:`fastreg.train` — the ``fastreg`` command and its trainer.
"""
from . import reference
from ._registry import BACKENDS, BackendUnavailable, available_backends, choose_backend
from .fused import (
    CoupledGroups,
    PrunedSlices,
    SliceNorms,
    group_lasso_grad_,
    group_lasso_grad_grouped_,
    group_norms,
    group_saliency,
    l2_grad_,
    shrink_,
    slimming_grad_,
)
from .gram import gram_penalty, gram_penalty_grad_
from .pruning import (
    HeadPrunedAttention,
    OCSPruner,
    SlimmingLoss,
    TPPLoss,
    TPPPruner,
    count_params_flops,
    l1_prune,
    prune,
    scratch_reinit,
    select_keep_masks,
    slimming_prune,
    zero_pruned_,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "CoupledGroups",
    "HeadPrunedAttention",
    "OCSPruner",
    "PrunedSlices",
    "SliceNorms",
    "SlimmingLoss",
    "TPPLoss",
    "TPPPruner",
    "available_backends",
    "choose_backend",
    "count_params_flops",
    "gram_penalty",
    "gram_penalty_grad_",
    "group_lasso_grad_",
    "group_lasso_grad_grouped_",
    "group_norms",
    "group_saliency",
    "l1_prune",
    "l2_grad_",
    "prune",
    "reference",
    "scratch_reinit",
    "select_keep_masks",
    "shrink_",
    "slimming_grad_",
    "slimming_prune",
    "zero_pruned_",
]
__version__ = "0.1.0"
