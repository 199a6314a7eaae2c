"""Pruning methods in the trainer: what a method adds to a training step (:class:`Regularizer`
and one subclass per method) and which filters it keeps (:func:`prune_by_method`)."""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..pruning import OCSPruner, SlimmingLoss, TPPLoss, TPPPruner, l1_prune, prune, slimming_prune
from .config import Config

class Regularizer:
    """What a method adds to a training step. ``loss`` returns the objective, ``after_backward``
    edits gradients in place; ``keep_masks`` (module name → bool, True = kept) picks the filters."""

    reg: float | None = None

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target)

    def after_backward(self) -> None:
        pass

    def after_step(self, lr: float) -> None:
        pass

    def end_epoch(self, epoch: int) -> bool:
        """Called after every epoch; True ends the phase early (OCSPruner decided to prune)."""
        return False

    def keep_masks(self) -> dict[str, Tensor] | None:
        """The filters this method keeps, if it has chosen them already (TPP, OCSPruner)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TPPRegularizer(Regularizer):
    """TPP: ``fastreg.TPPLoss`` (gram decorrelation + growing L2 / BN terms on pruned filters) with reg
    capped at ``ceiling``; with a stabilize phase (``stabilize_iters`` > 0) inside
    ``fastreg.pruning.TPPPruner``, which holds reg there for ``stabilize_iters`` iterations while it zeroes
    the pruned filters, biases, BN γ and β of the i-th Conv/Linear layer after every step from stabilize
    iteration (i + 1)·``zero_interval`` on, and prunes at the end of it."""

    def __init__(self, model: nn.Module, cfg: Config, example_inputs: Tensor, ceiling: float):
        kwargs = dict(lw=cfg.lw, delta=cfg.reg_delta, interval=cfg.reg_interval, ceiling=ceiling, target=cfg.target,
                      example_inputs=example_inputs)
        self.pruner = None
        if cfg.stabilize_iters:
            self.pruner = TPPPruner(model, cfg.pruning_ratio, stabilize_iters=cfg.stabilize_iters,
                                                    zero_interval=cfg.zero_interval, **kwargs)
            self.criterion = self.pruner.criterion
        else:
            self.criterion = TPPLoss(model, cfg.pruning_ratio, **kwargs)
        self.objective = self.pruner or self.criterion  # the pruner refuses a step once its stabilize phase is over

    @property
    def reg(self) -> float:
        return float(self.criterion.reg)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.objective(logits, target)

    def after_step(self, lr: float) -> None:
        if self.pruner is not None:
            self.pruner.step()

    def keep_masks(self) -> dict[str, Tensor]:
        return dict(self.criterion.keep_masks)

    def prune(self, model: nn.Module, example_inputs: Tensor) -> nn.Module:
        """The pruned model: ``TPPPruner.prune`` (zero every pruned slice, remove it; it refuses before the
        end of the stabilize phase), or without a stabilize phase the pruned filters removed."""
        if self.pruner is not None:
            return self.pruner.prune(example_inputs)
        return physically_prune(model, self.keep_masks(), example_inputs)

    def state_dict(self) -> dict[str, Any]:
        return (self.pruner or self.criterion).state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        (self.pruner or self.criterion).load_state_dict(state)


class SlimRegularizer(Regularizer):
    """Network slimming (Liu et al. 2017): ``fastreg.pruning.SlimmingLoss``, base loss + s·Σ|γ|
    over every BatchNorm scale; the masks come from one global |γ| threshold at pruning time."""

    def __init__(self, model: nn.Module, cfg: Config):
        self.criterion = SlimmingLoss(model, cfg.slim_s)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.criterion(logits, target)


class OCSRegularizer(Regularizer):
    """OCSPruner one-cycle sparsity learning (``fastreg.pruning.OCSPruner``): group lasso after
    backward, in-place shrinkage after the step, the partition / stability schedule per epoch.
    ``pruning_ratio`` is OCSPruner's target fraction of FLOPs removed."""

    def __init__(self, model: nn.Module, cfg: Config, example_inputs: Tensor):
        self.pruner = OCSPruner(
            model, cfg.pruning_ratio, example_inputs=example_inputs, window=cfg.ocs_window, start_tol=cfg.ocs_start_tol,
            prune_tol=cfg.ocs_prune_tol, lam_init=cfg.ocs_lam_init, lam_delta=cfg.ocs_lam_delta,
            lam_interval=cfg.ocs_lam_interval,
        )

    @property
    def reg(self) -> float:
        return float(self.pruner.lam)

    def after_backward(self) -> None:
        self.pruner.apply_grad_()

    def after_step(self, lr: float) -> None:
        self.pruner.shrink_(lr)

    def end_epoch(self, epoch: int) -> bool:
        return self.pruner.end_epoch() == "prune"

    def keep_masks(self) -> dict[str, Tensor]:
        masks = dict(self.pruner.keep_masks)
        if not masks:  # the schedule never decided to prune: the current partition
            partition = self.pruner.partition()
            masks = {n: m for g, m in zip(self.pruner.groups, partition) if not bool(m.all()) for n in g.producers}
        return masks

    def state_dict(self) -> dict[str, Any]:
        return self.pruner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruner.load_state_dict(state)


def physically_prune(model: nn.Module, keep_masks: dict[str, Tensor], example_inputs: Tensor) -> nn.Module:
    """``fastreg.prune``: remove the pruned filters, their BN channels and the next layers' inputs."""
    return prune(model, keep_masks, example_inputs, inplace=True)


def prune_by_method(method: str, model: nn.Module, ratio: float, example_inputs: Tensor,
                    regularizer: Regularizer | None) -> tuple[nn.Module, dict[str, Tensor]]:
    """(pruned model, keep masks): TPP / OCSPruner masks from their regularizer, the smallest BN
    |γ| under one global threshold (slim), the smallest-L1 filters (l1, and scratch's architecture)."""
    if method == "tpp":
        return regularizer.prune(model, example_inputs), regularizer.keep_masks()
    if method == "ocs":
        masks = regularizer.keep_masks()
        return physically_prune(model, masks, example_inputs), masks
    if method == "slim":
        return slimming_prune(model, ratio, example_inputs)
    return l1_prune(model, ratio, example_inputs)

