"""Pruning methods in the trainer: what a method adds to a training step (:class:`Regularizer`
and one subclass per method) and which filters it keeps (:func:`prune_by_method`)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gram import gram_penalty
from ..importance import (
    ACTIVATION_IMPORTANCES,
    ActivationImportance,
    EarlyBird,
    keep_masks_from_scores,
    prune_global_count,
    weight_importance,
)
from ..pruning import OCSPruner, SlimmingLoss, TPPLoss, TPPPruner, channel_groups, l1_prune, prune, resolve_ratios, slimming_prune
from ..pruning.graph import ChannelGroup
from ..pruning.masks import ceil_count
from .config import Config

# Scores of each channel of each group, for a model (the trainer measures data-driven ones on training batches).
Scorer = Callable[[nn.Module, Sequence[ChannelGroup]], list[Tensor]]

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

    def begin_epoch(self) -> None:
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

    def __init__(self, model: nn.Module, cfg: Config, example_inputs: Tensor, ceiling: float, scorer: Scorer | None = None):
        importance: Any = cfg.importance_kind
        if importance not in ("l1", "l2"):  # TPPLoss ranks by l1 / l2 itself; other scores are given per layer
            scores = group_scores_by_layer(model, example_inputs, scorer)
            importance = lambda name, module: scores[name]  # noqa: E731
        # in_loss=False: the loss is the base loss and after_backward() adds every TPP term into .grad with two
        # fused calls (benchmarks/bench_tpp_loss.py: 11 ops per step against 128 with the terms in the loss, and
        # the faster of the two there).
        kwargs = dict(lw=cfg.lw, delta=cfg.reg_delta, interval=cfg.reg_interval, ceiling=ceiling, target=cfg.target,
                      example_inputs=example_inputs, importance=importance, in_loss=False)
        # The one place the trainer builds TPP's criterion; after_backward() is where it applies in-place terms.
        self.pruner = None
        if cfg.stabilize_iters:
            self.pruner = TPPPruner(model, cfg.pruning_ratio, stabilize_iters=cfg.stabilize_iters,
                                    zero_interval=cfg.zero_interval, zero_count=cfg.zero_count, **kwargs)
            self.criterion = self.pruner.criterion
        else:
            self.criterion = TPPLoss(model, cfg.pruning_ratio, **kwargs)
        self.objective = self.pruner or self.criterion  # the pruner refuses a step once its stabilize phase is over

    @property
    def reg(self) -> float:
        return float(self.criterion.reg)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.objective(logits, target)

    def after_backward(self) -> None:
        """Every TPP term, into ``.grad`` (the pruner applies them only while it regularizes)."""
        (self.pruner or self.criterion).apply_grad_()

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


class OrthoRegRegularizer(Regularizer):
    """OrthoReg: cross-entropy + λ·Σ_l ‖W_l W_lᵀ − I‖²_F over the filters of every prunable layer
    (one ``fastreg.gram_penalty`` call, target ``identity``, reduction ``sum``), while the importance (``fisher`` /
    ``taylor``: hooks, one step per batch, restarted every epoch) accumulates. With ``early_bird``,
    every epoch's masks at the final ratio go to :class:`fastreg.importance.EarlyBird`; the phase
    ends when the ticket is drawn."""

    def __init__(self, model: nn.Module, cfg: Config, example_inputs: Tensor, ratio: float,
                 earlier_masks: dict[str, Tensor] | None = None):
        self.model, self.kind, self.coeff = model, cfg.importance_kind, float(cfg.ortho_coeff)
        self.groups = channel_groups(model, example_inputs)
        reach = resolve_ratios(self.groups, 0.5, coupled="skip")
        self.candidates = [self.groups[i] for i, r in enumerate(reach) if r > 0]
        modules = dict(model.named_modules())
        self.weights = [modules[n].weight for g in self.candidates for n in g.producers]
        self.scorer = ActivationImportance(model, self.candidates, self.kind) if self.kind in ACTIVATION_IMPORTANCES else None
        if self.scorer is not None:
            self.scorer.attach()
        self.early_bird = EarlyBird(cfg.eb_epsilon, cfg.eb_window) if cfg.early_bird else None
        earlier = [(earlier_masks or {}).get(g.producers[0]) for g in self.candidates]
        # T0: the prunable channels of the dense model; the earlier rounds pruned pruned_so_far of them
        self.original_channels = sum(g.num_channels if m is None else m.numel() for g, m in zip(self.candidates, earlier))
        self.pruned_so_far = sum(0 if m is None else int((~m).sum()) for m in earlier)
        self.ratio = ratio

    @property
    def reg(self) -> float:
        return self.coeff

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = F.cross_entropy(logits, target)
        return loss + gram_penalty(self.weights, target="identity", reduction="sum", coeff=self.coeff) if self.coeff else loss

    def after_backward(self) -> None:
        if self.scorer is not None:
            self.scorer.step()

    def begin_epoch(self) -> None:
        if self.scorer is not None:
            self.scorer.reset()

    def scores(self) -> list[Tensor]:
        """The candidates' scores: this epoch's accumulated fisher / taylor, or the weights' l1 / l2 / bn."""
        if self.scorer is not None and self.scorer.steps:
            return self.scorer.scores()
        kind = self.kind if self.kind not in ACTIVATION_IMPORTANCES else "l1"
        return weight_importance(self.model, self.candidates, kind)

    def round_masks(self) -> list[Tensor]:
        """Keep masks of the candidates pruning exactly ⌈ratio·T0⌉ of the T0 original prunable channels
        in all (this round prunes what the earlier rounds have not): one global ranking of the scores."""
        count = ceil_count(self.ratio, self.original_channels) - self.pruned_so_far
        return prune_global_count(self.scores(), max(count, 0))

    def end_epoch(self, epoch: int) -> bool:
        return self.early_bird is not None and self.early_bird.update(self.round_masks())

    def keep_masks(self) -> dict[str, Tensor]:
        device = self.weights[0].device
        return {n: m.to(device) for g, m in zip(self.candidates, self.round_masks()) for n in g.producers}

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"scorer": None if self.scorer is None else self.scorer.state_dict(),
                "early_bird": None if self.early_bird is None else self.early_bird.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scorer is not None and state["scorer"] is not None:
            self.scorer.load_state_dict(state["scorer"])
        if self.early_bird is not None and state["early_bird"] is not None:
            self.early_bird.load_state_dict(state["early_bird"])


def group_scores_by_layer(model: nn.Module, example_inputs: Tensor, scorer: Scorer | None) -> dict[str, Tensor]:
    """Producer name → its group's channel scores (``scorer`` over the model's channel groups)."""
    groups = channel_groups(model, example_inputs)
    if scorer is None:
        raise ValueError("a data-driven or BN importance needs a scorer")
    return {n: s for g, s in zip(groups, scorer(model, groups)) for n in g.producers}


def compose_masks(earlier: dict[str, Tensor] | None, current: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep masks over the original channels after pruning ``current`` (over the channels ``earlier`` kept)."""
    out = dict(earlier or {})
    for name, keep in current.items():
        if name in out:
            full = out[name].clone()
            full[full.clone()] = keep.to(full.device)
            out[name] = full
        else:
            out[name] = keep
    return out


def physically_prune(model: nn.Module, keep_masks: dict[str, Tensor], example_inputs: Tensor) -> nn.Module:
    """``fastreg.prune``: remove the pruned filters, their BN channels and the next layers' inputs."""
    return prune(model, keep_masks, example_inputs, inplace=True)


def prune_by_method(method: str, model: nn.Module, ratio: float, example_inputs: Tensor,
                    regularizer: Regularizer | None, importance: str | None = None,
                    scorer: Scorer | None = None) -> tuple[nn.Module, dict[str, Tensor]]:
    """(pruned model, keep masks): TPP / OCSPruner / OrthoReg masks from their regularizer, the smallest
    BN |γ| under one global threshold (slim), the smallest-L1 filters (l1, and scratch's architecture)
    or, with ``importance``, the lowest scores of ``scorer`` per layer."""
    if method == "tpp":
        return regularizer.prune(model, example_inputs), regularizer.keep_masks()
    if method in ("orthoreg", "ocs"):
        masks = regularizer.keep_masks()
        return physically_prune(model, masks, example_inputs), masks
    if method == "slim":
        return slimming_prune(model, ratio, example_inputs)
    if importance is None:
        return l1_prune(model, ratio, example_inputs)
    groups = channel_groups(model, example_inputs)
    masks = keep_masks_from_scores(groups, resolve_ratios(groups, ratio), scorer(model, groups))
    return physically_prune(model, masks, example_inputs), masks

