"""TPP (Trainability Preserving Pruning, Wang & Fu, ICLR 2023): the drop-in criterion.

:class:`TPPLoss` — ``loss = criterion(logits, labels)`` is

    L = L_base + lw · reg · Σ_l mean(E_l²) + ½ · reg · (‖W_P‖² + ‖b_P‖² + ‖γ_P‖² + ‖β_P‖²)

(DESIGN.md §1.1–1.2) over every pruned layer l, E_l = G_l ⊙ (1 − m mᵀ) (``target="decorrelate"``),
P the pruned filters and the BatchNorm channels that follow them. The k-th call in training mode
(the model's ``training`` flag; k = 0, 1, ...) uses the GReg coefficient

    reg_k = min(τ, Δ · ⌊k / K_u⌋)          (Δ = ``delta``, K_u = ``interval``, τ = ``ceiling``)

exactly as the original ``opp_pruner.py`` (``reg_schedule='linear'``). Eval-mode calls use the last
coefficient and do not advance. With ``l2_in_loss=False`` the L2 terms are not in the loss; call
:meth:`TPPLoss.apply_l2_` after ``backward()`` instead: ``grad[P] += reg · param[P]`` for every
pruned slice in one fused call (the original code's ``_apply_reg``).

With ``in_loss=False`` no term is in the loss: ``criterion(logits, labels)`` returns the base loss
(advancing the schedule as above) and :meth:`TPPLoss.apply_grad_`, called once after ``backward()``,
adds every term's gradient into ``.grad`` — lw·reg·∂Σ mean(E²)/∂W and reg·(W_P, b_P, γ_P, β_P) — in
two fused calls whatever the depth of the model (``fastreg.gram_penalty_grad_`` and
``fastreg.l2_grad_``). Where the call goes:

* ``torch.amp.GradScaler``: after ``scaler.unscale_(optimizer)``, before ``scaler.step(optimizer)``
  (the gradients it adds to are then unscaled, as the regularizer's are);
* gradient accumulation: once per optimizer step, after the last micro-batch's ``backward()`` (each
  forward still advances the schedule; with k micro-batches per step, an ``interval`` that is a
  multiple of k keeps reg constant within a step, as in loss mode);
* DDP: after ``backward()`` (the data gradients are then averaged over the processes; the
  regularizer's gradient, the same on every process, is added on each, as loss mode's would be);
* a ``torch.compile``'d step: compile the forward and the loss as usual; ``apply_grad_`` reads reg as
  a tensor there (no recompile per value), and can be compiled itself.

The whole pipeline driven by the iteration count is :class:`fastreg.pruning.TPPPruner`
(:mod:`fastreg.pruning.tpp_pruner`).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..fused import PrunedSlices, group_norms
from ..gram import gram_penalty, gram_penalty_grad_, penalty_dtype
from .. import _registry, reference
from ..reference import TARGETS
from .graph import build_dependency_graph, channel_groups, producer_weight
from .masks import Importance, RatioSpec, layer_keep_masks, resolve_ratios, select_keep_masks
from .physical import check_keep_masks, group_keep_masks, producing_slices


class _PrunedSquares(torch.autograd.Function):
    """½ · coeff · Σ ‖param[P]‖² over every pruned slice (along dim 0) of every param, from one fused
    ``group_norms`` call; backward: ∂/∂param = coeff · param ⊙ pruned, one ``_foreach_mul`` (the per-tensor
    masked products, norms and their autograd would be hundreds of ops on a ResNet)."""

    @staticmethod
    def forward(ctx, pruned_flat: Tensor, pruned_scale: list, coeff: float, *params: Tensor) -> Tensor:
        ctx.pruned_scale, ctx.coeff = pruned_scale, coeff
        ctx.save_for_backward(*params)
        norms = group_norms(list(params), p=2, dim=0, flat=True)
        return 0.5 * coeff * (norms.square() * pruned_flat).sum()

    @staticmethod
    def backward(ctx, g: Tensor):
        params = ctx.saved_tensors
        scale = torch._foreach_mul(ctx.pruned_scale, g * ctx.coeff)  # (tiny: one value per slice)
        return (None, None, None, *torch._foreach_mul(list(params), scale))


def reg_schedule(k: int, delta: float, interval: int, ceiling: float) -> float:
    """GReg coefficient of training iteration k: min(τ, Δ·⌊k / K_u⌋)."""
    return min(ceiling, delta * (k // interval))


class TPPLoss(nn.Module):
    """Drop-in TPP criterion: ``loss = TPPLoss(model, 0.5)(logits, labels)``.

    Args:
        model: the network to prune (not registered as a submodule; not in ``state_dict``).
        pruning_ratio: float in [0, 1) for every block-internal layer, dict ``{pattern: ratio}``
            (``{"*layer*.conv1": 0.9}``), or the string form ``"*layer*.conv1:0.9,..."``.
        criterion: base loss ``criterion(logits, labels)``; cross-entropy by default.
        lw, delta, interval, ceiling: the original ``--lw_opp``, ``--reg_granularity_prune`` (Δ),
            ``--update_reg_interval`` (K_u) and ``--reg_upper_limit`` (τ).
        target: gram target, ``decorrelate`` (TPP), ``diagonal`` (OPP) or ``identity``.
        bn_terms: include the BatchNorm γ, β of pruned channels in the L2 terms.
        l2_in_loss: L2 terms as loss terms (default) or in place by :meth:`apply_l2_`.
        in_loss: every term in the loss (default), or none: the loss is the base loss and
            :meth:`apply_grad_` after ``backward()`` adds all the terms' gradients in place.
        importance: ``"l1"`` (original), ``"l2"`` or ``callable(name, module) -> scores``.
        skip: name patterns never pruned. scope: ``"layer"`` or ``"global"`` ranking.
        coupled: ``"skip"`` (residual-coupled layers untouched, the paper's ResNet setting) or
            ``"group"`` (they share one mask chosen by group saliency).
        example_inputs: one input batch for tracing the graph (default: inferred, 32×32 images).
        backend: backend of the gram penalty op (the per-step ``fastreg.PrunedSlices`` ops choose
            theirs automatically, or from ``FASTREG_BACKEND``).
    """

    def __init__(
        self,
        model: nn.Module,
        pruning_ratio: RatioSpec,
        *,
        criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
        lw: float = 1000.0,
        delta: float = 1e-4,
        interval: int = 10,
        ceiling: float = 1.0,
        target: str = "decorrelate",
        bn_terms: bool = True,
        l2_in_loss: bool = True,
        in_loss: bool = True,
        importance: Importance = "l1",
        skip: Sequence[str] = (),
        scope: str = "layer",
        coupled: str = "skip",
        example_inputs=None,
        backend: str | None = None,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        for name, value in (("lw", lw), ("delta", delta), ("ceiling", ceiling)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive int (iterations between reg updates), got {interval!r}")
        object.__setattr__(self, "model", model)  # a reference, not a submodule
        self.base = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.lw, self.delta, self.interval, self.ceiling = float(lw), float(delta), interval, float(ceiling)
        self.target, self.bn_terms, self.l2_in_loss, self.backend = target, bn_terms, l2_in_loss, backend
        self.in_loss = bool(in_loss)
        self.example_inputs = example_inputs

        graph = build_dependency_graph(model, example_inputs)
        self.groups = channel_groups(model, graph=graph)
        ratios = resolve_ratios(self.groups, pruning_ratio, skip=skip, coupled=coupled)
        masks = select_keep_masks(model, self.groups, ratios, importance=importance, scope=scope)
        self.iteration = 0
        self.reg = 0.0
        self._set_masks(layer_keep_masks(self.groups, masks))

    # ------------------------------------------------------------------ masks and derived lists
    def _set_masks(self, keep_masks: Mapping[str, Tensor]) -> None:
        """Install per-layer masks and build the tensor lists every call uses (done once)."""
        modules = dict(self.model.named_modules())
        keep_masks = check_keep_masks(self.model, keep_masks)
        self.keep_masks = {n: m.to(producer_weight(modules[n]).device) for n, m in keep_masks.items()}
        for g in self.groups:
            given = [n for n in g.producers if n in self.keep_masks]
            if given and len(given) != len(g.producers):
                raise ValueError(f"keep_masks: residual-coupled layers {g.producers} must all have one equal mask")
        group_masks = group_keep_masks(self.groups, self.keep_masks)  # (masks over group channels)
        self._group_masks = group_masks
        self.layers = [n for g, _ in group_masks for n in g.producers]  # pruned layers, model order
        self._gram_weights = [producer_weight(modules[n]) for n in self.layers]
        self._gram_masks = [self.keep_masks[n] for n in self.layers]
        self._l2_params, self._l2_masks = producing_slices(self.model, group_masks, bn=self.bn_terms)
        self._l2_slices = PrunedSlices(self._l2_params, self._l2_masks) if self._l2_params else None
        self._pruned_scale = [
            (~m).to(p.dtype).reshape((-1,) + (1,) * (p.dim() - 1)) for p, m in zip(self._l2_params, self._l2_masks)
        ]
        if self._l2_params:  # 1 per pruned slice, in group_norms(flat=True)'s order and dtype
            flat_dtype = reference.promoted_dtype(self._l2_params)
            self._pruned_flat = torch.cat([(~m).to(flat_dtype) for m in self._l2_masks])
        # reg as a tensor for torch.compile'd steps (a float would be a graph constant: a recompile per value)
        # (in the penalty's dtype: float64 for a float64 model, float32 otherwise, so that it promotes nothing)
        where = dict(device=self._gram_weights[0].device, dtype=penalty_dtype(self._gram_weights)) if self._gram_weights else {}
        self._reg_tensor = torch.tensor(float(getattr(self, "reg", 0.0)), **where)
        self._gram_coeff_tensor = self._reg_tensor * self.lw  # lw·reg, what apply_grad_ hands the gram kernels
        self._reg_in_tensors = float(getattr(self, "reg", 0.0))

    # ------------------------------------------------------------------ the objective
    def reg_at(self, k: int) -> float:
        """The coefficient of training iteration k: min(τ, Δ·⌊k / K_u⌋)."""
        return reg_schedule(k, self.delta, self.interval, self.ceiling)

    def gram_term(self, coeff: float = 1.0) -> Tensor:
        """coeff · Σ_l mean(E_l²) over the pruned layers (one fused call; coeff folded into the kernel)."""
        return gram_penalty(self._gram_weights, self._gram_masks, target=self.target, reduction="mean", coeff=coeff,
                            backend=self.backend)

    def l2_term(self, coeff: float = 1.0) -> Tensor:
        """coeff · ½ · Σ ‖param[P]‖² over pruned filters, biases, BN γ and β: one fused norms call forward,
        one multi-tensor product backward (coeff folded in: no extra pass over the gradients)."""
        return _PrunedSquares.apply(self._pruned_flat, self._pruned_scale, coeff, *self._l2_params)

    def regularization(self, reg: float | Tensor) -> Tensor | float:
        """lw·reg·Σ_l mean(E_l²) (+ ½·reg·‖·_P‖² when ``l2_in_loss``); 0 while reg = 0. A float reg is folded
        into the kernels (no pass over the gradients for it); a 0-d tensor reg, what a torch.compile'd step
        passes (a float would be a graph constant: a recompile per value), multiplies the terms."""
        if not self.layers or (not isinstance(reg, Tensor) and reg == 0.0):
            return 0.0
        folded = 1.0 if isinstance(reg, Tensor) else reg
        out = self.gram_term(self.lw * folded)  # its gradients come out scaled: no pass over them in backward
        if self.l2_in_loss and self._l2_params:
            out = out + self.l2_term(folded)
        return out * reg if isinstance(reg, Tensor) else out

    def _follow_model(self) -> None:
        """Rebuild the mask-derived tensors if the model moved to another device or dtype."""
        if not self.layers:
            return
        moved = self._gram_masks[0].device != self._gram_weights[0].device
        if moved or (self._l2_params and self._pruned_scale[0].dtype != self._l2_params[0].dtype):
            self._set_masks(self.keep_masks)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        reg = self.step_schedule()
        loss = self.base(logits, labels)
        if not self.in_loss:
            return loss
        reg_term = self.regularization(reg)
        return loss + reg_term if isinstance(reg_term, Tensor) else loss

    def step_schedule(self) -> float | Tensor:
        """Advance the GReg schedule exactly as one forward call does (training mode: reg of the next
        iteration; eval mode: unchanged) and return this call's reg: a float, or under torch.compile the
        0-d tensor the graph reads. For drivers that call :meth:`apply_grad_` without calling the
        criterion (a Torch-Pruning-style ``regularize()``)."""
        if torch.compiler.is_compiling():  # the schedule eagerly, reg read by the graph as a tensor
            self._advance_outside_graph()
            return self._reg_tensor
        self._advance()
        return self.reg

    def _advance(self) -> None:
        """The schedule, on the host: this call's reg (training mode advances the iteration)."""
        self._follow_model()
        if self.model.training:
            self.reg = self.reg_at(self.iteration)
            self.iteration += 1
        if self.reg != self._reg_in_tensors:  # the tensor copies (what compiled graphs read), when reg changes
            self._reg_tensor.fill_(self.reg)
            self._gram_coeff_tensor.fill_(self.lw * self.reg)
            self._reg_in_tensors = self.reg

    @torch.compiler.disable(reason="TPPLoss: the GReg schedule (iteration, reg) advances on the host every "
                                   "call, one graph break (compile without fullgraph=True)")
    def _advance_outside_graph(self) -> None:
        """:meth:`_advance` run eagerly under torch.compile, reg handed to the graph as a tensor (so that a
        new value never recompiles)."""
        self._advance()
        if self.layers and not self.in_loss:  # the backend chosen here, so that a compiled apply_grad_ sees no choice made
            _registry.choose_backend("gram_penalty_grad_", self._gram_weights[0].device, self.backend)

    @torch.no_grad()
    def apply_grad_(self) -> None:
        """After ``backward()`` (with ``in_loss=False``): every TPP term's gradient added into ``.grad``
        with this step's reg — ``W.grad += lw·reg·∂Σ_l mean(E_l²)/∂W`` over the pruned layers (one
        ``gram_penalty_grad_`` call) and ``grad[P] += reg · param[P]`` for every pruned filter, bias, BN γ
        and β (one ``l2_grad_`` call). A zero ``.grad`` is created for a pruned layer's weight that has
        none; the L2 call raises, naming the tensor, where a pruned bias or BN parameter has none."""
        self._follow_model()
        if self.in_loss:
            raise RuntimeError("apply_grad_() is for in_loss=False; here the TPP terms are already in the loss")
        if not self.layers:
            return
        if torch.compiler.is_compiling():  # reg as the tensors the schedule fills (no recompile per value)
            gram_coeff, l2_coeff = self._gram_coeff_tensor, self._reg_tensor
        elif self.reg == 0.0:
            return
        else:
            gram_coeff, l2_coeff = self.lw * self.reg, self.reg
        gram_penalty_grad_(self._gram_weights, self._gram_masks, target=self.target, reduction="mean",
                           coeff=gram_coeff, backend=self.backend)
        if self._l2_params:
            self._l2_slices.l2_grad_(l2_coeff)

    @torch.no_grad()
    def apply_l2_(self) -> None:
        """After ``backward()`` (with ``l2_in_loss=False``): grad[P] += reg · param[P] for every
        pruned filter, bias, BN γ and β, one fused ``l2_grad_`` call."""
        self._follow_model()
        if not self.in_loss:
            raise RuntimeError("apply_l2_() is for in_loss=True with l2_in_loss=False; with in_loss=False, "
                               "apply_grad_() applies the L2 terms")
        if self.l2_in_loss:
            raise RuntimeError("apply_l2_() is for l2_in_loss=False; here the L2 terms are already in the loss")
        if self.reg == 0.0 or not self._l2_params:
            return
        self._l2_slices.l2_grad_(self.reg)  # raises, naming the tensor, if backward() has not run

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        return {
            "iteration": self.iteration,
            "reg": self.reg,
            "keep_masks": {n: m.cpu() for n, m in self.keep_masks.items()},
        }

    def set_extra_state(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.reg = float(state["reg"])
        self._set_masks(state["keep_masks"])  # (also sets the tensor copy of reg)

    def extra_repr(self) -> str:
        return (
            f"layers={len(self.layers)}, lw={self.lw}, delta={self.delta}, interval={self.interval}, "
            f"ceiling={self.ceiling}, target={self.target!r}, in_loss={self.in_loss}, iteration={self.iteration}, "
            f"reg={self.reg}"
        )
