"""The baselines TPP is compared against (DESIGN.md §1.4).

* :func:`l1_prune` — L1-norm filter pruning (Li et al. 2017): prune the filters of smallest
  Σ|w| per layer, physically, with the same ratio rules as :class:`fastreg.TPPLoss` (so both reach
  the same architecture for the same ``pruning_ratio``).
* :class:`SlimmingLoss` + :func:`slimming_prune` — network slimming (Liu et al. 2017): train with
  + s·Σ|γ| over every BatchNorm scale, then prune the channels of smallest |γ| under one global
  threshold.
* :func:`scratch_reinit` — the pruned architecture re-initialized with the model family's own
  init, to train from scratch (Liu et al. 2019).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..fused import slimming_grad_
from .graph import NORM_TYPES, channel_groups
from .masks import RatioSpec, global_pruned_counts, keep_lowest_pruned, layer_keep_masks, resolve_ratios, select_keep_masks
from .physical import prune


def l1_prune(
    model: nn.Module,
    pruning_ratio: RatioSpec,
    example_inputs=None,
    *,
    skip: Sequence[str] = (),
    coupled: str = "skip",
    scope: str = "layer",
) -> tuple[nn.Module, dict[str, Tensor]]:
    """(pruned copy of ``model``, keep masks): the filters of smallest L1 norm removed."""
    groups = channel_groups(model, example_inputs)
    ratios = resolve_ratios(groups, pruning_ratio, skip=skip, coupled=coupled)
    masks = layer_keep_masks(groups, select_keep_masks(model, groups, ratios, importance="l1", scope=scope))
    return prune(model, masks, example_inputs), masks


def bn_scales(model: nn.Module) -> list[Tensor]:
    """γ of every affine BatchNorm layer, in model order."""
    return [m.weight for m in model.modules() if isinstance(m, NORM_TYPES) and m.affine]


class SlimmingLoss(nn.Module):
    """Network slimming criterion: ``base(logits, labels) + s · Σ|γ|`` over every BatchNorm γ.

    With ``in_loss=False`` the penalty is not in the loss; call :meth:`apply_grad_` after
    ``backward()``: grad(γ) += s·sign(γ) in one fused ``slimming_grad_`` call (the original code's
    ``updateBN``).
    """

    def __init__(self, model: nn.Module, s: float = 1e-4, *, criterion: Callable | None = None, in_loss: bool = True):
        super().__init__()
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise ValueError(f"s must be a finite number >= 0, got {s!r}")
        object.__setattr__(self, "model", model)
        self.base = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.s, self.in_loss = float(s), in_loss
        self.scales = bn_scales(model)
        if not self.scales:
            raise ValueError("model has no affine BatchNorm layer: network slimming needs BN scales γ")

    def penalty(self) -> Tensor:
        """Σ|γ| over every BN (a constant number of ops)."""
        return torch.stack(torch._foreach_norm(self.scales, 1)).sum()

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        loss = self.base(logits, labels)
        return loss + self.s * self.penalty() if self.in_loss and self.s else loss

    @torch.no_grad()
    def apply_grad_(self) -> None:
        if self.in_loss:
            raise RuntimeError("apply_grad_() is for in_loss=False; here s·Σ|γ| is already in the loss")
        if self.s:
            slimming_grad_(self.scales, self.s)


def slimming_prune(
    model: nn.Module,
    pruning_ratio: float,
    example_inputs=None,
    *,
    skip: Sequence[str] = (),
    coupled: str = "skip",
) -> tuple[nn.Module, dict[str, Tensor]]:
    """(pruned copy, keep masks): one global ranking of |γ| (the mean |γ| over a coupled group's
    BNs; groups without a BN are left as they are) prunes the ⌈r·T⌉ smallest of the T candidate
    channels (at most T − 1, and ⌊0.995·N⌋ per layer; equal |γ|, e.g. γ = 0, rank in model order: :func:`~fastreg.pruning.masks.global_pruned_counts`)."""
    if isinstance(pruning_ratio, (dict, str)):
        raise ValueError("slimming_prune takes one float pruning_ratio (a global |γ| threshold)")
    groups = channel_groups(model, example_inputs)
    ratios = resolve_ratios(groups, pruning_ratio, skip=skip, coupled=coupled)
    modules = dict(model.named_modules())
    if not any(r > 0 and _bn_slices(g) for g, r in zip(groups, ratios)):
        raise ValueError("no layer the ratio reaches has a BatchNorm after it: network slimming cannot rank channels")
    scores = []  # groups without a BatchNorm (e.g. squeeze-excitation layers) are not ranked
    for g, r in zip(groups, ratios):
        norms = [s.channel_mean(modules[s.module].weight.detach().abs(), g.num_channels) for s in _bn_slices(g)]
        scores.append(torch.stack(norms).mean(0).cpu() if r > 0 and norms else None)
    scored = [i for i, s in enumerate(scores) if s is not None]
    group_masks: list[Tensor | None] = [None] * len(groups)
    for i, count in zip(scored, global_pruned_counts([scores[i] for i in scored], pruning_ratio)):
        group_masks[i] = keep_lowest_pruned(scores[i], count).to(modules[groups[i].producers[0]].weight.device)
    masks = layer_keep_masks(groups, group_masks)
    return prune(model, masks, example_inputs), masks


def _bn_slices(group) -> list:
    """The γ slices of the BatchNorm layers acting on a group's channels."""
    return [s for s in group.slices if s.module in group.norms and s.param == "weight" and s.role == "output"]


def kaiming_fan_out_init_(module: nn.Module) -> None:
    """The init of the CIFAR ResNets, VGG-19 and torchvision's ResNets: Conv2d weights Kaiming-normal
    with fan-out and ReLU gain, N(0, 2 / (out_channels·k²)); BatchNorm γ = 1, β = 0; other modules as they are."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, NORM_TYPES) and module.affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def family_init(model: nn.Module) -> Callable[[nn.Module], None] | None:
    """The init the model's family applies after construction (``fastreg.models``):
    :func:`kaiming_fan_out_init_` for the CIFAR ResNets, VGG and torchvision ResNets, None (PyTorch's
    ``reset_parameters()`` defaults) for the others (MLP-7-Linear, the digits CNN)."""
    from ..models.cifar_resnet import CifarResNet
    from ..models.vgg import VGG

    families: tuple[type, ...] = (CifarResNet, VGG)
    try:
        from torchvision.models import ResNet

        families += (ResNet,)
    except ImportError:  # torchvision is optional
        pass
    return kaiming_fan_out_init_ if isinstance(model, families) else None


def scratch_reinit(
    model: nn.Module, seed: int | None = None, init: Callable[[nn.Module], None] | None = None
) -> nn.Module:
    """A copy of ``model`` (e.g. a pruned architecture) with every layer freshly initialized, for
    training from scratch: ``reset_parameters()``, BN running stats reset, then ``init(module)`` for
    every module — by default the model family's own init (:func:`family_init`, e.g. Kaiming-normal
    fan-out for the CIFAR ResNets), so that the statistics are those of a freshly built model."""
    init = init if init is not None else family_init(model)
    fresh = copy.deepcopy(model)
    generator_state = torch.random.get_rng_state() if seed is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for m in fresh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            elif hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
        if init is not None:
            fresh.apply(init)
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    return fresh
