"""Fused per-step ops over every tensor of a model (DESIGN.md §1.2–1.4): norms, saliency, and the
in-place gradient / weight updates of GReg, TPP, OCSPruner and network slimming.

Each op takes whole lists of tensors (mixed sizes, mixed fp32/fp16/bf16) and runs as one call of a
custom op (``fastreg::<op>`` for the C++ CPU and CUDA kernels, ``fastreg_triton::<op>`` for
Triton), so a training step costs O(1) dispatches whatever the number of layers.

Two ways in:

* functional forms (:func:`l2_grad_`, :func:`shrink_`, :func:`group_norms`, ...) check their
  arguments on every call, and errors name the offending argument. With the compiled backends a
  call is the op alone (its kernel checks every argument, in C++; the in-place forms read every
  ``.grad`` in C++ too); with the others the checks run in Python first;
* plan objects, built once when the masks change and reused every step with no validation, no
  host→device copies and no ``.item()``:

  - :class:`PrunedSlices` — per-tensor keep masks along a dim (rows = output filters, or columns =
    input channels): ``.l2_grad_(coeff)``, ``.shrink_(factor)``, ``.group_lasso_grad_(lam)``;
  - :class:`CoupledGroups` — OCSPruner's coupled channel groups (a conv's output filter i, its BN
    γ_i and β_i, the next layers' input column i, ...): ``.saliency()``, then
    ``.set_pruned(pruned_groups)`` and ``.group_lasso_grad_(lam)``, ``.shrink_(factor)``,
    ``.l2_grad_(coeff)``.

Coefficients (``coeff``, ``factor``, ``lam``, ``s``) may be Python floats or one-element tensors on
the tensors' device (a schedule kept on the device never forces a host sync).
"""
from __future__ import annotations

import functools
import math
import numbers
import operator
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import _registry, reference
from ._checks import check_writable, check_slice_vectors, check_tensor_list, is_argument_error

__all__ = [
    "CoupledGroups",
    "PrunedSlices",
    "SliceNorms",
    "group_lasso_grad_",
    "group_lasso_grad_grouped_",
    "group_norms",
    "group_saliency",
    "l2_grad_",
    "shrink_",
    "slimming_grad_",
]


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes only. The in-place ops return nothing.
# ---------------------------------------------------------------------------------------------
@_registry.register_fake("group_norms")
def _group_norms_fake(tensors, p, dim):
    # The meta kernel also runs for a list mixing meta and real tensors: check as the kernels do.
    tensors, p, dim = _check_group_norms_args(tensors, p, dim)
    return [t.new_empty((t.shape[dim],)) for t in tensors]


@_registry.register_fake("group_norms_flat")
def _group_norms_flat_fake(tensors, p, dim):
    tensors, p, dim = _check_group_norms_args(tensors, p, dim)
    return tensors[0].new_empty((sum(t.shape[dim] for t in tensors),), dtype=reference.promoted_dtype(tensors))


@_registry.register_fake("group_saliency")
def _group_saliency_fake(tensors, dims, group_ids, num_groups):
    return tensors[0].new_empty((num_groups,), dtype=reference.accumulate_dtype(tensors[0].dtype))


def _inplace_fake(op: str):
    """The in-place ops' fake: no output. It also runs for a call mixing meta and real tensors, so it
    checks, as the kernels do, that every tensor is on one device."""
    names = [a.name for a in getattr(torch.ops.fastreg, op).default._schema.arguments]

    def fake(*args):
        first = None
        for name, arg in zip(names, args):
            for i, t in enumerate(arg if isinstance(arg, (list, tuple)) else [arg]):
                if not isinstance(t, Tensor) or (name.endswith("_tensor") and t.device.type == "cpu"):
                    continue
                if first is None:
                    first = (f"{name}[{i}]", t.device)
                elif t.device != first[1]:
                    raise ValueError(f"fastreg.{op}: {name}[{i}] is on {t.device} but {first[0]} is on {first[1]}")
        return None

    return fake


for _op in ("l2_grad_", "shrink_", "group_lasso_grad_", "group_lasso_grad_grouped_", "slimming_grad_"):
    _registry.register_fake(_op)(_inplace_fake(_op))


# ---------------------------------------------------------------------------------------------
# Argument handling
# ---------------------------------------------------------------------------------------------
def _split_coeff(name: str, value, device: torch.device) -> tuple[float, Tensor | None]:
    """A coefficient as the op's (float c, Tensor? c_tensor) pair; effective value c · c_tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, got shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if value.device != device:
            if value.device.type == "cpu":  # a CPU scalar: reading it costs no device sync
                return float(value), None
            raise ValueError(f"{name} is on {value.device} but the tensors are on {device}")
        if value.requires_grad:
            value = value.detach()
        if value.dtype not in (torch.float32, torch.float64):
            value = value.float()
        return 1.0, value.reshape(())  # (a [1, 1] tensor would broadcast the reference's updates)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a one-element tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value), None


def _effective(c: float, c_tensor: Tensor | None):
    return c if c_tensor is None else c_tensor * c


def _check_dims(dims, tensors: Sequence[Tensor], tensors_name: str) -> list[int]:
    if dims is None:
        return [0] * len(tensors)
    if isinstance(dims, numbers.Integral):  # (a bool too: _index below refuses it)
        dims = [dims] * len(tensors)
    dims = [_index("dims", d) for d in dims]
    if len(dims) != len(tensors):
        raise ValueError(f"dims has {len(dims)} entries but {tensors_name} has {len(tensors)} tensors")
    for i, (d, t) in enumerate(zip(dims, tensors)):
        if not 0 <= d < t.dim():
            raise ValueError(f"dims[{i}] = {d} is not a dim of {tensors_name}[{i}] (shape {tuple(t.shape)})")
    return dims


def _index(name: str, value) -> int:
    """An int argument: ints (and integer-like objects such as numpy ints) only, not bool, float or str."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be ints, got a bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be ints, got {type(value).__name__} ({value!r})") from None


def _check_group_norms_args(tensors, p: int, dim: int) -> tuple[list[Tensor], int, int]:
    """(tensors as a list, p, dim as ints)."""
    tensors = check_tensor_list("tensors", tensors)
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p not in (1, 2):
        raise ValueError(f"p must be 1 or 2 (an int), got {p!r}")
    p, dim = int(p), _index("dim", dim)
    for i, t in enumerate(tensors):
        if not 0 <= dim < t.dim():
            raise ValueError(f"dim = {dim} is not a dim of tensors[{i}] (shape {tuple(t.shape)})")
    return tensors, p, dim


def _grads_of(params: Sequence[Tensor], name: str = "params") -> list[Tensor]:
    """The ``.grad`` of every parameter; an error naming the first one without."""
    grads = [p.grad for p in params]
    if any(g is None for g in grads):
        i = next(i for i, g in enumerate(grads) if g is None)
        raise ValueError(f"{name}[{i}].grad is None: call backward() first (or the parameter is unused)")
    return grads


def _check_grads(grads: Sequence[Tensor], params: Sequence[Tensor], name: str = "params") -> None:
    for i, (g, p) in enumerate(zip(grads, params)):
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(
                f"{name}[{i}].grad must match {name}[{i}] in shape, dtype and device: got "
                f"{tuple(g.shape)} {g.dtype} {g.device} for {tuple(p.shape)} {p.dtype} {p.device}"
            )
    check_writable(name, grads, ".grad")


def _backend(op: str, tensors: Sequence[Tensor], backend: str | None) -> str:
    return _registry.choose_backend(op, tensors[0].device, backend)


def _rows_view(t: Tensor, d: int, grad: Tensor | None = None) -> Tensor:
    """``t`` with dim d moved first (a view: writes go through); with ``grad`` attached likewise."""
    v = t.detach().movedim(d, 0)
    if grad is not None:
        v.grad = grad.movedim(d, 0)
    return v


# ---------------------------------------------------------------------------------------------
# The calls (no validation): the plan objects and the functional forms end here
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _call_masked(op: str, backend: str, grads, params, masks, dims, c: float, c_tensor: Tensor | None) -> None:
    """One of the masked gradient updates (l2_grad_, group_lasso_grad_) over every tensor."""
    if backend == "reference":
        views = [_rows_view(p, d, g) for g, p, d in zip(grads, params, dims)]
        getattr(reference, op)(views, masks, _effective(c, c_tensor))
        return
    _registry.op(backend, op)(grads, params, masks, dims, c, c_tensor)


@torch.no_grad()
def _call_shrink(backend: str, tensors, masks, dims, c: float, c_tensor: Tensor | None) -> None:
    if backend == "reference":
        reference.shrink_([_rows_view(t, d) for t, d in zip(tensors, dims)], masks, _effective(c, c_tensor))
        return
    _registry.op(backend, "shrink_")(tensors, masks, dims, c, c_tensor)


@torch.no_grad()
def _call_grouped_lasso(backend: str, grads, params, dims, group_ids, pruned_groups, c, c_tensor) -> None:
    if backend == "reference":
        views = [_rows_view(p, 0, g) for g, p in zip(grads, params)]
        reference.group_lasso_grad_grouped_(views, dims, group_ids, pruned_groups, _effective(c, c_tensor))
        return
    _registry.op(backend, "group_lasso_grad_grouped_")(grads, params, dims, group_ids, pruned_groups, c, c_tensor)


@torch.no_grad()
def _call_saliency(backend: str, tensors, dims, group_ids, num_groups: int) -> Tensor:
    if backend == "reference":
        return reference.group_saliency(tensors, dims, group_ids, num_groups)
    return _registry.op(backend, "group_saliency")(tensors, dims, group_ids, num_groups)


# ---------------------------------------------------------------------------------------------
# Functional forms
# ---------------------------------------------------------------------------------------------
def group_norms(
    tensors: Sequence[Tensor], *, p: int = 2, dim: int = 0, flat: bool = False, backend: str | None = None
) -> list[Tensor] | Tensor:
    """‖slice‖_p (p = 1 or 2) of every slice along ``dim`` of every tensor, in one call.

    dim 0: one norm per output filter / row; dim 1: per input channel / column. Returns one 1-D
    tensor per input, in its dtype (accumulated in float32, float64 for float64 inputs). ``flat=True``
    returns every tensor's norms concatenated in list order in one tensor of the tensors' promoted
    dtype, e.g. for a global ranking; it also skips making one tensor object per input (about 1 µs
    each on our CPUs). For a call repeated on the same tensors, :class:`SliceNorms` makes its outputs
    once and refills them.

    Streams: every op runs on the current CUDA stream. The cpp/cuda outputs are carved out of one
    allocation, so ``Tensor.record_stream`` has no effect on them: to read them on another stream,
    make it wait (``other.wait_stream(torch.cuda.current_stream())``) and keep the outputs alive
    until it has finished.
    """
    op = "group_norms_flat" if flat else "group_norms"
    if type(tensors) in (list, tuple) and tensors and type(p) is int and type(dim) is int:  # (not bools: the op takes them as 1)
        # Fast path (a per-step call on a model's 50+ weights): the compiled kernel checks every tensor
        # itself, in C++, for far less than the Python loop below. An argument it refuses falls through
        # to the checked path, which raises the error naming the argument; any other error propagates.
        try:
            kernel = _registry.fast_op(op, tensors, backend)
            if kernel is not None:  # (its autograd kernel runs it below autograd: no no_grad())
                return kernel(tensors, p, dim)
        except Exception as err:
            if not is_argument_error(err):
                raise
    tensors, p, dim = _check_group_norms_args(tensors, p, dim)
    chosen = _backend(op, tensors, backend)
    with torch.no_grad():
        if chosen == "reference":
            norms = reference.group_norms(tensors, p, dim)
            return torch.cat([n.to(reference.promoted_dtype(tensors)) for n in norms]) if flat else norms
        return _registry.op(chosen, op)(tensors, p, dim)


def _segments(buffers: dict[torch.dtype, Tensor], tensors: Sequence[Tensor], dim: int) -> list[Tensor]:
    """Tensor i's norms as a view of its segment of ``buffers[tensors[i].dtype]`` (each buffer holds
    every norm, in list order): one split per buffer."""
    split, sizes = torch.ops.aten.split_with_sizes.default, [t.shape[dim] for t in tensors]
    if len(buffers) == 1:
        return split(next(iter(buffers.values())), sizes)
    per_dtype = {d: split(buf, sizes) for d, buf in buffers.items()}
    return [per_dtype[t.dtype][i] for i, t in enumerate(tensors)]


def group_saliency(
    tensors: Sequence[Tensor],
    dims: Sequence[int],
    group_ids: Sequence[Tensor],
    num_groups: int,
    *,
    backend: str | None = None,
) -> Tensor:
    """OCSPruner group saliency S(g) = (Σ_{w∈g} ‖w‖₂/√|w|) / |g| for every group, in one call.

    Slice j of ``tensors[i]`` along ``dims[i]`` belongs to group ``group_ids[i][j]`` (int64, −1 =
    none). Groups without slices score 0. Float32 result (float64 when tensors[0] is float64).
    For repeated calls build a :class:`CoupledGroups` once and call ``.saliency()``.
    """
    return CoupledGroups(tensors, dims, group_ids, num_groups, backend=backend).saliency()


def l2_grad_(
    params: Sequence[Tensor], keep_masks: Sequence[Tensor], coeff, *, dims=None, backend: str | None = None
) -> None:
    """GReg / TPP Eq. 5 in place: ``p.grad[pruned] += coeff · p[pruned]`` for every parameter.

    ``keep_masks[i]`` (bool, True = kept) runs along ``dims[i]`` of ``params[i]`` (default 0: output
    filters; pass the conv's mask for its bias and its BatchNorm γ and β). For repeated calls build
    a :class:`PrunedSlices` once.
    """
    args = lambda: (_grads_in_list(params), params, keep_masks, _dims_arg(dims, params))  # noqa: E731
    if not _functional_in_cpp("l2_grad_", params, backend, args, ("coeff", coeff)):
        PrunedSlices(params, keep_masks, dims, backend=backend).l2_grad_(coeff)


def shrink_(tensors: Sequence[Tensor], keep_masks: Sequence[Tensor], factor, *, dims=None, backend: str | None = None) -> None:
    """OCSPruner Eq. 9 in place: ``t[pruned] *= factor`` (factor = 1 − λ·lr; 0 zeroes the pruned
    slices, the TPP stabilize phase). Masks along ``dims`` as in :func:`l2_grad_`."""
    args = lambda: (tensors, keep_masks, _dims_arg(dims, tensors))  # noqa: E731
    if not _functional_in_cpp("shrink_", tensors, backend, args, ("factor", factor)):
        PrunedSlices(tensors, keep_masks, dims, backend=backend, _arg="tensors").shrink_(factor)


def group_lasso_grad_(
    params: Sequence[Tensor], keep_masks: Sequence[Tensor], lam, *, dims=None, backend: str | None = None
) -> None:
    """OCSPruner Eq. 8 per slice, in place: ``grad[g] += λ · w_g / ‖w_g‖₂`` for every pruned slice g
    along ``dims[i]``; exactly 0 where ‖w_g‖₂ = 0. For coupled groups see :class:`CoupledGroups`."""
    args = lambda: (_grads_in_list(params), params, keep_masks, _dims_arg(dims, params))  # noqa: E731
    if not _functional_in_cpp("group_lasso_grad_", params, backend, args, ("lam", lam)):
        PrunedSlices(params, keep_masks, dims, backend=backend).group_lasso_grad_(lam)


def group_lasso_grad_grouped_(
    params: Sequence[Tensor],
    dims: Sequence[int],
    group_ids: Sequence[Tensor],
    pruned_groups: Tensor,
    lam,
    *,
    backend: str | None = None,
) -> None:
    """Group lasso over coupled groups, in place: ``grad[slice] += λ · slice / ‖w_g‖₂`` for every
    slice of every pruned group g, ‖w_g‖₂ taken over all slices of g in all tensors; 0 where ‖w_g‖₂ = 0.
    For repeated calls build a :class:`CoupledGroups` once."""
    # (The CPU kernel checks every group id; the CUDA one does not, so CUDA calls check here, with a sync.)
    args = lambda: (_grads_in_list(params), params, _dims_arg(dims, params), group_ids, pruned_groups)  # noqa: E731
    if _functional_in_cpp("group_lasso_grad_grouped_", params, backend, args, ("lam", lam), only=("cpp",)):
        return
    sized = isinstance(pruned_groups, Tensor) and pruned_groups.dim() == 1  # (else set_pruned names what is wrong)
    groups = CoupledGroups(params, dims, group_ids, pruned_groups.shape[0] if sized else None, backend=backend)
    groups.set_pruned(pruned_groups)
    groups.group_lasso_grad_(lam)


def slimming_grad_(bn_weights: Sequence[Tensor], s, *, backend: str | None = None) -> None:
    """Network slimming (Liu et al. 2017) in place: ``γ.grad += s · sign(γ)`` for every BN scale."""
    if _functional_in_cpp("slimming_grad_", bn_weights, backend, lambda: (_grads_in_list(bn_weights), bn_weights), ("s", s)):
        return
    bn_weights = check_tensor_list("bn_weights", bn_weights)
    grads = _grads_of(bn_weights, "bn_weights")
    _check_grads(grads, bn_weights, "bn_weights")
    c, c_tensor = _split_coeff("s", s, bn_weights[0].device)
    chosen = _backend("slimming_grad_", bn_weights, backend)
    with torch.no_grad():
        if chosen == "reference":
            reference.slimming_grad_(bn_weights, _effective(c, c_tensor))
            return
        _registry.op(chosen, "slimming_grad_")(grads, bn_weights, c, c_tensor)


# ---------------------------------------------------------------------------------------------
# Plans: validated once, reused every step
# ---------------------------------------------------------------------------------------------
class _Backends(dict):
    """op -> backend for one plan, resolved on first use (explicit > FASTREG_BACKEND > automatic)."""

    def __init__(self, tensors: Sequence[Tensor], backend: str | None):
        super().__init__()
        self._device, self._backend = tensors[0].device, backend

    def __missing__(self, op: str) -> str:
        self[op] = _registry.choose_backend(op, self._device, self._backend)
        return self[op]


def _dims_arg(dims, tensors) -> list[int] | object:
    """``dims`` as the op's int[] (None: 0 for every tensor; an int: for every tensor); anything else
    as given, for the kernel to check, except bools (the op's int[] would take True as 1): the checked
    path refuses those."""
    if dims is None or (isinstance(dims, int) and not isinstance(dims, bool)):
        return [dims or 0] * len(tensors) if isinstance(tensors, (list, tuple)) else dims
    if isinstance(dims, bool) or (isinstance(dims, (list, tuple)) and any(isinstance(d, bool) for d in dims)):
        raise TypeError("dims must be ints")  # (caught: the checked path raises its own error)
    return dims


def _grads_in_list(params) -> list:
    """Every ``.grad`` (None where missing: the op then refuses the list, and the checked path names it)."""
    return [p.grad for p in params]


def _functional_in_cpp(op: str, tensors, backend: str | None, args: Callable[[], tuple], coeff: tuple[str, object],
                       only: tuple[str, ...] = _registry.SELF_CHECKING) -> bool:
    """The functional in-place ops' fast path: the op itself, ``op(*args(), c, c_tensor)``, when the
    chosen backend is among ``only``: one call, whose kernel checks every argument (no Python checks;
    the ``.grad`` lists are read here, which costs less than handing the lists to a one-off C++ plan:
    l2_grad_ on ResNet-56's 110 conv weights and biases 210 µs against 245 µs). False: the caller's
    checked path runs instead, and raises naming the argument if one is wrong (the kernels check
    before they write). Any other error (out of memory, a CUDA error) propagates: after a partly
    applied first launch, running the op again would apply it twice."""
    if type(tensors) not in (list, tuple) or not tensors or torch.compiler.is_compiling():
        return False
    try:
        kernel = _registry.fast_op(op, tensors, backend)
        if kernel is None or (only != _registry.SELF_CHECKING
                              and _registry.choose_backend(op, tensors[0].device, backend) not in only):
            return False
        c, c_tensor = _split_coeff(*coeff, tensors[0].device)
        kernel(*args(), c, c_tensor)
    except Exception as err:
        if not is_argument_error(err):
            raise
        return False
    return True


class _HeldInCpp:
    """A plan whose lists a C++ ``torch.classes.fastreg.SlicePlan`` (csrc/plans.cpp) also holds for the
    compiled backends, so that a step passes no tensor list from Python and the kernels check every
    argument. The C++ object is made on first use and left out of copies and pickles (a copy makes its
    own from its lists)."""

    _cpp_plan = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cpp_plan": None}

    def _run_in_cpp(self, backend: str, lists, method: str, *args) -> bool:
        """``method(*args)`` on the C++ plan of ``lists()`` = (tensors, keep_masks, dims, group_ids).
        False when the caller's checked path must run instead: other backends, torch.compile, or an
        argument the plan or kernel refuses, which that path raises naming it (the kernels check before
        they write). Any other error propagates (see _functional_in_cpp)."""
        if backend not in _registry.SELF_CHECKING or torch.compiler.is_compiling():
            return False
        try:
            if self._cpp_plan is None:
                self._cpp_plan = torch.classes.fastreg.SlicePlan(*lists())
            getattr(self._cpp_plan, method)(*args)
            return True
        except Exception as err:
            if not is_argument_error(err):
                raise
            return False


class PrunedSlices(_HeldInCpp):
    """The pruned slices of a list of parameters, validated and held on their device once.

    ``keep_masks[i]`` (bool, True = kept) runs along ``dims[i]`` of ``params[i]`` (default 0). The
    same parameter may appear twice, e.g. along dim 0 (its own filters) and dim 1 (input channels
    fed by pruned filters); the updates then apply one after the other, as listed.

        slices = fastreg.PrunedSlices(params, masks)   # when the masks change (build a new one: it holds
        loss.backward(); slices.l2_grad_(reg)           # a copy of the masks, so editing them has no effect)

    With the cpp and cuda backends the lists are held by a C++ plan (``torch.classes.fastreg.SlicePlan``)
    that reads every ``.grad`` itself: a step passes only its coefficient from Python.

    A plan follows its parameters through ``.grad`` set to None and re-created, ``.data`` reassigned and
    in-place dtype/device moves, but it holds the parameter tensors themselves: after parameters are
    replaced by new tensors (``load_state_dict(..., assign=True)``, module swaps), build a new plan. (Its
    reference to them also makes ``torch.__future__.set_swap_module_params_on_conversion(True)`` refuse
    to swap them: drop the plan first.)
    """

    _arg = "params"  # (class defaults: plans pickled before these attributes existed load too)
    _checked_params = False

    def __init__(self, params: Sequence[Tensor], keep_masks: Sequence[Tensor], dims=None, *, backend: str | None = None,
                 _arg: str = "params"):
        # _arg: the caller's name for the tensor list, in error messages (fastreg.shrink_ and CoupledGroups: "tensors")
        self._arg = _arg
        self.params = check_tensor_list(_arg, params)
        self.dims = _check_dims(dims, self.params, _arg)
        # (a snapshot: a mask edited in place afterwards changes nothing, whatever its layout)
        self.keep_masks = [m.clone() for m in check_slice_vectors("keep_masks", keep_masks, self.params, _arg, self.dims, (torch.bool,))]
        self.device = self.params[0].device
        self.backends = _Backends(self.params, backend)
        self._checked_grads = self._checked_params = False

    def _grads(self) -> list[Tensor]:
        """The parameters' ``.grad``; their shapes and dtypes are checked on the first call only
        (autograd keeps them), the kernels check them again."""
        grads = _grads_of(self.params, self._arg)
        if not self._checked_grads:
            _check_grads(grads, self.params, self._arg)
            self._checked_grads = True
        return grads

    def l2_grad_(self, coeff) -> None:
        """``p.grad[pruned] += coeff · p[pruned]`` (GReg / TPP Eq. 5) over every parameter."""
        self._apply("l2_grad_", "coeff", coeff)

    def group_lasso_grad_(self, lam) -> None:
        """``grad[g] += λ · w_g / ‖w_g‖₂`` for every pruned slice g (0 where ‖w_g‖₂ = 0)."""
        self._apply("group_lasso_grad_", "lam", lam)

    def shrink_(self, factor) -> None:
        """``p[pruned] *= factor`` (OCSPruner Eq. 9; factor 0 zeroes the pruned slices)."""
        self._apply("shrink_", "factor", factor)

    def _apply(self, op: str, name: str, value) -> None:
        c, c_tensor = _split_coeff(name, value, self.device)
        backend = self.backends[op]
        if op == "shrink_" and not self._checked_params:
            check_writable(self._arg, self.params)  # written in place (the other ops only read them)
            # (inside inference_mode, inference tensors pass: check again outside it)
            self._checked_params = torch.compiler.is_compiling() or not torch.is_inference_mode_enabled()
        if self._run_in_cpp(backend, lambda: (self.params, self.keep_masks, self.dims, []), op, c, c_tensor):
            return
        if op == "shrink_":
            _call_shrink(backend, self.params, self.keep_masks, self.dims, c, c_tensor)
        else:
            _call_masked(op, backend, self._grads(), self.params, self.keep_masks, self.dims, c, c_tensor)


class SliceNorms:
    """‖slice‖_p (p = 1 or 2) of every slice along ``dim`` of a fixed list of tensors: validated once,
    outputs made once. Each call refills the same output tensors in place (one fused call and one
    copy per dtype), so a step creates no tensor per layer.

        norms = fastreg.SliceNorms(weights, p=1)   # once, or when the tensors change shape
        per_layer = norms()                         # every few iterations: the same list, refreshed
        norms.flat                                  # every norm in one tensor (promoted dtype), in list order

    The outputs belong to the plan: the next call overwrites them (clone what you keep).
    """

    def __init__(self, tensors: Sequence[Tensor], *, p: int = 2, dim: int = 0, backend: str | None = None):
        self.tensors, self.p, self.dim = _check_group_norms_args(tensors, p, dim)
        p, dim = self.p, self.dim
        self.backend = _registry.choose_backend("group_norms_flat", self.tensors[0].device, backend)
        # Every call: the op itself when its backend checks the arguments (validated here once), else
        # the public function.
        if self.backend in _registry.SELF_CHECKING:
            self._flat_norms = functools.partial(_registry.op(self.backend, "group_norms_flat"), self.tensors, p, dim)
        else:
            self._flat_norms = functools.partial(group_norms, self.tensors, p=p, dim=dim, flat=True, backend=self.backend)
        flat = self._flat_norms()
        # One buffer per dtype (the promoted one first), each holding every norm.
        self._buffers = {d: flat.to(d, copy=True) for d in dict.fromkeys([flat.dtype] + [t.dtype for t in self.tensors])}
        self.flat = self._buffers[flat.dtype]
        self.norms = _segments(self._buffers, self.tensors, dim)

    def __call__(self) -> list[Tensor]:
        flat = self._flat_norms()  # never requires grad: no no_grad() needed for the copies
        if flat.shape != self.flat.shape:  # (one check per call; a reshuffle of equal total goes unseen)
            raise RuntimeError(f"SliceNorms: the tensors now have {flat.shape[0]} slices in all, not {self.flat.shape[0]}: "
                               "they changed shape since the plan was built; build a new SliceNorms")
        for buf in self._buffers.values():
            buf.copy_(flat)
        return self.norms


class CoupledGroups(_HeldInCpp):
    """Coupled channel groups (OCSPruner), described once and held on the device.

    Slice j of ``tensors[i]`` along ``dims[i]`` belongs to group ``group_ids[i][j]`` (−1 = none).
    Build from channel sets with :meth:`from_channel_sets`. Then, every step:

        groups.saliency()                      # S(g) for every group, one call
        groups.set_pruned(pruned)              # when the partition changes: bool [num_groups]
        groups.group_lasso_grad_(lam)          # Eq. 8 over every slice of the pruned groups
        groups.shrink_(1 - lam * lr)           # Eq. 9
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        dims: Sequence[int],
        group_ids: Sequence[Tensor],
        num_groups: int | None = None,
        *,
        backend: str | None = None,
    ):
        self.tensors = check_tensor_list("tensors", tensors)
        self.dims = _check_dims(dims, self.tensors, "tensors")
        ids = check_slice_vectors("group_ids", group_ids, self.tensors, "tensors", self.dims, (torch.int64, torch.int32))
        self.group_ids = [g.long() for g in ids]
        # The ids' range: one host sync, at construction only; not under torch.compile, where reading
        # data would break the graph (there the CPU kernels' own check of every id serves).
        tracing = torch.compiler.is_compiling()
        if tracing and num_groups is None:
            raise ValueError("num_groups is required under torch.compile (it cannot read the ids' maximum)")
        if tracing or not sum(g.numel() for g in ids):
            lo, hi = -1, -1
        else:
            lo, hi = (int(v) for v in torch.aminmax(torch.cat(self.group_ids)))
        if num_groups is None:
            num_groups = hi + 1
        if not isinstance(num_groups, int) or num_groups < 0:
            raise ValueError(f"num_groups must be a non-negative int, got {num_groups!r}")
        if lo < -1 or hi >= num_groups:
            i = next(i for i, g in enumerate(self.group_ids) if g.numel() and (g.min() < -1 or g.max() >= num_groups))
            raise ValueError(
                f"group_ids[{i}] must hold group ids in [0, {num_groups}) or -1 (no group), got values in "
                f"[{int(self.group_ids[i].min())}, {int(self.group_ids[i].max())}]"
            )
        self.num_groups = num_groups
        self.device = self.tensors[0].device
        self.backend = backend
        self.backends = _Backends(self.tensors, backend)
        self.pruned_groups: Tensor | None = None
        self._slices: PrunedSlices | None = None

    @classmethod
    def from_channel_sets(cls, channel_sets: Sequence[Sequence[tuple[Tensor, int]]], *, backend: str | None = None):
        """Groups from channel sets: each set lists the (tensor, dim) pairs that share one channel
        index space of size C (a conv's weight along 0, its bias and BN γ, β along 0, the next
        convs' weights along 1, ...); channel c of set k is one group. Group ids run set by set."""
        tensors, dims, ids = [], [], []
        offset = 0
        for k, channel_set in enumerate(channel_sets):
            sizes = {t.shape[d] for t, d in channel_set}
            if len(sizes) != 1:
                raise ValueError(f"channel_sets[{k}] mixes channel counts {sorted(sizes)}: one set shares one size")
            (size,) = sizes
            for t, d in channel_set:
                tensors.append(t)
                dims.append(d)
                ids.append(torch.arange(offset, offset + size, device=t.device))
            offset += size
        return cls(tensors, dims, ids, offset, backend=backend)

    def saliency(self) -> Tensor:
        """S(g) = (Σ_{w∈g} ‖w‖₂/√|w|) / |g| for every group g: a [num_groups] tensor."""
        return _call_saliency(self.backends["group_saliency"], self.tensors, self.dims, self.group_ids, self.num_groups)

    def set_pruned(self, pruned_groups: Tensor) -> None:
        """Fix the pruned groups (bool [num_groups], on the device) until the next call."""
        if not isinstance(pruned_groups, Tensor) or pruned_groups.dtype != torch.bool:
            raise TypeError(f"pruned_groups must be a bool tensor, got {getattr(pruned_groups, 'dtype', type(pruned_groups))}")
        if pruned_groups.shape != (self.num_groups,):
            raise ValueError(f"pruned_groups must have shape [{self.num_groups}], got {tuple(pruned_groups.shape)}")
        if pruned_groups.device != self.device:
            raise ValueError(f"pruned_groups is on {pruned_groups.device} but the tensors are on {self.device}")
        self.pruned_groups = pruned_groups.clone(memory_format=torch.contiguous_format)  # (the keep masks below are its snapshot)
        # Per-tensor keep masks along dims[i] (device ops, once): kept unless in a pruned group. Id −1 (no
        # group) reads the False appended at the end, so it needs no case of its own, nor do zero groups.
        pruned_or_none = torch.cat([self.pruned_groups, self.pruned_groups.new_zeros(1)])
        keep = [~pruned_or_none[ids] for ids in self.group_ids]
        self._slices = PrunedSlices(self.tensors, keep, self.dims, backend=self.backend, _arg="tensors")

    def _require_pruned(self, what: str) -> PrunedSlices:
        if self._slices is None:
            raise RuntimeError(f"CoupledGroups.{what}: call set_pruned(pruned_groups) first")
        return self._slices

    def group_lasso_grad_(self, lam) -> None:
        """``grad[slice] += λ · slice / ‖w_g‖₂`` over every slice of every pruned group (Eq. 8)."""
        slices = self._require_pruned("group_lasso_grad_")
        c, c_tensor = _split_coeff("lam", lam, self.device)
        backend = self.backends["group_lasso_grad_grouped_"]
        if self._run_in_cpp(backend, lambda: (self.tensors, [], self.dims, self.group_ids), "group_lasso_grad_grouped_",
                            self.pruned_groups, c, c_tensor):
            return
        _call_grouped_lasso(backend, slices._grads(), self.tensors, self.dims, self.group_ids, self.pruned_groups, c, c_tensor)

    def shrink_(self, factor) -> None:
        """Every slice of every pruned group ``*= factor`` (Eq. 9)."""
        self._require_pruned("shrink_").shrink_(factor)

    def l2_grad_(self, coeff) -> None:
        """``grad[slice] += coeff · slice`` over every slice of every pruned group."""
        self._require_pruned("l2_grad_").l2_grad_(coeff)


# ---------------------------------------------------------------------------------------------
# Per-group coefficients (Torch-Pruning's regularizing pruners, :mod:`fastreg.torch_pruning`)
# ---------------------------------------------------------------------------------------------
for _op in ("l2_grad_grouped_",):
    _registry.register_fake(_op)(_inplace_fake(_op))


@_registry.register_fake("group_sq_sums")
def _group_sq_sums_fake(tensors, dims, group_ids, num_groups):
    return tensors[0].new_empty((num_groups,), dtype=reference.accumulate_dtype(tensors[0].dtype))


@_registry.register_fake("group_norm_gamma")
def _group_norm_gamma_fake(importance, segment_offsets, alpha, guard):
    return torch.empty_like(importance)


class GroupedSlices:
    """Slices of a list of tensors grouped by id, validated and held on their device once: slice j of
    ``tensors[i]`` along ``dims[i]`` belongs to group ``group_ids[i][j]`` (int64, −1 = none) of
    ``num_groups``. The same tensor may be listed several times (e.g. along dim 0 and dim 1); updates
    then apply one after the other. Every step:

        sq = plan.sq_sums()              # Σ ‖slice‖² of each group: [num_groups]
        plan.l2_grad_(coeffs, c)         # grad[slice] += c · coeffs[group] · slice (coeffs: [num_groups])

    Slices whose group coefficient is 0 are left as they are.
    """

    def __init__(self, tensors: Sequence[Tensor], dims: Sequence[int], group_ids: Sequence[Tensor], num_groups: int,
                 *, backend: str | None = None):
        self.tensors = check_tensor_list("tensors", tensors)
        self.dims = _check_dims(dims, self.tensors, "tensors")
        ids = check_slice_vectors("group_ids", group_ids, self.tensors, "tensors", self.dims, (torch.int64,))
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
            raise ValueError(f"num_groups must be a non-negative int, got {num_groups!r}")
        for i, g in enumerate(ids):
            if g.numel() and (int(g.min()) < -1 or int(g.max()) >= num_groups):  # (once, at construction)
                raise ValueError(f"group_ids[{i}] must hold group ids in [0, {num_groups}) or -1 (no group), got values "
                                 f"in [{int(g.min())}, {int(g.max())}]")
        self.group_ids = [g.contiguous() for g in ids]
        self.num_groups = num_groups
        self.device = self.tensors[0].device
        self.backends = _Backends(self.tensors, backend)

    def sq_sums(self) -> Tensor:
        """Σ ‖slice‖₂² over the slices of each group: [num_groups] (float32; float64 for float64 tensors)."""
        backend = self.backends["group_sq_sums"]
        with torch.no_grad():
            if backend == "reference":
                return reference.group_sq_sums(self.tensors, self.dims, self.group_ids, self.num_groups)
            return _registry.op(backend, "group_sq_sums")(self.tensors, self.dims, self.group_ids, self.num_groups)

    def l2_grad_(self, group_coeffs: Tensor, coeff=1.0, *, grads: Sequence[Tensor] | None = None) -> None:
        """``grad[slice] += coeff · group_coeffs[g] · slice`` for every slice of every group g (``grads``: the
        tensors' ``.grad``, read here when not given)."""
        if not isinstance(group_coeffs, Tensor) or group_coeffs.shape != (self.num_groups,):
            raise ValueError(f"group_coeffs must be a tensor of shape [{self.num_groups}], got "
                             f"{tuple(getattr(group_coeffs, 'shape', ())) or type(group_coeffs).__name__}")
        c, c_tensor = _split_coeff("coeff", coeff, self.device)
        if grads is None:
            grads = _grads_of(self.tensors, "tensors")
        backend = self.backends["l2_grad_grouped_"]
        with torch.no_grad():
            if backend == "reference":
                views = [_rows_view(p, 0, g) for g, p in zip(grads, self.tensors)]
                reference.l2_grad_grouped_(views, self.dims, self.group_ids, group_coeffs, _effective(c, c_tensor))
                return
            _registry.op(backend, "l2_grad_grouped_")(list(grads), self.tensors, self.dims, self.group_ids, group_coeffs,
                                                      c, c_tensor)


def group_norm_gamma(importance: Tensor, segment_offsets: Tensor, alpha: float, *, guard: bool = True,
                     backend: str | None = None) -> Tensor:
    """DepGraph's per-channel weights within each segment [o_k, o_{k+1}) of ``importance`` (before the square
    root): imp = √x, γ = α^((max_k imp − imp) / (max_k imp − min_k imp)); see :func:`fastreg.reference.group_norm_gamma`."""
    if not isinstance(importance, Tensor) or not isinstance(segment_offsets, Tensor):
        raise TypeError("importance and segment_offsets must be tensors")
    alpha = float(alpha)
    chosen = _registry.choose_backend("group_norm_gamma", importance.device, backend)
    with torch.no_grad():
        if chosen == "reference":
            return reference.group_norm_gamma(importance, segment_offsets, alpha, guard)
        return _registry.op(chosen, "group_norm_gamma")(importance, segment_offsets, alpha, bool(guard))
