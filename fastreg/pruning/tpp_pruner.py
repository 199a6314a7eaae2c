"""TPP's pipeline (Wang & Fu, ICLR 2023), the original code's phases.

:class:`TPPPruner` — the original schedule driven by the iteration count: regularize until reg
reaches τ → stabilize at τ for ``stabilize_iters`` iterations, zeroing the pruned filters (their
biases, BN γ and β) of layer i from stabilize iteration (i + 1) · ``zero_interval`` on → physical pruning →
fine-tuning.
"""
from __future__ import annotations

import warnings
from typing import Mapping

import torch
from torch import Tensor, nn

from ..fused import PrunedSlices
from .masks import RatioSpec
from .physical import producing_slices, prune, zero_pruned_
from .tpp import TPPLoss

PHASES = ("regularize", "stabilize", "prune", "finetune", "done")
ZERO_COUNTS = ("all", "pruned")


class TPPPruner:
    """The TPP pipeline, driven by the iteration count. Per training step::

        loss = pruner(model(x), y)      # TPP objective (base loss once fine-tuning)
        opt.zero_grad(); loss.backward(); pruner.apply_grad_(); opt.step()
        if pruner.step() == "prune":    # stabilize phase is over
            model = pruner.prune()      # smaller model: build a new optimizer for it

    Phases: ``regularize`` (reg grows to τ) → ``stabilize`` (reg = τ for ``stabilize_iters``
    iterations; the pruned filters, biases and BN γ, β of the i-th Conv/Linear layer are zeroed
    after every step from stabilize iteration (i + 1)·``zero_interval`` on, as the original
    ``_layerwise_zero_out``; i counts every Conv/Linear layer in model order, or with
    ``zero_count="pruned"`` only the layers that are pruned, so that each of them is zeroed before the
    end of the phase when ``stabilize_iters`` ≥ ``zero_interval`` × pruned layers) → ``prune`` → ``finetune``
    (``finetune_iters`` steps, None = until the caller stops) → ``done``. A pruned layer whose zero-out
    time falls after the stabilize phase (deep models, e.g. ResNet-110's 112 layers with the paper's
    10,000 iterations and interval 100) is pruned without being zeroed first, as in the original code:
    a warning names those layers (:attr:`unzeroed_layers`). ``state_dict()`` holds
    the criterion's state and the phase; after pruning, rebuild the architecture with
    ``fastreg.prune(dense_model, pruner.keep_masks)`` before loading the pruned weights.
    """

    def __init__(
        self,
        model: nn.Module,
        pruning_ratio: RatioSpec,
        *,
        stabilize_iters: int = 10000,
        zero_interval: int = 100,
        zero_count: str = "all",
        finetune_iters: int | None = None,
        **loss_kwargs,
    ):
        for name, value in (("stabilize_iters", stabilize_iters), ("zero_interval", zero_interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if finetune_iters is not None and (not isinstance(finetune_iters, int) or finetune_iters < 0):
            raise ValueError(f"finetune_iters must be None or an int >= 0, got {finetune_iters!r}")
        if zero_count not in ZERO_COUNTS:
            raise ValueError(f"zero_count must be one of {ZERO_COUNTS}, got {zero_count!r}")
        self.model = model
        self.criterion = TPPLoss(model, pruning_ratio, **loss_kwargs)
        self.stabilize_iters, self.zero_interval, self.finetune_iters = stabilize_iters, zero_interval, finetune_iters
        self.zero_count = zero_count
        # the index i of each pruned group in the zero-out order: (i + 1)·zero_interval stabilize iterations
        orders = sorted(g.order for g, _ in self.criterion._group_masks)
        self._zero_index = {o: (o if zero_count == "all" else orders.index(o)) for o in orders}
        if self.unzeroed_layers:
            names = self.unzeroed_layers
            warnings.warn(
                f"TPPPruner: {len(names)} pruned layer(s) reach their zero-out time after the stabilize phase "
                f"(stabilize_iters={stabilize_iters} < (i + 1) × zero_interval={zero_interval}, i counting "
                f"{'every Conv/Linear layer' if zero_count == 'all' else 'the pruned layers'}) and are pruned without "
                f"being zeroed first: {', '.join(names)}. Pass zero_count='pruned' to count only the pruned layers, "
                "a larger stabilize_iters or a smaller zero_interval to zero them all",
                stacklevel=2,
            )
        self.phase = "regularize"
        self.iteration = 0  # completed steps
        self.stabilize_start: int | None = None
        self.finetune_start: int | None = None
        self.pruned_model: nn.Module | None = None
        self._zeroed_count, self._zero_slices = 0, None

    def zero_time(self, group) -> int:
        """The stabilize iteration from which ``group``'s pruned slices are zeroed: (i + 1)·zero_interval."""
        return (self._zero_index[group.order] + 1) * self.zero_interval

    @property
    def unzeroed_layers(self) -> list[str]:
        """The pruned layers whose zero-out time comes after the stabilize phase's last iteration."""
        return [n for g, _ in self.criterion._group_masks if self.zero_time(g) > self.stabilize_iters for n in g.producers]

    @property
    def keep_masks(self) -> dict[str, Tensor]:
        return self.criterion.keep_masks

    @property
    def reg(self) -> float:
        return self.criterion.reg

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.phase in ("finetune", "done"):
            return self.criterion.base(logits, labels)
        if self.phase == "prune":
            raise RuntimeError("the stabilize phase is over: call pruner.prune() and fine-tune the returned model")
        return self.criterion(logits, labels)

    def apply_grad_(self) -> None:
        """After backward, while regularizing or stabilizing: the terms the criterion keeps out of the loss, into
        ``.grad`` — every term with ``in_loss=False``, the L2 terms with ``l2_in_loss=False``; otherwise nothing."""
        if self.phase not in ("regularize", "stabilize"):
            return
        if not self.criterion.in_loss:
            self.criterion.apply_grad_()
        elif not self.criterion.l2_in_loss:
            self.criterion.apply_l2_()

    apply_l2_ = apply_grad_  # the name of the L2-only mode

    def _zero_due_layers(self) -> None:
        """Zero the groups whose index i in the zero-out order satisfies (k − k_s) ≥ (i + 1)·zero_interval
        (one fused shrink_ with factor 0; the plan is rebuilt only when another layer becomes due)."""
        elapsed = self.iteration - self.stabilize_start
        due = [(g, m) for g, m in self.criterion._group_masks if elapsed >= self.zero_time(g)]
        if len(due) != self._zeroed_count:
            tensors, masks = producing_slices(self.model, due)
            self._zero_slices = PrunedSlices(tensors, masks) if tensors else None
            self._zeroed_count = len(due)
        if self._zero_slices is not None:
            self._zero_slices.shrink_(0.0)

    @torch.no_grad()
    def step(self) -> str:
        """Call once after every ``optimizer.step()``: advances the pipeline; returns the phase."""
        k = self.iteration
        if self.phase == "regularize" and self.criterion.reg_at(k) >= self.criterion.ceiling:
            self.phase, self.stabilize_start = "stabilize", k
        if self.phase == "stabilize":
            self._zero_due_layers()
            if k - self.stabilize_start == self.stabilize_iters:
                self.phase = "prune"
        elif self.phase == "finetune" and self.finetune_iters is not None:
            if k - self.finetune_start + 1 >= self.finetune_iters:
                self.phase = "done"
        self.iteration += 1
        return self.phase

    def prune(self, example_inputs=None) -> nn.Module:
        """Zero every pruned slice, remove it physically, and enter fine-tuning. Returns the
        smaller model (the dense one is left zeroed)."""
        if self.phase != "prune":
            raise RuntimeError(f"prune() is for the end of the stabilize phase; the phase is {self.phase!r}")
        example_inputs = example_inputs if example_inputs is not None else self.criterion.example_inputs
        zero_pruned_(self.model, self.keep_masks, groups=self.criterion.groups)
        self.pruned_model = prune(self.model, self.keep_masks, example_inputs)
        self.phase, self.finetune_start = "finetune", self.iteration
        if self.finetune_iters == 0:
            self.phase = "done"
        return self.pruned_model

    def state_dict(self) -> dict:
        return {
            "phase": self.phase,
            "iteration": self.iteration,
            "stabilize_start": self.stabilize_start,
            "finetune_start": self.finetune_start,
            "criterion": self.criterion.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("phase") not in PHASES:
            raise ValueError(f"state['phase'] must be one of {PHASES}, got {state.get('phase')!r}")
        self.criterion.load_state_dict(state["criterion"])
        self.phase = state["phase"]
        self.iteration = int(state["iteration"])
        self.stabilize_start = state["stabilize_start"]
        self.finetune_start = state["finetune_start"]
        self._zeroed_count, self._zero_slices = 0, None
