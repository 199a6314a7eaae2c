"""Which channels of a model must be pruned together, read from its graph (never from module names).

Torch-Pruning's ``DependencyGraph`` traces one forward pass and, for the output channels of
every Conv/Linear layer, returns the *group* of coupled slices: the layer's filters and bias, the
BatchNorm γ/β acting on those channels, the next layers' input columns, and — through residual
additions — the filters of every other layer summed into the same tensor. One
:class:`ChannelGroup` per such group; channel j of the group is one prunable unit.

* ``producers``: Conv/Linear layers whose output filters are the group's channels (one for a
  block-internal layer, several for residual-coupled layers: ``coupled=True``).
* ``norms``: BatchNorm layers whose channels are the group's channels (the BN that follows each
  producer, found from the graph).
* ``slices``: every coupled tensor slice (producer weight/bias dim 0, BN γ/β dim 0, consumer
  weight dim 1) with its channel index, for group saliency (OCSPruner).

A group whose channels reach no other layer holds the model's outputs and is never prunable.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class CoupledSlice:
    """Slices ``index`` of ``module.<param>`` along ``dim`` belong to group channels ``channel``."""

    module: str
    param: str
    dim: int
    index: Tensor  # int64 positions along dim
    channel: Tensor  # int64 group channel of each position


@dataclass
class ChannelGroup:
    producers: list[str]
    norms: list[str]
    num_channels: int
    slices: list[CoupledSlice] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)  # layers reading these channels
    order: int = 0  # index of its first producer among all Conv/Linear layers (model order)

    @property
    def prunable(self) -> bool:
        """False when no layer reads the channels: they are the model's outputs."""
        return len(self.consumers) > 0

    @property
    def internal(self) -> bool:
        """One producer feeding one consumer, e.g. the first convs of a ResNet block: the layers a
        single float pruning ratio applies to (as in the TPP paper)."""
        return not self.coupled and len(self.consumers) == 1

    @property
    def coupled(self) -> bool:
        """Several layers' filters are tied together (residual additions)."""
        return len(self.producers) > 1


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run a tracing forward pass without touching BatchNorm running stats or dropout masks."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def default_example_inputs(model: nn.Module) -> Tensor:
    """A batch of one input inferred from the first layer: (1, C, 32, 32) for a Conv2d (32 for each
    spatial dim of Conv1d/3d), (1, D) for a Linear. Pass ``example_inputs`` for anything else."""
    for m in model.modules():
        if isinstance(m, LAYER_TYPES):
            p = m.weight
            if isinstance(m, nn.Linear):
                shape = (1, m.in_features)
            else:
                shape = (1, m.in_channels) + (32,) * (p.dim() - 2)
            return torch.ones(shape, dtype=p.dtype, device=p.device)  # no RNG draw: seeded runs stay put
    raise ValueError("model has no Conv/Linear layer: there is nothing to prune")


def build_dependency_graph(model: nn.Module, example_inputs=None):
    """Torch-Pruning ``DependencyGraph`` of ``model`` traced in eval mode (BN stats untouched)."""
    import torch_pruning as tp

    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    try:
        with eval_mode(model), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    except Exception as exc:  # tracing failures come from deep inside torch_pruning
        raise RuntimeError(
            f"could not trace the model's dependency graph with example_inputs of shape "
            f"{tuple(getattr(example_inputs, 'shape', ()))}: {exc}. Pass example_inputs= matching the model's input."
        ) from exc


def out_channel_handler(module: nn.Module):
    import torch_pruning as tp

    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def channel_groups(model: nn.Module, example_inputs=None, graph=None) -> list[ChannelGroup]:
    """Every group of coupled output channels of the model's Conv/Linear layers, in model order."""
    graph = graph if graph is not None else build_dependency_graph(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    layer_order = {n: i for i, (n, m) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES))}
    seen: set[str] = set()
    groups = []
    for name, module in model.named_modules():
        if not isinstance(module, LAYER_TYPES) or name in seen:
            continue
        n = module.weight.shape[0]
        group = graph.get_pruning_group(module, out_channel_handler(module), idxs=list(range(n)))
        producers, norms, slices, consumers = [], [], [], []
        for item in group.items:
            target = item.dep.target.module
            if target not in names:
                continue  # element-wise ops, reshapes: no parameters
            tname = names[target]
            index = torch.tensor([int(i) for i in item.idxs], dtype=torch.long)
            channel = torch.tensor([int(i) for i in item.root_idxs], dtype=torch.long)
            handler = item.dep.handler
            out_fn = graph.is_out_channel_pruning_fn(handler)
            if isinstance(target, LAYER_TYPES):
                if out_fn:
                    if tname not in producers:
                        producers.append(tname)
                        slices.append(CoupledSlice(tname, "weight", 0, index, channel))
                        if target.bias is not None:
                            slices.append(CoupledSlice(tname, "bias", 0, index, channel))
                else:
                    if tname not in consumers:
                        consumers.append(tname)
                    if getattr(target, "groups", 1) == 1:
                        slices.append(CoupledSlice(tname, "weight", 1, index, channel))
            elif isinstance(target, NORM_TYPES):
                if tname not in norms:
                    norms.append(tname)
                    if target.affine:
                        slices.append(CoupledSlice(tname, "weight", 0, index, channel))
                        slices.append(CoupledSlice(tname, "bias", 0, index, channel))
            elif isinstance(target, nn.Module) and any(True for _ in target.parameters(recurse=False)):
                if tname not in consumers:  # some other parametrised layer (LayerNorm, ...)
                    consumers.append(tname)
        producers.sort(key=layer_order.__getitem__)
        seen.update(producers)
        groups.append(
            ChannelGroup(
                producers=producers,
                norms=norms,
                num_channels=n,
                slices=slices,
                consumers=consumers,
                order=layer_order[producers[0]],
            )
        )
    return groups
