"""Triton backend of ``fastreg_triton::gram_penalty`` (DESIGN.md §1.1): every layer in 3–4 launches.

For layer l (W ∈ R^{N×D}, keep mask m, G = W Wᵀ) the op returns penalty_l = Σ E² (÷ N² for
``mean``) and, when asked, ∂penalty_l/∂W = 4 E W (same scale), with

    decorrelate  E = G ⊙ (1 − m mᵀ)   diagonal  E = G − diag(m)   identity  E = G − I.

Kernels (all grouped: one launch covers every layer, programs find their layer in device tables):

1. ``_pruned_first_order_kernel`` (one program per layer): the row order with the pruned rows
   first, and |P| per layer, computed on the device from the masks (no host sync).
2. ``_gram_rows_kernel`` (one program per (layer, row tile) in that order): for each column tile J
   it computes G[I, J] = W_I W_Jᵀ with ``tl.dot`` over D, applies the target in registers,
   accumulates Σ E² and (with gradients) adds 4 E[I, J] W_J into the tile's own gradient rows —
   no atomics, deterministic. ``diagonal``/``identity``: every row tile, all columns (4·N²D flops).
   ``decorrelate`` (the N-side formulation): only pruned rows, A = W_P Wᵀ; Σ E² = 2‖A‖² − ‖A[:, P]‖²;
   ∇W_P = 4 A W; the block A[P, K] is saved for
3. ``_kept_rows_grad_kernel`` (decorrelate with gradients): ∇W_K = 4 A[P, K]ᵀ W_P.
   Kept×kept is never computed: (6p − 2p²)·N²D flops for pruned fraction p, and the only
   stored intermediate is A[P, K] (|P|·|K| ≤ N²/4 per layer).
4. ``_layer_sums_kernel`` (one program per layer): penalty_l = Σ of its row tiles' partials.

Pointer/shape tables are built once per distinct set of inputs (keyed on data pointers and
shapes) with a single host→device copy from pinned memory (asynchronous), and reused by later
training steps; the gradients' address table likewise (the in-place op's ``.grad`` tensors keep
their addresses; fresh outputs usually get the same ones back from the caching allocator). Under
CUDA-graph capture, run the step once before capturing (as torch.cuda.graphs asks anyway): the
in-place op then finds every table built. Weights whose rows are blocks of memory (contiguous,
channels_last) are read where they are by the in-place op. Launches run under the weights' device
(``torch.cuda.device``), and the ops check their arguments as the C++ ones do.
fp16/bf16 weights accumulate in float32 (interpreter: upcast on load); float64 stays float64.
Runs on CPU under ``TRITON_INTERPRET=1`` (set before import), and on CUDA.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .._checks import is_dense, same_layout
from ..reference import accumulate_dtype

# Whether the kernels below are defined for the interpreter (CPU tensors) or compiled (CUDA).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Kernel-visible globals must be tl.constexpr (compiled Triton rejects plain globals; the
# interpreter does not check). Host code reads ``.value``.
DECORRELATE, DIAGONAL, IDENTITY = (tl.constexpr(code) for code in range(3))
_TARGET_CODES = {"decorrelate": DECORRELATE.value, "diagonal": DIAGONAL.value, "identity": IDENTITY.value}
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}

# Per-layer device table: one int64 row of LAYER_FIELDS columns.
LAYER_WEIGHT, LAYER_MASK, LAYER_N, LAYER_D, LAYER_ROW0, LAYER_SCRATCH0, LAYER_TILE0, LAYER_TILES = (tl.constexpr(f) for f in range(8))
LAYER_FIELDS = tl.constexpr(8)
# Per-row-tile device table: (layer, first row position of the tile in the layer's row order).
TILE_LAYER, TILE_ROW = (tl.constexpr(f) for f in range(2))
TILE_FIELDS = tl.constexpr(2)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _pruned_first_order_kernel(layers, order, n_pruned, BLOCK: tl.constexpr):
    """order[row0 + 0 .. |P|) = pruned rows, order[row0 + |P| .. N) = kept rows (both ascending);
    n_pruned[l] = |P|. One program per layer."""
    layer = tl.program_id(0)
    row = layers + layer * LAYER_FIELDS
    keep_ptr = tl.load(row + LAYER_MASK).to(tl.pointer_type(tl.int8))  # torch.bool: one byte, any non-zero byte true
    N = tl.load(row + LAYER_N)
    row0 = tl.load(row + LAYER_ROW0)
    count = tl.zeros((), tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        keep = tl.load(keep_ptr + offs, mask=offs < N, other=1)
        count += tl.sum((keep == 0).to(tl.int32))
    pruned_seen = tl.zeros((), tl.int32)
    kept_seen = tl.zeros((), tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < N
        keep = tl.load(keep_ptr + offs, mask=valid, other=1)
        is_pruned = ((keep == 0) & valid).to(tl.int32)
        is_kept = ((keep != 0) & valid).to(tl.int32)
        pos = tl.where(
            is_pruned != 0,
            pruned_seen + tl.cumsum(is_pruned, 0) - 1,
            count + kept_seen + tl.cumsum(is_kept, 0) - 1,
        )
        tl.store(order + row0 + pos, offs.to(tl.int32), mask=valid)
        pruned_seen += tl.sum(is_pruned)
        kept_seen += tl.sum(is_kept)
    tl.store(n_pruned + layer, count)


@triton.jit
def _layer_scale(N, coeff, MEAN: tl.constexpr, HAS_COEFF: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The factor s on a layer's penalty and gradient: 1/N² for mean (else 1), times *coeff if given."""
    scale = tl.full((), 1.0, ACC_DTYPE)
    if MEAN:
        scale = scale / (N.to(ACC_DTYPE) * N.to(ACC_DTYPE))
    if HAS_COEFF:
        scale = scale * tl.load(coeff).to(ACC_DTYPE)
    return scale


@triton.jit
def _tile_of(tiles, layers, pid, W_DTYPE: tl.constexpr):
    """Program ``pid``'s (layer, first row, layer metadata row, weight pointer, N, D) from the tables."""
    layer = tl.load(tiles + pid * TILE_FIELDS + TILE_LAYER)
    row_start = tl.load(tiles + pid * TILE_FIELDS + TILE_ROW)
    meta = layers + layer * LAYER_FIELDS
    w = tl.load(meta + LAYER_WEIGHT).to(tl.pointer_type(W_DTYPE))
    return layer, row_start, meta, w, tl.load(meta + LAYER_N), tl.load(meta + LAYER_D)


@triton.jit
def _gram_rows_kernel(
    layers,
    tiles,
    order,
    n_pruned,
    grad_ptrs,
    scratch,
    partials,
    coeff,
    TARGET: tl.constexpr,
    MEAN: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    HAS_COEFF: tl.constexpr,
    W_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    GRAM_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (layer, row tile I of the layer's row order); s = 1/N² for mean, else 1.

    diagonal / identity: E[I, J] = W_I W_Jᵀ − target for every column tile J;
      partials[pid] = s Σ_{i∈I, j} E_ij²  and  grad_l[I, :] = 4 s E[I, :] W.
    decorrelate (pruned rows first): only rows i ∈ P (A = W_P Wᵀ = E[P, :]);
      partials[pid] = s Σ_{i∈I∩P} (Σ_{j∈P} A_ij² + 2 Σ_{j∈K} A_ij²)  (E[K, P] = A[P, K]ᵀ),
      grad_l[I∩P, :] = 4 s A[I, :] W, and A[I, K] saved to ``scratch`` for the kept rows' gradient
      (:func:`_kept_rows_grad_kernel`); tiles of kept rows do nothing here.
    grad_l is the ACC_DTYPE N×D tensor at address grad_ptrs[l], written (or, ACCUMULATE, added
    into). Gram operands are cast to GRAM_DTYPE (ACC_DTYPE, or fp16/bf16 on GPUs: exact products, fp32
    sums). HAS_COEFF: s also carries the device scalar *coeff."""
    pid = tl.program_id(0)
    layer, row_start, meta, w, N, D = _tile_of(tiles, layers, pid, W_DTYPE)
    if NEED_GRAD:
        g = tl.load(grad_ptrs + layer).to(tl.pointer_type(ACC_DTYPE))
    scale = _layer_scale(N, coeff, MEAN, HAS_COEFF, ACC_DTYPE)

    i_pos = row_start + tl.arange(0, BLOCK_M)  # positions in the layer's row order
    i_valid = i_pos < N
    if TARGET == IDENTITY:
        pruned_count = 0
        i_rows = i_pos
    else:
        pruned_count = tl.load(n_pruned + layer)
        if TARGET == DECORRELATE:
            i_valid = i_pos < pruned_count  # pruned rows only
        i_rows = tl.load(order + tl.load(meta + LAYER_ROW0) + i_pos, mask=i_valid, other=0)
    n_cols = N
    if TARGET == DECORRELATE:
        n_cols = tl.where(row_start < pruned_count, N, 0)  # tiles of kept rows: nothing to do
        kept_count = N - pruned_count
        if NEED_GRAD:
            kept_block = scratch + tl.load(meta + LAYER_SCRATCH0)  # A[P, K], |P|×|K| row-major

    sq = tl.zeros((BLOCK_M,), ACC_DTYPE)  # per-row Σ E² (a row vector keeps registers free)
    for col_start in range(0, n_cols, BLOCK_N):
        j_pos = col_start + tl.arange(0, BLOCK_N)
        j_valid = j_pos < n_cols
        if TARGET == IDENTITY:
            j_rows = j_pos
        else:
            j_rows = tl.load(order + tl.load(meta + LAYER_ROW0) + j_pos, mask=j_valid, other=0)
        gram = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
        for d_start in range(0, D, BLOCK_D):
            d = d_start + tl.arange(0, BLOCK_D)
            d_valid = d < D
            w_i = tl.load(w + i_rows[:, None] * D + d[None, :], mask=i_valid[:, None] & d_valid[None, :], other=0.0)
            w_j = tl.load(w + j_rows[:, None] * D + d[None, :], mask=j_valid[:, None] & d_valid[None, :], other=0.0)
            gram += tl.dot(w_i.to(GRAM_DTYPE), tl.trans(w_j.to(GRAM_DTYPE)), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        # epilogue: the target, in registers
        valid = i_valid[:, None] & j_valid[None, :]
        on_diagonal = i_pos[:, None] == j_pos[None, :]
        if TARGET == DECORRELATE:
            err = tl.where(valid, gram, 0.0)
            j_kept = j_pos >= pruned_count
            sq += tl.sum(err * err * tl.where(j_kept, 2.0, 1.0).to(ACC_DTYPE)[None, :], 1)
            if NEED_GRAD:
                kept_offs = tl.where(j_kept, j_pos - pruned_count, 0)
                tl.store(kept_block + i_pos[:, None] * kept_count + kept_offs[None, :], err, mask=valid & j_kept[None, :])
        else:
            if TARGET == DIAGONAL:
                err = gram - tl.where(on_diagonal & (i_pos >= pruned_count)[:, None], 1.0, 0.0).to(ACC_DTYPE)
            else:
                err = gram - tl.where(on_diagonal, 1.0, 0.0).to(ACC_DTYPE)
            err = tl.where(valid, err, 0.0)
            sq += tl.sum(err * err, 1)
        if NEED_GRAD:
            for d_start in range(0, D, BLOCK_D):
                d = d_start + tl.arange(0, BLOCK_D)
                d_valid = d < D
                w_j = tl.load(w + j_rows[:, None] * D + d[None, :], mask=j_valid[:, None] & d_valid[None, :], other=0.0)
                update = tl.dot(err, w_j.to(ACC_DTYPE), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
                out = g + i_rows[:, None] * D + d[None, :]
                out_mask = i_valid[:, None] & d_valid[None, :]
                previous = tl.load(out, mask=out_mask & ((col_start > 0) | ACCUMULATE), other=0.0)  # first tile: no read
                tl.store(out, previous + (4.0 * scale) * update, mask=out_mask)
    tl.store(partials + pid, tl.sum(sq) * scale)


@triton.jit
def _kept_rows_grad_kernel(
    layers,
    tiles,
    order,
    n_pruned,
    grad_ptrs,
    scratch,
    coeff,
    MEAN: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    HAS_COEFF: tl.constexpr,
    W_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """decorrelate, kept rows: grad_l[K, :] = 4 s A[P, K]ᵀ W_P, reading the A[P, K] block that
    :func:`_gram_rows_kernel` saved (no recomputation). One program per (layer, row tile); tiles
    without kept rows exit at once. A layer with nothing pruned gets zero rows."""
    pid = tl.program_id(0)
    layer, row_start, meta, w, N, D = _tile_of(tiles, layers, pid, W_DTYPE)
    g = tl.load(grad_ptrs + layer).to(tl.pointer_type(ACC_DTYPE))
    row0 = tl.load(meta + LAYER_ROW0)
    kept_block = scratch + tl.load(meta + LAYER_SCRATCH0)
    scale = _layer_scale(N, coeff, MEAN, HAS_COEFF, ACC_DTYPE)
    pruned_count = tl.load(n_pruned + layer)
    kept_count = N - pruned_count

    k_pos = row_start + tl.arange(0, BLOCK_M)
    k_valid = (k_pos < N) & (k_pos >= pruned_count)
    k_rows = tl.load(order + row0 + k_pos, mask=k_valid, other=0)
    k_offs = tl.where(k_valid, k_pos - pruned_count, 0)
    d_end = tl.where(row_start + BLOCK_M > pruned_count, D, 0)  # no kept rows: nothing to do
    for d_start in range(0, d_end, BLOCK_D):
        d = d_start + tl.arange(0, BLOCK_D)
        d_valid = d < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
        for p_start in range(0, pruned_count, BLOCK_N):
            p_pos = p_start + tl.arange(0, BLOCK_N)
            p_valid = p_pos < pruned_count
            p_rows = tl.load(order + row0 + p_pos, mask=p_valid, other=0)
            a = tl.load(kept_block + p_pos[:, None] * kept_count + k_offs[None, :], mask=p_valid[:, None] & k_valid[None, :], other=0.0)
            w_p = tl.load(w + p_rows[:, None] * D + d[None, :], mask=p_valid[:, None] & d_valid[None, :], other=0.0)
            acc += tl.dot(tl.trans(a), w_p.to(ACC_DTYPE), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        out = g + k_rows[:, None] * D + d[None, :]
        out_mask = k_valid[:, None] & d_valid[None, :]
        previous = tl.load(out, mask=out_mask & ACCUMULATE, other=0.0)
        tl.store(out, previous + (4.0 * scale) * acc, mask=out_mask)


@triton.jit
def _layer_sums_kernel(layers, partials, per_layer, BLOCK: tl.constexpr):
    """per_layer[l] = Σ partials over the row tiles of layer l. One program per layer."""
    layer = tl.program_id(0)
    first = tl.load(layers + layer * LAYER_FIELDS + LAYER_TILE0)
    count = tl.load(layers + layer * LAYER_FIELDS + LAYER_TILES)
    total = tl.zeros((BLOCK,), per_layer.dtype.element_ty)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        total += tl.load(partials + first + offs, mask=offs < count, other=0.0)
    tl.store(per_layer + layer, tl.sum(total))


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def _launch_options(device: torch.device, dtype: torch.dtype, acc_dtype: torch.dtype) -> dict:
    """Tile sizes and dot precision.

    GPU: 32×32 row/column tiles, 16-wide D steps, 4 warps, 2 stages — the largest of the configs
    compiled for sm_80 whose kernels do not spill registers for any dtype (cuobjdump -res-usage;
    64×64 tiles spill 0.4–1.5 KB per thread: the gathered rows need a 64-bit address per element).
    fp16/bf16 gram operands stay in their dtype (exact products, fp32 accumulation); fp32 dots use
    3×TF32 (≈ fp32 accuracy on tensor cores, where "ieee" would fall back to FMA).
    Interpreter: tiles large enough that numpy, not Python, does the work (ResNet-56 shapes: 8×
    faster than 16×16×32), everything upcast to ACC_DTYPE in the kernel (numpy has no bf16)."""
    if device.type == "cuda":
        half = dtype in (torch.float16, torch.bfloat16)
        return dict(
            BLOCK_M=32,
            BLOCK_N=32,
            BLOCK_D=16,
            num_warps=4,
            num_stages=2,
            GRAM_DTYPE=_TL_DTYPES[dtype if half else acc_dtype],
            DOT_PRECISION="tf32x3" if acc_dtype == torch.float32 else "ieee",
        )
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=128, GRAM_DTYPE=_TL_DTYPES[acc_dtype], DOT_PRECISION="ieee")


class _Plan:
    """Device tables for one set of inputs: ``layers`` [L, LAYER_FIELDS] and ``tiles`` [T, TILE_FIELDS]
    int64, made with one host→device copy (from pinned memory: asynchronous, and legal inside CUDA-graph
    capture); plus the sizes of the row-order and A[P, K] buffers. ``rows``: (data pointer, N, D) per
    layer, the weight's memory read as an N×D matrix."""

    def __init__(self, rows, masks, block_m: int, device: torch.device):
        layer_rows, tile_rows = [], []
        row0 = scratch0 = 0
        for l, (ptr, n, d) in enumerate(rows):
            n_tiles = triton.cdiv(n, block_m)
            mask_ptr = masks[l].data_ptr() if masks else 0
            layer_rows.append([ptr, mask_ptr, n, d, row0, scratch0, len(tile_rows), n_tiles])
            tile_rows.extend([l, t * block_m] for t in range(n_tiles))
            row0 += n
            scratch0 += (n // 2) * (n - n // 2)  # |P|·|K| ≤ ⌊N/2⌋·⌈N/2⌉
        flat = _to_device([x for row in layer_rows + tile_rows for x in row], device)
        self.layers = flat[: len(layer_rows) * LAYER_FIELDS.value]
        self.tiles = flat[len(layer_rows) * LAYER_FIELDS.value :]
        self.n_layers = len(layer_rows)
        self.n_tiles = len(tile_rows)
        self.total_rows = row0
        self.total_scratch = scratch0


def _to_device(values, device: torch.device) -> torch.Tensor:
    """An int64 tensor of ``values`` on ``device``: on CUDA copied from pinned host memory, which the
    caller keeps cached with the result (no pageable copy, so nothing blocks and capture is legal)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


# Every buffer allocated with this is fully written by the kernels (tests swap in a NaN fill).
_uninitialized = torch.empty

# Device tables, keyed on everything they are built from (data pointers, shapes, device): a
# hit is always valid, and steady-state training steps (same weights, masks, and — through the
# caching allocator or the in-place op's .grad tensors — the same gradient addresses) make no
# host→device copy at all.
_TABLES: OrderedDict = OrderedDict()
_TABLES_MAX = 32


def _cached(key, build):
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = build()
        if len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


def _plan(rows, masks, block_m: int, device: torch.device) -> _Plan:
    """The :class:`_Plan` for these (pointer, N, D) rows and masks (cached)."""
    key = ("plan", device, block_m, tuple(rows), tuple(m.data_ptr() for m in masks))
    return _cached(key, lambda: _Plan(rows, masks, block_m, device))


def _address_table(tensors, device: torch.device) -> torch.Tensor:
    """The data pointers of ``tensors`` as an int64 tensor on ``device`` (cached)."""
    addresses = tuple(t.data_ptr() for t in tensors)
    return _cached(("addresses", device, addresses), lambda: _to_device(list(addresses), device))


def _on_device(device: torch.device):
    """The launches' device context: Triton launches on the current CUDA device, so weights on another
    one need it made current (else device-0 kernels would get device-1 pointers)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _rows_are_blocks(t: torch.Tensor) -> bool:
    """Whether t is dense in memory with each dim-0 row one block of numel/N consecutive elements (so its
    memory is an N×D matrix whose columns are the other dims in some order: contiguous, channels_last)."""
    n = t.shape[0]
    return is_dense(t) and (n == 1 or t.stride(0) * n == t.numel())


def _check_arguments(weights, keep_masks, target, reduction, grads=None) -> None:
    """The checks of the C++ kernels (csrc/gram_penalty.h, check_arguments), same messages: the Triton op
    called directly (torch.ops.fastreg_triton...) must not put host pointers or wrong shapes in its tables."""
    if target not in _TARGET_CODES:
        raise ValueError(f"gram_penalty: target must be 'decorrelate', 'diagonal' or 'identity', got '{target}'")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"gram_penalty: reduction must be 'mean', 'sum' or 'none', got '{reduction}'")
    if not weights:
        raise ValueError("gram_penalty: weights must not be empty")
    if target != "identity" and len(keep_masks) != len(weights):
        raise ValueError(f"gram_penalty: keep_masks has {len(keep_masks)} masks but weights has {len(weights)} tensors")
    if target == "identity" and keep_masks:
        raise ValueError("gram_penalty: target 'identity' takes no keep_masks")
    dtype, device = weights[0].dtype, weights[0].device
    if dtype not in _TL_DTYPES:
        raise TypeError(f"gram_penalty: weights must be floating, got {dtype}")
    for l, w in enumerate(weights):
        if w.dim() < 2:
            raise ValueError(f"gram_penalty: weights[{l}] must have at least 2 dims, got {list(w.shape)}")
        if w.numel() == 0:
            raise ValueError(f"gram_penalty: weights[{l}] is empty (shape {list(w.shape)}): a layer needs at least one "
                             "row and one column")
        if w.dtype != dtype:
            raise TypeError("gram_penalty: weights must share one dtype")
        if w.device != device:
            raise ValueError("gram_penalty: weights must share one device")
        if keep_masks:
            m = keep_masks[l]
            if m.dtype != torch.bool:
                raise TypeError(f"gram_penalty: keep_masks[{l}] must be bool")
            if m.dim() != 1 or m.shape[0] != w.shape[0]:
                raise ValueError(f"gram_penalty: keep_masks[{l}] must have shape [{w.shape[0]}], got {list(m.shape)}")
            if m.device != device:
                raise ValueError(f"gram_penalty: keep_masks[{l}] must be on {device}")
        if grads is not None:
            g = grads[l] if l < len(grads) else None
            if g is None or g.shape != w.shape:
                raise ValueError(f"gram_penalty_grad_: grads[{l}] must have the shape {list(w.shape)} of weights[{l}]")
            if g.dtype != dtype:
                raise TypeError(f"gram_penalty_grad_: grads[{l}] has dtype {g.dtype} but weights[{l}] has {dtype}")
            if g.device != device:
                raise ValueError(f"gram_penalty_grad_: grads[{l}] is on {g.device} but weights[{l}] on {device}")
            if not is_dense(g):
                raise ValueError(f"gram_penalty_grad_: grads[{l}] is updated in place, so it must be dense in memory, "
                                 f"got strides {g.stride()}")
    if grads is not None and len(grads) != len(weights):
        raise ValueError(f"gram_penalty_grad_: grads has {len(grads)} tensors but weights has {len(weights)}")
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "fastreg_triton::gram_penalty: weights are CPU tensors, which Triton runs only under "
            "TRITON_INTERPRET=1 set before fastreg is imported"
        )


def _launch(rows, masks, dsts, target: str, reduction: str, *, dtype, device, accumulate: bool, coeff=None):
    """Runs the kernels: per_layer[l] = s Σ E_l² and (dsts given: N×D ACC tensors) dsts[l] = or += 4 s E W,
    s = 1/N² (mean) or 1, times the device scalar ``coeff`` if given. rows: (pointer, N, D) per layer."""
    acc_dtype = accumulate_dtype(dtype)
    options = _launch_options(device, dtype, acc_dtype)
    plan = _plan(rows, masks, options["BLOCK_M"], device)
    need_grad = dsts is not None
    order = n_pruned = None  # identity: natural row order, nothing pruned
    if masks:
        order = _uninitialized(plan.total_rows, dtype=torch.int32, device=device)
        n_pruned = _uninitialized(plan.n_layers, dtype=torch.int32, device=device)
        _pruned_first_order_kernel[(plan.n_layers,)](plan.layers, order, n_pruned, BLOCK=256)
    grad_ptrs = _address_table(dsts, device) if need_grad else None  # unread without grads
    # decorrelate: the A[P, K] blocks the kept rows' gradient reads
    scratch = None
    if need_grad and target == "decorrelate":
        scratch = _uninitialized(max(plan.total_scratch, 1), dtype=acc_dtype, device=device)
    partials = _uninitialized(plan.n_tiles, dtype=acc_dtype, device=device)
    flags = dict(MEAN=reduction == "mean", ACCUMULATE=accumulate, HAS_COEFF=coeff is not None,
                 W_DTYPE=_TL_DTYPES[dtype], ACC_DTYPE=_TL_DTYPES[acc_dtype])
    _gram_rows_kernel[(plan.n_tiles,)](
        plan.layers, plan.tiles, order, n_pruned, grad_ptrs, scratch, partials, coeff,
        TARGET=_TARGET_CODES[target], NEED_GRAD=need_grad, **flags, **options,
    )
    if scratch is not None:
        _kept_rows_grad_kernel[(plan.n_tiles,)](
            plan.layers, plan.tiles, order, n_pruned, grad_ptrs, scratch, coeff,
            **flags, **{k: v for k, v in options.items() if k != "GRAM_DTYPE"},
        )
    per_layer = _uninitialized(plan.n_layers, dtype=acc_dtype, device=device)
    _layer_sums_kernel[(plan.n_layers,)](plan.layers, partials, per_layer, BLOCK=64)
    return per_layer


def gram_penalty(weights, keep_masks, target: str, reduction: str, coeff: float, need_grad: bool):
    """``fastreg_triton::gram_penalty_and_grads``: (coeff · Σ_l penalty_l or [coeff · penalty_l],
    [coeff · ∂penalty_l/∂W_l]) — see module doc. (coeff ≠ 1 costs one multi-tensor multiply here; the
    C++ backends fold it into their epilogues. A Triton scalar argument would be float32, too coarse
    for float64 weights.)"""
    _check_arguments(weights, keep_masks, target, reduction)
    device, dtype = weights[0].device, weights[0].dtype
    acc_dtype = accumulate_dtype(dtype)
    rows2d = [w.reshape(w.shape[0], -1).contiguous() for w in weights]
    masks = [] if target == "identity" else [m.contiguous() for m in keep_masks]
    with _on_device(device):
        # Gradients: one tensor per layer (outputs must not alias), addresses in a cached table.
        acc_grads = [_uninitialized(w.shape, dtype=acc_dtype, device=device) for w in rows2d] if need_grad else None
        per_layer = _launch([(w.data_ptr(), *w.shape) for w in rows2d], masks, acc_grads, target, reduction,
                            dtype=dtype, device=device, accumulate=False)
        if coeff != 1.0:
            per_layer.mul_(coeff)
            if acc_grads:
                torch._foreach_mul_(acc_grads, coeff)
        penalty = per_layer if reduction == "none" else per_layer.sum()

        # Contiguous, of each weight's shape and dtype (as the C++ kernels and the fake return them,
        # whatever the weight's layout): the N×D results reshaped, and one multi-tensor cast for fp16/bf16.
        grads = [a.view(w.shape) for a, w in zip(acc_grads or [], weights)]
        differ = [i for i, w in enumerate(weights) if w.dtype != acc_dtype]
        if differ:
            converted = [torch.empty(weights[i].shape, dtype=weights[i].dtype, device=device) for i in differ]
            torch._foreach_copy_(converted, [grads[i] for i in differ])
            for i, c in zip(differ, converted):
                grads[i] = c
    return penalty, grads


def gram_penalty_grad_(weights, keep_masks, grads, target: str, reduction: str, coeff: float, coeff_tensor):
    """``fastreg_triton::gram_penalty_grad_``: grads[l] += coeff · coeff_tensor · ∂penalty_l/∂W_l, in place;
    returns the penalty. The epilogues add into each gradient where it lies when it has the accumulation
    dtype (fp32/fp64) and rows as blocks; the weight is read in place when it shares that layout (else
    copied into it: the gram and E W do not depend on the order of the columns). fp16/bf16 gradients, or
    gradients whose rows are not blocks, get an fp32 workspace and one multi-tensor add."""
    _check_arguments(weights, keep_masks, target, reduction, grads)
    device, dtype = weights[0].device, weights[0].dtype
    acc_dtype = accumulate_dtype(dtype)
    if coeff_tensor is not None:
        if coeff_tensor.numel() != 1 or not coeff_tensor.dtype.is_floating_point or coeff_tensor.device != device:
            raise ValueError(f"gram_penalty: coeff_tensor must be one floating element on {device}")
    masks = [] if target == "identity" else [m.contiguous() for m in keep_masks]
    with _on_device(device):
        if coeff_tensor is None:
            c = torch.full((), coeff, dtype=acc_dtype, device=device)
        else:
            c = coeff_tensor.reshape(()).to(acc_dtype) * coeff if coeff != 1.0 else coeff_tensor.reshape(()).to(acc_dtype)
        rows, dsts, workspaces = [], [], []
        for w, g in zip(weights, grads):
            n = w.shape[0]
            if g.dtype == acc_dtype and _rows_are_blocks(g):
                src = w if _rows_are_blocks(w) and same_layout(w, g) else torch.empty_like(g).copy_(w)
                dsts.append(g)
            else:
                src = w.reshape(n, -1).contiguous()
                dsts.append(torch.zeros(src.shape, dtype=acc_dtype, device=device))
                workspaces.append((g, dsts[-1]))
            rows.append((src.data_ptr(), n, w.numel() // n))
            if src is not w:
                workspaces.append((None, src))  # (kept alive until the kernels have read it)
        per_layer = _launch(rows, masks, dsts, target, reduction, dtype=dtype, device=device, accumulate=True, coeff=c)
        added = [(g, t.view(g.shape)) for g, t in workspaces if g is not None]
        if added:
            torch._foreach_add_([g for g, _ in added], [t for _, t in added])
    return per_layer if reduction == "none" else per_layer.sum()


torch.library.register_kernel("fastreg_triton::gram_penalty_and_grads", ("cpu", "cuda"), gram_penalty)
torch.library.register_kernel("fastreg_triton::gram_penalty_grad_", ("cpu", "cuda"), gram_penalty_grad_)
