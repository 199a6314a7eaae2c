"""Shared benchmark utilities (protocol: ../shared/BENCHMARKING.md): model shapes, L1 masks, op
counting, timing, the machine's own GEMM peak and read bandwidth, and the flop counts of DESIGN.md §1.1.

Times are medians; providers are compared in one process (``interleaved_medians`` times them
in rounds of shuffled order). The roofline of a step is ``min flops ÷ GEMM peak`` with both measured in the same
run; ``roofline_fraction = (min_flops / peak) / median_time``.

Flop convention: a product of an m×k by a k×n matrix costs 2·m·k·n flops (multiply and add counted
separately). Only matrix products are counted; see :func:`decorrelate_layer_flops`.
"""
from __future__ import annotations

import os
import platform
from typing import Callable, Sequence

import torch
from torch import Tensor

import fastreg
from fastreg import reference
from fastreg.bench import (  # noqa: F401  (re-exported: one implementation, shared with `fastreg bench`)
    count_aten_ops,
    count_ops_by_name,
    interleaved_medians,
    l1_keep_masks,
    loss_and_grads,
    max_disagreement,
    model_conv_weights,
    resnet_cifar_conv_shapes,
    resnet_cifar_projection_shapes,
    round_orders,
    time_median,
    vgg19_conv_shapes,
)

MODELS = ("resnet56", "resnet50", "vgg19")


# ---------------------------------------------------------------------------------------------
# Model weights and masks
# ---------------------------------------------------------------------------------------------
def resnet56_conv_weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """The 55 conv weights of CIFAR ResNet-56 with option-A shortcuts, built from shapes, He-normal init:
    16×3×3×3, then 3 stages × 9 basic blocks × 2 convs with 16/32/64 channels (the first conv of
    stages 2 and 3 takes 16 / 32 input channels). Option-B shortcuts would add the two 1×1 projections
    of :func:`resnet56_projection_shapes` (fastreg.models.cifar_resnet uses option B: 57 convs)."""
    return model_conv_weights("resnet56", seed=seed, dtype=dtype)


def resnet56_projection_shapes() -> list[tuple[int, int, int, int]]:
    """The 1×1 shortcut projections (32×16×1×1, 64×32×1×1) that option B adds; not benchmarked."""
    return resnet_cifar_projection_shapes()


def resnet50_conv_weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """Every Conv2d weight (53) of torchvision ``resnet50(weights=None)``: random init, no download."""
    return model_conv_weights("resnet50", seed=seed, dtype=dtype)


def vgg19_conv_weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """The 16 conv weights of VGG-19 (torchvision ``vgg19().features``), built from shapes."""
    return model_conv_weights("vgg19", seed=seed, dtype=dtype)


def l1_masks(weights: Sequence[Tensor], ratio: float) -> list[Tensor]:
    """Per layer ``fastreg.reference.l1_keep_mask(w, ratio)``: the ⌊ratio·N⌋ smallest-L1 filters pruned."""
    return l1_keep_masks(weights, ratio)


# ---------------------------------------------------------------------------------------------
# Backends and machine
# ---------------------------------------------------------------------------------------------
def fastreg_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """The compiled/Triton fastreg backends that can run ``op`` on ``device`` (``reference`` is left out:
    benchmarks time it as the ``reference`` peer). On CPU, ``triton`` appears only when
    TRITON_INTERPRET=1 was set before fastreg was imported — the interpreter is a correctness path,
    not a performance one; see :func:`provider_note`."""
    return [b for b in fastreg.available_backends(op, device) if b != "reference"]


def provider_note(backend: str, device: torch.device | str = "cpu") -> str:
    """A caveat to print next to a backend's figures ('' if none)."""
    if backend == "triton" and torch.device(device).type == "cpu":
        return "Triton interpreter (TRITON_INTERPRET=1): correctness path, not a performance path"
    return ""


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One line naming the machine: CPU model, cores, threads torch uses, torch version."""
    return (
        f"{cpu_model()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def gemm_peak_step(n: int = 2048, dtype: torch.dtype = torch.float32) -> tuple[Callable[[], Tensor], int]:
    """(fn, flops): fn runs one n×n @ n×n ``torch.mm`` (2·n³ flops) — time it beside other work (e.g. in
    :func:`interleaved_medians`) to get the GEMM peak under the same machine load."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=dtype)
    b = torch.randn(n, n, generator=gen, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2 * n**3


def gemm_peak_flops(n: int = 2048, reps: int = 5, warmup: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """The machine's GEMM peak in flop/s, measured now: 2·n³ / median time of an n×n @ n×n ``torch.mm``."""
    fn, flops = gemm_peak_step(n, dtype)
    return flops / time_median(fn, warmup=warmup, reps=reps)


def read_bandwidth(numel: int = 1 << 25, reps: int = 5, warmup: int = 1) -> float:
    """Memory read bandwidth in bytes/s: numel·4 bytes / median time of ``torch.sum`` over float32."""
    x = torch.ones(numel, dtype=torch.float32)
    return x.numel() * x.element_size() / time_median(lambda: x.sum(), warmup=warmup, reps=reps)


# ---------------------------------------------------------------------------------------------
# Flop counts (DESIGN.md §1.1), forward + gradient of one layer's Σ E²
# ---------------------------------------------------------------------------------------------
def decorrelate_layer_flops(n: int, d: int, pruned: int) -> dict[str, int]:
    """Matrix-product flops of one layer's ``decorrelate`` penalty and its gradient, per formulation.

    W is N×D, q = |P| pruned rows, k = N − q kept rows, p = q/N.

    * ``nside``: A = W_P Wᵀ (2qND), ∇W_P = 4 A W (2qND), ∇W_K = 4 A[:, K]ᵀ W_P (2kqD):
      4qND + 2kqD = (6p − 2p²)·N²·D.
    * ``dside``: S = W_Pᵀ W_P (2qD²), R = W_Kᵀ W_K (2kD²), ∇W_P = 4 W_P (S + R) (2qD²),
      ∇W_K = 4 W_K S (2kD²): 4·N·D².
    * ``textbook``: autograd of G = W Wᵀ: forward 2N²D, backward dG·W + dGᵀ·W = 4N²D: 6·N²·D.
    * ``min``: the cheaper of nside and dside (0 when q = 0: the layer contributes nothing).

    Left out (they are not matrix products): ΣE² = 2‖A‖² − ‖A[:, P]‖² (2qN + 2q²), ‖S‖² + 2⟨S, R⟩ and
    T = S + R (5D²), and scaling the gradients (N·D): at most 6% of a layer's ``min`` (ResNet-56's
    3-channel stem), under 2% for every ResNet-50 layer, so the roofline is slightly conservative.
    Neither is the symmetry of W_P W_Pᵀ and S, R exploited (a syrk would halve those products):
    these are DESIGN.md's counts, which the issue's roofline targets are defined against.
    """
    if not 0 <= pruned <= n:
        raise ValueError(f"pruned must be in [0, n={n}], got {pruned}")
    nside, dside = reference.gram_side_flops("decorrelate", n, d, pruned)
    dside = dside if pruned else 0
    return {"nside": nside, "dside": dside, "textbook": 6 * n * n * d, "min": min(nside, dside)}


def _layer_counts(weights: Sequence[Tensor], masks: Sequence[Tensor] | None):
    for i, w in enumerate(weights):
        n, d = w.shape[0], w[0].numel()
        pruned = int((~masks[i]).sum()) if masks is not None else 0
        yield decorrelate_layer_flops(n, d, pruned)


def decorrelate_min_flops(weights: Sequence[Tensor], masks: Sequence[Tensor]) -> int:
    """Σ over layers of the cheaper formulation (N-side or D-side) — the work any exact ``decorrelate``
    forward+gradient must do by DESIGN.md §1.1 (see :func:`decorrelate_layer_flops`)."""
    return sum(c["min"] for c in _layer_counts(weights, masks))


def decorrelate_nside_flops(weights: Sequence[Tensor], masks: Sequence[Tensor]) -> int:
    """Σ over layers of the N-side count (6p − 2p²)·N²·D."""
    return sum(c["nside"] for c in _layer_counts(weights, masks))


def textbook_flops(weights: Sequence[Tensor]) -> int:
    """Σ over layers of 6·N²·D: the textbook autograd version (full gram forward, two GEMMs backward)."""
    return sum(c["textbook"] for c in _layer_counts(weights, None))


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def is_peer(provider: str) -> bool:
    """Peers are every provider that is not a fastreg backend (``fastreg[<backend>]``)."""
    return not provider.startswith("fastreg")


def add_ratios(rows: list[dict], time_key: str = "median_s") -> None:
    """Per row, ``vs_best_peer`` = (fastest peer's time) / (this time): > 1 means faster than every
    peer; and ``vs_<peer>`` for each peer present. Rows without a time get NaN."""
    peers = {r["provider"]: r[time_key] for r in rows if is_peer(r["provider"]) and r.get(time_key)}
    best = min(peers.values()) if peers else None
    for r in rows:
        t = r.get(time_key)
        r["vs_best_peer"] = best / t if best and t else float("nan")
        for name, peer_time in peers.items():
            r[f"vs_{name}"] = peer_time / t if t else float("nan")


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table: ``columns`` = (header, row key, format spec); missing keys print as '—'."""

    def cell(r, key, spec):
        v = r.get(key)
        if v is None or (isinstance(v, float) and v != v):
            return "—"
        return format(v, spec) if spec else str(v)

    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
    for r in rows:
        lines.append("| " + " | ".join(cell(r, key, spec) for _, key, spec in columns) + " |")
    return "\n".join(lines)


def smoke_mode() -> bool:
    """True when ``FASTREG_BENCH_SMOKE=1``: tiny repetition counts, for tests of the benchmark code."""
    return os.environ.get("FASTREG_BENCH_SMOKE") == "1"


__all__ = [
    "MODELS",
    "add_ratios",
    "count_aten_ops",
    "count_ops_by_name",
    "cpu_model",
    "decorrelate_layer_flops",
    "decorrelate_min_flops",
    "decorrelate_nside_flops",
    "fastreg_backends",
    "gemm_peak_flops",
    "gemm_peak_step",
    "interleaved_medians",
    "is_peer",
    "l1_masks",
    "loss_and_grads",
    "machine_description",
    "markdown_table",
    "max_disagreement",
    "model_conv_weights",
    "provider_note",
    "read_bandwidth",
    "resnet50_conv_weights",
    "resnet56_conv_weights",
    "round_orders",
    "resnet56_projection_shapes",
    "smoke_mode",
    "textbook_flops",
    "time_median",
    "vgg19_conv_weights",
]
