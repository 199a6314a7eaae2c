"""Argument checks shared by the public entry points: clear errors that name the argument."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_argument_error(err: BaseException) -> bool:
    """Whether ``err`` is an op refusing its arguments before it wrote anything, so that a caller may
    run a checked path instead: the C++ ops' checks raise ValueError, TypeError or IndexError, the
    dispatcher NotImplementedError (no kernel for the device) or a plain RuntimeError naming the schema
    argument it could not convert, and a fast path reading an attribute of a non-tensor AttributeError.
    Out of memory, CUDA / accelerator errors and any other failure are not: the op may have written
    part of its output, and an in-place op run again would apply twice."""
    if isinstance(err, (TypeError, ValueError, IndexError, NotImplementedError, AttributeError)):
        return True
    return type(err) is RuntimeError and "Expected a value of type" in str(err)


def check_tensor_list(name: str, tensors, *, min_dim: int = 1, allow_empty: bool = False) -> list[Tensor]:
    """A non-empty list of floating tensors on one device, each with at least ``min_dim`` dims. Any
    iterable of tensors will do (a tuple, ``nn.ParameterList``, ``model.parameters()``) except a tensor."""
    if isinstance(tensors, (Tensor, str, bytes, set, frozenset)) or not isinstance(tensors, Iterable):
        why = " (a set has no order to pair it with other lists)" if isinstance(tensors, (set, frozenset)) else ""
        raise TypeError(f"{name} must be a list of tensors, got {type(tensors).__name__}{why}")
    tensors = list(tensors)
    if not tensors and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    device = None
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
        if device is None:
            device = t.device
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}] must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
        if t.dim() < min_dim:
            raise ValueError(f"{name}[{i}] must have at least {min_dim} dims, got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {device}: all must share one device")
    return tensors


def is_dense(t: Tensor) -> bool:
    """Whether ``t`` fills its memory block exactly once, in some dim order (contiguous, channels_last,
    a transposed matrix, ...): what the kernels update in place."""
    if t.is_contiguous() or t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (one shape) put every element at the same memory offset (the strides of
    size-1 dims aside)."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def check_writable(name: str, tensors: Sequence[Tensor], suffix: str = "") -> None:
    """Tensors updated in place (``name[i]`` + ``suffix``, e.g. ``.grad``): each dense in memory, in any
    dim order, and not an inference tensor outside inference mode (as PyTorch's own in-place ops)."""
    # (not while torch.compile traces: it cannot trace these queries, and traced tensors are not inference tensors)
    refuse_inference = not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
    for i, t in enumerate(tensors):
        if not is_dense(t):
            raise ValueError(
                f"{name}[{i}]{suffix} is updated in place, so it must be dense in memory (contiguous, channels_last or any "
                f"other dim order), got shape {tuple(t.shape)} with strides {t.stride()}"
            )
        if refuse_inference and t.is_inference():
            raise RuntimeError(
                f"{name}[{i}]{suffix} is an inference tensor (made under torch.inference_mode()): it can be updated in "
                "place only inside inference_mode (or clone it to get a normal tensor)"
            )


def check_slice_vectors(name: str, vectors, tensors: Sequence[Tensor], tensors_name: str, dims, dtypes) -> list[Tensor]:
    """One 1-D tensor per tensor (bool keep mask or int64 group ids), as long as the tensor's size
    along dims[i], on the tensors' device."""
    if isinstance(vectors, Tensor) or not isinstance(vectors, Sequence):
        raise TypeError(f"{name} must be a list of tensors, got {type(vectors).__name__}")
    vectors = list(vectors)
    if len(vectors) != len(tensors):
        raise ValueError(f"{name} has {len(vectors)} entries but {tensors_name} has {len(tensors)} tensors")
    out = []
    for i, (v, t, d) in enumerate(zip(vectors, tensors, dims)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(v).__name__}")
        if v.dtype not in dtypes:
            want = " or ".join(str(x) for x in dtypes)
            raise TypeError(f"{name}[{i}] must be a {want} tensor, got {v.dtype}")
        if v.dim() != 1 or v.shape[0] != t.shape[d]:
            raise ValueError(
                f"{name}[{i}] must have shape [{t.shape[d]}] (size of {tensors_name}[{i}] along dim {d}), "
                f"got {tuple(v.shape)}"
            )
        if v.device != t.device:
            raise ValueError(f"{name}[{i}] is on {v.device} but {tensors_name}[{i}] is on {t.device}")
        out.append(v.contiguous())
    return out


def check_masks(name: str, masks, tensors: Sequence[Tensor], tensors_name: str, dim: int = 0) -> list[Tensor]:
    """One bool keep mask per tensor, of length ``tensors[i].shape[dim]``, on the tensors' device."""
    return check_slice_vectors(name, masks, tensors, tensors_name, [dim] * len(tensors), (torch.bool,))


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_coeff(name: str, value) -> float:
    """A finite Python number (int or float, not bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}"
                        + (" (for a tensor factor, multiply the result instead)" if isinstance(value, Tensor) else ""))
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
