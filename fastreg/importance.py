"""Channel importance estimators over coupled channel groups, and keep masks from their scores.

One score per channel of every :class:`~fastreg.pruning.ChannelGroup` (higher = more important):

* ``l1`` — Σ|w| of the channel's filters, summed over the group's producer layers;
* ``l2`` — ‖w‖₂ of the channel's filters, summed over the producers;
* ``bn`` — |γ| of the channel's BatchNorm scales, summed over the group's norms (network slimming);
* ``fisher`` — Fisher pruning (Theis et al. 2018; OrthoReg's default): with d_c the derivative of
  the loss by a multiplicative mask on channel c, d_c = Σ_batch Σ_space a·∂L/∂a, the score is
  Σ_steps ½·d_c², accumulated over batches;
* ``taylor`` — first-order Taylor (Molchanov et al. 2017): Σ_steps |d_c|.

The activations a are the outputs of the group's norm layers (BatchNorm after each producer;
the producers' outputs where a group has no norm): with BatchNorm in training mode, Σ a·∂L/∂a
over a producer's own output is 0 by scale invariance. Summed over the group's hooked layers,
so residual-coupled channels add up.

Weight scores are one fused ``group_norms`` call. Activation scores attach hooks
(:class:`ActivationImportance`): a forward hook keeps each hooked output, a gradient hook adds its
per-channel Σ a·g into one flat buffer, and :meth:`ActivationImportance.step` folds that buffer into
the group scores with one ``index_add_`` and one square/abs-accumulate per step, whatever the depth.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused import group_norms
from .pruning.graph import ChannelGroup, producer_weight
from .pruning.masks import global_pruned_counts, keep_lowest_pruned, layer_keep_masks, num_pruned

IMPORTANCES = ("l1", "l2", "bn", "fisher", "taylor")
WEIGHT_IMPORTANCES = ("l1", "l2", "bn")
ACTIVATION_IMPORTANCES = ("fisher", "taylor")


def check_importance(kind: str) -> str:
    if kind not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {kind!r}")
    return kind


def _slice_map(group: ChannelGroup, module_name: str, size: int) -> tuple[Tensor, Tensor]:
    """(positions along dim 0 of ``module_name``'s output, group channel of each): from the group's
    output-side weight slice of that module, identity when it has none (a non-affine norm)."""
    for s in group.slices:
        if s.module == module_name and s.param in ("weight", "in_proj_weight") and s.dim == 0:
            return s.index.cpu(), s.channel.cpu()
    n = min(size, group.num_channels)
    return torch.arange(n), torch.arange(n)


def _offsets(groups: Sequence[ChannelGroup]) -> list[int]:
    out, total = [], 0
    for g in groups:
        out.append(total)
        total += g.num_channels
    return out + [total]


def _split(flat: Tensor, groups: Sequence[ChannelGroup]) -> list[Tensor]:
    return list(flat.split([g.num_channels for g in groups]))


# ---------------------------------------------------------------------------------------------
# weight-based: l1, l2, bn
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def weight_importance(model: nn.Module, groups: Sequence[ChannelGroup], kind: str) -> list[Tensor]:
    """Per group, the ``l1`` / ``l2`` / ``bn`` score of each channel (float32, on the model's device):
    one ``group_norms`` call over every producer weight (or |γ| of every affine norm), scattered into
    the groups' channels with one ``index_add_``."""
    check_importance(kind)
    if kind not in WEIGHT_IMPORTANCES:
        raise ValueError(f"importance {kind!r} needs data: use ActivationImportance or estimate_importance")
    modules = dict(model.named_modules())
    offsets = _offsets(groups)
    names, srcs, dsts = [], [], []
    for gi, g in enumerate(groups):
        members = g.producers if kind != "bn" else [n for n in g.norms if getattr(modules[n], "affine", False)]
        for name in members:
            weight = modules[name].weight if kind == "bn" else producer_weight(modules[name])
            pos, chan = _slice_map(g, name, weight.shape[0])
            names.append(weight)
            srcs.append(pos + sum(t.shape[0] for t in names[:-1]))
            dsts.append(chan + offsets[gi])
    device = next(model.parameters()).device
    scores = torch.zeros(offsets[-1], dtype=torch.float32, device=device)
    if names:
        if kind == "bn":
            flat = torch.cat([w.detach().abs().float() for w in names])
        else:
            flat = group_norms([w.detach() for w in names], p=1 if kind == "l1" else 2, flat=True).float()
        scores.index_add_(0, torch.cat(dsts).to(device), flat[torch.cat(srcs).to(device)])
    return _split(scores, groups)


# ---------------------------------------------------------------------------------------------
# activation-based: fisher, taylor
# ---------------------------------------------------------------------------------------------
class ActivationImportance:
    """Fisher / Taylor scores accumulated over training steps by hooks::

        scorer = ActivationImportance(model, groups, "fisher")
        with scorer.attached():
            for x, y in loader:
                loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward()
                scorer.step()            # d_c of this batch → ½·d_c² (fisher) or |d_c| (taylor)
                opt.step()
        scores = scorer.scores()         # one tensor per group

    A step's d_c = Σ_batch Σ_space a·∂L/∂a over the group's hooked outputs (see the module docstring).
    """

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], kind: str = "fisher"):
        check_importance(kind)
        if kind not in ACTIVATION_IMPORTANCES:
            raise ValueError(f"ActivationImportance computes {ACTIVATION_IMPORTANCES}, got {kind!r}: use weight_importance")
        self.model, self.groups, self.kind = model, list(groups), kind
        modules = dict(model.named_modules())
        offsets = _offsets(self.groups)
        self.points: list[tuple[str, int, int]] = []  # (hooked module, its offset in the flat buffer, channel dim)
        srcs, dsts, flat_size = [], [], 0
        for gi, g in enumerate(self.groups):
            if g.heads:
                raise ValueError(f"importance {kind!r}: the heads of {g.root!r} have no output of their own to hook; "
                                 f"rank attention heads with a weight importance ({WEIGHT_IMPORTANCES[:2]})")
            norms = [n for n in g.norms if n in modules]
            for name in norms or g.producers:
                m = modules[name]
                size = m.num_features if hasattr(m, "num_features") else m.weight.shape[0]
                pos, chan = _slice_map(g, name, size)
                channel_dim = -1 if isinstance(m, (nn.Linear, nn.LayerNorm)) else 1  # (B, ..., F) vs (B, C, ...)
                self.points.append((name, flat_size, channel_dim))
                srcs.append(pos + flat_size)
                dsts.append(chan + offsets[gi])
                flat_size += size
        device = next(model.parameters()).device
        self._src = torch.cat(srcs).to(device)
        self._dst = torch.cat(dsts).to(device)
        self._buffer = torch.zeros(flat_size, dtype=torch.float32, device=device)
        self._batch = torch.zeros(offsets[-1], dtype=torch.float32, device=device)
        self._scores = torch.zeros(offsets[-1], dtype=torch.float32, device=device)
        self._handles: list = []
        self.steps = 0

    def _forward_hook(self, offset: int, channel_dim: int):
        def hook(module, inputs, out):
            if not (module.training and torch.is_grad_enabled() and out.requires_grad):
                return  # (evaluation, Jacobians in eval mode: not a training step)
            act = out.detach().clone()  # (an in-place ReLU may overwrite ``out`` before backward)
            dim = channel_dim % act.dim()
            reduce_dims = [d for d in range(act.dim()) if d != dim]
            view = self._buffer[offset:offset + act.shape[dim]]

            def grad_hook(grad):
                view.add_(torch.sum(act * grad, reduce_dims, dtype=torch.float32))

            out.register_hook(grad_hook)

        return hook

    def attach(self) -> None:
        if self._handles:
            return
        modules = dict(self.model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._forward_hook(offset, dim)) for name, offset, dim in self.points]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def attached(self):
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    @torch.no_grad()
    def step(self) -> None:
        """After ``backward()``: fold this batch's d_c into the scores (a constant number of ops). Under
        ``torch.distributed`` the d_c of the processes are averaged first (one all-reduce of the small
        vector, as DDP averages gradients), so every process holds the scores of the global batch."""
        self._batch.zero_().index_add_(0, self._dst, self._buffer[self._src])
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(self._batch)
            self._batch.div_(torch.distributed.get_world_size())
        if self.kind == "fisher":
            self._scores.addcmul_(self._batch, self._batch, value=0.5)
        else:
            self._scores.add_(self._batch.abs())
        self._buffer.zero_()
        self.steps += 1

    def reset(self) -> None:
        self._scores.zero_()
        self._buffer.zero_()
        self.steps = 0

    def scores(self) -> list[Tensor]:
        return [s.clone() for s in _split(self._scores, self.groups)]

    def state_dict(self) -> dict:
        return {"scores": self._scores.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self._scores.copy_(state["scores"])
        self.steps = int(state["steps"])


def estimate_importance(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    kind: str,
    batches: Iterable[tuple[Tensor, Tensor]] | None = None,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Per group, each channel's score. ``l1`` / ``l2`` / ``bn`` read the weights; ``fisher`` /
    ``taylor`` run forward + backward over ``batches`` (the model in training mode) and accumulate one
    step per batch; the model is left as it was (parameters, ``.grad``, BatchNorm running statistics)."""
    check_importance(kind)
    if kind in WEIGHT_IMPORTANCES:
        return weight_importance(model, groups, kind)
    if batches is None:
        raise ValueError(f"importance {kind!r} needs batches of (inputs, labels)")
    device = device if device is not None else next(model.parameters()).device
    scorer = ActivationImportance(model, groups, kind)
    saved = [(p, p.grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    model.train()
    try:
        with scorer.attached():
            for x, y in batches:
                for p in model.parameters():
                    p.grad = None
                loss_fn(model(x.to(device)), y.to(device)).backward()
                scorer.step()
    finally:
        for p, g in saved:
            p.grad = g
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        model.train(was_training)
    if scorer.steps == 0:
        raise ValueError("batches is empty: importance needs at least one batch")
    return scorer.scores()


# ---------------------------------------------------------------------------------------------
# keep masks from scores
# ---------------------------------------------------------------------------------------------
def keep_masks_from_scores(
    groups: Sequence[ChannelGroup], ratios: Sequence[float], scores: Sequence[Tensor], *, scope: str = "layer"
) -> dict[str, Tensor]:
    """Module name → keep mask for the producers of every group with ratio > 0: the ⌈r·N⌉ lowest
    scores of the group pruned (``layer``), or of one pooled ranking (``global``; the rules of
    :func:`fastreg.pruning.masks.global_pruned_counts`)."""
    chosen = [i for i, r in enumerate(ratios) if r > 0]
    if scope == "layer":
        counts = [num_pruned(ratios[i], groups[i].num_channels) for i in chosen]
    elif scope == "global":
        if len({ratios[i] for i in chosen}) > 1:
            raise ValueError("scope='global' takes one pruning ratio for every group")
        counts = global_pruned_counts([scores[i] for i in chosen], ratios[chosen[0]]) if chosen else []
    else:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    masks: list[Tensor | None] = [None] * len(groups)
    for i, c in zip(chosen, counts):
        masks[i] = keep_lowest_pruned(scores[i], c)
    return layer_keep_masks(groups, masks)


def prune_global_count(scores: Sequence[Tensor], count: int, keep: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Keep masks that prune exactly ``count`` more channels, the lowest scores of one pooled ranking
    (stable: equal scores in pooled order) among those still kept in ``keep``; every group keeps at
    least one channel. ValueError when that leaves too few channels."""
    keep = [torch.ones(s.numel(), dtype=torch.bool) for s in scores] if keep is None else [k.cpu().clone() for k in keep]
    kept = [int(k.sum()) for k in keep]
    available = sum(kept) - sum(1 for k in kept if k > 0)
    if count > available:
        raise ValueError(f"cannot prune {count} more channels: {available} can go while every layer keeps one")
    sizes = [s.numel() for s in scores]
    pooled = torch.cat([s.detach().float().cpu() for s in scores])
    alive = torch.cat(keep)
    order = torch.sort(torch.where(alive, pooled, torch.full_like(pooled, float("inf"))), stable=True).indices
    layer_of = torch.repeat_interleave(torch.arange(len(scores)), torch.tensor(sizes))
    flat_keep = alive.clone()
    left = list(kept)
    done = 0
    for j in order.tolist():
        if done == count:
            break
        layer = int(layer_of[j])
        if flat_keep[j] and left[layer] > 1:
            flat_keep[j] = False
            left[layer] -= 1
            done += 1
    return list(flat_keep.split(sizes))


def hamming_distance(masks_a: Sequence[Tensor], masks_b: Sequence[Tensor]) -> float:
    """Normalized Hamming distance of two mask lists: the fraction of channels whose keep/prune
    decision differs (the early-bird distance, You et al. 2020)."""
    if len(masks_a) != len(masks_b) or not masks_a:
        raise ValueError(f"hamming_distance needs two equally long, non-empty mask lists, got {len(masks_a)} and {len(masks_b)}")
    a, b = torch.cat([m.cpu() for m in masks_a]), torch.cat([m.cpu() for m in masks_b])
    return float((a != b).sum()) / max(a.numel(), 1)


class EarlyBird:
    """Early-bird ticket detection (You et al. 2020): after every epoch, :meth:`update` takes the
    masks the pruning would choose now; the ticket is drawn when the normalized Hamming distance
    between consecutive epochs' masks has stayed below ``epsilon`` for the last ``window`` epochs.
    With masks that stop changing from epoch e on (e counted from 0), the ticket is drawn after
    epoch e + ``window``, and its masks are those of epoch e."""

    def __init__(self, epsilon: float = 0.1, window: int = 5):
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon <= 1:
            raise ValueError(f"epsilon must be a number in [0, 1], got {epsilon!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.epsilon, self.window = float(epsilon), window
        self.previous: list[Tensor] | None = None
        self.distances: list[float] = []

    def update(self, masks: Sequence[Tensor]) -> bool:
        """Record this epoch's masks; True when the ticket is drawn."""
        masks = [m.detach().cpu().clone() for m in masks]
        if self.previous is not None:
            self.distances.append(hamming_distance(self.previous, masks))
        self.previous = masks
        return self.drawn

    @property
    def drawn(self) -> bool:
        recent = self.distances[-self.window:]
        return len(recent) == self.window and max(recent) < self.epsilon

    def state_dict(self) -> dict:
        return {"previous": self.previous, "distances": list(self.distances)}

    def load_state_dict(self, state: dict) -> None:
        self.previous, self.distances = state["previous"], list(state["distances"])


__all__ = [
    "EarlyBird",
    "ACTIVATION_IMPORTANCES",
    "IMPORTANCES",
    "ActivationImportance",
    "estimate_importance",
    "hamming_distance",
    "keep_masks_from_scores",
    "prune_global_count",
    "weight_importance",
]
