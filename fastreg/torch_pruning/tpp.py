"""TPP (``fastreg.TPPLoss``'s objective) as a Torch-Pruning pruner, driven by Torch-Pruning's loop:

    pruner = fastreg.torch_pruning.TPPPruner(model, example_inputs, pruning_ratio=0.5)
    loss = criterion(model(x), y); loss.backward()
    pruner.regularize(model)        # every TPP term into .grad; advances the GReg schedule
    optimizer.step()
    ...
    pruner.step()                   # prunes the masked channels through Torch-Pruning's graph
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from ..pruning.attention import pruned_heads, remove_heads_
from ..pruning.graph import out_channel_handler
from ..pruning.masks import RatioSpec
from ..pruning.tpp import TPPLoss


class _KeepMaskImportance(tp.importance.Importance):
    """Scores for Torch-Pruning's own selection: 1 for a channel TPP keeps, 0 for one it prunes (1 for
    every channel of a group TPP leaves alone)."""

    def __init__(self, pruner: "TPPPruner"):
        self.pruner = pruner

    def __call__(self, group):
        n = len(group[0].idxs)
        keep = self.pruner._keep_of(group[0].dep.target.module)
        return torch.ones(n) if keep is None or keep.numel() != n else keep.float().cpu()


class TPPPruner(tp.pruner.BasePruner):
    """TPP as a Torch-Pruning pruner. The objective is ``fastreg.TPPLoss``'s (``pruning_ratio`` and the
    keyword arguments as there: ``lw``, ``delta``, ``interval``, ``ceiling``, ``target``, ``bn_terms``,
    ``importance``, ``skip``, ``scope``, ``coupled``, ``backend``), applied in place:
    :meth:`regularize` after ``backward()`` adds lw·reg·∂(Σ_l mean E_l²)/∂W and reg·(W_P, b_P, γ_P, β_P) to the
    gradients, then the schedule advances (reg_k = min(τ, Δ·⌊k/K_u⌋), k counting training-mode calls).
    :meth:`step` prunes TPP's pruned channels through Torch-Pruning's dependency graph (and removes pruned
    attention heads as ``fastreg.prune`` does: Torch-Pruning's graph has no head-only group); ``regularize``
    does nothing afterwards. Further keyword arguments go to ``tp.pruner.BasePruner``."""

    def __init__(self, model: nn.Module, example_inputs, pruning_ratio: RatioSpec = 0.5, *, lw: float = 1000.0,
                 delta: float = 1e-4, interval: int = 10, ceiling: float = 1.0, target: str = "decorrelate",
                 bn_terms: bool = True, importance="l1", skip=(), scope: str = "layer", coupled: str = "skip",
                 backend: str | None = None, **tp_kwargs):
        self.criterion = TPPLoss(model, pruning_ratio, lw=lw, delta=delta, interval=interval, ceiling=ceiling,
                                 target=target, bn_terms=bn_terms, in_loss=False, importance=importance, skip=skip,
                                 scope=scope, coupled=coupled, example_inputs=example_inputs, backend=backend)
        tp_ratio = float(pruning_ratio) if isinstance(pruning_ratio, (int, float)) else 0.0
        modes = {m: m.training for m in model.modules()}
        super().__init__(model, example_inputs, importance=_KeepMaskImportance(self), pruning_ratio=tp_ratio, **tp_kwargs)
        for m, training in modes.items():  # (tracing leaves the model in eval mode; the schedule reads the flag)
            m.training = training
        self.pruned = False

    def _keep_of(self, module: nn.Module):
        names = {m: n for n, m in self.model.named_modules()}
        return self.criterion.keep_masks.get(names.get(module))

    def update_regularizer(self):
        """The TPP masks are fixed until :meth:`step`: nothing to update."""

    @torch.no_grad()
    def regularize(self, model=None, bias=None):
        """Every TPP term into ``.grad`` (after ``backward()``), then the schedule's next step."""
        if self.pruned:
            return
        self._apply_tpp_terms()

    def _apply_tpp_terms(self) -> None:
        """This step's reg (advancing the schedule in training mode, as ``TPPLoss``'s forward does), then every
        TPP term into ``.grad``: ``TPPLoss.apply_grad_`` (two fused calls)."""
        self.criterion.step_schedule()
        self.criterion.apply_grad_()

    def step(self, interactive: bool = False):
        """Prune TPP's pruned channels (and every slice coupled to them) through Torch-Pruning's graph; with
        ``interactive=True``, yield the groups instead (call ``group.prune()`` on each)."""
        heads = pruned_heads(self.criterion._group_masks)
        if interactive and heads:
            raise ValueError(f"interactive=True yields Torch-Pruning groups, and the pruned attention heads of "
                             f"{[n for n, _ in heads]} are not one: call step() without interactive")
        groups = self._pruning_groups()
        self.pruned = True
        self.current_step += 1
        if interactive:
            return iter(groups)
        for group in groups:
            group.prune()
        for name, keep in heads:
            remove_heads_(self.model, name, keep)

    def _pruning_groups(self) -> list:
        modules = dict(self.model.named_modules())
        out = []
        for g, keep in self.criterion._group_masks:
            pruned = (~keep).nonzero().flatten().tolist()
            if pruned and not g.heads:
                root = modules[g.producers[0]]
                out.append(self.DG.get_pruning_group(root, out_channel_handler(root), idxs=pruned))
        return out
