"""Which channels of a model must be pruned together, read from its graph (never from module names).

Torch-Pruning's ``DependencyGraph`` traces one forward pass and, for the output channels of
every Conv/Linear layer it sees called, returns the *group* of coupled slices: every tensor slice
that Torch-Pruning removes with those channels. One :class:`ChannelGroup` per group; its channel
j is one prunable unit. Each slice is a :class:`CoupledSlice` ``(module, param, dim, index,
channel, role)``: positions ``index`` of ``module.<param>`` along ``dim`` carry group channels
``channel`` (``index`` may differ from the root layer's positions: concatenations add offsets,
grouped convs read one column per channel group). Roles:

* ``"filter"`` — rows of a *producer* (a Conv/Linear layer computing the channels, groups < its
  output channels): the gram penalty's rows, and output-side.
* ``"output"`` — slices that vanish with the channel: producer biases, norm affine parameters
  (BatchNorm, LayerNorm, GroupNorm, InstanceNorm), depthwise conv filters and biases passing the
  channels through, nn.MultiheadAttention projections, parameters Torch-Pruning prunes directly
  (class tokens, position embeddings, layer scales). With ``filter`` slices these are what
  L2 terms, shrink and zero-out touch, and exactly what physical pruning removes.
* ``"input"`` — the input columns of layers reading the channels (group saliency only).

Channel groups: when a grouped conv (1 < groups < channels), a GroupNorm or an
nn.MultiheadAttention's heads split the channels, Torch-Pruning removes the same positions from
every split (so that each keeps the same width); such a group has ``channel_groups`` = the number
of splits and ``num_channels`` = channels per split: group channel j is position j of every split.

Attention heads: for every ``nn.MultiheadAttention`` the trace saw called (with packed q, k, v
projections), one more group whose channel h is head h: its ``filter`` slice is the head's q, k
and v rows of ``in_proj_weight`` (the module is the group's producer), its ``output`` slice the same
rows of ``in_proj_bias``, its ``input`` slice the head's columns of ``out_proj.weight`` (``heads`` =
True; see :mod:`fastreg.pruning.attention` for why zeroed heads compute what removed heads compute).

A group whose channels reach no other layer holds the model's outputs and is never prunable; a
group whose zeroed channels would not compute what the pruned model computes (channels normalized
together by a LayerNorm/GroupNorm, attention dims rescaling the softmax, parameters pruned along a
dim other than 0) is not prunable either, and says why in ``blocked``.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CHANNEL_NORM_TYPES = NORM_TYPES + (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)  # per channel
JOINT_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)  # statistics over several channels
ROLES = ("filter", "output", "input")


@dataclass
class CoupledSlice:
    """Slices ``index`` of ``module.<param>`` along ``dim`` belong to group channels ``channel``."""

    module: str
    param: str
    dim: int
    index: Tensor  # int64 positions along dim
    channel: Tensor  # int64 group channel of each position
    role: str = "input"  # "filter" (producer rows), "output" (vanishes with the channel), "input"

    @property
    def output_side(self) -> bool:
        """True for slices that compute the channel (zeroed, shrunk and removed with it)."""
        return self.role in ("filter", "output")

    def position_mask(self, channel_mask: Tensor, size: int) -> Tensor:
        """A bool mask over the ``size`` positions of this slice's dim: ``channel_mask[channel]``
        at ``index``, True (untouched) elsewhere."""
        out = torch.ones(size, dtype=torch.bool, device=channel_mask.device)
        out[self.index.to(channel_mask.device)] = channel_mask[self.channel.to(channel_mask.device)]
        return out

    def channel_mean(self, values: Tensor, num_channels: int) -> Tensor:
        """Per group channel, the mean of ``values`` (one per position of this slice's dim) over the
        channel's positions (``values`` itself when positions and channels are 0..n-1)."""
        values = values.detach().float()
        if self.index.numel() == values.shape[0] == num_channels and torch.equal(self.index, self.channel) \
                and torch.equal(self.index, torch.arange(num_channels)):
            return values
        index, channel = self.index.to(values.device), self.channel.to(values.device)
        total = torch.zeros(num_channels, device=values.device).index_add_(0, channel, values[index])
        count = torch.zeros(num_channels, device=values.device).index_add_(0, channel, torch.ones_like(values[index]))
        return total / count.clamp_min(1)


@dataclass
class ChannelGroup:
    producers: list[str]
    norms: list[str]
    num_channels: int
    slices: list[CoupledSlice] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)  # layers reading these channels
    order: int = 0  # index of its first producer among all Conv/Linear layers (model order)
    root: str = ""  # the layer the group was traced from (a producer)
    passthrough: list[str] = field(default_factory=list)  # depthwise convs carrying the channels
    channel_groups: int = 1  # splits that each lose the same positions (grouped conv, GroupNorm, heads)
    residual: bool = False  # the channels are summed from several branches (an addition in the group)
    gated: bool = False  # the channels are multiplied by another layer's outputs
    gate_producers: list[str] = field(default_factory=list)  # producers of a multiplicative gate (SE)
    gate_readers: list[str] = field(default_factory=list)  # consumers feeding that gate only
    blocked: str = ""  # why the group cannot be pruned exactly ("" = it can)
    heads: bool = False  # the channels are the attention heads of the producer (an nn.MultiheadAttention)

    @property
    def prunable(self) -> bool:
        """False when no layer reads the channels (the model's outputs) or ``blocked`` says why not."""
        return len(self.consumers) > 0 and not self.blocked

    @property
    def internal(self) -> bool:
        """One producer feeding one consumer (through depthwise convs and squeeze-excitation gates),
        e.g. the first convs of a ResNet block or the expansion of an inverted-residual block: the
        layers a single float pruning ratio applies to (as in the TPP paper)."""
        return not self.coupled and len(self.consumers) - len(self.gate_readers) == 1

    @property
    def coupled(self) -> bool:
        """Several layers' filters are tied together (residual additions)."""
        return len(self.producers) - len(self.gate_producers) > 1

    def filter_slice(self, name: str) -> CoupledSlice:
        """The ``filter`` slice of producer ``name``."""
        for s in self.slices:
            if s.role == "filter" and s.module == name:
                return s
        raise KeyError(f"{name!r} is not a producer of this group ({self.producers})")

    def output_slices(self, *, norms: bool = True, bias: bool = True) -> list[CoupledSlice]:
        """The output-side slices: producers' weights (and biases), then the norms' affine parameters,
        then the others (depthwise filters, ...)."""
        out = self.slices
        first = [s for n in self.producers for s in out if s.module == n and s.output_side]
        norm_slices = [s for n in self.norms for s in out if s.module == n and s.output_side]
        taken = {id(s) for s in first + norm_slices}
        rest = [s for s in out if s.output_side and id(s) not in taken]
        picked = first + (norm_slices if norms else []) + rest
        return [s for s in picked if bias or s.param != "bias" or s.module not in self.producers]


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


def _shape_of(example_inputs) -> str:
    if isinstance(example_inputs, Tensor):
        return f"of shape {tuple(example_inputs.shape)}"
    return f"of type {type(example_inputs).__name__}"


def build_dependency_graph(model: nn.Module, example_inputs=None):
    """Torch-Pruning ``DependencyGraph`` of ``model`` traced in eval mode (BN stats untouched)."""
    from .trace import DependencyGraph

    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    try:
        with eval_mode(model), torch.enable_grad():
            return DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    except Exception as exc:  # tracing failures come from deep inside torch_pruning
        raise RuntimeError(
            f"could not trace the model's dependency graph with example_inputs {_shape_of(example_inputs)} "
            f"({type(exc).__name__}: {exc}). Pass example_inputs= matching the model's input; models Torch-Pruning "
            f"cannot trace cannot be pruned by fastreg."
        ) from exc


def out_channel_handler(module: nn.Module):
    import torch_pruning as tp

    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def is_depthwise(module: nn.Module) -> bool:
    """A conv whose every output channel reads one input channel (groups = out_channels > 1)."""
    return isinstance(module, LAYER_TYPES[:3]) and module.groups == module.out_channels and module.out_channels > 1


def _grouped(module: nn.Module) -> int:
    """The number of channel splits of a grouped (not depthwise) conv, else 1."""
    if isinstance(module, LAYER_TYPES[:3]) and module.groups > 1 and not is_depthwise(module):
        return module.groups
    return 1


def producer_weight_name(module: nn.Module) -> str | None:
    """The parameter whose rows are a producer's filters: ``weight`` of a Conv/Linear layer,
    ``in_proj_weight`` (q, k, v rows) of an nn.MultiheadAttention; None for other modules."""
    if isinstance(module, nn.MultiheadAttention):
        return "in_proj_weight"
    return "weight" if isinstance(module, LAYER_TYPES) else None


def producer_weight(module: nn.Module) -> Tensor:
    """The tensor named by :func:`producer_weight_name`."""
    return getattr(module, producer_weight_name(module))


def head_group(name: str, module: nn.MultiheadAttention, order: int) -> ChannelGroup:
    """The group of the heads of ``module`` (channel h = head h; packed projections, ``in_proj_weight``):
    q, k, v rows of in_proj_weight and in_proj_bias, columns of out_proj.weight; ``blocked`` where the
    heads cannot be removed exactly."""
    from .attention import head_prunable

    e, h = module.embed_dim, module.num_heads
    blocked = head_prunable(module)
    rows = torch.arange(3 * e)
    head_of_row = (rows % e) // module.head_dim
    slices = [CoupledSlice(name, "in_proj_weight", 0, rows, head_of_row, "filter")]
    if module.in_proj_bias is not None:
        slices.append(CoupledSlice(name, "in_proj_bias", 0, rows, head_of_row, "output"))
    cols = torch.arange(e)
    slices.append(CoupledSlice(f"{name}.out_proj", "weight", 1, cols, cols // module.head_dim, "input"))
    return ChannelGroup(producers=[name], norms=[], num_channels=h, slices=slices, consumers=[f"{name}.out_proj"],
                        order=order, root=name, blocked=blocked and f"the heads of MultiheadAttention {name!r}: {blocked}",
                        heads=True)


def _long(values) -> Tensor:
    return torch.tensor([int(i) for i in values], dtype=torch.long)


class _GroupReader:
    """Turns one Torch-Pruning group (items: dependency, idxs, root_idxs) into a ChannelGroup."""

    def __init__(self, model: nn.Module, graph):
        self.graph = graph
        self.names = {m: n for n, m in model.named_modules()}
        self.param_names = {id(p): n for n, p in model.named_parameters()}
        self.unwrapped_dims = {id(u.parameters): u.pruning_dim for u in getattr(graph, "unwrapped_parameters", [])}
        self.layer_order = {n: i for i, n in enumerate(n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES))}

    def read(self, root_name: str, root: nn.Module, example_inputs) -> ChannelGroup:
        import torch_pruning as tp

        n = root.weight.shape[0]
        try:
            group = self.graph.get_pruning_group(root, out_channel_handler(root), idxs=list(range(n)))
        except Exception as exc:
            raise RuntimeError(
                f"could not group the output channels of layer {root_name!r} ({type(root).__name__}) in the graph "
                f"traced with example_inputs {_shape_of(example_inputs)} ({type(exc).__name__}: {exc})"
            ) from exc
        raw = []  # (module name, param, dim, positions, root channels, role)
        producers, passthrough, norms, consumers = [], [], [], []
        residual, gated, blocked, splits = False, False, [], [1]
        for item in group.items:
            target, handler = item.dep.target.module, item.dep.handler
            idxs, roots = list(item.idxs), list(item.root_idxs)
            out_fn = self.graph.is_out_channel_pruning_fn(handler)
            if isinstance(target, nn.Parameter):
                pname = self.param_names.get(id(target))
                if pname is None:
                    continue
                module_name, _, param = pname.rpartition(".")
                dim = self.unwrapped_dims.get(id(target), target.dim() - 1)
                raw.append((module_name, param, dim, idxs, roots, "output"))
                if dim != 0:
                    blocked.append(f"parameter {pname!r} is pruned along dim {dim}")
                continue
            if isinstance(target, tp.ops._ElementWiseOp):
                op = str(getattr(target, "_grad_fn", ""))
                residual |= re.search(r"\b(Add|Sub)Backward", op) is not None
                gated |= re.search(r"\bMulBackward", op) is not None
                continue
            name = self.names.get(target)
            if name is None:
                continue  # concat, split, reshape, ...: no parameters
            if isinstance(target, LAYER_TYPES):
                if out_fn and is_depthwise(target):
                    passthrough.append(name)
                    raw.append((name, "weight", 0, idxs, roots, "output"))
                    if target.bias is not None:
                        raw.append((name, "bias", 0, idxs, roots, "output"))
                elif out_fn:
                    producers.append(name)
                    splits.append(_grouped(target))
                    raw.append((name, "weight", 0, idxs, roots, "filter"))
                    if target.bias is not None:
                        raw.append((name, "bias", 0, idxs, roots, "output"))
                else:
                    consumers.append(name)
                    g = _grouped(target)
                    splits.append(g)
                    width = target.weight.shape[1]  # columns per split
                    raw.append((name, "weight", 1, [i % width for i in idxs] if g > 1 else idxs, roots, "input"))
            elif isinstance(target, (CHANNEL_NORM_TYPES, JOINT_NORM_TYPES)):
                norms.append(name)
                if isinstance(target, JOINT_NORM_TYPES):
                    blocked.append(f"{type(target).__name__} {name!r} normalizes these channels together")
                    if isinstance(target, nn.GroupNorm):
                        splits.append(target.num_groups)
                if getattr(target, "weight", None) is not None:
                    dim = target.weight.dim() - 1
                    raw.append((name, "weight", dim, idxs, roots, "output"))
                    if target.bias is not None:
                        raw.append((name, "bias", dim, idxs, roots, "output"))
            elif isinstance(target, nn.MultiheadAttention):
                blocked.append(f"MultiheadAttention {name!r} scales its attention by the head width")
                splits.append(target.num_heads)
                e = target.embed_dim
                if target.in_proj_weight is not None:
                    raw.append((name, "in_proj_weight", 0, idxs + [i + e for i in idxs] + [i + 2 * e for i in idxs], roots * 3, "output"))
                    raw.append((name, "in_proj_weight", 1, idxs, roots, "input"))
                if target.in_proj_bias is not None:
                    raw.append((name, "in_proj_bias", 0, idxs + [i + e for i in idxs] + [i + 2 * e for i in idxs], roots * 3, "output"))
                producers.append(f"{name}.out_proj")
                raw.append((f"{name}.out_proj", "weight", 0, idxs, roots, "filter"))
                if target.out_proj.bias is not None:
                    raw.append((f"{name}.out_proj", "bias", 0, idxs, roots, "output"))
                raw.append((f"{name}.out_proj", "weight", 1, idxs, roots, "input"))
            elif any(True for _ in target.parameters(recurse=False)):
                blocked.append(f"{type(target).__name__} {name!r} is not a layer fastreg knows how to prune")
                consumers.append(name)
        producers = list(dict.fromkeys(producers))
        producers.sort(key=lambda p: self.layer_order.get(p, len(self.layer_order)))
        split = max(splits)
        if n % split:
            blocked.append(f"{n} channels do not split evenly into {split} groups")
            split = 1
        units = n // split
        slices = self._slices(raw, units)
        return ChannelGroup(
            producers=producers,
            norms=list(dict.fromkeys(norms)),
            num_channels=units,
            slices=slices,
            consumers=list(dict.fromkeys(consumers)),
            order=self.layer_order[producers[0]] if producers else self.layer_order[root_name],
            root=root_name,
            passthrough=list(dict.fromkeys(passthrough)),
            channel_groups=split,
            residual=residual,
            gated=gated,
            blocked="; ".join(dict.fromkeys(blocked)),
        )

    @staticmethod
    def _slices(raw, units: int) -> list[CoupledSlice]:
        """One slice per (module, param, dim, role): positions deduplicated, channels modulo ``units``."""
        merged: dict[tuple, dict[int, int]] = {}
        for module, param, dim, idxs, roots, role in raw:
            positions = merged.setdefault((module, param, dim, role), {})
            for i, r in zip(idxs, roots):
                positions.setdefault(int(i), int(r) % units)
        out = []
        for (module, param, dim, role), positions in merged.items():
            index = sorted(positions)
            out.append(CoupledSlice(module, param, dim, _long(index), _long(positions[i] for i in index), role))
        return out


def _resolve_gates(groups: list[ChannelGroup]) -> None:
    """In a group multiplied by a gate (squeeze-excitation: pool → conv → conv → sigmoid → ×), the
    consumers that only feed the gate and the gate's producers are marked, so that the group counts
    one producer and one consumer."""
    by_producer = {p: g for g in groups for p in g.producers}
    for g in groups:
        if not g.gated or g.residual:
            continue
        readers, gate = [], []
        for c in g.consumers:
            h = by_producer.get(c)
            if h is None or h.residual:  # (a residual stream reaches back to the block's input: not a gate)
                continue
            hits = [p for p in h.consumers if p in g.producers and p != g.root]
            if hits:
                readers.append(c)
                gate += hits
        g.gate_readers, g.gate_producers = readers, list(dict.fromkeys(gate))


def channel_groups(model: nn.Module, example_inputs=None, graph=None) -> list[ChannelGroup]:
    """Every group of coupled output channels of the model's Conv/Linear layers, in model order.
    Layers the trace never saw called as modules (weights used through ``F.linear``) are not roots."""
    graph = graph if graph is not None else build_dependency_graph(model, example_inputs)
    reader = _GroupReader(model, graph)
    seen: set[str] = set()
    groups = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            if module in graph.module2node and module.in_proj_weight is not None:  # (packed q, k, v projections)
                groups.append(head_group(name, module, reader.layer_order.get(f"{name}.out_proj", 0)))
            continue
        if not isinstance(module, LAYER_TYPES) or name in seen or module not in graph.module2node or is_depthwise(module):
            continue
        group = reader.read(name, module, example_inputs)
        seen.update(group.producers)
        seen.update(group.passthrough)
        if name not in group.producers:  # the root is always among them; guard against odd graphs
            group.producers.insert(0, name)
        groups.append(group)
    _resolve_gates(groups)
    return groups
