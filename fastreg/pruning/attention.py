"""Attention heads: what removing heads from an ``nn.MultiheadAttention`` leaves.

An ``nn.MultiheadAttention`` computes, for each head h of width d = E / H,

    o_h = softmax(q_h k_hᵀ / √d + mask) v_h,   q_h, k_h, v_h = rows h·d … (h+1)·d of each third of
    in_proj_weight (and in_proj_bias) applied to query, key, value;   out = out_proj([o_1 … o_H])

and its inner width H·d is tied to its input width E, so it cannot hold fewer heads.
:class:`HeadPrunedAttention` is the same computation with H' < H heads of the same width d (the
scale 1/√d is unchanged, so each kept head computes exactly what it computed before), an input
projection of 3·H'·d rows and an output projection of H'·d columns. A head whose q, k, v rows and
biases are zero has v_h = 0, so o_h = 0 and it adds nothing: the model with those heads zeroed
computes what the model with them removed computes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def head_prunable(module: nn.MultiheadAttention) -> str:
    """"" when the heads of ``module`` can be removed exactly, else why not."""
    if not module._qkv_same_embed_dim:
        return "its key/value widths differ from its embedding width (separate q/k/v projections)"
    if module.bias_k is not None or module.add_zero_attn:
        return "it appends learned or zero key/value rows (add_bias_kv / add_zero_attn)"
    if module.num_heads < 2:
        return "it has a single head"
    return ""


class HeadPrunedAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward with ``num_heads`` heads of width ``head_dim`` on inputs of
    width ``embed_dim`` (inner width num_heads·head_dim ≤ embed_dim). Same call signature and outputs:
    ``(attn_output, attn_weights or None)``; averaged attention weights are the mean over the kept heads."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False, source_heads: tuple[int, ...] | None = None, device=None, dtype=None):
        super().__init__()
        where = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        # (the heads of the original module these are, to pick per-head rows of a 3-D attn_mask)
        self.source_heads = tuple(source_heads) if source_heads is not None else tuple(range(num_heads))
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.in_proj = nn.Linear(embed_dim, 3 * inner, bias=bias, **where)
        self.out_proj = nn.Linear(inner, embed_dim, bias=True, **where)

    @classmethod
    def from_attention(cls, module: nn.MultiheadAttention, keep_heads: Tensor) -> "HeadPrunedAttention":
        """The heads ``keep_heads`` (bool over heads, True = kept) of ``module``, weights copied."""
        why = head_prunable(module)
        if why:
            raise ValueError(f"the heads of this MultiheadAttention cannot be removed: {why}")
        keep_heads = keep_heads.to(torch.bool).cpu()
        if keep_heads.shape != (module.num_heads,) or not bool(keep_heads.any()):
            raise ValueError(f"keep_heads must be a bool mask over the {module.num_heads} heads keeping at least one, "
                             f"got shape {tuple(keep_heads.shape)} with {int(keep_heads.sum())} kept")
        e, d = module.embed_dim, module.head_dim
        w = module.in_proj_weight
        kept = keep_heads.nonzero().flatten()
        cols = (kept[:, None] * d + torch.arange(d)).flatten()  # positions in [0, E) of the kept heads
        rows = torch.cat([cols + i * e for i in range(3)]).to(w.device)
        out = cls(e, int(kept.numel()), d, bias=module.in_proj_bias is not None, dropout=module.dropout,
                  batch_first=module.batch_first, source_heads=tuple(kept.tolist()), device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.in_proj.weight.copy_(w[rows])
            if module.in_proj_bias is not None:
                out.in_proj.bias.copy_(module.in_proj_bias[rows])
            out.out_proj.weight.copy_(module.out_proj.weight[:, cols.to(w.device)])
            if module.out_proj.bias is not None:
                out.out_proj.bias.copy_(module.out_proj.bias)
            else:
                out.out_proj.bias = None
        out.train(module.training)
        return out

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        tgt, batch, _ = query.shape
        src = key.shape[0]
        h, d = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj.weight.chunk(3)
        b_q, b_k, b_v = self.in_proj.bias.chunk(3) if self.in_proj.bias is not None else (None, None, None)

        def heads(x: Tensor, w: Tensor, b: Tensor | None, length: int) -> Tensor:  # (L, B, E) → (B, h, L, d)
            return F.linear(x, w, b).reshape(length, batch, h, d).permute(1, 2, 0, 3)

        q, k, v = heads(query, w_q, b_q, tgt), heads(key, w_k, b_k, src), heads(value, w_v, b_v, src)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # (B, h, L, S)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:  # (L, S), or (B·H, L, S) over the original module's heads
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(batch, -1, tgt, src)[:, list(self.source_heads)]
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:  # (B, S)
            mask = key_padding_mask[:, None, None, :]
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        attn = scores.softmax(-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = (attn @ v).permute(2, 0, 1, 3).reshape(tgt, batch, h * d)
        out = self.out_proj(out)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = attn.mean(1) if average_attn_weights else attn
        return out, weights if batched else weights.squeeze(0)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"batch_first={self.batch_first}, source_heads={self.source_heads}")


def pruned_heads(group_masks) -> list[tuple[str, Tensor]]:
    """(attention module, keep mask over its heads) of every head group of ``group_masks`` (pairs of a
    channel group and its keep mask) that prunes at least one head."""
    return [(g.root, keep) for g, keep in group_masks if g.heads and not bool(keep.all())]


def remove_heads_(model: nn.Module, name: str, keep_heads: Tensor) -> HeadPrunedAttention:
    """Replace the ``nn.MultiheadAttention`` ``model.<name>`` by its kept heads, in place."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module = getattr(parent, child)
    if not isinstance(module, nn.MultiheadAttention):
        raise ValueError(f"{name!r} is a {type(module).__name__}, not an nn.MultiheadAttention")
    pruned = HeadPrunedAttention.from_attention(module, keep_heads)
    setattr(parent, child, pruned)
    return pruned
