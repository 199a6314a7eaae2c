"""Benchmark: Torch-Pruning's ``pruner.regularize(model)`` against fastreg's drop-in of the same class.

For ResNet-50 (torchvision, traced at 1×3×32×32) and CIFAR ResNet-56 (``fastreg.models``), classifier
ignored, ``GroupMagnitudeImportance(p=2)``, every parameter's ``.grad`` populated as after backward:

  GroupNorm        ``tp.pruner.GroupNormPruner``       vs ``fastreg.torch_pruning.GroupNormPruner``
  GrowingReg       ``tp.pruner.GrowingRegPruner``      vs ``fastreg.torch_pruning.GrowingRegPruner``
                   (after one ``update_reg()``: per-channel coefficients; fastreg in
                   ``torch_pruning_compat=True`` mode, the same work as TP's, whose BN term is lost)
  BNScale          ``tp.pruner.BNScalePruner``         (sign(γ)) vs fastreg's
  BNScale lasso    ``BNScalePruner(group_lasso=True)`` vs fastreg's

Beside them, in the same run, two peers over the parameters whose gradients the call changes:

* floor: the bytes the call must move, in one contiguous tensor, by the fastest plain ops —
  ``w.sum()`` where the pruner reads the weights for its importance (GroupNorm, BNScale lasso), then
  ``g.add_(w)``. A call that reads the weights and updates their gradients moves no fewer bytes, so
  fastreg ÷ floor is its distance from the memory roofline and TP ÷ floor about the largest speed-up
  any implementation reaches on this machine;
* foreach_add_: one ATen op over the same separate tensors, ``torch._foreach_add_(grads, weights)``:
  the cost of reaching that many tensors (their metadata and ``.grad``) once.

Per row, the median time of one ``regularize()`` call in two settings, each in interleaved rounds (7
rounds, 101 where Torch-Pruning's call takes under 20 ms): Torch-Pruning and fastreg in one set of
rounds (the speed-up), then fastreg and the two peers in another (fastreg ÷ floor; TP ÷ floor takes
Torch-Pruning's time from the first) — a peer's call between them would change the cache state each
meets, and calls of tens of µs measure it:

* back to back: the calls repeated on fixed gradients;
* after backward: where a training loop makes it, right after the model's ``loss.backward()``
  (gradients set to None, forward and backward of a 2×3×32×32 batch, untimed; each provider on its
  own copy of the model). On a 2-vCPU VM the first ops after a backward pay a fixed delay (tens of
  µs even for ``torch.zeros(1)``), which dominates calls of a few µs.

Then the ratios and the ATen ops one call dispatches. Before timing, the two calls are checked to
add the same gradients.

    python benchmarks/bench_torch_pruning.py              # markdown table for the README
    python benchmarks/bench_torch_pruning.py --smoke      # seconds: every code path, a small model
"""
from __future__ import annotations

import copy
import importlib.metadata
import os
import sys

import torch
import torch_pruning as tp
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import report  # noqa: E402

from fastreg import torch_pruning as ftp  # noqa: E402
from fastreg.models import get_model  # noqa: E402

REPS = (1, 7)
SHORT_REPS = (5, 101)  # (warm-up, rounds) where Torch-Pruning's call takes under SHORT_MS: a stable median
SHORT_MS = 20.0
SMOKE_REPS = (0, 1)
PRUNERS = {
    "GroupNorm": (tp.pruner.GroupNormPruner, ftp.GroupNormPruner, dict(reg=1e-4)),
    "GrowingReg": (tp.pruner.GrowingRegPruner, ftp.GrowingRegPruner, dict(reg=1e-4, delta_reg=1e-4)),
    "BNScale": (tp.pruner.BNScalePruner, ftp.BNScalePruner, dict(reg=1e-5)),
    "BNScale lasso": (tp.pruner.BNScalePruner, ftp.BNScalePruner, dict(reg=1e-5, group_lasso=True)),
}
MODELS = {
    "ResNet-50": lambda: torchvision.models.resnet50(num_classes=1000),
    "ResNet-56": lambda: get_model("resnet56", 10),
    "ResNet-20": lambda: get_model("resnet20", 10),  # (smoke runs)
}


def make_pair(model_name: str, pruner: str):
    """(TP's call, fastreg's call, the two models) on copies of one model with the same ``.grad``s."""
    torch.manual_seed(0)
    model = MODELS[model_name]()
    x = torch.randn(1, 3, 32, 32)
    tp_cls, ours_cls, kwargs = PRUNERS[pruner]
    if pruner == "GrowingReg":
        ours_cls = lambda *a, **k: ftp.GrowingRegPruner(*a, torch_pruning_compat=True, **k)  # noqa: E731
    calls, models = [], []
    for cls in (tp_cls, ours_cls):
        m = copy.deepcopy(model)
        ignored = [l for l in m.modules() if isinstance(l, nn.Linear)]
        p = cls(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                ignored_layers=ignored, **kwargs)
        if pruner == "GrowingReg":
            p.update_reg()
        gen = torch.Generator().manual_seed(1)
        for param in m.parameters():
            param.grad = torch.randn(param.shape, generator=gen)
        calls.append(lambda p=p, m=m: p.regularize(m))
        models.append(m)
    return calls, models


IMPORTANCE_READ = {"GroupNorm", "BNScale lasso"}  # pruners whose call reads the weights before updating


def floor_call(pruner: str, weights: list[torch.Tensor]):
    """The memory floor of a call that updates the gradients of ``weights``: the same bytes in one
    contiguous tensor, read by ``sum()`` where the pruner computes an importance, then ``g.add_(w)``."""
    w = torch.cat([t.detach().flatten() for t in weights])
    g = torch.cat([t.grad.flatten() for t in weights])
    reads = pruner in IMPORTANCE_READ

    def call():
        if reads:
            w.sum()
        g.add_(w, alpha=1e-12)

    return call


def foreach_call(weights: list[torch.Tensor]):
    """One ATen op over the same separate tensors: ``torch._foreach_add_`` of the weights into their
    ``.grad`` (read at each call, as after a backward that makes new ones)."""
    return lambda: torch._foreach_add_([t.grad for t in weights], weights, alpha=1e-12)


def check_agreement(calls, models) -> tuple[float, list[torch.Tensor]]:
    """One call of each from the same gradients: the largest difference of the gradients (relative), and
    the parameters of fastreg's model whose gradients its call changed."""
    before = [p.grad.clone() for p in models[0].parameters()]
    for call in calls:
        call()
    tp_grads = [p.grad for p in models[0].parameters()]
    ours = [p.grad for p in models[1].parameters()]
    changed = sum(not torch.equal(a, b) for a, b in zip(tp_grads, before))
    assert changed > 0, "Torch-Pruning's regularize() changed no gradient"
    touched = [p for p, b in zip(models[1].parameters(), before) if not torch.equal(p.grad, b)]
    return common.max_disagreement(ours, tp_grads)[1], touched


def backward_step(model: nn.Module):
    """What precedes ``regularize()`` in a training step: ``zero_grad()`` (set to None), forward, backward."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    classes = [l for l in model.modules() if isinstance(l, nn.Linear)][-1].out_features
    y = torch.randint(0, classes, (2,), generator=gen)

    model.train()

    def step():
        for p in model.parameters():
            p.grad = None
        nn.functional.cross_entropy(model(x), y).backward()

    return step


def run(smoke: bool = False, models=None) -> list[dict]:
    warmup, reps = SMOKE_REPS if smoke else REPS
    models = models or (["ResNet-20"] if smoke else ["ResNet-50", "ResNet-56"])
    rows = []
    for model_name in models:
        for pruner in PRUNERS:
            calls, pair = make_pair(model_name, pruner)
            err, touched = check_agreement(calls, pair)
            if err > 1e-5:
                raise AssertionError(f"{model_name} {pruner}: fastreg's gradients differ from TP's by {err:.2e}")
            short = not smoke and common.interleaved_medians({"tp": calls[0]}, warmup=0, reps=1)["tp"] * 1e3 < SHORT_MS
            w, r = SHORT_REPS if short else (warmup, reps)
            peer = copy.deepcopy(pair[1])  # the floors' own copy, its backward run before each of their calls
            for q, p in zip(peer.parameters(), pair[1].parameters()):
                q.grad = None if p.grad is None else p.grad.clone()
            touched_ids = {id(p) for p in touched}
            peer_touched = [q for q, p in zip(peer.parameters(), pair[1].parameters()) if id(p) in touched_ids]
            pairs = {"tp": calls[0], "fastreg": calls[1]}
            peers = {"fastreg_peer": calls[1], "floor": floor_call(pruner, peer_touched),
                     "foreach": foreach_call(peer_touched)}
            setups = {"tp": backward_step(pair[0]), "fastreg": backward_step(pair[1]), "floor": backward_step(peer)}
            setups.update(fastreg_peer=setups["fastreg"], foreach=setups["floor"])
            back_to_back, after = {}, {}
            for fns in (pairs, peers):
                back_to_back.update(common.interleaved_medians(fns, warmup=w, reps=r))
                after.update(common.interleaved_medians(fns, warmup=w, reps=r, setup={k: setups[k] for k in fns}))
            ops = [common.count_aten_ops(c) for c in calls]
            rows.append(dict(model=model_name, pruner=pruner, tp_ops=ops[0], fastreg_ops=ops[1], max_rel_diff=err,
                             tensors=len(touched), mb=sum(p.numel() * p.element_size() for p in touched) / 1e6,
                             **{f"{k}_ms": v * 1e3 for k, v in back_to_back.items()},
                             **{f"{k}_bw_ms": v * 1e3 for k, v in after.items()},
                             speedup=back_to_back["tp"] / back_to_back["fastreg"], speedup_bw=after["tp"] / after["fastreg"]))
    print(f"CPU: {common.cpu_model()}, torch {torch.__version__}, torch-pruning {importlib.metadata.version('torch-pruning')}, threads {torch.get_num_threads()}")
    for title, sfx in (("Calls back to back", ""), ("Each call right after its model's loss.backward()", "_bw")):
        print(f"\n{title}:\n")
        print("| model | pruner | weights | TP ms | fastreg ms | speed-up | floor ms | foreach_add_ ms | fastreg ÷ floor | TP ÷ floor |"
              + (" ATen ops TP / fastreg |" if not sfx else ""))
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if not sfx else ""))
        for r in rows:
            t, f, fp, fl, fe = (r[f"{k}{sfx}_ms"] for k in ("tp", "fastreg", "fastreg_peer", "floor", "foreach"))
            print(f"| {r['model']} | {r['pruner']} | {r['tensors']} tensors, {r['mb']:.1f} MB | {t:.1f} | {f:.3f} | "
                  f"{r['speedup' + sfx]:.0f}× | {fl:.3f} | {fe:.3f} | {fp / fl:.1f} | {t / fl:.0f} |"
                  + (f" {r['tp_ops']} / {r['fastreg_ops']} |" if not sfx else ""))
    return rows


if __name__ == "__main__":
    sys.exit(report.main_with_readme("bench_torch_pruning", lambda argv: run(smoke="--smoke" in argv)))
