"""Torch-Pruning's regularizing pruners with fastreg's fused ``regularize()``: change ``tp.pruner.X`` to
``fastreg.torch_pruning.X`` and nothing else.

    pruner = fastreg.torch_pruning.GroupNormPruner(model, example_inputs, importance=imp, pruning_ratio=0.5)
    for epoch in range(epochs):
        pruner.update_regularizer()
        for x, y in loader:
            loss = criterion(model(x), y); loss.backward()
            pruner.regularize(model)          # after backward, before optimizer.step()
            optimizer.step()
    pruner.step()                             # physical pruning (Torch-Pruning's own)

:class:`GroupNormPruner`, :class:`GrowingRegPruner` and :class:`BNScalePruner` subclass Torch-Pruning's
classes of the same name (constructor, ``step()``, ``update_regularizer()``, ``update_reg()`` and the
pruning results are theirs). ``regularize()`` computes Torch-Pruning 1.6.1's formula term by term, from
plans built when the groups or the coefficients change: every slice a group regularizes (producer
filters along dim 0, consumer input columns along dim 1, BatchNorm/LayerNorm channels; grouped convs
and flattened Linear inputs as Torch-Pruning maps them) carries the id of its group channel, and a
call is ≤ 4 ops whatever the depth of the model (:class:`fastreg.fused.GroupedSlices`):

* GroupNorm (DepGraph): ``grad[slice] += reg · γ_c · slice``, γ_c = α^((max imp − imp_c)/(max imp − min imp))
  within each group, imp = √(group importance): ``group_sq_sums`` → ``group_norm_gamma`` → ``l2_grad_grouped_``
  (with ``GroupMagnitudeImportance(p=2)`` and a group reduction / normalizer that scales a group by one
  factor, which γ does not see; other importances are called group by group, as Torch-Pruning does);
* GrowingReg: ``grad[slice] += reg_c · slice`` with the grown per-channel coefficients: one ``l2_grad_grouped_``;
* BNScale: ``grad(γ) += reg · sign(γ)`` (one ``slimming_grad_``), or with ``group_lasso=True``
  ``grad(γ_c) += reg · γ_c / √(mean_BN γ_c² + 1e-9)``: ``group_sq_sums``, two element-wise ops, ``l2_grad_grouped_``.

Where Torch-Pruning 1.6.1 is wrong, these classes differ by default and ``torch_pruning_compat=True``
reproduces it:

* GrowingReg's BatchNorm term (``grad.data[idxs].add_`` updates a copy, so it is lost): applied;
* GrowingReg's ``update_regularizer()`` resets every grown coefficient to ``reg``: groups that are
  still there with the same channels keep theirs;
* GroupNorm's ``alpha`` constructor argument is unused (``regularize`` takes α = 16): ``regularize(model)``
  uses 2^alpha (16 for the default alpha = 4); an explicit ``regularize(model, alpha=...)`` wins;
* GroupNorm divides by max − min unguarded (a group of equal importances gives NaN gradients): γ = 1 there.

Other differences, not switchable: no host sync per call, so GrowingReg does not skip a group whose
importance is NaN (Torch-Pruning recomputes every group's importance each call just for that check),
and BNScale's group lasso skips the groups that hold no BatchNorm (Torch-Pruning raises a TypeError
on them, e.g. on a ViT).

The three ops have CPU kernels (the ``cpp`` backend); on CUDA tensors they run through the ``reference``
backend (per-tensor PyTorch ops, still no host sync).

:class:`TPPPruner` is TPP (``fastreg.TPPLoss``'s objective) as a Torch-Pruning pruner: ``regularize()``
after ``backward()`` adds every TPP term to the gradients and advances the GReg schedule; ``step()``
prunes the masked channels through Torch-Pruning's dependency graph.
"""
from .pruners import BNScalePruner, GroupNormPruner, GrowingRegPruner
from .tpp import TPPPruner

__all__ = ["BNScalePruner", "GroupNormPruner", "GrowingRegPruner", "TPPPruner"]
