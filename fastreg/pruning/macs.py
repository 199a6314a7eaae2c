"""Multiply-accumulates of attention modules Torch-Pruning's op counter does not see whole.

``fastreg.count_params_flops`` counts with Torch-Pruning's op counter, which hooks module calls: a
Linear whose weight its parent applies through ``F.linear`` is never counted (torchvision's Swin
attention), and a module it does not know counts nothing (:class:`HeadPrunedAttention`). These hooks
count such modules whole, with the convention of Torch-Pruning's ``nn.MultiheadAttention`` count: q,
k, v projections (with a bias term per token), q scaling, per head q kᵀ, softmax and attention × v,
and the output projection.
"""
from __future__ import annotations

import math

from torch import nn

from .attention import HeadPrunedAttention


def attention_macs(q_tokens: int, kv_tokens: int, pairs: int, width: int, inner: int, heads: int, bias: bool) -> int:
    """MACs of attention over ``q_tokens`` queries and ``kv_tokens`` keys/values of width ``width``, projected
    to ``inner`` = heads·d, with ``pairs`` (query, key) pairs per head, and projected back to ``width``."""
    d = inner // heads
    macs = q_tokens * inner + (q_tokens + 2 * kv_tokens) * width * inner
    if bias:
        macs += (q_tokens + 2 * kv_tokens) * inner
    macs += heads * pairs * (2 * d + 1)
    return macs + q_tokens * width * (inner + 1)


def head_pruned_attention_macs(module: HeadPrunedAttention, inputs, output) -> None:
    """:class:`HeadPrunedAttention` on (L, B, E) or (B, L, E) inputs (one sequence: (L, E))."""
    q, k = inputs[0], inputs[1]
    seq = 1 if module.batch_first and q.dim() == 3 else 0
    batch = q.shape[1 - seq] if q.dim() == 3 else 1
    tgt, src = q.shape[seq], k.shape[seq]
    module.__flops__ += int(attention_macs(batch * tgt, batch * src, batch * tgt * src, module.embed_dim,
                                           module.num_heads * module.head_dim, module.num_heads,
                                           module.in_proj.bias is not None))


def shifted_window_attention_macs(module: nn.Module, inputs, output) -> None:
    """torchvision's Swin ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2`` on (B, H, W, C):
    the feature map padded to whole windows, attention within each window."""
    b, h, w, c = inputs[0].shape
    wh, ww = module.window_size
    tokens = b * math.ceil(h / wh) * wh * math.ceil(w / ww) * ww
    module.__flops__ += int(attention_macs(tokens, tokens, tokens * wh * ww, c, module.qkv.out_features // 3,
                                           module.num_heads, module.qkv.bias is not None))


def macs_hooks() -> dict[type, callable]:
    """Module type → op-counter hook, for Torch-Pruning's ``CUSTOM_MODULES_MAPPING``."""
    hooks = {HeadPrunedAttention: head_pruned_attention_macs}
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
    except ImportError:  # (torchvision is optional here)
        return hooks
    hooks[ShiftedWindowAttention] = hooks[ShiftedWindowAttentionV2] = shifted_window_attention_macs
    return hooks
