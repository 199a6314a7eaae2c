"""fastreg: fast, exact structured-pruning regularizers for PyTorch.

    criterion = fastreg.TPPLoss(model, pruning_ratio=0.5)

Ops (one call covers every layer; backends ``reference`` / ``cpp`` / ``triton`` / ``cuda``):
:func:`gram_penalty`. Formulas: :mod:`fastreg.reference`; registry: :mod:`fastreg._registry`.
"""
from . import reference
from ._registry import BACKENDS, BackendUnavailable, available_backends, choose_backend
from .gram import gram_penalty

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "choose_backend",
    "gram_penalty",
    "reference",
]
__version__ = "0.1.0"
