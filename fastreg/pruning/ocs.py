"""OCSPruner (one-cycle structured pruning, DESIGN.md §1.3): find the sub-network while training.

Every channel of every prunable coupled group g (a filter, its BN γ/β, the next layers' input
columns, residual partners) has the group saliency S(g) = (Σ_{w∈g} ‖w‖₂/√|w|)/|g|, computed for the
whole model in one ``group_saliency`` call. Each epoch:

1. **Partition**: one global saliency threshold, found by binary search, prunes the channels below
   it so that the cost (``metric``: Conv/Linear parameters or multiply-accumulates, or channels)
   drops by at least ``target_ratio``; every layer keeps at least its most salient channel.
2. **Stability**: J_t = J(M_t, M_{t−1}) = (1/L) Σ_l |K_t ∩ K_{t−1}| / |K_t ∪ K_{t−1}| over the kept
   sets of the L groups; J_avg^t = mean of the last r = ``window`` values.
3. **Schedule** (Algorithm 1, Eq. 5–7): sparsity learning starts at the first t with
   J_avg^t − J_avg^{t−r} ≤ τ (``start_tol``), with λ_{t_start} = λ0 (``lam_init``); then
   λ_t = λ_{t−1} + δ·⌊(t − t_start)/Δt⌋ (``lam_delta``, ``lam_interval``); pruning happens at the
   first t with J_avg^t ≥ 1 − ε (``prune_tol``). The defaults are the paper's Table 8: τ = 1e-4
   (its ImageNet value; on CIFAR it fixes t_start = 30 instead), ε = 1e-3, λ0 = δ = 1e-4, Δt = 1
   (CIFAR; 2 on ImageNet); r is not given there, 5 here.

During sparsity learning, each step adds the group-lasso gradient λ·w/‖w‖₂ to every slice w of
every pruned channel (:meth:`OCSPruner.apply_grad_`, after backward) and shrinks those slices in
place, w ← w·(1 − λ·lr) (:meth:`OCSPruner.shrink_`, after the optimizer step): filters, biases,
BN γ/β and the consumers' input columns, one fused call each (``fastreg.CoupledGroups`` /
``fastreg.PrunedSlices`` plans, rebuilt once per epoch). λ_t computed at the end of epoch t is
used during epoch t + 1 (so λ0 during the first epoch of sparsity learning).
"""
from __future__ import annotations

import math
from fnmatch import fnmatch
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..fused import CoupledGroups, PrunedSlices
from .graph import LAYER_TYPES, build_dependency_graph, channel_groups, default_example_inputs, eval_mode, producer_weight, producer_weight_name
from .masks import COUPLED, layer_keep_masks
from .physical import prune

METRICS = ("flops", "params", "channels")
OCS_PHASES = ("dense", "sparsify", "prune", "finetune")
LASSOS = ("slice", "group")


def jaccard(masks_a: Sequence[Tensor], masks_b: Sequence[Tensor]) -> float:
    """J = (1/L) Σ_l |K_a ∩ K_b| / |K_a ∪ K_b| over the kept sets of L layers (1 for two empty sets)."""
    if len(masks_a) != len(masks_b) or not masks_a:
        raise ValueError(f"jaccard needs two equally long, non-empty mask lists, got {len(masks_a)} and {len(masks_b)}")
    total = 0.0
    for a, b in zip(masks_a, masks_b):
        union = int((a | b).sum())
        total += 1.0 if union == 0 else int((a & b).sum()) / union
    return total / len(masks_a)


class OCSPruner:
    """One-cycle structured pruning. Training loop::

        pruner = fastreg.OCSPruner(model, target_ratio=0.5, example_inputs=x)
        for epoch in ...:
            for x, y in loader:
                loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward()
                pruner.apply_grad_(); opt.step(); pruner.shrink_(opt.param_groups[0]["lr"])
            if pruner.end_epoch() == "prune":
                model = pruner.prune()   # smaller model: build a new optimizer, keep training

    Args:
        target_ratio: fraction of the ``metric`` cost to remove, in [0, 1).
        metric: ``"flops"`` (multiply-accumulates of Conv/Linear layers), ``"params"`` (their
            weights) or ``"channels"`` (prunable channels).
        window (r), start_tol (τ), prune_tol (ε), lam_init (λ0), lam_delta (δ), lam_interval (Δt):
            the schedule (defaults: the paper's Table 8, see the module docstring).
        skip: name patterns of layers whose groups are never pruned.
        heads: also prune the attention heads of ``nn.MultiheadAttention`` modules, each head one
            channel of the global ranking (its q, k, v rows, biases and output-projection columns).
        coupled: ``"group"`` (default: residual-coupled groups are pruned jointly) or ``"skip"``.
        lasso: ``"slice"`` — λ Σ_{g pruned} Σ_{w∈g} ‖w‖₂, every slice its own norm (DESIGN.md §1.3);
            ``"group"`` — λ Σ_{g pruned} ‖w_g‖₂ over all slices of the channel together.
    """

    def __init__(
        self,
        model: nn.Module,
        target_ratio: float,
        *,
        example_inputs=None,
        metric: str = "flops",
        window: int = 5,
        start_tol: float = 1e-4,
        prune_tol: float = 1e-3,
        lam_init: float = 1e-4,
        lam_delta: float = 1e-4,
        lam_interval: int = 1,
        skip: Sequence[str] = (),
        coupled: str = "group",
        lasso: str = "slice",
        heads: bool = False,
    ):
        if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)) or not 0 <= target_ratio < 1:
            raise ValueError(f"target_ratio must be in [0, 1), got {target_ratio!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if coupled not in COUPLED:
            raise ValueError(f"coupled must be one of {COUPLED}, got {coupled!r}")
        if lasso not in LASSOS:
            raise ValueError(f"lasso must be one of {LASSOS}, got {lasso!r}")
        for name, value in (("window", window), ("lam_interval", lam_interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("start_tol", start_tol), ("prune_tol", prune_tol), ("lam_init", lam_init), ("lam_delta", lam_delta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(skip, str):
            skip = (skip,)
        self.model = model
        self.target_ratio, self.metric = float(target_ratio), metric
        self.window, self.start_tol, self.prune_tol = window, float(start_tol), float(prune_tol)
        self.lam_init, self.lam_delta, self.lam_interval = float(lam_init), float(lam_delta), lam_interval
        self.lasso = lasso
        self.example_inputs = example_inputs if example_inputs is not None else default_example_inputs(model)

        graph = build_dependency_graph(model, self.example_inputs)
        all_groups = channel_groups(model, graph=graph)
        layer_names = [n for g in all_groups for n in g.producers]
        for p in skip:
            if not any(fnmatch(n, p) for n in layer_names):
                raise ValueError(f"skip pattern {p!r} matches no Conv/Linear layer")
        self.groups = [
            g
            for g in all_groups
            if g.prunable
            and (heads or not g.heads)
            and (coupled == "group" or not g.coupled)
            and not any(fnmatch(n, p) for n in g.producers for p in skip)
        ]
        if not self.groups:
            raise ValueError("model has no prunable layer (no Conv/Linear layer whose outputs feed another layer)")
        self._build_saliency_inputs()
        self._build_cost_model()

        self.phase = "dense"
        self.epoch = 0  # completed epochs
        self.start_epoch: int | None = None
        self.lam = 0.0
        self.jaccard_history: list[float] = []
        self.masks: list[Tensor] | None = None  # latest partition, one keep mask per group

    # ------------------------------------------------------------------ construction helpers
    def _build_saliency_inputs(self) -> None:
        """(tensor, dim, channel ids) triples of every coupled slice, ids offset per group."""
        modules = dict(self.model.named_modules())
        self._offsets, offset = [], 0
        self._sal_tensors, self._sal_dims, self._sal_ids = [], [], []
        for g in self.groups:
            self._offsets.append(offset)
            for s in g.slices:
                t = getattr(modules[s.module], s.param)
                ids = torch.full((t.shape[s.dim],), -1, dtype=torch.long, device=t.device)
                ids[s.index.to(t.device)] = s.channel.to(t.device) + offset
                self._sal_tensors.append(t)
                self._sal_dims.append(s.dim)
                self._sal_ids.append(ids)
            offset += g.num_channels
        self.num_channels = offset
        self._coupled = CoupledGroups(self._sal_tensors, self._sal_dims, self._sal_ids, self.num_channels)

    def _build_cost_model(self) -> None:
        """Per Conv/Linear layer and attention input projection: weight elements per (out, in) pair
        and output positions in the example batch, and which group channels index its outputs / input
        columns (attention's q kᵀ and × v products are not counted)."""
        modules = dict(self.model.named_modules())
        positions = {}

        def record(names, out, channel_dim):
            for n in names:
                positions[n] = out.numel() // out.shape[channel_dim]

        hooks = []
        for n, m in modules.items():
            if isinstance(m, LAYER_TYPES):
                dim = -1 if isinstance(m, nn.Linear) else 1
                hooks.append(m.register_forward_hook(lambda mod, inp, out, n=n, dim=dim: record([n], out, dim)))
            elif isinstance(m, nn.MultiheadAttention):  # (it applies its out_proj's weight without calling it)
                hooks.append(m.register_forward_hook(lambda mod, inp, out, n=n: record([n, f"{n}.out_proj"], out[0], -1)))
        try:
            with eval_mode(self.model), torch.no_grad():
                self.model(self.example_inputs)
        finally:
            for h in hooks:
                h.remove()
        out_channels, in_columns = {}, {}
        for gi, g in enumerate(self.groups):
            for s in g.slices:
                if s.param != producer_weight_name(modules[s.module]):
                    continue
                ids = (s.channel + self._offsets[gi]).cpu()  # (a layer reading a concatenation is in several groups)
                side = out_channels if s.dim == 0 else in_columns
                side[s.module] = torch.cat([side[s.module], ids]) if s.module in side else ids
        self._cost_layers = []
        for n, m in modules.items():
            if producer_weight_name(m) is not None and producer_weight(m) is not None:
                w = producer_weight(m)
                per_pair = w[0, 0].numel() if w.dim() > 2 else 1
                scale = per_pair * (positions.get(n, 1) if self.metric == "flops" else 1)
                self._cost_layers.append((w.shape[0], w.shape[1], out_channels.get(n), in_columns.get(n), scale))

    # ------------------------------------------------------------------ saliency and partition
    @torch.no_grad()
    def saliency(self) -> Tensor:
        """S(g) of every channel of every candidate group, concatenated in group order (one call)."""
        return self._coupled.saliency().float().cpu()

    def cost(self, pruned: Tensor) -> float:
        """The ``metric`` cost of the model with channels ``pruned`` (bool over all group channels) removed."""
        if self.metric == "channels":
            return float(self.num_channels - int(pruned.sum()))
        total = 0.0
        for n_out, n_in, out_ids, in_ids, scale in self._cost_layers:
            kept_out = n_out - (int(pruned[out_ids].sum()) if out_ids is not None else 0)
            kept_in = n_in - (int(pruned[in_ids].sum()) if in_ids is not None else 0)
            total += kept_out * kept_in * scale
        return total

    def _pruned_below(self, saliency: Tensor, threshold: float, protected: Tensor) -> Tensor:
        return (saliency < threshold) & ~protected

    def partition(self, saliency: Tensor | None = None) -> list[Tensor]:
        """Keep masks (one per group) from the global threshold: binary search for the smallest
        threshold whose pruned channels cut the cost by at least ``target_ratio``."""
        saliency = self.saliency() if saliency is None else saliency
        protected = torch.zeros(self.num_channels, dtype=torch.bool)
        for off, g in zip(self._offsets, self.groups):  # every layer keeps its most salient channel
            protected[off + int(saliency[off : off + g.num_channels].argmax())] = True
        dense = self.cost(torch.zeros(self.num_channels, dtype=torch.bool))
        goal = dense * (1 - self.target_ratio)
        if self.target_ratio == 0:
            pruned = torch.zeros(self.num_channels, dtype=torch.bool)
        else:
            hi = float(saliency.max()) * (1 + 1e-6) + 1e-12  # prunes every unprotected channel
            if self.cost(self._pruned_below(saliency, hi, protected)) > goal:
                raise ValueError(
                    f"target_ratio={self.target_ratio} is unreachable: pruning all but one channel per layer "
                    f"removes only {1 - self.cost(self._pruned_below(saliency, hi, protected)) / dense:.3f} of the {self.metric}"
                )
            values = torch.unique(saliency)  # the threshold only matters between distinct saliencies
            lo_i, hi_i = 0, values.numel()  # search over thresholds values[i] (hi_i: beyond the max)
            while lo_i < hi_i:
                mid = (lo_i + hi_i) // 2
                if self.cost(self._pruned_below(saliency, float(values[mid]), protected)) <= goal:
                    hi_i = mid
                else:
                    lo_i = mid + 1
            threshold = float(values[lo_i]) if lo_i < values.numel() else hi
            pruned = self._pruned_below(saliency, threshold, protected)
        return [~pruned[off : off + g.num_channels] for off, g in zip(self._offsets, self.groups)]

    # ------------------------------------------------------------------ the schedule
    def _j_avg(self, upto: int) -> float | None:
        """Mean of the r Jaccard values ending at history index ``upto`` (None if fewer)."""
        if upto + 1 < self.window:
            return None
        return sum(self.jaccard_history[upto + 1 - self.window : upto + 1]) / self.window

    def record_partition(self, masks: Sequence[Tensor]) -> str:
        """Advance the schedule by one epoch with this epoch's partition; returns the phase."""
        masks = [m.detach().cpu().to(torch.bool) for m in masks]
        if len(masks) != len(self.groups) or any(m.shape != (g.num_channels,) for m, g in zip(masks, self.groups)):
            raise ValueError("masks must hold one bool mask per candidate group, of the group's channel count")
        t = self.epoch
        if self.masks is not None:
            self.jaccard_history.append(jaccard(masks, self.masks))
        self.masks = masks
        last = len(self.jaccard_history) - 1
        j_now = self._j_avg(last)
        if self.phase == "dense":
            j_before = self._j_avg(last - self.window)
            if j_now is not None and j_before is not None and j_now - j_before <= self.start_tol:
                self.phase, self.start_epoch, self.lam = "sparsify", t, self.lam_init
        elif self.phase == "sparsify":
            self.lam += self.lam_delta * ((t - self.start_epoch) // self.lam_interval)
            if j_now is not None and j_now >= 1 - self.prune_tol:
                self.phase = "prune"
        self.epoch += 1
        self._set_pruned_slices()
        return self.phase

    def end_epoch(self) -> str:
        """Call after every training epoch: partition, stability, schedule. Returns the phase:
        ``dense`` → ``sparsify`` → ``prune`` (call :meth:`prune`) → ``finetune``."""
        if self.phase in ("prune", "finetune"):
            self.epoch += 1
            return self.phase
        return self.record_partition(self.partition())

    def _set_pruned_slices(self) -> None:
        """Fix the latest partition's pruned channels for the per-step ops (once per epoch)."""
        self._has_pruned, self._lasso_slices = False, None
        if self.masks is None:
            return
        device = self._sal_tensors[0].device
        pruned = (~torch.cat(self.masks)).to(device)
        self._coupled.set_pruned(pruned)
        self._has_pruned = bool(pruned.any())
        if self.lasso == "slice":
            keep = [~((ids >= 0) & pruned[ids.clamp_min(0)]) for ids in self._sal_ids]
            self._lasso_slices = PrunedSlices(self._sal_tensors, keep, self._sal_dims)

    # ------------------------------------------------------------------ per step
    def _active(self) -> bool:
        return self.phase == "sparsify" and self.lam > 0 and self._has_pruned

    @torch.no_grad()
    def apply_grad_(self) -> None:
        """After backward, the group-lasso gradient on every slice of every pruned channel:
        grad[s] += λ·s/‖s‖₂ (``lasso="slice"``) or λ·s/‖w_g‖₂ (``lasso="group"``)."""
        if not self._active():
            return
        if self.lasso == "slice":
            self._lasso_slices.group_lasso_grad_(self.lam)
        else:
            self._coupled.group_lasso_grad_(self.lam)

    @torch.no_grad()
    def shrink_(self, lr: float) -> None:
        """After the optimizer step: every slice of every pruned channel *= (1 − λ·lr)."""
        if self._active():
            self._coupled.shrink_(1.0 - self.lam * float(lr))

    # ------------------------------------------------------------------ pruning and state
    @property
    def keep_masks(self) -> dict[str, Tensor]:
        """Module name → keep mask of the latest partition, for every producer of a pruned group."""
        if self.masks is None:
            return {}
        return layer_keep_masks(self.groups, [None if bool(m.all()) else m for m in self.masks])

    def prune(self) -> nn.Module:
        """Physically remove the latest partition's pruned channels; enter fine-tuning."""
        if self.phase != "prune":
            raise RuntimeError(f"prune() follows end_epoch() returning 'prune'; the phase is {self.phase!r}")
        small = prune(self.model, self.keep_masks, self.example_inputs)
        self.phase = "finetune"
        return small

    def state_dict(self) -> dict:
        return {
            "phase": self.phase,
            "epoch": self.epoch,
            "start_epoch": self.start_epoch,
            "lam": self.lam,
            "jaccard_history": list(self.jaccard_history),
            "masks": None if self.masks is None else [m.clone() for m in self.masks],
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("phase") not in OCS_PHASES:
            raise ValueError(f"state['phase'] must be one of {OCS_PHASES}, got {state.get('phase')!r}")
        masks = state["masks"]
        if masks is not None and (len(masks) != len(self.groups) or any(m.shape != (g.num_channels,) for m, g in zip(masks, self.groups))):
            raise ValueError("state['masks'] does not match this model's prunable groups")
        self.phase, self.epoch, self.start_epoch = state["phase"], int(state["epoch"]), state["start_epoch"]
        self.lam, self.jaccard_history = float(state["lam"]), list(state["jaccard_history"])
        self.masks = None if masks is None else [m.clone() for m in masks]
        self._set_pruned_slices()
