"""The per-step multi-tensor ops the pruning workflow calls, looked up in one place.

``fastreg.fused`` (one launch per call for the whole model) serves when it exists; until then
the same-signature formulas of :mod:`fastreg.reference` do. Every pruning module calls these
through :func:`op`, so switching needs no change anywhere else.
"""
from __future__ import annotations

import functools
import importlib

from .. import reference

OPS = ("l2_grad_", "shrink_", "group_lasso_grad_", "group_saliency", "group_norms", "slimming_grad_")


@functools.cache
def _fused():
    try:
        return importlib.import_module("fastreg.fused")
    except ImportError:
        return None


def op(name: str):
    """``fastreg.fused.<name>`` when available, else ``fastreg.reference.<name>``."""
    if name not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {name!r}")
    fused = _fused()
    fn = getattr(fused, name, None) if fused is not None else None
    return fn if fn is not None else getattr(reference, name)
