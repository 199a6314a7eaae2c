"""Triton backend of the fused per-step ops (DESIGN.md §1.2–1.4): every tensor of a model in one
launch per kernel, registered as ``fastreg_triton::<op>``.

    group_norms            ‖slice‖_p (p = 1, 2) of every slice along ``dim`` of every tensor
    group_saliency         S(g) = (Σ_{w∈g} ‖w‖₂/√|w|) / |g| over coupled groups of slices
    l2_grad_               grad[P] += c · w[P]                     (GReg / TPP Eq. 5)
    shrink_                t[P] *= c                                (OCSPruner Eq. 9)
    group_lasso_grad_      grad[g] += c · w_g / ‖w_g‖₂, g ∈ P       (OCSPruner Eq. 8, per slice)
    group_lasso_grad_grouped_  the same over coupled groups (‖w_g‖₂ over every slice of g)
    slimming_grad_         grad(γ) += c · sign(γ)                  (network slimming)

P = the pruned slices (keep mask False) along each tensor's dim; c = ``c · c_tensor`` when the
coefficient tensor is given (read in-kernel: no host sync). Formulas: :mod:`fastreg.reference`.

Design (apex ``multi_tensor_apply``, with the tables on the device):

* Slices. A dense tensor in any dim order (contiguous, channels_last, transposed) is, in memory,
  [A, R, B] around its slicing dim d: R = shape[d], B = stride[d], so the element at memory offset
  o belongs to slice (o // B) % R, and element k of slice r sits at (k // B)·R·B + r·B + k % B.
* One int64 table row per tensor (:data:`FIELDS` columns: the addresses of the tensor, of its
  grad / in-place target and of its keep mask or group ids, cast in-kernel with
  ``.to(tl.pointer_type(...))``; numel, R, B, offsets into the scratch buffers) and a work list of
  (tensor, chunk) items; program i runs item i. A chunk is BLOCK elements in memory order for the
  elementwise updates, a BLOCK_R × BLOCK_K tile of (slices × elements of a slice) for reductions.
* Reductions write one partial sum per (slice, tile) (no atomics, fixed order: deterministic);
  ``_finish_slices_kernel`` adds a slice's partials and writes its norm, or adds its share to its
  group with an atomic add (saliency, coupled group lasso: a group has a handful of slices). Atomic
  adds make a group's total vary in its last bits from run to run; under
  ``torch.use_deterministic_algorithms(True)`` the kernel instead writes each slice's share and its
  group, and ``index_add_`` (deterministic in that mode) sums them: bitwise-reproducible results.
* Streams. Each call runs on the current stream; a plan's scratch buffers are kept per stream, so
  the same op may run concurrently on several streams.
* Masked updates touch only pruned slices: loads and stores are masked by the keep mask, so kept
  slices cost one mask byte per element read (on a GPU, fully masked lanes move no memory).
* Mixed dtypes: tensors are grouped by dtype (grad dtype, tensor dtype) and each group gets its own
  launches. The element type of a pointer is fixed when a kernel is compiled, so one launch per
  dtype keeps every kernel specialised (one fp16 load path, not four branches per element) and the
  accumulator exact (float64 only for float64 tensors). Real models use one dtype (AMP keeps fp32
  masters), so this costs no extra launch in practice and at most four in the worst case.
* Caching. The tables depend only on the tensors' (data_ptr, shape, stride, dtype), which are stable
  across training steps; a plan (device tables + scratch) is cached under that key, so a step
  costs the key, a dict lookup and the launches: no host→device copy, no host sync. Mask values and
  group ids are read in-kernel on every call, so updating them in place needs no rebuild. Tensors
  the kernels read but cannot address directly (non-dense, or a parameter laid out unlike its grad)
  run through a slower uncached path on copies laid out as needed. Tensors written in place must be
  dense (an error names them otherwise), as for the C++ kernels.

fp16 / bf16 are loaded and upcast to float32 (float64 stays float64); values are rounded to the
tensor dtypes where the reference rounds them, so fp32/fp64 results match the reference to a few
ulps and fp16/bf16 results to one ulp. Runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (set
before this module is imported).
"""
from __future__ import annotations

import itertools
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import accumulate_dtype, promoted_dtype
from .._checks import check_writable, is_dense, same_layout

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

BLOCK = 4096  # elementwise updates: elements per program
BLOCK_R, BLOCK_K = 64, 64  # reductions: slices × elements of a slice per program
BLOCK_S = 256  # finishing reductions: slices per program
BLOCK_G = 1024  # group means: groups per program
PLAN_CACHE_SIZE = 16
INT32_INDEX_LIMIT = 2**30  # element offsets in int32 when every tensor of a dtype group is smaller

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}

# Per-tensor table: one int64 row of FIELDS columns.
T_X: tl.constexpr = tl.constexpr(0)  # address of the tensor read (param, or the in-place target)
T_DST: tl.constexpr = tl.constexpr(1)  # address of the tensor written (grad / in-place target)
T_SLICE_VEC: tl.constexpr = tl.constexpr(2)  # address of the keep mask (bool) or group ids (int64)
T_NUMEL: tl.constexpr = tl.constexpr(3)
T_R: tl.constexpr = tl.constexpr(4)  # number of slices (shape[d])
T_B: tl.constexpr = tl.constexpr(5)  # stride[d] (numel when R == 1)
T_K: tl.constexpr = tl.constexpr(6)  # elements per slice (numel / R)
T_SLICE0: tl.constexpr = tl.constexpr(7)  # index of the tensor's first slice among its group's slices
T_PARTIAL0: tl.constexpr = tl.constexpr(8)  # first partial sum; slice r, tile kb: T_PARTIAL0 + kb·R + r
T_TILES_K: tl.constexpr = tl.constexpr(9)  # tiles per slice: ceil(K / BLOCK_K)
FIELDS: tl.constexpr = tl.constexpr(10)

# Which slices an op reads / updates.
ALL_SLICES: tl.constexpr = tl.constexpr(0)
PRUNED_SLICES: tl.constexpr = tl.constexpr(1)  # keep mask False
PRUNED_GROUPS: tl.constexpr = tl.constexpr(2)  # group id in [0, num_groups) with pruned_groups[id]

# _finish_slices_kernel: what a slice's sum Σ|x|^p becomes.
NORM_P1: tl.constexpr = tl.constexpr(1)  # out[s] = Σ|x|
NORM_P2: tl.constexpr = tl.constexpr(2)  # out[s] = √Σx²
SALIENCY: tl.constexpr = tl.constexpr(3)  # groups[g] += √Σx² / √K, groups[G + g] += 1
GROUP_SQUARES: tl.constexpr = tl.constexpr(4)  # groups[g] += Σx²
# (SALIENCY / GROUP_SQUARES with PER_SLICE: out[s] = the share, out[S + s] = 1 if counted, slice_groups[s] = g)

# _update_kernel: the per-element update.
L2: tl.constexpr = tl.constexpr(0)  # dst += round_x(c · x)
SHRINK: tl.constexpr = tl.constexpr(1)  # x *= c (dst is x)
LASSO: tl.constexpr = tl.constexpr(2)  # dst += c · x / ‖slice‖₂
LASSO_GROUPED: tl.constexpr = tl.constexpr(3)  # dst += x · (c / ‖group‖₂)
SLIMMING: tl.constexpr = tl.constexpr(4)  # dst += round_x(c · sign(x))


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """Correctly rounded √x (``tl.sqrt`` is approximate for float32 on GPUs)."""
    if ACC == tl.float32:
        y = tl.sqrt_rn(x)
    else:
        y = tl.sqrt(x)
    return y


@triton.jit
def _div(x, y, ACC: tl.constexpr):
    """Correctly rounded x / y (float32 ``/`` is approximate on GPUs)."""
    if ACC == tl.float32:
        q = tl.div_rn(x, y)
    else:
        q = x / y
    return q


@triton.jit
def _group_of(row, r, ok, num_groups):
    """Group id of slice r of tensor t (int64 ids table), −1 when none or out of [0, num_groups)."""
    ids = tl.load(row + T_SLICE_VEC).to(tl.pointer_type(tl.int64))
    gid = tl.load(ids + r, mask=ok, other=-1)
    return tl.where((gid >= 0) & (gid < num_groups), gid, -1)


@triton.jit
def _selected(row, r, ok, pruned_groups, num_groups, SELECT: tl.constexpr):
    """``ok`` restricted to the slices the op touches (see ALL_SLICES / PRUNED_SLICES / PRUNED_GROUPS)."""
    if SELECT == PRUNED_SLICES:
        keep = tl.load(tl.load(row + T_SLICE_VEC).to(tl.pointer_type(tl.int8)) + r, mask=ok, other=1)
        sel = ok & (keep == 0)
    elif SELECT == PRUNED_GROUPS:
        gid = _group_of(row, r, ok, num_groups)
        pruned = tl.load(pruned_groups + gid, mask=ok & (gid >= 0), other=0)
        sel = ok & (pruned != 0)
    else:
        sel = ok
    return sel


@triton.jit
def _slice_partials_kernel(
    tensors, work, partials, pruned_groups, num_groups,
    P: tl.constexpr, SELECT: tl.constexpr, X: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (tensor, slice tile, element tile) per program: partials[T_PARTIAL0 + kb·R + r] = Σ_k |x[r, k]|^P
    over the tile's BLOCK_K elements of each of its BLOCK_R slices (0 for slices not selected)."""
    item = tl.program_id(0)
    t = tl.load(work + 3 * item)
    r = tl.load(work + 3 * item + 1) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = tl.load(work + 3 * item + 2)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    row = tensors + t * FIELDS
    R = tl.load(row + T_R)
    B = tl.load(row + T_B)
    K = tl.load(row + T_K)
    r_ok = r < R
    sel = _selected(row, r, r_ok, pruned_groups, num_groups, SELECT)
    x_ptr = tl.load(row + T_X).to(tl.pointer_type(X))
    offset = (k // B)[None, :] * (R * B) + (r * B)[:, None] + (k % B)[None, :]
    x = tl.load(x_ptr + offset, mask=sel[:, None] & (k < K)[None, :], other=0).to(ACC)
    if P == 1:
        part = tl.sum(tl.abs(x), axis=1)
    else:
        part = tl.sum(x * x, axis=1)
    tl.store(partials + tl.load(row + T_PARTIAL0) + kb * R + r, part, mask=r_ok)


@triton.jit
def _finish_slices_kernel(
    tensors, slice_tensor, n_slices, partials, out, groups, num_groups, slice_groups,
    MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr, PER_SLICE: tl.constexpr = False,
):
    """Slice s's Σ|x|^p = Σ_kb partials (fixed order); then per MODE (NORM_P1, NORM_P2: out[s];
    SALIENCY, GROUP_SQUARES: atomic adds into ``groups``, or with PER_SLICE each slice's share in
    ``out`` and its group in ``slice_groups``, for the caller to sum in a fixed order)."""
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = s < n_slices
    t = tl.load(slice_tensor + s, mask=ok, other=0)
    row = tensors + t * FIELDS
    R = tl.load(row + T_R)
    r = s - tl.load(row + T_SLICE0)
    first = tl.load(row + T_PARTIAL0) + r
    tiles = tl.where(ok, tl.load(row + T_TILES_K), 0)
    total = tl.zeros([BLOCK_S], ACC)
    for kb in range(0, tl.max(tiles, axis=0)):
        total += tl.load(partials + first + kb * R, mask=kb < tiles, other=0)
    if MODE == NORM_P1:
        tl.store(out + s, total.to(out.dtype.element_ty), mask=ok)
    elif MODE == NORM_P2:
        tl.store(out + s, _sqrt(total, ACC).to(out.dtype.element_ty), mask=ok)
    else:
        gid = _group_of(row, r, ok, num_groups)
        hit = gid >= 0
        if MODE == SALIENCY:
            K = tl.load(row + T_K).to(ACC)
            share = _div(_sqrt(total, ACC), _sqrt(tl.maximum(K, 1), ACC), ACC)  # 0 for a slice of no elements
        else:
            share = total
        if PER_SLICE:  # a slice outside every group adds 0 to group 0
            tl.store(out + s, tl.where(hit, share, 0).to(out.dtype.element_ty), mask=ok)
            if MODE == SALIENCY:
                tl.store(out + n_slices + s, tl.where(hit, 1, 0).to(out.dtype.element_ty), mask=ok)
            tl.store(slice_groups + s, tl.where(hit, gid, 0), mask=ok)
        else:
            tl.atomic_add(groups + gid, share.to(groups.dtype.element_ty), mask=hit)
            if MODE == SALIENCY:
                tl.atomic_add(groups + num_groups + gid, tl.full([BLOCK_S], 1, groups.dtype.element_ty), mask=hit)


@triton.jit
def _group_mean_kernel(groups, out, num_groups, ACC: tl.constexpr, BLOCK_G: tl.constexpr):
    """out[g] = groups[g] / groups[G + g] (sum / count), 0 for groups without slices."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    ok = g < num_groups
    total = tl.load(groups + g, mask=ok, other=0)
    count = tl.load(groups + num_groups + g, mask=ok, other=0)
    mean = _div(total, tl.maximum(count, 1), ACC)
    tl.store(out + g, tl.where(count > 0, mean, 0).to(out.dtype.element_ty), mask=ok)


@triton.jit
def _update_kernel(
    tensors, work, slice_norms, groups, pruned_groups, num_groups, coef: tl.float64, coef_tensor,
    MODE: tl.constexpr, SELECT: tl.constexpr, HAS_COEF_TENSOR: tl.constexpr,
    X: tl.constexpr, DST: tl.constexpr, ACC: tl.constexpr, INDEX: tl.constexpr, BLOCK: tl.constexpr,
):
    """One (tensor, chunk of BLOCK elements in memory order) per program; MODE's update on the
    selected slices (see L2 / SHRINK / LASSO / LASSO_GROUPED / SLIMMING). Steps are rounded to the
    dtype the reference computes them in before they are added. INDEX: the integer type of element
    offsets (int32 unless a tensor is huge: a GPU divides int32 several times faster)."""
    item = tl.program_id(0)
    t = tl.load(work + 2 * item)
    row = tensors + t * FIELDS
    e = tl.load(work + 2 * item + 1).to(INDEX) * BLOCK + tl.arange(0, BLOCK)
    r = (e // tl.load(row + T_B).to(INDEX)) % tl.load(row + T_R).to(INDEX)
    sel = _selected(row, r, e < tl.load(row + T_NUMEL).to(INDEX), pruned_groups, num_groups, SELECT)
    c = tl.full([], coef, ACC)  # (tl.cast would round a Python float to fp32 in the interpreter)
    if HAS_COEF_TENSOR:
        c = c * tl.load(coef_tensor).to(ACC)
    dst_ptr = tl.load(row + T_DST).to(tl.pointer_type(DST))
    if MODE == SHRINK:
        x = tl.load(dst_ptr + e, mask=sel, other=0).to(ACC)
        tl.store(dst_ptr + e, (x * c).to(DST), mask=sel)
    else:
        x = tl.load(tl.load(row + T_X).to(tl.pointer_type(X)) + e, mask=sel, other=0).to(ACC)
        if MODE == L2:
            step = (x * c).to(X).to(ACC)
        elif MODE == SLIMMING:
            sign = (x > 0).to(ACC) - (x < 0).to(ACC)
            step = (sign * c).to(X).to(ACC)
        elif MODE == LASSO:
            norm = tl.load(slice_norms + tl.load(row + T_SLICE0) + r, mask=sel, other=0).to(ACC)
            sel = sel & (norm > 0)
            step = _div(x, tl.where(sel, norm, 1), ACC) * c
        else:  # LASSO_GROUPED
            gid = _group_of(row, r, sel, num_groups)
            norm = _sqrt(tl.load(groups + gid, mask=sel, other=0).to(ACC), ACC)
            sel = sel & (norm > 0)
            step = x * _div(c, tl.where(sel, norm, 1), ACC)
        grad = tl.load(dst_ptr + e, mask=sel, other=0).to(ACC)
        tl.store(dst_ptr + e, (grad + step.to(DST).to(ACC)).to(DST), mask=sel)


# ---------------------------------------------------------------------------------------------
# Plans: device tables for one set of inputs, grouped by dtype
# ---------------------------------------------------------------------------------------------
def _slice_layout(t: Tensor, dim: int) -> tuple[int, int]:
    """(R, B) of the [A, R, B] memory view of dense ``t`` around ``dim`` (see module docstring)."""
    R = t.shape[dim]
    B = t.stride(dim) if R > 1 else t.numel()
    return R, max(B, 1)


@dataclass
class _DtypeGroup:
    """Every tensor of one (x dtype, dst dtype) pair: its tables, work lists and scratch."""

    positions: list[int]  # where its tensors are in the op's lists
    x: object  # tl dtypes
    dst: object
    acc: object
    acc_torch: torch.dtype
    index: object  # tl.int32 or tl.int64: element offsets in _update_kernel
    tensors: Tensor  # [n, FIELDS] int64
    slice_tensor: Tensor  # [n_slices] int32: the tensor of every slice
    slice_counts: list[int]  # R per tensor
    reduce_work: Tensor  # [items, 3] int32: (tensor, slice tile, element tile)
    update_work: Tensor  # [items, 2] int32: (tensor, chunk)
    n_partials: int
    scratch: dict = field(default_factory=dict)  # buffers (and, uncached plans, the copies the tables point to)

    @property
    def n_slices(self) -> int:
        return self.slice_tensor.shape[0]

    def buffer(self, name: str, size: int, dtype: torch.dtype) -> Tensor:
        """A scratch buffer kept with the plan, one per stream (kernels on one stream run in order;
        calls on two streams may overlap)."""
        device = self.tensors.device
        key = (name, torch.cuda.current_stream(device).cuda_stream) if device.type == "cuda" else name
        buf = self.scratch.get(key)
        if buf is None:
            buf = self.scratch[key] = torch.empty(max(size, 1), dtype=dtype, device=device)
        return buf


def _build_group(positions, xs, dsts, slice_vecs, dims, device, need_reduce: bool, need_update: bool) -> _DtypeGroup:
    x0, d0 = xs[positions[0]], dsts[positions[0]]
    acc = accumulate_dtype(x0.dtype)
    rows, reduce_work, update_work, slice_tensor, slice_counts = [], [], [], [], []
    first_slice = first_partial = 0
    for j, i in enumerate(positions):
        x, dst, vec = xs[i], dsts[i], slice_vecs[i]
        R, B = _slice_layout(x, dims[i])
        K = x.numel() // R if R else 0
        tiles_k = -(-K // BLOCK_K)
        rows.append([x.data_ptr(), dst.data_ptr(), 0 if vec is None else vec.data_ptr(), x.numel(), R, B, K,
                     first_slice, first_partial, tiles_k])
        if need_reduce:
            tiles_r = torch.arange(-(-R // BLOCK_R), dtype=torch.int32)
            ks = torch.arange(tiles_k, dtype=torch.int32)
            grid = torch.cartesian_prod(tiles_r, ks).reshape(-1, 2)
            reduce_work.append(torch.cat([torch.full((grid.shape[0], 1), j, dtype=torch.int32), grid], 1))
            slice_tensor.append(torch.full((R,), j, dtype=torch.int32))
        if need_update:
            chunks = torch.arange(-(-x.numel() // BLOCK), dtype=torch.int32)
            update_work.append(torch.stack([torch.full_like(chunks, j), chunks], 1))
        slice_counts.append(R)
        first_slice += R
        first_partial += R * tiles_k

    def cat(parts, width):
        return torch.cat(parts) if parts else torch.zeros((0, width), dtype=torch.int32)

    return _DtypeGroup(
        positions=positions,
        x=_TL_DTYPES[x0.dtype],
        dst=_TL_DTYPES[d0.dtype],
        acc=_TL_DTYPES[acc],
        acc_torch=acc,
        index=tl.int32 if all(xs[i].numel() < INT32_INDEX_LIMIT for i in positions) else tl.int64,
        tensors=torch.tensor(rows, dtype=torch.int64).to(device),
        slice_tensor=(torch.cat(slice_tensor) if slice_tensor else torch.zeros(0, dtype=torch.int32)).to(device),
        slice_counts=slice_counts,
        reduce_work=cat(reduce_work, 3).to(device),
        update_work=cat(update_work, 2).to(device),
        n_partials=first_partial,
    )


def _build_groups(xs, dsts, slice_vecs, dims, device, need_reduce, need_update) -> list[_DtypeGroup]:
    by_dtype: dict = {}
    for i, (x, dst) in enumerate(zip(xs, dsts)):
        by_dtype.setdefault((x.dtype, dst.dtype), []).append(i)
    return [_build_group(pos, xs, dsts, slice_vecs, dims, device, need_reduce, need_update) for pos in by_dtype.values()]


_PLANS: dict = {}
_WAVES: dict = {}  # _masked_update's key -> its write waves (the key's check() passed)
_DATA_PTR, _SHAPE, _STRIDE, _DTYPE = Tensor.data_ptr, attrgetter("shape"), Tensor.stride, attrgetter("dtype")


def _layout_key(tensors) -> tuple:
    """What the tables depend on: every tensor's (data_ptr, shape, stride, dtype)."""
    return (tuple(map(_DATA_PTR, tensors)), tuple(map(_SHAPE, tensors)), tuple(map(_STRIDE, tensors)),
            tuple(map(_DTYPE, tensors)))


# ---------------------------------------------------------------------------------------------
# Argument preparation (on a cache miss only)
# ---------------------------------------------------------------------------------------------
def _check_list(name: str, tensors, device) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
        if t.dtype not in _TL_DTYPES:
            raise TypeError(f"{name}[{i}] must be a float16/bfloat16/float32/float64 tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {device}: all must share one device")


def _check_dims(dims, tensors, name: str) -> None:
    if len(dims) != len(tensors):
        raise ValueError(f"dims has {len(dims)} entries but {name} has {len(tensors)} tensors")
    for i, (d, t) in enumerate(zip(dims, tensors)):
        if not 0 <= d < t.dim():
            raise ValueError(f"dims[{i}] = {d} is not a dim of {name}[{i}] (shape {tuple(t.shape)})")


def _check_slice_vecs(name: str, vecs, tensors, dims, dtype: torch.dtype, tensors_name: str) -> None:
    if len(vecs) != len(tensors):
        raise ValueError(f"{name} has {len(vecs)} entries but {tensors_name} has {len(tensors)} tensors")
    for i, (v, t, d) in enumerate(zip(vecs, tensors, dims)):
        if v.dtype != dtype:
            raise TypeError(f"{name}[{i}] must be a {dtype} tensor, got {v.dtype}")
        if v.shape != (t.shape[d],):
            raise ValueError(f"{name}[{i}] must have shape [{t.shape[d]}] (size of {tensors_name}[{i}] along dim {d}), "
                             f"got {tuple(v.shape)}")
        if v.device != t.device:
            raise ValueError(f"{name}[{i}] is on {v.device} but {tensors_name}[{i}] is on {t.device}")


def _addressable(xs, dsts, vecs) -> bool:
    """Whether the kernels can address these tensors in place: dense tensors, each source laid out as
    its target, contiguous slice vectors."""
    return (all(is_dense(d) for d in dsts)
            and all(x is d or (is_dense(x) and same_layout(x, d)) for x, d in zip(xs, dsts))
            and all(v is None or v.is_contiguous() for v in vecs))


def _addressable_copies(xs, dsts, vecs):
    """Copies the kernels can address: (xs, dsts, vecs). Only tensors the kernels read are copied: an
    update's targets are dense (checked), a reduction's "targets" are its inputs (read only)."""
    new_dsts = [d if is_dense(d) else d.contiguous() for d in dsts]
    new_xs = []
    for x, d, nd in zip(xs, dsts, new_dsts):
        if x is d:
            new_xs.append(nd)
        elif is_dense(x) and same_layout(x, nd):
            new_xs.append(x)
        else:
            new_xs.append(torch.empty_like(nd, dtype=x.dtype).copy_(x))  # laid out as nd
    return new_xs, new_dsts, [None if v is None else v.contiguous() for v in vecs]


def _plan(key, check, xs, dsts, vecs, dims, device, need_reduce: bool, need_update: bool):
    """The dtype groups for these inputs: from the cache, else ``check()`` the arguments and build
    them (cached when the tensors are addressable as given; else built on copies of what the kernels
    read, uncached). A cached plan's key has the tensors' strides, so an update's targets, which
    ``check()`` requires dense, are dense whenever a plan is found."""
    groups = _PLANS.get(key)
    if groups is not None:
        return groups
    check()
    vecs = vecs or [None] * len(xs)
    if not _addressable(xs, dsts, vecs):
        xs, dsts, vecs = _addressable_copies(xs, dsts, vecs)
        groups = _build_groups(xs, dsts, vecs, dims, device, need_reduce, need_update)
        for group in groups:  # the tables hold bare addresses: keep the copies alive with them
            group.scratch["copies"] = (xs, dsts, vecs)
        return groups
    groups = _PLANS[key] = _build_groups(xs, dsts, vecs, dims, device, need_reduce, need_update)
    if len(_PLANS) > PLAN_CACHE_SIZE:  # evict the oldest (a training loop reuses one plan per op)
        del _PLANS[next(iter(_PLANS))]
    return groups


def _device_context(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("fastreg_triton ops run on CPU tensors only under TRITON_INTERPRET=1 (set before importing fastreg)")
    return nullcontext()


def _coefficient(name: str, c: float, c_tensor: Tensor | None, device: torch.device):
    """(c as float, c_tensor on the device or None); a CPU c_tensor with device tensors is read on the host."""
    if c_tensor is None:
        return float(c), None
    if c_tensor.numel() != 1:
        raise ValueError(f"{name} must hold one element, got shape {tuple(c_tensor.shape)}")
    if c_tensor.device != device:
        if c_tensor.device.type == "cpu":  # a host value: reading it costs no device sync
            return float(c) * float(c_tensor), None
        raise ValueError(f"{name} is on {c_tensor.device} but the tensors are on {device}")
    return float(c), c_tensor.detach()


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _slice_sums(group: _DtypeGroup, p: int, select, pruned_groups: Tensor | None, num_groups: int) -> Tensor:
    """Partial sums Σ|x|^p of every slice of the group (one launch); returns the partials buffer."""
    partials = group.buffer("partials", group.n_partials, group.acc_torch)
    items = group.reduce_work.shape[0]
    if items:
        _slice_partials_kernel[(items,)](
            group.tensors, group.reduce_work, partials,
            group.tensors if pruned_groups is None else pruned_groups, num_groups,
            P=p, SELECT=select, X=group.x, ACC=group.acc, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
        )
    return partials


def _finish(group: _DtypeGroup, partials: Tensor, mode, out: Tensor | None, groups: Tensor | None, num_groups: int) -> None:
    if not group.n_slices:
        return
    grid = (triton.cdiv(group.n_slices, BLOCK_S),)
    if groups is not None and torch.are_deterministic_algorithms_enabled():
        # Each slice's share and group, then index_add_ (deterministic in this mode) instead of atomics.
        rows = 2 if mode == SALIENCY else 1
        shares = group.buffer("slice_shares", rows * group.n_slices, groups.dtype)
        slice_groups = group.buffer("slice_groups", group.n_slices, torch.int64)
        _finish_slices_kernel[grid](
            group.tensors, group.slice_tensor, group.n_slices, partials, shares, partials, num_groups, slice_groups,
            MODE=mode, ACC=group.acc, BLOCK_S=BLOCK_S, PER_SLICE=True,
        )
        n = group.n_slices
        groups.view(rows, -1).index_add_(1, slice_groups[:n], shares[: rows * n].view(rows, n))
        return
    _finish_slices_kernel[grid](
        group.tensors, group.slice_tensor, group.n_slices, partials,
        partials if out is None else out, partials if groups is None else groups, num_groups, partials,
        MODE=mode, ACC=group.acc, BLOCK_S=BLOCK_S,
    )


def _update(group: _DtypeGroup, mode, select, c: float, c_tensor: Tensor | None, *, slice_norms=None,
            groups=None, pruned_groups=None, num_groups: int = 0) -> None:
    items = group.update_work.shape[0]
    if items:
        t = group.tensors
        _update_kernel[(items,)](
            t, group.update_work, t if slice_norms is None else slice_norms, t if groups is None else groups,
            t if pruned_groups is None else pruned_groups, num_groups, c, t if c_tensor is None else c_tensor,
            MODE=mode, SELECT=select, HAS_COEF_TENSOR=c_tensor is not None,
            X=group.x, DST=group.dst, ACC=group.acc, INDEX=group.index, BLOCK=BLOCK,
        )


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------
def _group_norms_by_dtype(tensors: list[Tensor], p: int, dim: int) -> list[tuple[_DtypeGroup, Tensor]]:
    """(dtype group, the norms of its tensors' slices in list order, in their dtype) for every group."""
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    if not tensors:
        return []
    device = tensors[0].device
    dims = [dim] * len(tensors)

    def check():
        _check_list("tensors", tensors, device)
        for i, t in enumerate(tensors):
            if not 0 <= dim < t.dim():
                raise ValueError(f"dim = {dim} is not a dim of tensors[{i}] (shape {tuple(t.shape)})")

    key = ("group_norms", device, dim, _layout_key(tensors))
    plan = _plan(key, check, tensors, tensors, [], dims, device, True, False)
    out = []
    with _device_context(device):
        for group in plan:
            norms = torch.empty(group.n_slices, dtype=tensors[group.positions[0]].dtype, device=device)
            _finish(group, _slice_sums(group, p, ALL_SLICES, None, 0), NORM_P1 if p == 1 else NORM_P2, norms, None, 0)
            out.append((group, norms))
    return out


def group_norms(tensors: list[Tensor], p: int, dim: int) -> list[Tensor]:
    """‖slice‖_p of every slice along ``dim`` of every tensor: one tensor per input, in its dtype (each
    dtype group's output split into tensors of their own, one batched copy: a custom op's outputs may
    not alias each other)."""
    result: list[Tensor | None] = [None] * len(tensors)
    for group, norms in _group_norms_by_dtype(tensors, p, dim):
        sizes = [tensors[i].shape[dim] for i in group.positions]
        for i, seg in zip(group.positions, torch.ops.aten.split_with_sizes_copy.default(norms, sizes)):
            result[i] = seg
    return result


def group_norms_flat(tensors: list[Tensor], p: int, dim: int) -> Tensor:
    """The same norms concatenated in list order, in the tensors' promoted dtype (with mixed dtypes each
    group's norms are scattered into their tensors' segments, one copy per group)."""
    groups = _group_norms_by_dtype(tensors, p, dim)
    if not tensors:
        return torch.empty(0)
    dtype = promoted_dtype(tensors)
    if len(groups) == 1 and groups[0][1].dtype == dtype and groups[0][0].positions == list(range(len(tensors))):
        return groups[0][1]
    counts = [t.shape[dim] for t in tensors]
    flat = torch.empty(sum(counts), dtype=dtype, device=tensors[0].device)
    for group, norms in groups:
        flat.index_copy_(0, _flat_positions(group, counts, flat.device), norms.to(dtype))
    return flat


def _flat_positions(group: _DtypeGroup, counts: list[int], device) -> Tensor:
    """Where the group's slices sit in group_norms' flat output (list order); built once per plan."""
    index = group.scratch.get("flat_positions")
    if index is None:
        offsets = [0, *itertools.accumulate(counts)]
        index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in group.positions]).to(device)
        group.scratch["flat_positions"] = index
    return index


def group_saliency(tensors: list[Tensor], dims: list[int], group_ids: list[Tensor], num_groups: int) -> Tensor:
    """S(g) = (Σ_{w∈g} ‖w‖₂/√|w|) / |g|; slice j of tensors[i] along dims[i] is in group group_ids[i][j]
    (−1: none; ids outside [0, num_groups) are ignored). Float32 (float64 if tensors[0] is)."""
    if num_groups < 0:
        raise ValueError(f"num_groups must be >= 0, got {num_groups}")
    acc = accumulate_dtype(tensors[0].dtype) if tensors else torch.float32
    device = tensors[0].device if tensors else torch.device("cpu")
    if not tensors or num_groups == 0:
        return torch.zeros(num_groups, dtype=acc, device=device)
    dims = list(dims)

    def check():
        _check_list("tensors", tensors, device)
        _check_dims(dims, tensors, "tensors")
        _check_slice_vecs("group_ids", group_ids, tensors, dims, torch.int64, "tensors")

    key = ("group_saliency", device, tuple(dims), _layout_key(tensors), _layout_key(group_ids))
    plan = _plan(key, check, tensors, tensors, group_ids, dims, device, True, False)
    sums = torch.zeros(2 * num_groups, dtype=acc, device=device)  # [Σ scores | slice counts] per group
    out = torch.empty(num_groups, dtype=acc, device=device)
    with _device_context(device):
        for group in plan:
            partials = _slice_sums(group, 2, ALL_SLICES, None, 0)
            _finish(group, partials, SALIENCY, None, sums, num_groups)
        _group_mean_kernel[(triton.cdiv(num_groups, BLOCK_G),)](sums, out, num_groups, ACC=_TL_DTYPES[acc], BLOCK_G=BLOCK_G)
    return out


def _group_squares(plan, select, pruned_groups: Tensor, num_groups: int, dtype: torch.dtype, device) -> Tensor:
    """‖w_g‖² of every pruned group, summed over all the plan's dtype groups."""
    squares = torch.zeros(num_groups, dtype=accumulate_dtype(dtype), device=device)
    for group in plan:
        partials = _slice_sums(group, 2, select, pruned_groups, num_groups)
        _finish(group, partials, GROUP_SQUARES, None, squares, num_groups)
    return squares


def _write_waves(dsts: Sequence[Tensor]) -> list[list[int]]:
    """The entries in waves: the k-th entry that writes a tensor goes to wave k, so that no launch has
    two entries writing the same memory (on a GPU their programs would race: lost updates)."""
    seen: dict[int, int] = {}
    waves: list[list[int]] = []
    for i, d in enumerate(dsts):
        k = seen[d.data_ptr()] = seen.get(d.data_ptr(), -1) + 1
        if k == len(waves):
            waves.append([])
        waves[k].append(i)
    return waves


def _masked_update(op: str, mode, dsts, xs, vecs, dims, c, c_tensor, *, select, names=("grads", "params"),
                   vecs_name="keep_masks", vec_dtype=torch.bool, pruned_groups: Tensor | None = None,
                   num_groups: int = 0, squares: Tensor | None = None) -> None:
    """The in-place ops: ``mode``'s update of dsts[i] from xs[i] on the slices ``select`` picks
    (along dims[i], by vecs[i]: keep masks or group ids; [] when every slice is updated). A tensor
    listed twice is updated wave after wave (:func:`_write_waves`), in list order. ``squares``:
    the groups' ‖w_g‖² when already summed over a longer list (LASSO_GROUPED; a wave's call)."""
    if not dsts:
        return
    device = dsts[0].device
    c, c_tensor = _coefficient(f"{op}'s coefficient tensor", c, c_tensor, device)
    dims = list(dims)
    needs_norms = mode in (LASSO, LASSO_GROUPED)

    def check():
        _check_list(names[0], dsts, device)
        check_writable(names[0], dsts)  # written in place where they are
        _check_list(names[1], xs, device)
        if len(xs) != len(dsts):
            raise ValueError(f"{names[1]} has {len(xs)} tensors but {names[0]} has {len(dsts)}")
        for i, (d, x) in enumerate(zip(dsts, xs)):
            if d.shape != x.shape:
                raise ValueError(f"{names[0]}[{i}] has shape {tuple(d.shape)} but {names[1]}[{i}] has {tuple(x.shape)}")
        _check_dims(dims, xs, names[1])
        if select != ALL_SLICES:
            _check_slice_vecs(vecs_name, vecs, xs, dims, vec_dtype, names[1])

    # (inference mode and which targets are inference tensors in the key: check() refuses those
    # outside inference mode, and a new tensor may reuse an old one's address)
    key = (op, device, tuple(dims), _layout_key(dsts), None if xs is dsts else _layout_key(xs), _layout_key(vecs),
           torch.is_inference_mode_enabled() or tuple(t.is_inference() for t in dsts))
    waves = _WAVES.get(key)
    if waves is None:  # a key seen before passed check() (its layouts, dtypes and shapes are in it)
        check()  # (on the whole list: errors name the caller's indices)
        waves = _WAVES[key] = _write_waves(dsts)
        if len(_WAVES) > PLAN_CACHE_SIZE:
            del _WAVES[next(iter(_WAVES))]
    checked = lambda: None  # noqa: E731
    if len(waves) > 1:
        if mode == LASSO_GROUPED and squares is None:  # ‖w_g‖² over every entry, before any update
            plan = _plan(key + ("reduce",), checked, xs, xs, vecs, dims, device, True, False)
            with _device_context(device):
                squares = _group_squares(plan, select, pruned_groups, num_groups, xs[0].dtype, device)
        for wave in waves:
            pick = lambda seq: [seq[i] for i in wave]  # noqa: E731
            _masked_update(op, mode, pick(dsts), pick(xs), pick(vecs) if vecs else vecs, pick(dims), c, c_tensor,
                           select=select, names=names, vecs_name=vecs_name, vec_dtype=vec_dtype,
                           pruned_groups=pruned_groups, num_groups=num_groups, squares=squares)
        return
    plan = _plan(key, checked, xs, dsts, vecs, dims, device, needs_norms, True)
    with _device_context(device):
        if mode == LASSO_GROUPED and squares is None:
            squares = _group_squares(plan, select, pruned_groups, num_groups, xs[0].dtype, device)
        for group in plan:
            norms = None
            if mode == LASSO:
                partials = _slice_sums(group, 2, select, None, 0)
                norms = group.buffer("norms", group.n_slices, group.acc_torch)
                _finish(group, partials, NORM_P2, norms, None, 0)
            _update(group, mode, select, c, c_tensor, slice_norms=norms, groups=squares,
                    pruned_groups=pruned_groups, num_groups=num_groups)


def l2_grad_(grads, params, keep_masks, dims, coeff: float, coeff_tensor: Tensor | None) -> None:
    """grads[i][P] += c · params[i][P], P = slices along dims[i] with keep_masks[i] False."""
    _masked_update("l2_grad_", L2, grads, params, keep_masks, dims, coeff, coeff_tensor, select=PRUNED_SLICES)


def shrink_(tensors, keep_masks, dims, factor: float, factor_tensor: Tensor | None) -> None:
    """tensors[i][P] *= c."""
    _masked_update("shrink_", SHRINK, tensors, tensors, keep_masks, dims, factor, factor_tensor, select=PRUNED_SLICES,
                   names=("tensors", "tensors"))


def group_lasso_grad_(grads, params, keep_masks, dims, lam: float, lam_tensor: Tensor | None) -> None:
    """grads[i][g] += c · w_g / ‖w_g‖₂ for pruned slices g (0 where ‖w_g‖₂ = 0)."""
    _masked_update("group_lasso_grad_", LASSO, grads, params, keep_masks, dims, lam, lam_tensor, select=PRUNED_SLICES)


def group_lasso_grad_grouped_(grads, params, dims, group_ids, pruned_groups: Tensor, lam: float,
                              lam_tensor: Tensor | None) -> None:
    """Coupled groups: grad[slice] += c · slice / ‖w_g‖₂ for slices of pruned groups g, ‖w_g‖₂ over
    every slice of g in every tensor (0 where it is 0)."""
    if pruned_groups.dtype != torch.bool or pruned_groups.dim() != 1:
        raise TypeError(f"pruned_groups must be a 1-D bool tensor, got {pruned_groups.dtype} of shape "
                        f"{tuple(pruned_groups.shape)}")
    if grads and pruned_groups.device != grads[0].device:
        raise ValueError(f"pruned_groups is on {pruned_groups.device} but the tensors are on {grads[0].device}")
    _masked_update("group_lasso_grad_grouped_", LASSO_GROUPED, grads, params, group_ids, dims, lam, lam_tensor,
                   select=PRUNED_GROUPS, vecs_name="group_ids", vec_dtype=torch.int64,
                   pruned_groups=pruned_groups.contiguous(), num_groups=pruned_groups.shape[0])


def slimming_grad_(grads, bn_weights, s: float, s_tensor: Tensor | None) -> None:
    """grads[i] += c · sign(bn_weights[i])."""
    _masked_update("slimming_grad_", SLIMMING, grads, bn_weights, [], [0] * len(grads), s, s_tensor,
                   select=ALL_SLICES, names=("grads", "bn_weights"))


OPS = {
    "group_norms": group_norms,
    "group_norms_flat": group_norms_flat,
    "group_saliency": group_saliency,
    "l2_grad_": l2_grad_,
    "shrink_": shrink_,
    "group_lasso_grad_": group_lasso_grad_,
    "group_lasso_grad_grouped_": group_lasso_grad_grouped_,
    "slimming_grad_": slimming_grad_,
}
for _name, _fn in OPS.items():
    torch.library.register_kernel(f"fastreg_triton::{_name}", ("cpu", "cuda"), _fn)
