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
_AUTO: dict[tuple[str, str], str] = {}  # (op, device type) -> the automatic choice


def refresh_availability() -> None:
    """Recompute backend availability (after registering kernels by hand, e.g. in tests)."""
    _WHY.clear()
    _AUTO.clear()
    for name in SCHEMAS:
        for backend in BACKENDS:
            for device_type in ("cpu", "cuda"):
                _WHY[name, backend, device_type] = _why_unavailable(name, backend, device_type)


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
    explicit = backend or os.environ.get("FASTREG_BACKEND") or None
    if explicit:
        why = why_unavailable(op, explicit, device)
        if why is not None:
            raise BackendUnavailable(f"fastreg.{op}: backend={explicit!r} cannot run: {why}")
        return explicit
    key = (op, device.type)
    if key not in _AUTO:  # (a per-step call would otherwise pay the availability checks every time)
        order = _AUTO_ORDER.get(device.type, ("reference",))
        _AUTO[key] = next((b for b in order if why_unavailable(op, b, device) is None), "reference")
    return _AUTO[key]


def op(backend: str, name: str):
    """The op implementing ``name`` for a compiled/triton ``backend``: its one overload, ``.default``
    (a call through the overload packet first matches the arguments against the schemas: ≈7 µs more
    for a list of 55 tensors)."""
    return getattr(getattr(torch.ops, NAMESPACES[backend]), name).default


refresh_availability()
