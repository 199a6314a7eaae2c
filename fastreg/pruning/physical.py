"""Physical pruning, zero-out, and model size.

* :func:`prune` removes the pruned filters of each masked layer together with every slice coupled
  to them (BN channels, the next layers' input channels, residual partners) through
  Torch-Pruning's ``DependencyGraph``, and returns the smaller model.
* :func:`zero_pruned_` sets the same slices' producing parameters to 0 (filters, biases, BN γ/β):
  in eval mode the zeroed model computes exactly what the pruned model computes (a zeroed channel
  is 0 after its BN, so the inputs it feeds contribute nothing).
* :func:`count_params_flops` counts parameters and multiply-accumulates of one forward pass.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import Tensor, nn

from ..fused import PrunedSlices
from .graph import LAYER_TYPES, ChannelGroup, build_dependency_graph, channel_groups, eval_mode, out_channel_handler


def check_keep_masks(model: nn.Module, keep_masks: Mapping[str, Tensor], name: str = "keep_masks") -> dict[str, Tensor]:
    """keep_masks: module name → 1-D bool mask (True = kept) over the layer's output filters,
    keeping at least one filter."""
    if not isinstance(keep_masks, Mapping):
        raise TypeError(f"{name} must be a dict of module name -> bool mask, got {type(keep_masks).__name__}")
    modules = dict(model.named_modules())
    out = {}
    for layer, mask in keep_masks.items():
        module = modules.get(layer)
        if module is None:
            raise ValueError(f"{name}: the model has no module named {layer!r}")
        if not isinstance(module, LAYER_TYPES):
            raise ValueError(f"{name}: {layer!r} is a {type(module).__name__}, not a Conv/Linear layer")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{name}[{layer!r}] must be a bool tensor (True = kept), got {getattr(mask, 'dtype', type(mask).__name__)}")
        n = module.weight.shape[0]
        if mask.dim() != 1 or mask.shape[0] != n:
            raise ValueError(f"{name}[{layer!r}] must have shape [{n}] (the layer's output filters), got {tuple(mask.shape)}")
        if not bool(mask.any()):
            raise ValueError(f"{name}[{layer!r}] prunes every filter; keep at least one")
        out[layer] = mask
    return out


def _group_masks(groups: list[ChannelGroup], keep_masks: Mapping[str, Tensor], name: str) -> list[tuple[ChannelGroup, Tensor]]:
    """One mask per group touched by keep_masks; residual-coupled layers must agree."""
    out = []
    for g in groups:
        given = [(n, keep_masks[n]) for n in g.producers if n in keep_masks]
        if not given:
            continue
        first_name, first = given[0]
        for n, m in given[1:]:
            if not torch.equal(m.cpu(), first.cpu()):
                raise ValueError(
                    f"{name}: {first_name!r} and {n!r} are residual-coupled (one shared mask) but their masks differ"
                )
        if not g.prunable:
            raise ValueError(f"{name}: the outputs of {first_name!r} are the model's outputs and cannot be pruned")
        out.append((g, first))
    return out


def prune(model: nn.Module, keep_masks: Mapping[str, Tensor], example_inputs=None, *, inplace: bool = False) -> nn.Module:
    """The model without the pruned filters of ``keep_masks`` (module name → bool, True = kept)
    and every slice coupled to them. Residual-coupled layers must share a mask; a layer that is
    coupled to a masked one is pruned with it. Returns a copy unless ``inplace``."""
    keep_masks = check_keep_masks(model, keep_masks)
    target = model if inplace else copy.deepcopy(model)
    graph = build_dependency_graph(target, example_inputs)
    groups = channel_groups(target, graph=graph)
    modules = dict(target.named_modules())
    with torch.no_grad():
        for g, keep in _group_masks(groups, keep_masks, "keep_masks"):
            pruned = (~keep).nonzero().flatten().tolist()
            if not pruned:
                continue
            root = modules[g.producers[0]]
            graph.get_pruning_group(root, out_channel_handler(root), idxs=pruned).prune()
    return target


@torch.no_grad()
def zero_pruned_(model: nn.Module, keep_masks: Mapping[str, Tensor], example_inputs=None, groups=None) -> None:
    """Set the pruned filters (weights, biases) and their BatchNorm γ, β to 0, in place (one
    fused ``shrink_`` call with factor 0)."""
    keep_masks = check_keep_masks(model, keep_masks)
    groups = groups if groups is not None else channel_groups(model, example_inputs)
    tensors, masks = producing_slices(model, _group_masks(groups, keep_masks, "keep_masks"))
    if tensors:
        PrunedSlices(tensors, masks).shrink_(0.0)


def producing_slices(model: nn.Module, group_masks, *, bn: bool = True, bias: bool = True) -> tuple[list[Tensor], list[Tensor]]:
    """The dim-0 tensors that produce each group's channels — producer weights (and biases), BN γ
    and β — each with its group's keep mask: the inputs of a ``fastreg.PrunedSlices`` plan."""
    modules = dict(model.named_modules())
    tensors, masks = [], []
    for g, keep in group_masks:
        for name in g.producers:
            m = modules[name]
            tensors.append(m.weight)
            masks.append(keep)
            if bias and m.bias is not None:
                tensors.append(m.bias)
                masks.append(keep)
        if bn:
            for name in g.norms:
                m = modules[name]
                if m.affine:
                    tensors += [m.weight, m.bias]
                    masks += [keep, keep]
    return tensors, masks


def count_params_flops(model: nn.Module, example_inputs=None) -> tuple[int, int]:
    """(parameters, FLOPs) of one forward pass on ``example_inputs``; FLOPs are counted as
    multiply-accumulates, the convention of the pruning literature (CIFAR ResNet-56: 125M).
    BatchNorm running stats are not touched."""
    import torch_pruning as tp

    from .graph import default_example_inputs

    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    with eval_mode(model):
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(params), int(macs)
