"""Physical pruning, zero-out, and model size.

* :func:`prune` removes the pruned filters of each masked layer together with every slice coupled
  to them (BN channels, the next layers' input channels, residual partners) through
  Torch-Pruning's ``DependencyGraph``, and returns the smaller model. Pruned attention heads are
  removed by replacing their ``nn.MultiheadAttention`` with a
  :class:`~fastreg.pruning.attention.HeadPrunedAttention` holding the kept heads.
* :func:`zero_pruned_` sets the same channels' output-side slices to 0 (filters, biases, norm γ/β,
  depthwise filters): in eval mode the zeroed model computes exactly what the pruned model
  computes (a zeroed channel is 0 after its BN, so the inputs it feeds contribute nothing).
* :func:`count_params_flops` counts parameters and multiply-accumulates of one forward pass.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import Tensor, nn

from ..fused import PrunedSlices
from .attention import pruned_heads, remove_heads_
from .graph import LAYER_TYPES, ChannelGroup, build_dependency_graph, channel_groups, eval_mode, out_channel_handler, producer_weight


def check_keep_masks(model: nn.Module, keep_masks: Mapping[str, Tensor], name: str = "keep_masks") -> dict[str, Tensor]:
    """keep_masks: module name → 1-D bool mask (True = kept) over the layer's output filters (the
    q, k, v rows of ``in_proj_weight`` for an nn.MultiheadAttention), keeping at least one filter."""
    if not isinstance(keep_masks, Mapping):
        raise TypeError(f"{name} must be a dict of module name -> bool mask, got {type(keep_masks).__name__}")
    modules = dict(model.named_modules())
    out = {}
    for layer, mask in keep_masks.items():
        module = modules.get(layer)
        if module is None:
            raise ValueError(f"{name}: the model has no module named {layer!r}")
        if not isinstance(module, LAYER_TYPES + (nn.MultiheadAttention,)):
            raise ValueError(f"{name}: {layer!r} is a {type(module).__name__}, not a Conv/Linear layer or an nn.MultiheadAttention")
        if producer_weight(module) is None:
            raise ValueError(f"{name}: the heads of {layer!r} cannot be pruned: its q, k, v projections are separate "
                             f"(kdim/vdim differ from embed_dim), not one in_proj_weight")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{name}[{layer!r}] must be a bool tensor (True = kept), got {getattr(mask, 'dtype', type(mask).__name__)}")
        n = producer_weight(module).shape[0]
        if mask.dim() != 1 or mask.shape[0] != n:
            what = "the q, k, v rows of in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "the layer's output filters"
            raise ValueError(f"{name}[{layer!r}] must have shape [{n}] ({what}), got {tuple(mask.shape)}")
        if not bool(mask.any()):
            raise ValueError(f"{name}[{layer!r}] prunes every filter; keep at least one")
        out[layer] = mask
    return out


def group_keep_masks(groups: list[ChannelGroup], keep_masks: Mapping[str, Tensor], name: str = "keep_masks") -> list[tuple[ChannelGroup, Tensor]]:
    """One keep mask over group channels per group touched by ``keep_masks`` (layer masks over
    filters); residual-coupled layers must agree, and a layer whose filters split into channel
    groups must keep the same filters in each."""
    out = []
    for g in groups:
        given = [(n, keep_masks[n]) for n in g.producers if n in keep_masks]
        if not given:
            continue
        channel_masks = []
        for n, m in given:
            s = g.filter_slice(n)
            index, channel = s.index.to(m.device), s.channel.to(m.device)
            gm = torch.ones(g.num_channels, dtype=torch.bool, device=m.device)
            gm[channel] = m[index]
            if not torch.equal(gm[channel], m[index]):
                if g.heads:
                    raise ValueError(f"{name}[{n!r}]: the q, k and v rows of each attention head must be all kept or all pruned")
                raise ValueError(
                    f"{name}[{n!r}]: the layer's filters split into {g.channel_groups} channel groups (grouped conv, "
                    f"GroupNorm or attention heads) that must all keep the same positions"
                )
            channel_masks.append((n, gm))
        first_name, first = channel_masks[0]
        for n, m in channel_masks[1:]:
            if not torch.equal(m.cpu(), first.cpu()):
                raise ValueError(
                    f"{name}: {first_name!r} and {n!r} are residual-coupled (one shared mask) but their masks differ"
                )
        if g.blocked:
            raise ValueError(f"{name}: the channels of {first_name!r} cannot be pruned exactly: {g.blocked}")
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
    groups = channel_groups(target, example_inputs, graph=graph)
    modules = dict(target.named_modules())
    group_masks = group_keep_masks(groups, keep_masks, "keep_masks")
    with torch.no_grad():
        for g, keep in group_masks:
            if g.heads:
                continue
            s = g.filter_slice(g.root)
            pruned = s.index[~keep.cpu()[s.channel]].tolist()
            if not pruned:
                continue
            root = modules[g.root]
            graph.get_pruning_group(root, out_channel_handler(root), idxs=pruned).prune()
        # (after the graph's pruning: the heads' input and output widths are the stream's)
        for name, keep in pruned_heads(group_masks):
            remove_heads_(target, name, keep)
    return target


@torch.no_grad()
def zero_pruned_(model: nn.Module, keep_masks: Mapping[str, Tensor], example_inputs=None, groups=None) -> None:
    """Set every output-side slice of the pruned channels to 0, in place (one fused ``shrink_``
    call with factor 0): filters, biases, norm γ/β, depthwise filters passing them through."""
    keep_masks = check_keep_masks(model, keep_masks)
    groups = groups if groups is not None else channel_groups(model, example_inputs)
    tensors, masks = producing_slices(model, group_keep_masks(groups, keep_masks, "keep_masks"))
    if tensors:
        PrunedSlices(tensors, masks).shrink_(0.0)


def producing_slices(model: nn.Module, group_masks, *, bn: bool = True, bias: bool = True) -> tuple[list[Tensor], list[Tensor]]:
    """The dim-0 tensors that compute each group's channels — producer weights (and biases), norm γ
    and β (``bn``), depthwise filters passing them through — each with a keep mask over its own
    dim-0 positions built from its group's channel mask: the inputs of a ``fastreg.PrunedSlices`` plan."""
    modules = dict(model.named_modules())
    tensors, masks = [], []
    for g, keep in group_masks:
        for s in g.output_slices(norms=bn, bias=bias):
            t = getattr(modules[s.module], s.param)
            if s.dim != 0:
                raise ValueError(f"{s.module}.{s.param} is pruned along dim {s.dim}: its group cannot be zeroed in place")
            tensors.append(t)
            masks.append(s.position_mask(keep.to(t.device), t.shape[0]))
    return tensors, masks


def count_params_flops(model: nn.Module, example_inputs=None) -> tuple[int, int]:
    """(parameters, FLOPs) of one forward pass on ``example_inputs``; FLOPs are counted as
    multiply-accumulates, the convention of the pruning literature (CIFAR ResNet-56: 125M); attention
    modules that apply their projections through ``F.linear`` are counted whole (:mod:`.macs`).
    BatchNorm running stats are not touched."""
    import torch_pruning as tp
    from torch_pruning.utils import op_counter

    from .graph import default_example_inputs
    from .macs import macs_hooks

    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    op_counter.CUSTOM_MODULES_MAPPING.update(macs_hooks())  # (reset by every count)
    with eval_mode(model):
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(params), int(macs)
