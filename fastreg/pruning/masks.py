"""Which filters to prune: pruning ratios per layer, importance scores, keep masks.

Semantics of the original TPP / GReg code (``pruner/prune_utils.py``):

* ``pruning_ratio`` is a float, or a dict ``{name pattern: ratio}`` (``fnmatch`` patterns over
  module names, the last matching pattern wins, unmatched layers get 0), or the same as a string
  ``"*layer*.conv1:0.9,*layer*.conv2:0.5"``. ``skip`` patterns force 0.
* A layer of N filters with ratio r prunes ⌈r·N⌉ filters, at most ⌊0.995·N⌋, those of smallest
  score (r·N rounded to 9 decimals first, so that 0.07·100 = 7.000000000000001 prunes 7, not 8).
  Default score (``importance="l1"``): mean |w| over the filter (the L1 norm up to a per-layer
  constant); ``"l2"``: root-mean-square of the filter; or a callable
  ``importance(name, module) -> Tensor[N]`` (higher = more important).
* ``scope="global"``: one float ratio over all candidate filters: the k = ⌈r·T⌉ (at most T − 1)
  smallest of the T pooled scores are pruned (a stable sort: equal scores in pooled order, so that
  ties at the threshold still prune exactly k), at most ⌊0.995·N⌋ in a layer.

Which layers a ratio reaches is read from the graph (:mod:`fastreg.pruning.graph`): a float ratio
applies to block-internal layers (one producer feeding one consumer, through depthwise convs and
squeeze-excitation gates); patterns reach any layer whose outputs feed another layer. Per family:

* ResNet / ResNeXt / Wide-ResNet / RegNet: the first convs of each block (grouped convs keep the
  same positions in every group); VGG, AlexNet, MLP: every layer but the classifier.
* MobileNet v2/v3, EfficientNet v1/v2, MnasNet: the expanded hidden channels of each
  inverted-residual block (expand conv → depthwise conv → project conv) and the squeeze-excitation
  bottlenecks; DenseNet: the bottleneck convs; GoogLeNet / Inception: the branch-internal convs.
* ViT, ConvNeXt: the MLP hidden dims (residual streams, normalized by LayerNorm, are never pruned).
  Attention heads are pruned when asked: a dict pattern naming the ``nn.MultiheadAttention``
  modules (``{"*mlp.0": 0.5, "*self_attention": 0.5}``) prunes ⌈r·H⌉ of each one's H heads, ranked
  by the mean score of each head's q, k and v rows; a float ratio alone leaves heads untouched.

To change it, pass a dict of name patterns (``{"*mlp.0": 0.3}``), ``skip`` patterns, or
``coupled="group"`` for residual-coupled channels normalized by BatchNorm. Residual-coupled layers share one mask, so they are pruned only with
``coupled="group"``: then the whole coupled group takes one ratio and one mask, chosen by group
saliency S(g) = (Σ_{w∈g} ‖w‖₂/√|w|)/|g| over all its coupled slices (a callable importance is
summed over the group's layers instead).
"""
from __future__ import annotations

import math
from fnmatch import fnmatch
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from ..fused import group_saliency
from .graph import ChannelGroup, producer_weight

RatioSpec = Union[float, Mapping[str, float], str]
Importance = Union[str, Callable[[str, nn.Module], Tensor]]
IMPORTANCES = ("l1", "l2")
SCOPES = ("layer", "global")
COUPLED = ("skip", "group")
MAX_PRUNED_FRACTION = 0.995  # the original code never prunes more than ⌊0.995·N⌋ of a layer


def ceil_count(ratio: float, n: int) -> int:
    """⌈ratio·n⌉ of ratio·n rounded to 9 decimals: the float error of the product (0.07·100 =
    7.000000000000001) does not add one."""
    return math.ceil(round(ratio * n, 9))


def num_pruned(ratio: float, n: int) -> int:
    """⌈ratio·n⌉ filters, at most ⌊0.995·n⌋ (the original ``pick_pruned_layer``)."""
    return min(ceil_count(ratio, n), int(n * MAX_PRUNED_FRACTION))


def global_pruned_counts(scores: Sequence[Tensor], ratio: float) -> list[int]:
    """Per layer, how many of its scores are among the k = min(⌈ratio·T⌉, T − 1) smallest of all T
    pooled scores (stable sort: equal scores rank in pooled order), at most ⌊0.995·N⌋ per layer.
    Each layer then prunes its that many smallest (:func:`keep_lowest_pruned`, the same stable order)."""
    sizes = [s.numel() for s in scores]
    pooled = torch.cat([s.detach().cpu() for s in scores])
    k = min(ceil_count(ratio, pooled.numel()), pooled.numel() - 1)
    pruned = torch.zeros(pooled.numel(), dtype=torch.long)
    pruned[torch.sort(pooled, stable=True).indices[:k]] = 1
    return [min(int(c.sum()), int(n * MAX_PRUNED_FRACTION)) for c, n in zip(pruned.split(sizes), sizes)]


def _check_ratio(name: str, ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(ratio).__name__}")
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {ratio}")
    return ratio


def parse_ratio_spec(pruning_ratio: RatioSpec) -> float | dict[str, float]:
    """A float in [0, 1), or a dict of pattern → ratio (a string ``"pat:r,pat:r"`` is parsed)."""
    if isinstance(pruning_ratio, str):
        spec = {}
        for item in filter(None, (s.strip() for s in pruning_ratio.split(","))):
            pattern, sep, value = item.rpartition(":")
            if not sep or not pattern:
                raise ValueError(f"pruning_ratio entry {item!r} must look like 'pattern:ratio', e.g. '*layer*.conv1:0.5'")
            try:
                spec[pattern] = float(value)
            except ValueError:
                raise ValueError(f"pruning_ratio entry {item!r}: {value!r} is not a number") from None
        if not spec:
            raise ValueError("pruning_ratio string is empty; expected 'pattern:ratio,...'")
        pruning_ratio = spec
    if isinstance(pruning_ratio, Mapping):
        if not pruning_ratio:
            raise ValueError("pruning_ratio dict is empty")
        out = {}
        for pattern, ratio in pruning_ratio.items():
            if not isinstance(pattern, str):
                raise TypeError(f"pruning_ratio keys must be name patterns (str), got {type(pattern).__name__}")
            out[pattern] = _check_ratio(f"pruning_ratio[{pattern!r}]", ratio)
        return out
    return _check_ratio("pruning_ratio", pruning_ratio)


def resolve_ratios(
    groups: Sequence[ChannelGroup],
    pruning_ratio: RatioSpec,
    *,
    skip: Sequence[str] = (),
    coupled: str = "skip",
) -> list[float]:
    """One ratio per group (0 = not pruned), with clear errors for patterns that reach nothing."""
    if coupled not in COUPLED:
        raise ValueError(f"coupled must be one of {COUPLED}, got {coupled!r}")
    if isinstance(skip, str):
        skip = (skip,)
    spec = parse_ratio_spec(pruning_ratio)
    layer_names = [n for g in groups for n in g.producers]
    if not any(g.prunable for g in groups):
        raise ValueError(
            "model has no prunable layer: no Conv/Linear layer's outputs feed another layer "
            f"(layers found: {layer_names or 'none'})"
        )
    for pattern in skip:
        if not any(fnmatch(n, pattern) for n in layer_names):
            raise ValueError(f"skip pattern {pattern!r} matches no Conv/Linear layer (layers: {_preview(layer_names)})")

    def skipped(group: ChannelGroup) -> bool:
        return any(fnmatch(n, p) for n in group.producers for p in skip)

    ratios = []
    if isinstance(spec, float):
        for g in groups:
            reach = g.prunable and not g.heads and (g.internal or (coupled == "group" and g.coupled))
            ratios.append(spec if reach and not skipped(g) else 0.0)
        if spec > 0 and not any(ratios):
            raise ValueError(
                "pruning_ratio reaches no layer: the model has no block-internal prunable layer"
                + (" (its prunable layers are residual-coupled: pass coupled='group')" if coupled == "skip" else "")
                + (f" outside skip={list(skip)}" if skip else "")
            )
        return ratios

    # dict of patterns: the last matching pattern wins, per layer
    def layer_ratio(name: str) -> float | None:
        r = None
        for pattern, value in spec.items():
            if fnmatch(name, pattern):
                r = value
        return r

    reached = {p: False for p in spec}
    for g in groups:
        assigned = {n: layer_ratio(n) for n in g.producers}
        given = {n: r for n, r in assigned.items() if r is not None}
        ratio = 0.0
        if given and g.prunable and not skipped(g) and (not g.coupled or coupled == "group"):
            values = set(given.values())
            if len(values) > 1:
                raise ValueError(
                    f"residual-coupled layers {g.producers} share one mask but got different ratios {given}"
                )
            ratio = values.pop()
            for p in spec:
                if any(fnmatch(n, p) for n in given):
                    reached[p] = True
        ratios.append(ratio)
    for pattern, ok in reached.items():
        if ok:
            continue
        matched = [n for n in layer_names if fnmatch(n, pattern)]
        if not matched:
            raise ValueError(f"pruning_ratio pattern {pattern!r} matches no Conv/Linear layer (layers: {_preview(layer_names)})")
        why = _why_unreachable(groups, matched, skip, coupled)
        raise ValueError(f"pruning_ratio pattern {pattern!r} matches only layers that cannot be pruned: {why}")
    return ratios


def _preview(names: Sequence[str], k: int = 8) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def _why_unreachable(groups, matched, skip, coupled) -> str:
    reasons = []
    for g in groups:
        hits = [n for n in g.producers if n in matched]
        if not hits:
            continue
        if g.blocked:
            reasons.append(f"{hits} cannot be pruned exactly: {g.blocked}")
        elif not g.prunable:
            reasons.append(f"{hits} produce the model's outputs")
        elif any(fnmatch(n, p) for n in g.producers for p in skip):
            reasons.append(f"{hits} are skipped")
        elif g.coupled and coupled == "skip":
            reasons.append(f"{hits} are residual-coupled with {g.producers} (pass coupled='group' to prune them jointly)")
    return "; ".join(reasons)


# ---------------------------------------------------------------------------------------------
# scores and masks
# ---------------------------------------------------------------------------------------------
def filter_scores(module: nn.Module, importance: str) -> Tensor:
    """Per-filter score of one layer: mean |w| (``l1``) or √(mean w²) (``l2``)."""
    weight = producer_weight(module).detach()
    rows = weight.reshape(weight.shape[0], -1).float()
    if importance == "l1":
        return rows.abs().mean(1)
    return rows.square().mean(1).sqrt()


def group_slices_saliency(model: nn.Module, group: ChannelGroup) -> Tensor:
    """OCSPruner group saliency of each channel of ``group`` over all its coupled slices."""
    modules = dict(model.named_modules())
    tensors, dims, ids = [], [], []
    for s in group.slices:
        t = getattr(modules[s.module], s.param).detach()
        gid = torch.full((t.shape[s.dim],), -1, dtype=torch.long, device=t.device)
        gid[s.index.to(t.device)] = s.channel.to(t.device)
        tensors.append(t)
        dims.append(s.dim)
        ids.append(gid)
    return group_saliency(tensors, dims, ids, group.num_channels).float()


def group_scores(model: nn.Module, group: ChannelGroup, importance: Importance) -> Tensor:
    """Score of each channel of a group (higher = more important). Per-filter scores of a layer whose
    filters split into ``group.channel_groups`` are averaged over the filters of each group channel."""
    modules = dict(model.named_modules())
    if callable(importance):
        total = None
        for name in group.producers:
            s = importance(name, modules[name])
            n = producer_weight(modules[name]).shape[0]
            if not isinstance(s, Tensor) or s.shape != (n,):
                raise ValueError(
                    f"importance({name!r}, module) must return a tensor of shape [{n}], "
                    f"got {getattr(s, 'shape', type(s).__name__)}"
                )
            s = group.filter_slice(name).channel_mean(s, group.num_channels)
            total = s if total is None else total + s.to(total.device)
        return total
    if group.coupled:
        return group_slices_saliency(model, group)
    first = group.producers[0]
    return group.filter_slice(first).channel_mean(filter_scores(modules[first], importance), group.num_channels)


def check_importance(importance) -> None:
    if not callable(importance) and importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES} or a callable(name, module) -> scores, got {importance!r}")


def keep_lowest_pruned(scores: Tensor, k: int) -> Tensor:
    """Bool mask: False for the k smallest scores (stable order), True elsewhere."""
    keep = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.sort(scores, stable=True).indices[:k]] = False
    return keep


def select_keep_masks(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    ratios: Sequence[float],
    *,
    importance: Importance = "l1",
    scope: str = "layer",
) -> list[Tensor | None]:
    """One bool keep mask per group (None where the ratio is 0), on the layer's device."""
    check_importance(importance)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    modules = dict(model.named_modules())
    scores = [group_scores(model, g, importance) if r > 0 else None for g, r in zip(groups, ratios)]
    masks: list[Tensor | None] = [None] * len(groups)
    if scope == "layer":
        for i, (g, r, s) in enumerate(zip(groups, ratios, scores)):
            if r > 0:
                masks[i] = keep_lowest_pruned(s, num_pruned(r, g.num_channels))
    else:
        ratio_set = {r for r in ratios if r > 0}
        if len(ratio_set) > 1:
            raise ValueError("scope='global' takes one float pruning_ratio, not per-layer ratios")
        if ratio_set:
            layers = [i for i, s in enumerate(scores) if s is not None]
            counts = global_pruned_counts([scores[i] for i in layers], ratio_set.pop())
            for i, count in zip(layers, counts):
                masks[i] = keep_lowest_pruned(scores[i], count)
    for i, (g, m) in enumerate(zip(groups, masks)):
        if m is not None:
            masks[i] = m.to(producer_weight(modules[g.producers[0]]).device)
    return masks


def layer_keep_masks(groups: Sequence[ChannelGroup], masks: Sequence[Tensor | None]) -> dict[str, Tensor]:
    """Module name → keep mask over its output filters for every producer layer of every masked
    group (the group mask itself where filters and group channels coincide)."""
    out = {}
    for g, m in zip(groups, masks):
        if m is None:
            continue
        for name in g.producers:
            s = g.filter_slice(name)
            if s.index.numel() == m.shape[0] and torch.equal(s.index, s.channel):
                out[name] = m
            else:  # every filter of a producer is in its group: positions 0..n-1
                out[name] = s.position_mask(m, s.index.numel())
    return out
