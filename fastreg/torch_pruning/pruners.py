"""Torch-Pruning's GroupNormPruner, GrowingRegPruner and BNScalePruner with fused ``regularize()`` (see
:mod:`fastreg.torch_pruning`)."""
from __future__ import annotations

import math
import typing

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning.pruner import function
from torch_pruning.pruner.importance import GroupMagnitudeImportance

from .. import _registry, fused
from ..fused import GroupedSlices

__all__ = ["BNScalePruner", "GroupNormPruner", "GrowingRegPruner"]

_OUT = (function.prune_conv_out_channels, function.prune_linear_out_channels)
_IN = (function.prune_conv_in_channels, function.prune_linear_in_channels)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ---------------------------------------------------------------------------------------------
# Plans: which slice of which tensor belongs to which group channel
# ---------------------------------------------------------------------------------------------
class _SliceTable:
    """(tensor, dim, slice positions, channel ids) entries gathered into id vectors, one per (tensor, dim)
    — or several where one slice belongs to more than one channel (each adds its own term)."""

    def __init__(self):
        self._entries: dict[tuple[int, int], tuple[Tensor, int, list[Tensor]]] = {}

    def add(self, tensor: Tensor, dim: int, positions, ids) -> None:
        positions = torch.as_tensor(list(positions), dtype=torch.int64)
        ids = torch.as_tensor(list(ids), dtype=torch.int64)
        if not positions.numel():
            return
        _, _, vectors = self._entries.setdefault((id(tensor), dim), (tensor, dim, []))
        while positions.numel():
            # one id per slice and vector: a position listed twice goes to the next vector
            first = torch.ones_like(positions, dtype=torch.bool)
            seen = set()
            for k, p in enumerate(positions.tolist()):
                first[k] = p not in seen
                seen.add(p)
            pos, gid = positions[first], ids[first]
            for vec in vectors:
                if bool((vec[pos] < 0).all()):
                    vec[pos] = gid
                    break
            else:
                vec = torch.full((tensor.shape[dim],), -1, dtype=torch.int64)
                vec[pos] = gid
                vectors.append(vec)
            positions, ids = positions[~first], ids[~first]

    def plan(self, num_groups: int) -> GroupedSlices | None:
        tensors, dims, ids = [], [], []
        for tensor, dim, vectors in self._entries.values():
            for vec in vectors:
                tensors.append(tensor)
                dims.append(dim)
                ids.append(vec.to(tensor.device))
        return GroupedSlices(tensors, dims, ids, num_groups) if tensors else None


def _with_grads(plan: GroupedSlices | None, cache: dict) -> tuple[GroupedSlices | None, list[Tensor]]:
    """The plan over the tensors that have a ``.grad`` (Torch-Pruning skips the others) and their grads."""
    if plan is None:
        return None, []
    grads = [t.grad for t in plan.tensors]
    if all(g is not None for g in grads):
        return plan, grads
    key = tuple(g is not None for g in grads)
    if key not in cache:
        keep = [i for i, present in enumerate(key) if present]
        cache[key] = GroupedSlices([plan.tensors[i] for i in keep], [plan.dims[i] for i in keep],
                                   [plan.group_ids[i] for i in keep], plan.num_groups) if keep else None
    sub = cache[key]
    return sub, ([grads[i] for i in range(len(grads)) if key[i]] if sub is not None else [])


def _root_idxs(group, k: int) -> list | None:
    root = group[k].root_idxs
    return None if any(r is None for r in root) else list(root)


def _fusable_magnitude(importance) -> bool:
    """Torch-Pruning's GroupMagnitudeImportance(p=2) whose reduction and normalizer scale each group by one
    positive factor (which DepGraph's γ does not see): its importance is the groups' sums of squares."""
    return (isinstance(importance, GroupMagnitudeImportance)
            and type(importance).__call__ is GroupMagnitudeImportance.__call__
            and importance.p == 2 and importance.group_reduction in ("mean", "sum")
            and importance.normalizer in (None, "mean", "sum", "max"))


def _add_importance_slices(table: _SliceTable, importance: GroupMagnitudeImportance, group, offset: int) -> bool:
    """The slices GroupMagnitudeImportance(p=2) sums the squares of, per group channel; False if none."""
    found = False
    for k, (dep, idxs) in enumerate(group):
        layer, fn, root = dep.layer, dep.pruning_fn, _root_idxs(group, k)
        if root is None or not isinstance(layer, tuple(importance.target_types)):
            continue
        ids = [offset + r for r in root]
        transposed = getattr(layer, "transposed", False)
        if fn in _OUT:
            table.add(layer.weight, 1 if transposed else 0, idxs, ids)
            if importance.bias and layer.bias is not None:
                table.add(layer.bias, 0, idxs, ids)
        elif fn in _IN:
            dim = 0 if transposed else 1
            cols = layer.weight.shape[dim]
            repeat = fn == function.prune_conv_in_channels and layer.groups not in (1, layer.in_channels)
            table.add(layer.weight, dim, [i % cols for i in idxs] if repeat else idxs, ids)
        elif fn in (function.prune_batchnorm_out_channels, function.prune_layernorm_out_channels):
            if not (layer.affine if fn == function.prune_batchnorm_out_channels else layer.elementwise_affine):
                continue
            table.add(layer.weight, 0, idxs, ids)
            if importance.bias and layer.bias is not None:
                table.add(layer.bias, 0, idxs, ids)
        else:
            continue
        found = True
    return found


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


class _PlanCache:
    """The plans of a drop-in, built on first use and dropped when the groups change: by
    ``update_regularizer()`` and by ``step()`` (pruning replaces the parameters; call
    ``update_regularizer()`` afterwards, as Torch-Pruning needs too)."""

    _plans: dict

    def _drop_plans(self) -> None:
        self._plans = {}

    def update_regularizer(self):
        super().update_regularizer()
        self._drop_plans()

    def step(self, interactive: bool = False):
        self._drop_plans()
        return super().step(interactive)


# ---------------------------------------------------------------------------------------------
# GroupNormPruner (DepGraph)
# ---------------------------------------------------------------------------------------------
class GroupNormPruner(_PlanCache, tp.pruner.GroupNormPruner):
    """``tp.pruner.GroupNormPruner`` whose ``regularize()`` is ≤ 3 fused ops (see the module docstring).
    ``torch_pruning_compat=True``: α = 16 unless given to ``regularize`` (``alpha`` unused) and an
    unguarded max − min."""

    def __init__(self, *args, torch_pruning_compat: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.torch_pruning_compat = torch_pruning_compat
        self._plans: dict = {}

    def _plan(self, bias: bool) -> dict:
        if bias in self._plans:
            return self._plans[bias]
        fusable = _fusable_magnitude(self.importance)
        grad_table, imp_table, sizes, groups = _SliceTable(), _SliceTable(), [], []
        for group in self._groups:
            offset = sum(sizes)
            if fusable and not _add_importance_slices(imp_table, self.importance, group, offset):
                continue  # no importance (Torch-Pruning skips the group)
            n = len(group[0].idxs)
            self._add_grad_slices(grad_table, group, offset, n, bias)
            sizes.append(n)
            groups.append(group)
        total = sum(sizes)
        device = next(iter(self.model.parameters())).device
        plan = dict(grads=grad_table.plan(total), importance=imp_table.plan(total) if fusable else None,
                    groups=groups, sizes=sizes, offsets=torch.tensor(_offsets(sizes), device=device), subsets={})
        self._plans[bias] = plan
        return plan

    def _add_grad_slices(self, table: _SliceTable, group, offset: int, n: int, bias: bool) -> None:
        """Torch-Pruning's GroupNormPruner.regularize, slice by slice (its grouped-conv input truncation
        included: the γ of later members of the group is cut to the same length)."""
        ch_groups = self._get_channel_groups(group)
        gamma_len = n
        for k, (dep, idxs) in enumerate(group):
            layer, fn, root = dep.target.module, dep.handler, _root_idxs(group, k)
            if root is None:
                continue
            idxs = list(idxs)
            if fn == function.prune_conv_in_channels and layer.groups > 1:
                gamma_len = len(idxs) // ch_groups
                idxs, root = idxs[:gamma_len], root[:gamma_len]
            pairs = [(i, offset + r) for i, r in zip(idxs, root) if r < gamma_len]
            if not pairs:
                continue
            pos, ids = zip(*pairs)
            if fn in _OUT:
                table.add(layer.weight, 0, pos, ids)
                if bias and layer.bias is not None:
                    table.add(layer.bias, 0, pos, ids)
            elif fn in _IN:
                table.add(layer.weight, 1, pos, ids)
            elif fn == function.prune_batchnorm_out_channels and layer.affine:
                table.add(layer.weight, 0, pos, ids)
                if bias and layer.bias is not None:
                    table.add(layer.bias, 0, pos, ids)

    def _importance(self, plan: dict) -> Tensor:
        """Every group's importance before the square root, concatenated (up to one factor per group)."""
        if plan["importance"] is not None:
            return plan["importance"].sq_sums()
        parts = []
        for group, n in zip(plan["groups"], plan["sizes"]):
            imp = self.estimate_importance(group)
            parts.append(torch.full((n,), math.nan) if imp is None else imp.detach().float().cpu())
        return torch.cat(parts).to(plan["offsets"].device) if parts else torch.zeros(0, device=plan["offsets"].device)

    @torch.no_grad()
    def regularize(self, model, alpha=None, bias=False):
        """``grad[slice] += reg · γ_c · slice`` over every slice of every group channel c."""
        if alpha is None:
            alpha = 2 ** 4 if self.torch_pruning_compat else 2 ** self.alpha
        plan = self._plan(bool(bias))
        grads_plan, grads = _with_grads(plan["grads"], plan["subsets"])
        if grads_plan is not None:
            gamma = fused.group_norm_gamma(self._importance(plan), plan["offsets"], alpha,
                                           guard=not self.torch_pruning_compat)
            grads_plan.l2_grad_(gamma, self.reg, grads=grads)
        self.cnt += 1


# ---------------------------------------------------------------------------------------------
# GrowingRegPruner (GReg)
# ---------------------------------------------------------------------------------------------
class GrowingRegPruner(_PlanCache, tp.pruner.GrowingRegPruner):
    """``tp.pruner.GrowingRegPruner`` whose ``regularize()`` is one fused op (see the module docstring).
    ``torch_pruning_compat=True``: no BatchNorm term and ``update_regularizer()`` resets the coefficients."""

    def __init__(self, *args, torch_pruning_compat: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.torch_pruning_compat = torch_pruning_compat
        self._plans: dict = {}
        self._coeffs: Tensor | None = None

    def update_reg(self):
        super().update_reg()
        self._coeffs = None

    def _drop_plans(self) -> None:
        self._plans, self._coeffs = {}, None

    def update_regularizer(self):
        old = {self._group_key(g): reg for g, reg in self.group_reg.items()}
        super().update_regularizer()
        if not self.torch_pruning_compat:  # a group still there with the same channels keeps its grown coefficients
            for group in self._groups:
                kept = old.get(self._group_key(group))
                if kept is not None:
                    self.group_reg[group] = kept

    @staticmethod
    def _group_key(group) -> tuple:
        dep = group[0].dep
        return id(dep.target.module), dep.handler, len(group[0].idxs)

    def _plan(self, bias: bool) -> dict:
        if bias in self._plans:
            return self._plans[bias]
        table, groups, offset = _SliceTable(), [], 0
        for group in self._groups:
            if self.estimate_importance(group) is None:
                continue  # no importance (Torch-Pruning skips the group)
            self._add_grad_slices(table, group, offset, bias)
            groups.append(group)
            offset += len(group[0].idxs)
        self._plans[bias] = dict(grads=table.plan(offset), groups=groups, subsets={})
        self._coeffs = None
        return self._plans[bias]

    def _add_grad_slices(self, table: _SliceTable, group, offset: int, bias: bool) -> None:
        for k, (dep, idxs) in enumerate(group):
            layer, fn, root = dep.layer, dep.pruning_fn, _root_idxs(group, k)
            if root is None or (layer in self.ignored_layers and fn not in _IN):
                continue
            ids = [offset + r for r in root]
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.affine:
                if not self.torch_pruning_compat:
                    table.add(layer.weight, 0, idxs, ids)
                    if bias and layer.bias is not None:
                        table.add(layer.bias, 0, idxs, ids)
            elif isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
                if fn in _OUT:
                    table.add(layer.weight, 0, idxs, ids)
                    if bias and layer.bias is not None:
                        table.add(layer.bias, 0, idxs, ids)
                elif fn in _IN:
                    table.add(layer.weight, 1, idxs, ids)

    @torch.no_grad()
    def regularize(self, model, bias=False):
        """``grad[slice] += reg_c · slice`` over every slice of every group channel c."""
        plan = self._plan(bool(bias))
        grads_plan, grads = _with_grads(plan["grads"], plan["subsets"])
        if grads_plan is None:
            return
        if self._coeffs is None or self._coeffs.device != grads_plan.device:  # (when update_reg() ran)
            regs = [self.group_reg[g].detach().double() for g in plan["groups"]]
            self._coeffs = torch.cat(regs).to(grads_plan.device) if regs else torch.zeros(0, device=grads_plan.device)
        grads_plan.l2_grad_(self._coeffs, 1.0, grads=grads)


# ---------------------------------------------------------------------------------------------
# BNScalePruner (network slimming)
# ---------------------------------------------------------------------------------------------
class BNScalePruner(_PlanCache, tp.pruner.BNScalePruner):
    """``tp.pruner.BNScalePruner`` whose ``regularize()`` is one fused op (sign), or four (group lasso)."""

    def __init__(self, *args, torch_pruning_compat: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.torch_pruning_compat = torch_pruning_compat  # (nothing differs: accepted for a uniform interface)
        self._plans: dict = {}

    def _bn_weights(self, model) -> list[Tensor]:
        """The weights of the affine BatchNorm layers of ``model`` that are not ignored."""
        key = ("sign", id(model))
        if key not in self._plans:
            self._plans[key] = [m.weight for m in model.modules()
                                if isinstance(m, _BN_TYPES) and m.affine and m not in self.ignored_layers]
        return self._plans[key]

    def _lasso_plan(self) -> dict:
        if "lasso" in self._plans:
            return self._plans["lasso"]
        table, count, offset = _SliceTable(), [], 0
        for group in self._groups:
            n, per_channel, found = len(group[0].idxs), 0, False
            for k, (dep, idxs) in enumerate(group):
                layer, root = dep.layer, _root_idxs(group, k)
                if isinstance(layer, nn.modules.batchnorm._BatchNorm) and root is not None and layer.affine:
                    found = True
                    per_channel += 1  # the importance's mean over the group's BatchNorms
                    if layer not in self.ignored_layers:
                        table.add(layer.weight, 0, idxs, [offset + r for r in root])
            if found:
                count += [per_channel] * n
                offset += n
        plan = table.plan(offset)
        device = plan.device if plan is not None else torch.device("cpu")
        dtype = torch.float64 if plan is not None and plan.tensors[0].dtype == torch.float64 else torch.float32
        inv_count = 1.0 / torch.tensor(count, dtype=torch.float64)
        self._plans["lasso"] = dict(grads=plan, subsets={}, inv_count=inv_count.to(device, dtype),
                                    eps=torch.full((offset,), 1e-9, device=device, dtype=dtype))
        return self._plans["lasso"]

    def regularize(self, model, reg=None, bias=False):
        """``grad(γ) += reg · sign(γ)``, or (group lasso) ``grad(γ_c) += reg · γ_c / √(mean γ_c² + 1e-9)``."""
        if reg is None:
            reg = self.reg
        if not self.group_lasso:
            self._slimming_grad(model, reg)
            return
        with torch.no_grad():
            plan = self._lasso_plan()
            grads_plan, grads = _with_grads(plan["grads"], plan["subsets"])
            if grads_plan is None:
                return
            scale = torch.addcmul(plan["eps"], grads_plan.sq_sums(), plan["inv_count"]).rsqrt_()
            grads_plan.l2_grad_(scale, reg, grads=grads)

    def _slimming_plan(self, model):
        """The BatchNorm weights of ``model`` held by a C++ plan that reads their ``.grad`` itself, or None
        where no compiled self-checking kernel serves them."""
        key = ("sign plan", id(model))
        if key not in self._plans:
            weights = self._bn_weights(model)
            held = bool(weights) and _registry.fast_op("slimming_grad_", weights) is not None  # (cpp, cuda: compiled)
            self._plans[key] = torch.classes.fastreg.SlicePlan(weights, [], [0] * len(weights), []) if held else None
        return self._plans[key]

    def _slimming_grad(self, model, reg) -> None:
        """``grad(γ) += reg · sign(γ)`` over the BatchNorm weights that have a ``.grad`` (Torch-Pruning skips the
        others). The call costs about as much as the op itself (53 BatchNorms: tens of µs): a float ``reg``
        goes to the C++ plan, which reads the grads and calls the self-checking kernel."""
        if type(reg) is float and not torch.compiler.is_compiling():
            plan = self._slimming_plan(model)
            if plan is not None:
                plan.slimming_grad_(reg, None)
                return
        weights = [w for w in self._bn_weights(model) if w.grad is not None]
        if weights:
            fused.slimming_grad_(weights, reg)
