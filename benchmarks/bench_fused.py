"""Benchmark: the fused per-step ops over every layer (issue 3, ../shared/BENCHMARKING.md).

Cases (L1-ranked keep masks, pruning ratio 0.5, float32, CPU):
  l2_grad_ resnet56 / resnet50   GReg / TPP Eq. 5 on every conv weight and its BN γ and β (the conv's
                                 mask), ``p.grad[pruned] += reg · p[pruned]``. Providers:
      fastreg[<b>]   fastreg.PrunedSlices(...).l2_grad_(reg): one call, plan built once
      loop           the per-layer eager loop of the original TPP/GReg code (``_apply_reg``):
                     ``grad[idx] += reg * w[idx]`` per tensor, pruned indices precomputed
      foreach        torch._foreach_addcmul_(grads, params, dense 0/1 pruned masks, value=reg)
  l2_grad_ resnet50 vs torch-pruning
                                 the same work as Torch-Pruning's GrowingRegPruner.regularize on
                                 torchvision ResNet-50: L2 on every channel of every coupled group (conv
                                 output rows, BN γ, next convs' input columns), as one fastreg call
  group_norms resnet56 / resnet50
      fastreg[<b>]   fastreg.group_norms(weights): ‖row‖₂ of every conv filter, one call, one tensor per layer
      fastreg[<b>] flat   the same with flat=True: one tensor of all the norms (for comparison)
      fastreg[<b>] plan   fastreg.SliceNorms(weights), built once, called every time: the same per-layer
                     outputs refilled in place (as the l2_grad_ case uses its PrunedSlices plan)
      loop           torch.linalg.vector_norm per layer
      torch.sum      torch.sum over as many bytes, in a buffer of its own: the read bandwidth at this data
                     size, same run (the weights themselves may sit warmer in cache than that buffer)
Per provider: median time, ratio to the best peer, ATen ops dispatched per call (a TorchDispatchMode
count: on a GPU each is a launch), and for group_norms the achieved GB/s and its fraction of the
torch.sum bandwidth. Every provider's result is checked against fastreg.reference first.

    pytest benchmarks/bench_fused.py                 # pytest-benchmark groups + markdown summary
    python benchmarks/bench_fused.py                 # interleaved timing, markdown table + targets
    FASTREG_BENCH_SMOKE=1 pytest benchmarks/bench_fused.py   # seconds: every code path, tiny counts
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from fastreg import fused, reference  # noqa: E402

RATIO = 0.5
REG = 1e-4
# (warmup, reps) per case; the torch-pruning case is slow (≈ 0.6 s per call here).
REPS = {"resnet56": (5, 200), "resnet50": (1, 7), "tp": (1, 3)}
SMOKE_REPS = (0, 1)
CASES = ("l2_grad_/resnet56", "l2_grad_/resnet50", "l2_grad_/resnet50-tp", "group_norms/resnet56", "group_norms/resnet50")
SMOKE_CASES = ("l2_grad_/resnet56", "group_norms/resnet56")
# Issue 3 targets: (case, provider, quantity, op, bound).
TARGETS = (
    ("l2_grad_/resnet56", "loop", "speedup", ">=", 5.0),
    ("l2_grad_/resnet50", "loop", "speedup", ">=", 1.5),
    ("l2_grad_/resnet50-tp", "torch-pruning", "speedup", ">=", 20.0),
    ("group_norms/resnet56", "loop", "speedup", ">=", 5.0),
    ("group_norms/resnet50", "torch.sum", "bandwidth", ">=", 0.8),
)


# group_norms(..., flat=True): the concatenated norms as one tensor (reported, not judged: the targets
# are for one tensor per layer); SliceNorms: the plan form, one tensor per layer made once and refilled.
FLAT = " flat"
PLAN = " plan"


def fastreg_providers(op: str) -> list[str]:
    """fastreg backends worth timing here: not the Triton interpreter (a correctness path on CPU)."""
    return [f"fastreg[{b}]" for b in common.fastreg_backends(op, "cpu") if not common.provider_note(b, "cpu")]


@dataclass
class Case:
    label: str
    op: str
    providers: dict[str, Callable[[], object]]
    check: Callable[[str], float] = lambda name: 0.0  # max relative error vs the reference
    bytes_read: int = 0
    notes: dict[str, str] = field(default_factory=dict)
    reps: tuple[int, int] = (1, 5)


def _with_grads(tensors: list[Tensor]) -> list[Tensor]:
    for t in tensors:
        t.requires_grad_()
        t.grad = torch.randn_like(t)
    return tensors


def _relative_error(got: list[Tensor], expected: list[Tensor]) -> float:
    with torch.no_grad():
        scale = max(float(e.abs().max()) for e in expected)
        return max(float((g - e).abs().max()) for g, e in zip(got, expected)) / scale


def _model_weights(model: str) -> list[Tensor]:
    return common.resnet56_conv_weights() if model == "resnet56" else common.resnet50_conv_weights()


# ---------------------------------------------------------------------------------------------
# l2_grad_ with BN terms: fastreg vs the per-layer loop vs foreach
# ---------------------------------------------------------------------------------------------
def conv_bn_params(weights: list[Tensor], gammas: list[Tensor], betas: list[Tensor]):
    """GReg / TPP per-step work: every conv weight and its BN γ, β, each with the conv's L1 keep mask."""
    conv_masks = common.l1_masks(weights, RATIO)
    params, masks = [], []
    for w, gamma, beta, keep in zip(weights, gammas, betas, conv_masks):
        params += [w, gamma, beta]
        masks += [keep, keep, keep]
    return params, masks


def l2_check(providers: dict, params: list[Tensor], masks: list[Tensor]) -> Callable[[str], float]:
    """Relative error of one call of a provider against reference.l2_grad_ (gradients restored after)."""

    def check(name: str) -> float:
        saved = [p.grad.clone() for p in params]
        expected = [p.detach().clone().requires_grad_() for p in params]
        for e, g in zip(expected, saved):
            e.grad = g.clone()
        reference.l2_grad_(expected, masks, REG)
        providers[name]()
        steps = [p.grad - s for p, s in zip(params, saved)]
        for p, s in zip(params, saved):
            p.grad.copy_(s)
        return _relative_error(steps, [e.grad - s for e, s in zip(expected, saved)])

    return check


def l2_case(model: str) -> Case:
    weights = _model_weights(model)
    bn = [_with_grads([torch.rand(w.shape[0]), torch.randn(w.shape[0]) * 0.1]) for w in weights]
    params, masks = conv_bn_params(_with_grads(weights), [g for g, _ in bn], [b for _, b in bn])
    grads = [p.grad for p in params]
    data = [p.detach() for p in params]
    pruned_idx = [(~m).nonzero().flatten() for m in masks]
    dense_pruned = [(~m).reshape((-1,) + (1,) * (p.dim() - 1)).expand_as(p).to(p.dtype).contiguous() for p, m in zip(params, masks)]

    def loop():  # the original _apply_reg: one masked update per tensor
        for g, w, idx in zip(grads, data, pruned_idx):
            g[idx] += REG * w[idx]

    def foreach():
        torch._foreach_addcmul_(grads, data, dense_pruned, value=REG)

    providers = {}
    for name in fastreg_providers("l2_grad_"):
        slices = fused.PrunedSlices(params, masks, backend=name[8:-1])
        providers[name] = functools.partial(slices.l2_grad_, REG)
    providers.update(loop=loop, foreach=foreach)
    n_pruned = sum(int((~m).sum()) for m in masks[::3])
    return Case(f"l2_grad_ + BN γ/β: {model} ({len(weights)} convs, {n_pruned} pruned filters)", "l2_grad_", providers,
                l2_check(providers, params, masks), reps=REPS[model])


# ---------------------------------------------------------------------------------------------
# l2_grad_ on ResNet-50: the work of Torch-Pruning's GrowingRegPruner.regularize
# ---------------------------------------------------------------------------------------------
def tp_case() -> Case:
    import torch_pruning as tp
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    pruner = tp.pruner.GrowingRegPruner(
        model, torch.randn(1, 3, 224, 224), importance=tp.importance.GroupMagnitudeImportance(p=2),
        reg=REG, pruning_ratio=RATIO, ignored_layers=[model.fc],
    )
    _with_grads([p for p in model.parameters()])
    # Every (tensor, dim, channels) that regularize touches: conv/linear output rows, BN γ (bias=False,
    # its default), conv/linear input columns — every channel of every group.
    params, dims, masks = [], [], []
    for group in pruner._groups:
        for dep, idxs in group:
            layer, fn = dep.layer, dep.pruning_fn
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.affine:
                entry = (layer.weight, 0)
            elif fn in (tp.prune_conv_out_channels, tp.prune_linear_out_channels) and layer is not model.fc:
                entry = (layer.weight, 0)
            elif fn in (tp.prune_conv_in_channels, tp.prune_linear_in_channels):
                entry = (layer.weight, 1)
            else:
                continue
            keep = torch.ones(entry[0].shape[entry[1]], dtype=torch.bool)
            keep[torch.as_tensor(list(idxs), dtype=torch.long)] = False
            params.append(entry[0])
            dims.append(entry[1])
            masks.append(keep)
    # The task GReg needs (the "same work"): conv rows and BN γ, β of the pruned channels only.
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]  # each follows its conv
    pruned_params, pruned_masks = conv_bn_params([c.weight for c in convs], [b.weight for b in bns], [b.bias for b in bns])
    providers = {}
    for name in fastreg_providers("l2_grad_"):
        slices = fused.PrunedSlices(params, masks, dims, backend=name[8:-1])
        providers[name + " every channel"] = functools.partial(slices.l2_grad_, REG)
        pruned_slices = fused.PrunedSlices(pruned_params, pruned_masks, backend=name[8:-1])
        providers[name + " pruned channels"] = functools.partial(pruned_slices.l2_grad_, REG)
    providers["torch-pruning"] = functools.partial(pruner.regularize, model)
    check_pruned = l2_check(providers, pruned_params, pruned_masks)

    def check(name: str) -> float:
        if name == "torch-pruning":
            return 0.0
        if name.endswith("pruned channels"):
            return check_pruned(name)
        weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        saved = [w.grad.clone() for w in weights]
        providers["torch-pruning"]()
        tp_steps = [w.grad - s for w, s in zip(weights, saved)]
        for w, s in zip(weights, saved):
            w.grad.copy_(s)
        providers[name]()
        ours = [w.grad - s for w, s in zip(weights, saved)]
        for w, s in zip(weights, saved):
            w.grad.copy_(s)
        return _relative_error(ours, tp_steps)  # conv/linear weights: the same update as torch-pruning

    notes = {}
    for name in providers:
        if name.endswith("every channel"):
            notes[name] = (f"torch-pruning's element work: {len(params)} (tensor, dim) slicings, every channel, rows and "
                           "input columns; + BN γ, which torch-pruning drops (grad.data[idxs].add_ updates a copy)")
        elif name.endswith("pruned channels"):
            notes[name] = f"GReg's task: conv rows + BN γ, β of the pruned channels, ratio {RATIO}"
    return Case("l2_grad_: torchvision resnet50 vs Torch-Pruning GrowingRegPruner.regularize", "l2_grad_", providers,
                check, notes=notes, reps=REPS["tp"])


# ---------------------------------------------------------------------------------------------
# group_norms: fastreg vs the per-layer loop vs the machine's read bandwidth
# ---------------------------------------------------------------------------------------------
def norms_case(model: str) -> Case:
    weights = _model_weights(model)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    flat = torch.randn(nbytes // 4)  # as many bytes, in one separate buffer: the read bandwidth at this size

    def loop():
        return [torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1) for w in weights]

    providers = {}
    for name in fastreg_providers("group_norms"):
        providers[name] = functools.partial(fused.group_norms, weights, backend=name[8:-1])
        providers[name + FLAT] = functools.partial(fused.group_norms, weights, flat=True, backend=name[8:-1])
        providers[name + PLAN] = fused.SliceNorms(weights, backend=name[8:-1])
    providers.update(loop=loop, **{"torch.sum": flat.sum})
    expected = reference.group_norms(weights)

    def check(name: str) -> float:
        if name == "torch.sum":
            return 0.0
        got = providers[name]()
        return _relative_error([got] if name.endswith(FLAT) else got, [torch.cat(expected)] if name.endswith(FLAT) else expected)

    case = Case(f"group_norms p=2 dim=0: {model} ({len(weights)} convs, {nbytes / 1e6:.1f} MB)", "group_norms", providers,
                check, bytes_read=nbytes, reps=REPS[model])
    case.notes["torch.sum"] = "read bandwidth: torch.sum over the same bytes"
    for name in providers:
        if name.endswith(FLAT):
            case.notes[name] = "flat=True: one tensor of every norm, no per-layer tensor objects"
        elif name.endswith(PLAN):
            case.notes[name] = "fastreg.SliceNorms(weights)(): the per-layer outputs made once, refilled every call"
    case.flat_bytes = flat.numel() * 4
    return case


@functools.lru_cache(maxsize=None)
def get_case(case_id: str) -> Case:
    op, model = case_id.split("/")
    if model == "resnet50-tp":
        return tp_case()
    return l2_case(model) if op == "l2_grad_" else norms_case(model)


def provider_bytes(case: Case, provider: str) -> int:
    return getattr(case, "flat_bytes", 0) if provider == "torch.sum" else case.bytes_read


def row(case: Case, provider: str, seconds: float | None) -> dict:
    r = {"provider": provider, "median_s": seconds, "median_ms": seconds * 1e3 if seconds else None,
         "aten_ops": common.count_aten_ops(case.providers[provider]), "note": case.notes.get(provider, "")}
    nbytes = provider_bytes(case, provider)
    if nbytes and seconds:
        r["gbps"] = nbytes / seconds / 1e9
        r["note"] = (r["note"] + f" {r['gbps']:.1f} GB/s").strip()
    return r


def add_bandwidth_fraction(rows: list[dict]) -> None:
    """``roofline`` = achieved GB/s ÷ torch.sum's GB/s in the same run (group_norms cases)."""
    bw = next((r.get("gbps") for r in rows if r["provider"] == "torch.sum"), None)
    for r in rows:
        if bw and r.get("gbps"):
            r["roofline"] = r["gbps"] / bw


# ---------------------------------------------------------------------------------------------
# pytest-benchmark mode
# ---------------------------------------------------------------------------------------------
def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ != "test_fused":
        return
    smoke = metafunc.config.getoption("bench_smoke") or common.smoke_mode()
    params = []
    for case_id in SMOKE_CASES if smoke else CASES:
        op = case_id.split("/")[0]
        peers = {"l2_grad_/resnet50-tp": ["torch-pruning"], "group_norms/resnet56": ["loop", "torch.sum"],
                 "group_norms/resnet50": ["loop", "torch.sum"]}.get(case_id, ["loop", "foreach"])
        ours = fastreg_providers(op)
        if op == "group_norms":
            ours = [p + suffix for p in ours for suffix in ("", FLAT, PLAN)]
        if case_id.endswith("-tp"):
            ours = [f"{p} {what}" for p in ours for what in ("every channel", "pruned channels")]
        params += [(case_id, p) for p in ours + peers]
    metafunc.parametrize("case_id,provider", params)


_ROWS: dict[str, list[dict]] = {}


def test_fused(benchmark, bench_settings, bench_record, case_id, provider):
    case = get_case(case_id)
    err = case.check(provider)
    assert err <= 1e-5, f"{provider} disagrees with the reference on {case_id}: relative error {err:.2e}"
    warmup, reps = SMOKE_REPS if bench_settings["smoke"] else case.reps
    benchmark.group = case.label
    benchmark.pedantic(case.providers[provider], rounds=max(reps, 1), warmup_rounds=warmup, iterations=1)
    r = row(case, provider, benchmark.stats.stats.median if benchmark.stats else None)
    rows = _ROWS.setdefault(case.label, [])
    rows.append(r)
    add_bandwidth_fraction(rows)
    benchmark.extra_info.update({k: v for k, v in r.items() if isinstance(v, (int, float, str)) and v is not None})
    bench_record(case.label, r)


# ---------------------------------------------------------------------------------------------
# Script mode: interleaved medians, one table per case, targets
# ---------------------------------------------------------------------------------------------
def run(case_ids=CASES, smoke: bool = False) -> dict[str, list[dict]]:
    results = {}
    for case_id in case_ids:
        case = get_case(case_id)
        for name in case.providers:
            err = case.check(name)
            assert err <= 1e-5, f"{name} disagrees with the reference on {case_id}: relative error {err:.2e}"
        warmup, reps = SMOKE_REPS if smoke else case.reps
        medians = common.interleaved_medians(case.providers, warmup=warmup, reps=max(reps, 1))
        rows = [row(case, name, t) for name, t in medians.items()]
        common.add_ratios(rows)
        add_bandwidth_fraction(rows)
        results[case_id] = rows
        print(f"\n### {case.label}\n")
        print(common.markdown_table(rows, (
            ("provider", "provider", ""), ("median ms", "median_ms", ".3f"), ("× best peer", "vs_best_peer", ".2f"),
            ("ops/call", "aten_ops", "d"), ("of read bandwidth", "roofline", ".0%"), ("note", "note", ""))))
    return results


def check_targets(results: dict[str, list[dict]]) -> list[str]:
    lines = []
    for case_id, peer, what, op, bound in TARGETS:
        if case_id not in results:
            continue
        rows = {r["provider"]: r for r in results[case_id]}
        for name, r in rows.items():
            if not name.startswith("fastreg"):
                continue
            value = rows[peer]["median_s"] / r["median_s"] if what == "speedup" else r.get("roofline", float("nan"))
            if name.endswith(FLAT):  # not the form the target is for: reported, not judged
                lines.append(f"     {case_id} {name}: {what} vs {peer} = {value:.2f} (flat output, for comparison)")
                continue
            ok = value >= bound
            lines.append(f"{'MET ' if ok else 'MISS'} {case_id} {name}: {what} vs {peer} = {value:.2f} (target {op} {bound})")
        if "torch.sum" in rows and peer == "loop":  # one read of as many bytes, from a buffer of its own
            bound = rows["loop"]["median_s"] / rows["torch.sum"]["median_s"]
            lines.append(f"     {case_id}: loop ÷ torch.sum over as many bytes = {bound:.2f} (a bandwidth-bound reference)")
    fastreg_ops = {(c, r["provider"]): r["aten_ops"] for c, rows in results.items() for r in rows if r["provider"].startswith("fastreg")}
    if fastreg_ops:
        worst = max(fastreg_ops.values())
        lines.append(f"{'MET ' if worst <= 4 else 'MISS'} ATen ops per fastreg call: max {worst} over {len(fastreg_ops)} "
                     f"(case, backend) pairs (target <= 4, same for resnet56 and resnet50)")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    smoke = "--smoke" in argv or common.smoke_mode()
    print(f"Machine: {common.machine_description()}")
    results = run(SMOKE_CASES if smoke else CASES, smoke)
    print()
    for line in check_targets(results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
