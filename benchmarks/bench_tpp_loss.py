"""Benchmark: what the drop-in criterion costs per training step, on top of the model's own step.

One step of the TPP objective over ResNet-56 (CIFAR) with ``TPPLoss(model, 0.5)``'s masks, from fixed
logits (the model's forward and backward are left out: they cost the same with any criterion):

  TPPLoss              ``loss = criterion(logits, y); loss.backward()`` — the default, L2 terms in the loss
  TPPLoss in place     ``TPPLoss(..., l2_in_loss=False)``: ``loss.backward(); criterion.apply_l2_()``
  TPPLoss in_loss=False ``TPPLoss(..., in_loss=False)``: ``loss.backward(); criterion.apply_grad_()`` (every
                       term added into ``.grad`` by two fused in-place calls)
  original             the original TPP code's step: CE + lw·reg·Σ mse_loss(G, G with pruned rows and
                       columns zeroed) per layer, backward, then ``grad += reg·w`` on every pruned filter,
                       bias, BN γ and β, one masked update per tensor (its ``_apply_reg``)
  cross-entropy        the base loss alone: the floor every criterion pays

Every provider starts from zeroed ``.grad``s (``zero_grad(set_to_none=False)``) and accumulates into
them, as training does. Before timing, the three TPP steps are
checked to produce the same gradients. Per provider: median time (interleaved rounds), ratio to the
original code, ATen ops dispatched per step.

    python benchmarks/bench_tpp_loss.py            # markdown table for the README
    python benchmarks/bench_tpp_loss.py --smoke    # seconds: every code path with tiny counts
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

LW, REG, BATCH = 1000.0, 0.01, 128
REPS = (3, 60)
SMOKE_REPS = (0, 2)


def make_case(model_name: str = "resnet56"):
    """(providers, parameters) over one model and fixed logits; reg fixed at REG for every provider."""
    torch.manual_seed(0)
    model = get_model(model_name, 10)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(BATCH, 10, generator=gen, requires_grad=True)
    labels = torch.randint(0, 10, (BATCH,), generator=gen)
    params = [p for p in model.parameters()]
    ce = nn.CrossEntropyLoss()

    def fixed_reg(criterion):  # every call at reg = REG (the schedule's value does not change the work)
        criterion.reg_at = lambda k: REG
        return criterion

    in_loss = fixed_reg(fastreg.TPPLoss(model, 0.5, lw=LW))
    in_place = fixed_reg(fastreg.TPPLoss(model, 0.5, lw=LW, l2_in_loss=False))
    grad_mode = fixed_reg(fastreg.TPPLoss(model, 0.5, lw=LW, in_loss=False))
    weights, masks = in_loss._gram_weights, in_loss._gram_masks  # (the criterion's own lists)
    l2_params, l2_masks = in_loss._l2_params, in_loss._l2_masks
    pruned_rows = [(~m).nonzero().squeeze(1) for m in l2_masks]

    for p in params + [logits]:  # (the logits stand for the model: no parameter gets a gradient from it here)
        p.grad = torch.zeros_like(p)

    grads = [p.grad for p in params + [logits]]

    def zero_grads():  # optimizer.zero_grad(set_to_none=False): one multi-tensor op
        torch._foreach_zero_(grads)

    def step_in_loss():
        zero_grads()
        in_loss(logits, labels).backward()

    def step_in_place():
        zero_grads()
        in_place(logits, labels).backward()
        in_place.apply_l2_()

    def step_grad_mode():
        zero_grads()
        grad_mode(logits, labels).backward()
        grad_mode.apply_grad_()

    def step_original():
        zero_grads()
        loss = ce(logits, labels) + LW * REG * reference.gram_penalty_official(weights, masks, "decorrelate")
        loss.backward()
        with torch.no_grad():
            for p, idx in zip(l2_params, pruned_rows):
                p.grad[idx] += REG * p[idx]

    def step_ce():
        zero_grads()
        ce(logits, labels).backward()

    providers = {"TPPLoss": step_in_loss, "TPPLoss in place": step_in_place, "TPPLoss in_loss=False": step_grad_mode,
                 "original": step_original, "cross-entropy": step_ce}
    return providers, params


def grads_after(step, params) -> list[torch.Tensor]:
    step()
    return [p.grad.clone() for p in params]


def check(providers, params) -> float:
    """Max relative gradient difference of the TPP steps against the original code's."""
    expected = grads_after(providers["original"], params)
    worst = 0.0
    for name in ("TPPLoss", "TPPLoss in place", "TPPLoss in_loss=False"):
        got = grads_after(providers[name], params)
        worst = max(worst, common.max_disagreement(got, expected)[1])
    return worst


def run(smoke: bool = False) -> list[dict]:
    providers, params = make_case()
    error = check(providers, params)
    if error > 1e-4:
        raise AssertionError(f"the TPP steps disagree with the original code's gradients: {error:.2e}")
    warmup, reps = SMOKE_REPS if smoke else REPS
    medians = common.interleaved_medians(providers, warmup=warmup, reps=max(reps, 1))
    rows = []
    for name, seconds in medians.items():
        rows.append({"provider": name, "median_ms": seconds * 1e3, "vs_original": medians["original"] / seconds,
                     "ops": common.count_aten_ops(providers[name])})
    print(f"### TPP criterion step, resnet56 (ratio 0.5, lw {LW:g}, reg {REG:g}, batch {BATCH}), "
          f"gradients agree to {error:.1e}\n")
    print(f"Machine: {common.machine_description()}  \nCommand: `python benchmarks/bench_tpp_loss.py`\n")
    print(common.markdown_table(rows, [("provider", "provider", ""), ("median ms", "median_ms", ".2f"),
                                       ("× original", "vs_original", ".2f"), ("ops/step", "ops", "d")]))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    run(smoke="--smoke" in argv or common.smoke_mode())
    return 0


if __name__ == "__main__":
    sys.exit(report.main_with_readme("bench_tpp_loss", main))
