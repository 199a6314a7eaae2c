"""Torch-Pruning's ``DependencyGraph`` with its view/reshape and split rules given the input sizes they look for.

Torch-Pruning 1.6.1 maps indices across a view/reshape (a flatten: channel ``c`` of a ``(N, C, H, W)``
input becomes features ``c·H·W … (c+1)·H·W - 1``) only when the reshape's input is 1-D or 4-D and
its ``C·H·W`` equals the consumer's width, and splits a ``chunk``/``split(int)`` into its saved
sizes. It reads the input sizes from ``grad_fn._saved_self_sizes``, which PyTorch 2 saves as
``grad_fn._saved_self_sym_sizes``; without them it guesses from the channel counts of the
neighbouring layers, and assigns flatten index maps to reshapes that are no flatten and wrong sizes
to chunks. On models with such reshapes between layers the guess breaks the trace:

* the window partitions and relative position biases of Swin and MaxViT get index maps of stride 8
  in a cycle, so that ``get_pruning_group`` multiplies the index list by 8 on each pass (16 root
  channels: 4,194,304 indices after 12 passes) and does not finish;
* ShuffleNet's channel shuffle (a 5-D view before a chunk) gets a map computed as ``in // out`` with
  ``out = 0``: ``ZeroDivisionError`` during tracing.

:class:`DependencyGraph` hands each view/reshape and split node the sizes under the name
Torch-Pruning reads, so that its own rules decide; nothing else changes. It refuses models that
permute channels through a view (ShuffleNet's channel shuffle: ``view(N, g, C/g, H, W) →
transpose(1, 2) → view(N, C, H, W)``): Torch-Pruning treats the transpose as element-wise and maps
channel ``j`` through it as channel ``j``, so its groups would remove channels the next layer does
not read (a pruned ShuffleNet V2 would not even run).
"""
from __future__ import annotations

import contextlib
import warnings

import torch_pruning as tp


class _GradFnSizes:
    """A reshape's or split's ``grad_fn`` that also answers ``_saved_self_sizes`` (= ``_saved_self_sym_sizes``)."""

    def __init__(self, grad_fn):
        self._grad_fn = grad_fn
        self._saved_self_sizes = tuple(int(s) for s in grad_fn._saved_self_sym_sizes)

    def __getattr__(self, name):
        return getattr(self._grad_fn, name)


def _dim(d: int, rank: int) -> int:
    """A dim saved by autograd (negative dims come back as unsigned 64-bit ints) in 0..rank-1."""
    return (d - (1 << 64) if d >= 1 << 63 else d) % rank


def _permutation(grad_fn, rank: int) -> list[int] | None:
    """Output dim i of a transpose/permute reads input dim ``perm[i]``; None for other ops."""
    if hasattr(grad_fn, "_saved_dims"):
        return [_dim(d, rank) for d in grad_fn._saved_dims]
    if hasattr(grad_fn, "_saved_dim0") and hasattr(grad_fn, "_saved_dim1"):
        perm = list(range(rank))
        a, b = _dim(grad_fn._saved_dim0, rank), _dim(grad_fn._saved_dim1, rank)
        perm[a], perm[b] = b, a
        return perm
    return None


def channel_permutation(module2node) -> str | None:
    """The first view → transpose/permute → view that reorders the channels (dim 1) of a 4-D tensor,
    described, or None: the first view splits the channels into several dims whose order the
    transpose changes (the second view's input sizes give the transposed shape)."""
    reshape = tp.ops.OPTYPE.RESHAPE
    for node in module2node.values():
        views_in = [n for n in node.inputs if n.type == reshape and hasattr(n.grad_fn, "_saved_self_sizes")]
        if not views_in or len(views_in[0].grad_fn._saved_self_sizes) != 4:
            continue
        after, seen = list(node.outputs), set()
        while after:  # through element-wise ops (contiguous) to the next view
            n = after.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.type == reshape and hasattr(n.grad_fn, "_saved_self_sizes"):
                shape = list(n.grad_fn._saved_self_sizes)
                perm = _permutation(node.grad_fn, len(shape))
                if perm is None:
                    break
                split = [1] * len(shape)  # the first view's output shape
                for i, d in enumerate(perm):
                    split[d] = shape[i]
                batch, channels = views_in[0].grad_fn._saved_self_sizes[:2]
                k, size = 1, 1
                while k < len(split) and size < channels:
                    size *= split[k]
                    k += 1
                dims = [d for d in range(1, k) if split[d] > 1]  # dims holding the channels
                order = [d for d in perm if d in dims]
                if split[0] == batch and size == channels and len(dims) > 1 and order != dims:
                    return (f"{node.name} permutes the {channels} channels of a {tuple(views_in[0].grad_fn._saved_self_sizes)}"
                            f" tensor viewed as {tuple(split)}")
                break
            if n.type == tp.ops.OPTYPE.ELEMENTWISE:
                after.extend(n.outputs)
    return None


@contextlib.contextmanager
def _quiet_channel_inference():
    """Silences Torch-Pruning's "Maximum recursive depth reached!": its channel count inference gives
    up on a node (no index map there), which attention blocks' reshapes hit on every group search."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Maximum recursive depth reached", category=UserWarning)
        yield


class DependencyGraph(tp.DependencyGraph):
    """``tp.DependencyGraph`` whose view/reshape and split nodes expose their input sizes as
    ``_saved_self_sizes``, and which refuses channel shuffles (:func:`channel_permutation`)."""

    _SIZED = (tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.SPLIT)

    def build_dependency(self, *args, **kwargs):
        with _quiet_channel_inference():
            return super().build_dependency(*args, **kwargs)

    def get_pruning_group(self, *args, **kwargs):
        with _quiet_channel_inference():
            return super().get_pruning_group(*args, **kwargs)

    def _trace(self, *args, **kwargs):
        module2node = super()._trace(*args, **kwargs)
        for node in module2node.values():
            fn = node.grad_fn
            if node.type in self._SIZED and hasattr(fn, "_saved_self_sym_sizes") \
                    and not hasattr(fn, "_saved_self_sizes"):
                node.grad_fn = _GradFnSizes(fn)
        shuffle = channel_permutation(module2node)
        if shuffle is not None:
            raise ValueError(
                f"{shuffle} (a channel shuffle): Torch-Pruning maps channel j through it as channel j, so its "
                f"groups would not match the channels the next layers read"
            )
        return module2node
