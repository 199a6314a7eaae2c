"""``fastreg bench``: the TPP gram penalty of a CNN on every available backend, side by side.

For the conv weights of a model (default: CIFAR ResNet-56, 55 convs) with L1-ranked keep masks,
one forward+backward of ``gram_penalty(target="decorrelate", reduction="mean")`` per provider:
every fastreg backend that can run here, and the original TPP code's loop (``official``). Printed
per provider: the penalty, its max abs/rel disagreement with the float64 reference (values and
gradients), the median time of a step, the ATen ops one step dispatches, and the speedup over the
reference backend.

    python -m fastreg.bench [--model resnet56|resnet50|vgg19] [--ratio 0.5] [--reps 7]

The model builders, op counter and timers here are also what ``benchmarks/common.py`` uses.
"""
from __future__ import annotations

import argparse
import collections
import math
import random
import statistics
import sys
import time
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from . import _registry, reference
from .gram import gram_penalty

MODELS = ("resnet56", "resnet50", "vgg19")

# VGG-19 (configuration "E" of Simonyan & Zisserman; torchvision's vgg19().features): output
# channels of each 3×3 conv, "M" = max-pool.
VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


# ---------------------------------------------------------------------------------------------
# Model shapes
# ---------------------------------------------------------------------------------------------
def resnet_cifar_conv_shapes(depth: int = 56) -> list[tuple[int, int, int, int]]:
    """Conv weight shapes of a CIFAR ResNet-``depth`` (He et al. 2016, §4.2; depth = 6n + 2) with
    option-A (parameter-free) shortcuts: a 16×3×3×3 stem, then 3 stages of n basic blocks (two 3×3
    convs each) with 16, 32, 64 channels. ResNet-56: n = 9, 1 + 3·9·2 = 55 convs."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n ≥ 1 (20, 32, 44, 56, 110, ...), got {depth}")
    blocks = (depth - 2) // 6
    shapes = [(16, 3, 3, 3)]
    in_channels = 16
    for channels in (16, 32, 64):
        for _ in range(blocks):
            shapes += [(channels, in_channels, 3, 3), (channels, channels, 3, 3)]
            in_channels = channels
    return shapes


def resnet_cifar_projection_shapes() -> list[tuple[int, int, int, int]]:
    """The 1×1 convs an option-B (projection) shortcut would add at the two stage transitions
    (16→32, 32→64). Not part of the 55 convs above: the benchmarks use option A."""
    return [(32, 16, 1, 1), (64, 32, 1, 1)]


def vgg19_conv_shapes() -> list[tuple[int, int, int, int]]:
    """The 16 3×3 conv weight shapes of VGG-19 (ImageNet input, 3 channels)."""
    shapes, in_channels = [], 3
    for item in VGG19_CONFIG:
        if item != "M":
            shapes.append((item, in_channels, 3, 3))
            in_channels = item
    return shapes


def weights_from_shapes(
    shapes: Sequence[Sequence[int]], *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"
) -> list[Tensor]:
    """Random weights for the given shapes, He-normal (fan_out, ReLU) like torchvision's ResNet/VGG
    init; leaf tensors with requires_grad=True."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        fan_out = shape[0] * math.prod(shape[2:])
        w = torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * math.sqrt(2.0 / fan_out)
        out.append(w.to(dtype=dtype, device=device).requires_grad_())
    return out


def torchvision_conv_weights(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> list[Tensor]:
    """Every Conv2d weight of ``torchvision.models.<name>(weights=None)`` (random init, no download),
    as detached leaf tensors with requires_grad=True."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, name)(weights=None)
    return [
        m.weight.detach().to(dtype=dtype, device=device).clone().requires_grad_()
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]


def model_conv_weights(model: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> list[Tensor]:
    """The conv weights of ``model``: ``resnet56`` (55, CIFAR, option A), ``resnet50`` (53, torchvision)
    or ``vgg19`` (16)."""
    if model == "resnet56":
        return weights_from_shapes(resnet_cifar_conv_shapes(56), seed=seed, dtype=dtype, device=device)
    if model == "resnet50":
        return torchvision_conv_weights("resnet50", seed=seed, dtype=dtype, device=device)
    if model == "vgg19":
        return weights_from_shapes(vgg19_conv_shapes(), seed=seed, dtype=dtype, device=device)
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")


def l1_keep_masks(weights: Sequence[Tensor], ratio: float) -> list[Tensor]:
    """Per layer, keep all but the ⌊ratio·N⌋ filters of smallest L1 norm (fastreg.reference.l1_keep_mask)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    with torch.no_grad():
        return [reference.l1_keep_mask(w, ratio) for w in weights]


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
class _OpCounter(TorchDispatchMode):
    """Counts every op that reaches the dispatcher's Python key, by overload name.

    ``ignore_compile_internals``: a torch.compile'd function runs compiled (instead of falling back to
    eager) and its runtime ATen calls are counted; Inductor's own generated kernels are not ATen ops
    and are not seen. A custom op (``fastreg::gram_penalty``) counts once, whatever it runs inside."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_ops_by_name(fn: Callable[[], object]) -> collections.Counter:
    """The ops dispatched during one call of ``fn`` (forward and autograd backward alike), by name."""
    with _OpCounter() as counter:
        fn()
    return counter.counts


def count_aten_ops(fn: Callable[[], object]) -> int:
    """How many ops one call of ``fn`` dispatches (e.g. one forward+backward step). On a GPU each is a
    kernel launch; the number is exact and independent of machine noise."""
    return sum(count_ops_by_name(fn).values())


def time_median(fn: Callable[[], object], warmup: int = 1, reps: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds over ``reps`` calls, after ``warmup`` untimed calls."""
    return interleaved_medians({"fn": fn}, warmup=warmup, reps=reps)["fn"]


def round_orders(names: Sequence[str], reps: int, seed: int = 0) -> list[list[str]]:
    """The order of each of ``reps`` rounds: every name once per round, shuffled with a fixed seed, so
    that no name always runs right after the same other one (on the caches that one left)."""
    rng = random.Random(seed)
    orders = []
    for _ in range(reps):
        order = list(names)
        rng.shuffle(order)
        orders.append(order)
    return orders


def interleaved_medians(fns: dict[str, Callable[[], object]], warmup: int = 1, reps: int = 5,
                        setup: dict[str, Callable[[], object]] | None = None) -> dict[str, float]:
    """Median seconds per call of each function, timed in rounds (one call of each per round, in the
    order of :func:`round_orders`) so that machine noise and cache state hit every provider alike.
    ``setup[name]``, where given, runs untimed right before each call of ``fns[name]`` (e.g. the
    training step's backward whose gradients a regularizer then reads)."""
    if reps < 1:
        raise ValueError(f"reps must be ≥ 1, got {reps}")
    setup = setup or {}
    if set(setup) - set(fns):
        raise ValueError(f"setup names {sorted(set(setup) - set(fns))}, which are not among the timed functions {list(fns)}")
    for _ in range(warmup):
        for name, fn in fns.items():
            if name in setup:
                setup[name]()
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for order in round_orders(list(fns), reps):
        for name in order:
            if name in setup:
                setup[name]()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def max_disagreement(values: Sequence[Tensor], expected: Sequence[Tensor]) -> tuple[float, float]:
    """(max |v − e|, max |v − e| / max |e|) over all tensors: abs error and error relative to the
    largest expected entry (an elementwise ratio blows up near zeros)."""
    abs_err = max(float((v.double() - e.double()).abs().max()) for v, e in zip(values, expected))
    scale = max(float(e.double().abs().max()) for e in expected)
    return abs_err, abs_err / scale if scale > 0 else abs_err


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------
def loss_and_grads(loss_fn: Callable[[], Tensor], weights: Sequence[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One forward+backward step: the loss and ∂loss/∂w for every weight (no .grad accumulation)."""
    loss = loss_fn()
    return loss, torch.autograd.grad(loss, weights)


def demo_providers(weights: Sequence[Tensor], masks: Sequence[Tensor]) -> dict[str, Callable[[], Tensor]]:
    """name -> loss function: ``fastreg[<backend>]`` for every backend that runs on these tensors, then
    ``official`` (the original TPP loop)."""
    device = weights[0].device
    providers: dict[str, Callable[[], Tensor]] = {}
    for backend in _registry.available_backends("gram_penalty", device):
        providers[f"fastreg[{backend}]"] = (
            lambda b=backend: gram_penalty(weights, masks, target="decorrelate", reduction="mean", backend=b)
        )
    providers["official"] = lambda: reference.gram_penalty_official(weights, masks)
    return providers


def run_demo(
    model: str = "resnet56", ratio: float = 0.5, reps: int = 7, warmup: int = 1, dtype=torch.float32, layers: int | None = None
) -> list[dict]:
    """Measure every provider on ``model``'s conv weights (the first ``layers`` if given); one dict per
    provider (see module docstring), with ``error`` instead of figures for a provider that raised."""
    weights = model_conv_weights(model, dtype=dtype)[:layers]
    masks = l1_keep_masks(weights, ratio)
    oracle_weights = [w.detach().double().requires_grad_() for w in weights]
    expected_loss, expected_grads = loss_and_grads(
        lambda: reference.gram_penalty(oracle_weights, masks, "decorrelate", "mean"), oracle_weights
    )
    rows, steps = [], {}
    for name, loss_fn in demo_providers(weights, masks).items():
        step = steps[name] = lambda f=loss_fn: loss_and_grads(f, weights)
        try:
            loss, grads = step()
        except Exception as e:  # noqa: BLE001 - a broken backend is reported, the others still run
            del steps[name]
            rows.append(dict(provider=name, error=f"{type(e).__name__}: {e}".splitlines()[0][:160]))
            continue
        value_abs, value_rel = max_disagreement([loss.detach()], [expected_loss.detach()])
        grad_abs, grad_rel = max_disagreement(grads, expected_grads)
        rows.append(
            dict(
                provider=name,
                penalty=float(loss.detach()),
                value_abs_err=value_abs,
                value_rel_err=value_rel,
                grad_abs_err=grad_abs,
                grad_rel_err=grad_rel,
                aten_ops=count_aten_ops(step),
            )
        )
    medians = interleaved_medians(steps, warmup=warmup, reps=reps)
    base = medians.get("fastreg[reference]")
    for r in rows:
        if r["provider"] in medians:
            r["median_s"] = medians[r["provider"]]
            r["speedup_vs_reference"] = base / r["median_s"] if base else float("nan")
    return rows


def agreement_tolerance(dtype: torch.dtype) -> float:
    """Relative disagreement with the float64 reference that still counts as agreement."""
    return 1e-10 if dtype == torch.float64 else 1e-4


def format_rows(rows: Sequence[dict]) -> str:
    """The demo's markdown table (errors relative to the float64 reference)."""
    header = "| provider | penalty | Δpenalty rel | max Δgrad abs | Δgrad rel | median ms | ATen ops/step | × vs reference |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['provider']} | ERROR: {r['error']} |  |  |  |  |  |  |")
            continue
        lines.append(
            f"| {r['provider']} | {r['penalty']:.6g} | {r['value_rel_err']:.1e} | {r['grad_abs_err']:.1e} | "
            f"{r['grad_rel_err']:.1e} | {1e3 * r['median_s']:.2f} | {r['aten_ops']} | {r['speedup_vs_reference']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``fastreg bench``: print the side-by-side table; exit status 1 if a provider disagrees with the reference."""
    parser = argparse.ArgumentParser(prog="fastreg bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="resnet56")
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio of the L1 masks (default 0.5)")
    parser.add_argument("--reps", type=int, default=7, help="timed steps per provider (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--layers", type=int, help="only the first LAYERS conv weights (default: all)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    device = torch.device("cpu")
    layers = "" if args.layers is None else f" (first {args.layers})"
    print(f"fastreg bench: gram_penalty(target='decorrelate', reduction='mean') forward+backward, {args.model} "
          f"conv weights{layers}, L1 masks at ratio {args.ratio}, {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for backend in _registry.BACKENDS:
        why = _registry.why_unavailable("gram_penalty", backend, device)
        if why is not None:
            print(f"  backend {backend}: not available here ({why})")
    start = time.perf_counter()
    rows = run_demo(args.model, args.ratio, reps=args.reps, warmup=args.warmup, dtype=dtype, layers=args.layers)
    print(format_rows(rows))
    tol = agreement_tolerance(dtype)
    bad = [r["provider"] for r in rows if "error" in r or max(r["value_rel_err"], r["grad_rel_err"]) > tol]
    print(f"errors are relative to the float64 reference; agreement tolerance {tol:.0e}: "
          + (f"DISAGREE: {', '.join(bad)}" if bad else "all providers agree")
          + f"  ({time.perf_counter() - start:.1f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
