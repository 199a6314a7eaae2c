"""Benchmark: the gram penalty's gradient added into ``.grad`` in place (``fastreg.gram_penalty_grad_``)
against the loss-mode providers, every one accumulating into gradients that already hold a data gradient,
as in a training step. Measured side by side in one process (interleaved rounds, medians):

1. ResNet-56 and ResNet-50 conv shapes, L1 masks at ratio 0.5, ``decorrelate``/``mean``, float32:
     in place        ``gram_penalty_grad_(weights, masks)``  (the chosen compiled backend)
     loss mode       ``gram_penalty(weights, masks).backward()``
     compile         ``torch.compile(reference)(weights, masks).backward()``
     official        the original TPP code's loop, ``.backward()``
   Per provider: median ms, × compile, ATen ops per call, and the min-flop roofline fraction (DESIGN.md
   §1.1 flops / GEMM peak timed in the same rounds / median).
2. Memory (ResNet-50): the bytes one call allocates through PyTorch's allocator (torch.profiler,
   ``profile_memory=True``), against the sum of the weights' bytes (what a gradient per layer costs).
3. One real training step of CIFAR ResNet-56 (batch 128, SGD, ``.grad`` from the data loss): plain
   cross-entropy, TPPLoss in loss mode, TPPLoss(in_loss=False) + ``apply_grad_()``, and the original
   code's step; ATen ops per step over the plain step, each regularizer's own time (timed alone in the
   same rounds, on the gradients a step left) and its share of the step.

    python benchmarks/bench_gram_grad_inplace.py            # markdown tables for the README
    python benchmarks/bench_gram_grad_inplace.py --smoke    # seconds: every code path with tiny counts
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import report  # noqa: E402

import fastreg  # noqa: E402
from fastreg import reference  # noqa: E402
from fastreg.models import get_model  # noqa: E402

REPS = {"resnet56": (2, 40), "resnet50": (1, 5)}
STEP_REPS = (1, 7)
SMOKE_REPS = (0, 1)
LW, REG, BATCH = 1000.0, 0.01, 128


def _official(weights, masks):
    return reference.gram_penalty_official(weights, masks, "decorrelate")


def _reference(weights, masks):
    return reference.gram_penalty(weights, masks, "decorrelate", "mean")


def gram_providers(model: str, with_compile: bool):
    weights = [w.detach().requires_grad_() for w in common.model_conv_weights(model)]
    masks = common.l1_masks(weights, 0.5)
    for w in weights:
        w.grad = torch.randn_like(w)  # a data gradient is there already
    compiled = torch.compile(_reference, dynamic=False) if with_compile else None
    providers = {
        "in place": lambda: fastreg.gram_penalty_grad_(weights, masks),
        "loss mode": lambda: fastreg.gram_penalty(weights, masks).backward(),
        "official": lambda: _official(weights, masks).backward(),
    }
    if compiled is not None:
        providers["compile"] = lambda: compiled(weights, masks).backward()
    return providers, weights, masks


def check_gram(weights, masks) -> float:
    """Max relative difference of the in-place gradients against loss mode's (from the same start)."""
    start = [w.grad.clone() for w in weights]
    fastreg.gram_penalty(weights, masks).backward()
    expected = [w.grad.clone() for w in weights]
    for w, s in zip(weights, start):
        w.grad.copy_(s)
    fastreg.gram_penalty_grad_(weights, masks)
    return common.max_disagreement([w.grad for w in weights], expected)[1]


def gram_table(model: str, smoke: bool, with_compile: bool) -> list[dict]:
    providers, weights, masks = gram_providers(model, with_compile)
    error = check_gram(weights, masks)
    if error > 1e-4:
        raise AssertionError(f"{model}: in-place gradients disagree with loss mode's: {error:.1e}")
    for fn in providers.values():  # (compiles 'compile' outside the timing)
        fn()
    peak_fn, peak_flops = common.gemm_peak_step(512 if smoke else 2048)
    warmup, reps = SMOKE_REPS if smoke else REPS[model]
    medians = common.interleaved_medians({**providers, "gemm peak": peak_fn}, warmup=warmup, reps=max(reps, 1))
    peak = peak_flops / medians.pop("gemm peak")
    min_flops = common.decorrelate_min_flops(weights, masks)
    rows = []
    for name, seconds in medians.items():
        row = {"model": model, "provider": name, "median_ms": seconds * 1e3, "ops": common.count_aten_ops(providers[name]),
               "roofline": min_flops / peak / seconds}
        if "compile" in medians:
            row["vs_compile"] = medians["compile"] / seconds
        rows.append(row)
    print(f"### {model} conv weights, ratio 0.5, decorrelate/mean, float32: in-place gradients agree with loss "
          f"mode's to {error:.1e}; GEMM peak {peak / 1e9:.0f} GFLOP/s\n")
    print(common.markdown_table(rows, [("provider", "provider", ""), ("median ms", "median_ms", ".2f"),
                                       ("× compile", "vs_compile", ".2f"), ("ATen ops", "ops", "d"),
                                       ("min-flop roofline", "roofline", ".0%")]))
    print()
    return rows


def allocated_bytes(fn) -> int:
    """Bytes fn's ops allocate through PyTorch's CPU allocator (torch.profiler, profile_memory=True): each
    op's own balance (allocated minus freed within it), summed over the ops that leave memory allocated."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def memory_table(model: str = "resnet50") -> dict:
    providers, weights, masks = gram_providers(model, with_compile=False)
    for fn in providers.values():
        fn()
    weights_bytes = sum(w.numel() * w.element_size() for w in weights)
    largest = max(w.numel() * w.element_size() for w in weights)
    row = {"in place": allocated_bytes(providers["in place"]), "loss mode": allocated_bytes(providers["loss mode"])}
    print(f"### Memory, {model}: bytes one call allocates (torch.profiler, profile_memory=True)\n")
    print(f"| provider | bytes allocated |\n|---|---:|\n| in place | {row['in place']:,} |\n"
          f"| loss mode | {row['loss mode']:,} |\n| (sum of the weights) | {weights_bytes:,} |\n"
          f"| (largest weight) | {largest:,} |\n")
    print("(The cpp backend's GEMM workspace is a per-thread buffer kept across calls, sized for the largest "
          "layer program it ran; it is not allocated per call.)\n")
    return dict(row, weights=weights_bytes, largest=largest)


def training_step_providers(smoke: bool):
    """One SGD step of CIFAR ResNet-56 (batch 128; smaller with --smoke) per provider, on one model."""
    torch.manual_seed(0)
    model = get_model("resnet56", 10)
    batch = 8 if smoke else BATCH
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    ce = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def fixed_reg(criterion):  # every call at reg = REG (the schedule's value does not change the work)
        criterion.reg_at = lambda k: REG
        return criterion

    in_loss = fixed_reg(fastreg.TPPLoss(model, 0.5, lw=LW))
    in_place = fixed_reg(fastreg.TPPLoss(model, 0.5, lw=LW, in_loss=False))
    weights, masks = in_loss._gram_weights, in_loss._gram_masks  # (the criterion's own lists)
    l2_params, l2_masks = in_loss._l2_params, in_loss._l2_masks
    pruned_rows = [(~m).nonzero().squeeze(1) for m in l2_masks]

    def plain():
        opt.zero_grad()
        ce(model(x), y).backward()
        opt.step()

    def loss_mode():
        opt.zero_grad()
        in_loss(model(x), y).backward()
        opt.step()

    def in_place_mode():
        opt.zero_grad()
        in_place(model(x), y).backward()
        in_place.apply_grad_()
        opt.step()

    def original():
        opt.zero_grad()
        loss = ce(model(x), y) + LW * REG * _official(weights, masks)
        loss.backward()
        with torch.no_grad():
            for p, idx in zip(l2_params, pruned_rows):
                p.grad[idx] += REG * p[idx]
        opt.step()

    def original_terms():  # the original code's regularizer alone (its loss terms' backward, its L2 loop)
        (LW * REG * _official(weights, masks)).backward()
        with torch.no_grad():
            for p, idx in zip(l2_params, pruned_rows):
                p.grad[idx] += REG * p[idx]

    steps = {"cross-entropy": plain, "TPPLoss (loss mode)": loss_mode, "TPPLoss(in_loss=False)": in_place_mode,
             "original": original}
    # Each regularizer alone, on the .grad a step left (what it adds to a step, timed without the step's noise)
    alone = {"TPPLoss (loss mode)": lambda: in_loss.regularization(REG).backward(),
             "TPPLoss(in_loss=False)": in_place.apply_grad_, "original": original_terms}
    return steps, alone


def step_table(smoke: bool) -> list[dict]:
    """Full steps (medians, ATen ops) and each regularizer alone, interleaved in the same rounds; the
    regularizer's share of a step = its own time / (plain step + its own time) — on a loaded machine the
    difference of two step medians is noisier than the regularizer itself."""
    steps, alone = training_step_providers(smoke)
    for fn in list(steps.values()) + list(alone.values()):
        fn()
    ops = {name: common.count_aten_ops(fn) for name, fn in steps.items()}
    warmup, reps = SMOKE_REPS if smoke else STEP_REPS
    timed = {**steps, **{f"{name} alone": fn for name, fn in alone.items()}}
    medians = common.interleaved_medians(timed, warmup=warmup, reps=max(reps, 1))
    plain = medians["cross-entropy"]
    rows = []
    for name in steps:
        own = medians.get(f"{name} alone", 0.0)
        rows.append({"provider": name, "median_ms": medians[name] * 1e3, "extra_ops": ops[name] - ops["cross-entropy"],
                     "own_ms": own * 1e3, "share": own / (plain + own)})
    print(f"### One SGD step of CIFAR ResNet-56, batch {8 if smoke else BATCH}, ratio 0.5: ATen ops over the plain "
          f"step ({ops['cross-entropy']} ops), the regularizer's own time and its share of the step\n")
    print(common.markdown_table(rows, [("provider", "provider", ""), ("step median ms", "median_ms", ".1f"),
                                       ("ops over plain", "extra_ops", "d"), ("regularizer ms", "own_ms", ".2f"),
                                       ("regularizer share", "share", ".1%")]))
    print()
    return rows


def run(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    smoke = "--smoke" in argv or common.smoke_mode()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"Machine: {common.machine_description()}  \nCommand: `python benchmarks/bench_gram_grad_inplace.py`\n")
    out = {"gram": []}
    for model in ("resnet56",) if smoke else ("resnet56", "resnet50"):
        out["gram"] += gram_table(model, smoke, with_compile=not smoke)
    if not smoke:
        out["memory"] = memory_table()
    out["step"] = step_table(smoke)
    return out


if __name__ == "__main__":
    sys.exit(report.main_with_readme("bench_gram_grad_inplace", run))
