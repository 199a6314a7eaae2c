"""The one registry of fastreg ops: schemas, compiled-library loading, and backend choice.

Every op's schema is written once, in :data:`SCHEMAS` (``fastreg/_schemas.py``), and defined in two namespaces:

* ``fastreg::<op>``         — the compiled extension (``csrc/``): its CPU kernel is the ``cpp``
  backend, its CUDA kernel the ``cuda`` backend (``TORCH_LIBRARY_IMPL(fastreg, CPU|CUDA, m)``).
* ``fastreg_triton::<op>``  — the Triton kernels (``fastreg/kernels/``), registered for CPU (under
  ``TRITON_INTERPRET=1``) and CUDA.

The ``reference`` backend is :mod:`fastreg.reference`, plain PyTorch with native autograd.
Fake (meta) implementations are registered once per op for both namespaces with
:func:`register_fake`. The one differentiable op, ``gram_penalty``, gets its autograd from the compiled
library (csrc/gram_penalty_autograd.cpp, registered for both namespaces), so its triton backend
needs the library too.

Backend choice for a call: explicit ``backend=`` argument > env ``FASTREG_BACKEND`` > automatic
(CUDA tensors: cuda, triton, reference; CPU tensors: cpp, reference). An explicit choice that
cannot run raises :class:`BackendUnavailable` saying why; the automatic choice falls through.
``FASTREG_BACKEND`` is read when fastreg is imported and by :func:`refresh_availability` (reading the
environment on every call cost up to 20 µs per call on our machines once its caches were cold).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import warnings

import torch

from ._schemas import SCHEMAS, schema_digest

BACKENDS = ("reference", "cpp", "triton", "cuda")
NAMESPACES = {"cpp": "fastreg", "cuda": "fastreg", "triton": "fastreg_triton"}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
# Backends whose kernels validate every argument themselves (C++ TORCH_CHECKs naming the argument):
# the public functions' fast paths skip the Python checks for them.
SELF_CHECKING = ("cpp", "cuda")

# The differentiable ops: their autograd is a kernel of the compiled library (csrc/gram_penalty_autograd.cpp,
# for both namespaces) over another op, the one the backends' kernels implement. The others take no gradient.
KERNEL_OPS = {"gram_penalty": "gram_penalty_and_grads"}

_LIBS = {}
for _ns in sorted(set(NAMESPACES.values())):
    _LIBS[_ns] = torch.library.Library(_ns, "DEF")
    for _name, _schema in SCHEMAS.items():
        _LIBS[_ns].define(_name + _schema)


def qualnames(op: str) -> list[str]:
    return [f"{ns}::{op}" for ns in sorted(set(NAMESPACES.values()))]


def register_fake(op: str):
    """Decorator: one fake (meta) implementation for ``op`` in every namespace."""

    def deco(fn):
        for q in qualnames(op):
            torch.library.register_fake(q, fn)
        return fn

    return deco


# ---------------------------------------------------------------------------------------------
# The compiled library
# ---------------------------------------------------------------------------------------------
LIBRARY_ERROR: str | None = None


def _load_library() -> str | None:
    """Load the compiled kernels: ``$FASTREG_LIBRARY`` (e.g. the CMake build) if set, else the
    ``fastreg._C`` extension built by setup.py. Returns an error string instead of raising."""
    path = os.environ.get("FASTREG_LIBRARY")
    if not path:
        spec = importlib.util.find_spec("fastreg._C")
        if spec is None or spec.origin is None:
            here = os.path.dirname(__file__)
            found = glob.glob(os.path.join(here, "_C*.so"))
            if not found:
                return "the compiled extension fastreg._C is not built (pip install -e . builds it)"
            path = found[0]
        else:
            path = spec.origin
    if not os.path.isfile(path):
        return f"loading {path} failed: no such file"
    stamp = _schema_stamp(path)
    if stamp != schema_digest():
        return (
            f"{path} was built against other op schemas (its stamp: {stamp or 'none'}; fastreg/_schemas.py: "
            f"{schema_digest()}): rebuild it (pip install -e ., or bash tools/cmake_build.sh)"
        )
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as e:  # pragma: no cover - depends on the build
        return f"loading {path} failed: {e}"
    return None


def _schema_stamp(path: str) -> str | None:
    """The schema digest a compiled library was built against (csrc/schema_digest.cpp), read from the file
    without loading it: loading a library built for other schemas would abort the process. None: no stamp."""
    import mmap

    marker = b"fastreg-schema-digest:"
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            at = data.find(marker)
            if at < 0:
                return None
            end = data.find(b";", at, at + 64 + len(marker))
            return data[at + len(marker) : end].decode("ascii", "replace") if end > 0 else None
    except (OSError, ValueError):
        return None


def _register_autograd_in_python() -> None:
    """Without the compiled library: the Autograd kernels of csrc/non_differentiable.cpp, in Python, for
    the ops that take no gradient (the triton backend runs them): the op runs below autograd, then the
    tensors its schema marks as written (``Tensor(a!)[]``) get their versions bumped."""
    for name in SCHEMAS:
        if name in KERNEL_OPS or name in KERNEL_OPS.values():
            continue
        for ns, lib in _LIBS.items():
            op = getattr(getattr(torch.ops, ns), name).default
            written = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]

            def kernel(*args, _op=op, _written=written, **kwargs):
                with torch._C._AutoDispatchBelowADInplaceOrView():
                    out = _op(*args, **kwargs)
                bound = dict(zip((a.name for a in _op._schema.arguments), args), **kwargs)
                for arg in _written:
                    torch.autograd.graph.increment_version(bound[arg])
                return out

            lib.impl(name, kernel, "Autograd")


LIBRARY_ERROR = _load_library()
if LIBRARY_ERROR is not None:
    warnings.warn(f"fastreg: {LIBRARY_ERROR}; the reference backend serves", RuntimeWarning, stacklevel=2)
    _register_autograd_in_python()


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
def _triton_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


TRITON_ERROR = _triton_error()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if TRITON_ERROR is None:
    try:
        from . import kernels as _kernels  # noqa: F401  (registers fastreg_triton::* impls)
    except Exception as e:  # pragma: no cover - depends on the triton install
        TRITON_ERROR = f"importing fastreg.kernels failed: {e}"


# ---------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------
class BackendUnavailable(RuntimeError):
    """An explicitly chosen backend cannot run this op on these tensors."""


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """Ask the dispatcher whether ``qualname`` has a kernel for ``dispatch_key`` (CPU, CUDA)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)


def _why_unavailable(op: str, backend: str, device_type: str) -> str | None:
    if backend not in BACKENDS:
        return f"backend must be one of {BACKENDS}, got {backend!r}"
    if backend == "reference":
        return None
    key = {"cuda": "CUDA", "cpu": "CPU"}.get(device_type)
    if key is None:
        return f"fastreg has no {backend} kernels for device type {device_type!r}"
    if backend == "cpp" and key != "CPU":
        return f"the cpp backend runs on CPU tensors, got {device_type} tensors"
    if backend == "cuda" and key != "CUDA":
        return f"the cuda backend runs on CUDA tensors, got {device_type} tensors"
    if key == "CUDA" and not torch.cuda.is_available():
        return "no CUDA device is available (the CUDA kernels are compiled but cannot run here)"
    if backend in ("cpp", "cuda"):
        if LIBRARY_ERROR is not None:
            return LIBRARY_ERROR
        if not has_kernel(f"fastreg::{KERNEL_OPS.get(op, op)}", key):
            return f"the compiled library has no {key} kernel for fastreg::{op} (built without it?)"
        return None
    # triton
    if TRITON_ERROR is not None:
        return TRITON_ERROR
    if op in KERNEL_OPS and LIBRARY_ERROR is not None:
        return f"its autograd comes from the compiled library, and {LIBRARY_ERROR}"
    if key == "CPU" and not TRITON_INTERPRET:
        return "triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing fastreg)"
    if not has_kernel(f"fastreg_triton::{KERNEL_OPS.get(op, op)}", key):
        return f"no triton kernel for {op} on {key}"
    return None


# Availability is fixed once the library and the triton kernels are registered (at import), so it
# is computed once: a dict look-up per call, which torch.compile traces without a graph break.
_WHY: dict[tuple[str, str, str], str | None] = {}
# Choices made, so that a per-step call pays one dict look-up: (op, device, backend argument) ->
# the backend, and -> the op of a self-checking backend (None for the others).
_CHOICE: dict[tuple[str, torch.device, str | None], str] = {}
_SELF_CHECKING_OP: dict[tuple[str, torch.device, str | None], object] = {}
_UNKNOWN = object()
_OPS: dict[tuple[str, str], object] = {}  # (backend, op) -> its OpOverload
# op -> its OpOverload when the automatic choice is a self-checking backend on every device type that
# can have tensors here (cpp on CPU, cuda on CUDA: one op, whose kernel the dispatcher picks by device).
_ANY_DEVICE_OP: dict[str, object] = {}
ENV_BACKEND: str | None = None  # FASTREG_BACKEND, as read by the last refresh_availability()
# Bumped by every refresh_availability(): a choice computed under an older generation (another thread
# refreshed meanwhile) is returned but not cached, so no stale choice outlives a refresh.
_GENERATION = 0


def refresh_availability() -> None:
    """Re-read ``FASTREG_BACKEND`` and recompute backend availability (after changing the variable in a
    running process, or registering kernels by hand, e.g. in tests)."""
    global ENV_BACKEND, _GENERATION
    _GENERATION += 1
    ENV_BACKEND = os.environ.get("FASTREG_BACKEND") or None
    _WHY.clear()
    _CHOICE.clear()
    _SELF_CHECKING_OP.clear()
    _OPS.clear()
    _ANY_DEVICE_OP.clear()
    for name in SCHEMAS:
        for backend in BACKENDS:
            for device_type in ("cpu", "cuda"):
                _WHY[name, backend, device_type] = _why_unavailable(name, backend, device_type)
    _fill_any_device_ops()


def why_unavailable(op: str, backend: str, device: torch.device | str) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason."""
    device_type = torch.device(device).type if isinstance(device, str) else device.type
    key = (op, backend, device_type)
    if key in _WHY:
        return _WHY[key]
    return _why_unavailable(op, backend, device_type)


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if why_unavailable(op, b, device) is None]


def choose_backend(op: str, device: torch.device, backend: str | None = None) -> str:
    """Resolve the backend for one call (see module docstring)."""
    key = (op, device, backend)  # (the device itself: reading its .type costs ≈20 µs on a cold cache)
    chosen = _CHOICE.get(key)
    if chosen is None:  # (first call for this key: the checks below run once)
        generation = _GENERATION
        device = torch.device(device)
        explicit = backend or ENV_BACKEND
        if explicit:
            why = why_unavailable(op, explicit, device)
            if why is not None:
                raise BackendUnavailable(f"fastreg.{op}: backend={explicit!r} cannot run: {why}")
            chosen = explicit
        else:
            order = _AUTO_ORDER.get(device.type, ("reference",))
            chosen = next((b for b in order if why_unavailable(op, b, device) is None), "reference")
        if generation == _GENERATION:
            _CHOICE[key] = chosen
    return chosen


def op(backend: str, name: str):
    """The op implementing ``name`` for a compiled/triton ``backend``: its one overload, ``.default``
    (a call through the overload packet first matches the arguments against the schemas: ≈7 µs more
    for a list of 55 tensors)."""
    found = _OPS.get((backend, name))
    if found is None:
        found = _OPS[backend, name] = getattr(getattr(torch.ops, NAMESPACES[backend]), name).default
    return found


def self_checking_op(name: str, device: torch.device, backend: str | None = None):
    """The op ``name`` of the backend :func:`choose_backend` picks, if that backend's kernels check every
    argument themselves (:data:`SELF_CHECKING`), else None: the public functions' fast path, one dict
    look-up per call. Raises as :func:`choose_backend` does."""
    key = (name, device, backend)
    found = _SELF_CHECKING_OP.get(key, _UNKNOWN)
    if found is not _UNKNOWN:
        return found
    generation = _GENERATION
    chosen = choose_backend(name, device, backend)
    found = op(chosen, name) if chosen in SELF_CHECKING else None
    if generation == _GENERATION:
        _SELF_CHECKING_OP[key] = found
    return found


def fast_op(name: str, tensors, backend: str | None = None):
    """:func:`self_checking_op` for a call on ``tensors`` (a non-empty list). With the automatic choice,
    a look-up by name alone where one op serves every device: reading the tensors' device costs more
    than the look-up on a cold cache (≈10 µs of a 200 µs call after other work, on our machines)."""
    if backend is None:
        found = _ANY_DEVICE_OP.get(name)
        if found is not None:
            return found
    return self_checking_op(name, tensors[0].device, backend)


def _fill_any_device_ops() -> None:
    if ENV_BACKEND is not None:  # (an explicit choice: cpp must refuse CUDA tensors, and cuda CPU ones)
        return
    device_types = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for name in SCHEMAS:
        if name in KERNEL_OPS.values():
            continue
        chosen = {choose_backend(name, torch.device(t)) for t in device_types}
        if chosen <= set(SELF_CHECKING) and len({NAMESPACES[b] for b in chosen}) == 1:
            _ANY_DEVICE_OP[name] = op(chosen.pop(), name)


refresh_availability()
