"""Benchmark: forward + backward of ``fastreg.gram_penalty(target="decorrelate", reduction="mean")``
over every conv weight of a model, with L1-ranked keep masks (protocol: benchmarks/README.md).

Providers, all in one process on the same weights and masks:
  fastreg[<b>]  each fastreg backend that runs here (cpp; triton only under TRITON_INTERPRET=1 on CPU,
                which is a correctness path, not a performance one)
  reference     fastreg.reference.gram_penalty, eager (the textbook formula; = fastreg[reference])
  compile       torch.compile(reference), compiled and warmed up before timing
  official      fastreg.reference.gram_penalty_official: the original TPP loop (rows zeroed one index
                at a time, mse_loss)
Per provider: median time of a step, ratio to the best peer and to ``compile``, ops dispatched per step,
achieved GFLOP/s of the min-flop work (DESIGN.md §1.1) and its fraction of the GEMM peak measured in
the same run (the roofline; in script mode a large torch.mm is timed in the same rounds as the providers). Every provider's loss and gradients are checked against ``reference``
before it is timed.

    pytest benchmarks/bench_gram_penalty.py              # pytest-benchmark, one group per model/ratio
    pytest benchmarks/bench_gram_penalty.py --bench-slow # + ratios 0.3 and 0.9, + VGG-19
    python benchmarks/bench_gram_penalty.py --table      # interleaved timing, markdown for the README
    python benchmarks/bench_gram_penalty.py --smoke      # seconds: every code path with tiny counts
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Callable, Sequence

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import report  # noqa: E402

from fastreg import _registry, fused, reference  # noqa: E402
from fastreg.gram import gram_penalty  # noqa: E402

DEFAULT_MODELS = ("resnet56", "resnet50")
SLOW_MODELS = ("resnet56", "resnet50", "vgg19")
DEFAULT_RATIOS = (0.5,)
SLOW_RATIOS = (0.3, 0.5, 0.9)
PEERS = ("reference", "compile", "official")
# Timed steps (warmup, reps) per model: ResNet-50 and VGG-19 steps take seconds on 2 cores.
REPS = {"resnet56": (2, 60), "resnet50": (1, 3), "vgg19": (1, 3)}
SMOKE_REPS = (0, 1)
# Loss and gradients must match the float32 reference within this fraction of the largest entry.
AGREE_RTOL = 1e-3
# Layers of the small prefix used to show that op counts do not grow with the layer count.
FEW_LAYERS = 5

# Targets for the cpp backend: (model, ratio, what, minimum or maximum).
TARGETS = (
    ("resnet50", 0.5, "vs_compile", ">=", 2.5),
    ("resnet50", 0.5, "roofline", ">=", 0.60),
    ("resnet56", 0.5, "vs_compile", ">=", 5.0),
    ("resnet56", 0.5, "aten_ops", "<=", 8),
)


def provider_names(device: torch.device | str = "cpu", include_compile: bool = True) -> list[str]:
    names = [f"fastreg[{b}]" for b in common.fastreg_backends("gram_penalty", device)]
    return names + [p for p in PEERS if include_compile or p != "compile"]


def _reference_loss(weights: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
    return reference.gram_penalty(weights, masks, "decorrelate", "mean")


class Case:
    """One model's conv weights (leaf tensors) and L1 masks at one ratio, and each provider's step."""

    def __init__(self, model: str, ratio: float, layers: int | None = None):
        self.model, self.ratio = model, ratio
        self.weights = common.model_conv_weights(model)[:layers]
        self.masks = common.l1_masks(self.weights, ratio)
        self.min_flops = common.decorrelate_min_flops(self.weights, self.masks)
        self.nside_flops = common.decorrelate_nside_flops(self.weights, self.masks)
        self.textbook_flops = common.textbook_flops(self.weights)
        self._compiled: Callable | None = None
        self.compile_s: float | None = None
        self.inductor_kernels: int | None = None
        self._expected: tuple[Tensor, tuple[Tensor, ...]] | None = None
        self._errors: dict[str, tuple[float, float]] = {}

    @property
    def label(self) -> str:
        return f"{self.model} ({len(self.weights)} convs), ratio {self.ratio}"

    def compiled_loss(self) -> Callable:
        """torch.compile(reference) for these shapes (see :func:`compiled_reference`)."""
        if self._compiled is None:
            self._compiled, self.inductor_kernels, self.compile_s = compiled_reference(self.model, self.weights, self.masks)
        return self._compiled

    def loss_fn(self, provider: str) -> Callable[[], Tensor]:
        w, m = self.weights, self.masks
        if provider.startswith("fastreg["):
            backend = provider[len("fastreg[") : -1]
            return lambda: gram_penalty(w, m, target="decorrelate", reduction="mean", backend=backend)
        if provider == "reference":
            return lambda: _reference_loss(w, m)
        if provider == "compile":
            compiled = self.compiled_loss()
            return lambda: compiled(w, m)
        if provider == "official":
            return lambda: reference.gram_penalty_official(w, m)
        raise ValueError(f"provider must be fastreg[<backend>] or one of {PEERS}, got {provider!r}")

    def step(self, provider: str) -> Callable[[], tuple[Tensor, tuple[Tensor, ...]]]:
        """One forward+backward: (loss, ∂loss/∂w for every weight), without touching ``.grad``."""
        loss_fn = self.loss_fn(provider)
        return lambda: common.loss_and_grads(loss_fn, self.weights)

    def disagreement(self, provider: str) -> tuple[float, float]:
        """(relative error of the loss, of the gradients) against the float32 reference; computed once."""
        if provider not in self._errors:
            if self._expected is None:
                self._expected = self.step("reference")()
            loss, grads = self.step(provider)()
            exp_loss, exp_grads = self._expected
            self._errors[provider] = (
                common.max_disagreement([loss.detach()], [exp_loss.detach()])[1],
                common.max_disagreement(grads, exp_grads)[1],
            )
        return self._errors[provider]

    def row(self, provider: str, median_s: float | None, peak_flops: float | None) -> dict:
        """Everything reported for one provider except ratios (see common.add_ratios)."""
        step = self.step(provider)
        value_err, grad_err = self.disagreement(provider)
        r = dict(
            provider=provider,
            median_s=median_s,
            median_ms=1e3 * median_s if median_s else None,
            aten_ops=common.count_aten_ops(step),
            value_rel_err=value_err,
            grad_rel_err=grad_err,
            agrees=max(value_err, grad_err) <= AGREE_RTOL,
            note=common.provider_note(provider[len("fastreg[") : -1]) if provider.startswith("fastreg[") else "",
        )
        if provider == "compile":
            r["inductor_kernels"] = self.inductor_kernels
            r["compile_s"] = self.compile_s
            r["note"] = f"+{self.inductor_kernels} Inductor kernels/step; compile+first step {self.compile_s:.1f} s"
        if median_s:
            r["gflops"] = self.min_flops / median_s / 1e9
            if peak_flops:
                r["roofline"] = self.min_flops / peak_flops / median_s
        return r


_COMPILED: dict[tuple, tuple[Callable, int, float]] = {}


def compiled_reference(model: str, weights: Sequence[Tensor], masks: Sequence[Tensor]) -> tuple[Callable, int, float]:
    """(torch.compile(reference), Inductor kernels it generated — each runs once per step —, seconds of
    its compile + first step), compiled once per model and layer shapes: other ratios reuse the graph
    (dynamo guards on shapes, not mask values)."""
    key = (model, tuple(tuple(w.shape) for w in weights))
    if key not in _COMPILED:
        from torch._inductor import metrics

        # one graph per (model, layers): more than dynamo's default 8 in a --slow run
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        fn = torch.compile(_reference_loss, dynamic=False)
        kernels_before = metrics.generated_kernel_count
        start = time.perf_counter()
        torch.autograd.grad(fn(weights, masks), weights)
        _COMPILED[key] = (fn, metrics.generated_kernel_count - kernels_before, time.perf_counter() - start)
    return _COMPILED[key]


@functools.lru_cache(maxsize=None)
def get_case(model: str, ratio: float, layers: int | None = None) -> Case:
    return Case(model, ratio, layers)


GEMM = "GEMM peak"


def measure(case: Case, providers: Sequence[str], warmup: int, reps: int, gemm_n: int = 2048) -> tuple[list[dict], float]:
    """Check every provider against the reference, then time those that run in rounds together with
    a large ``torch.mm`` (so the GEMM peak sees the same machine load). Returns one row per provider,
    ratios included, and the GEMM peak in flop/s. A provider that raises gets a row saying so."""
    steps, failed = {}, {}
    for p in providers:
        try:
            steps[p] = case.step(p)  # compiles 'compile' here, outside the timing
            case.disagreement(p)
        except Exception as e:  # noqa: BLE001 - report any provider failure, keep measuring the rest
            steps.pop(p, None)
            failed[p] = f"ERROR {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
    gemm, gemm_flops = common.gemm_peak_step(gemm_n)
    medians = common.interleaved_medians({**steps, GEMM: gemm}, warmup=max(warmup, 1), reps=reps)
    peak = gemm_flops / medians.pop(GEMM)
    rows = [
        case.row(p, medians[p], peak) if p in steps else dict(provider=p, agrees=False, note=failed[p])
        for p in providers
    ]
    common.add_ratios(rows)
    return rows, peak


FLOOR = "autograd floor"


def floor_loss(weights: Sequence[Tensor]) -> Callable[[], Tensor]:
    """A loss of ``weights`` whose backward returns precomputed gradients: no arithmetic, only what
    autograd itself costs for one node over these leaves (the engine and the Function's Python call).
    Every differentiable implementation pays at least this per step."""
    grads = tuple(torch.randn_like(w) for w in weights)

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *ws):
            return ws[0].new_zeros(())

        @staticmethod
        def backward(ctx, g):
            return grads

    return lambda: Floor.apply(*weights)


READ, WRITE = "read the weights", "write as many bytes"


def step_split(case: Case, providers: Sequence[str], reps: int, gemm_n: int = 2048) -> list[dict]:
    """Where a step's time goes, per provider: the forward (the loss), ``torch.autograd.grad`` over every
    weight (the backward, plus the engine's and Python's fixed cost of 55 inputs and outputs), and
    freeing the step's results. Medians over rounds interleaved as in :func:`measure` (the GEMM
    included, so caches are as cold), with the :func:`floor_loss` of the same weights as a last row,
    and the memory traffic every step has, in the same rounds: reading every weight once
    (``fastreg.group_norms(flat=True)``) and writing as many bytes to a fresh buffer (the gradients)."""
    gemm, _ = common.gemm_peak_step(gemm_n)
    providers = list(providers) + [FLOOR]
    parts: dict[str, list[tuple[float, float, float]]] = {p: [] for p in providers}
    floor = floor_loss(case.weights)
    numel, dtype = sum(w.numel() for w in case.weights), case.weights[0].dtype
    # (fused.group_norms(flat=True) reads 55 tensors at about torch.sum's bandwidth, one call; torch._foreach_norm
    # takes twice as long on our CPUs, which would overstate what reading them costs)
    memory = {READ: lambda: fused.group_norms(case.weights, flat=True),
              WRITE: lambda: torch.empty(numel, dtype=dtype).fill_(1.0)}
    memory_times: dict[str, list[float]] = {k: [] for k in memory}
    for order in common.round_orders(providers + [GEMM, READ, WRITE], reps):
        for p in order:
            if p == GEMM:
                gemm()
                continue
            if p in memory:
                t0 = time.perf_counter()
                memory[p]()
                memory_times[p].append(time.perf_counter() - t0)
                continue
            loss_fn = floor if p == FLOOR else case.loss_fn(p)
            t0 = time.perf_counter()
            loss = loss_fn()
            t1 = time.perf_counter()
            grads = torch.autograd.grad(loss, case.weights)
            t2 = time.perf_counter()
            del loss, grads
            parts[p].append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    rows = []
    for p, times in parts.items():
        fwd, bwd, free = (sorted(t[i] for t in times)[len(times) // 2] * 1e3 for i in range(3))
        rows.append(dict(provider=p, forward_ms=fwd, grad_ms=bwd, free_ms=free))
    for p, times in memory_times.items():
        rows.append(dict(provider=p, forward_ms=sorted(times)[len(times) // 2] * 1e3))
    return rows


def step_bound(split: list[dict], roofline_ms: float) -> dict[str, float]:
    """What any differentiable implementation pays per step in these rounds: the autograd floor (forward +
    autograd.grad + free), the min-flop work at 100% of the GEMM peak, and the cold memory traffic (read the
    weights, write the gradients) — in sequence, or wholly hidden under the arithmetic (a lower bound)."""
    rows = {r["provider"]: r for r in split}
    floor = sum(rows[FLOOR][k] for k in ("forward_ms", "grad_ms", "free_ms"))
    traffic = rows[READ]["forward_ms"] + rows[WRITE]["forward_ms"]
    return dict(floor=floor, traffic=traffic, roofline=roofline_ms, serial=floor + traffic + roofline_ms,
                overlapped=floor + max(traffic, roofline_ms))


def back_to_back(case: Case, providers: Sequence[str], rounds: int, burst: int = 10) -> dict[str, float]:
    """Median ms of a step when it repeats with nothing in between (caches hot: the weights, the gradient
    buffer, autograd's and Python's objects — what no training step gets), per provider and the
    :func:`floor_loss`. Each round runs every provider ``burst`` times in a row, in a shuffled order; the
    first step of a burst (after another provider) is not counted."""
    floor = floor_loss(case.weights)
    steps = {p: (lambda f=(floor if p == FLOOR else case.loss_fn(p)): common.loss_and_grads(f, case.weights))
             for p in list(providers) + [FLOOR]}
    times: dict[str, list[float]] = {p: [] for p in steps}
    for order in common.round_orders(list(steps), rounds):
        for p in order:
            for i in range(burst):
                t0 = time.perf_counter()
                steps[p]()
                if i:
                    times[p].append(time.perf_counter() - t0)
    return {p: 1e3 * sorted(t)[len(t) // 2] for p, t in times.items()}


def weighted_forms(case: Case, reps: int, coeff: float = 0.1, gemm_n: int = 2048) -> list[dict]:
    """A loss that weights the penalty (TPP: lw·reg·Σ mean(E²)), written two ways, fastreg[cpp]:
    ``coeff * gram_penalty(...)`` (the backward scales the gradients: one pass over them) and
    ``gram_penalty(..., coeff=coeff)`` (folded into the kernel). Medians of interleaved steps, the GEMM
    in every round; the unweighted step for comparison."""
    w, m = case.weights, case.masks
    forms = {
        "gram_penalty(...)": lambda: gram_penalty(w, m, backend="cpp"),
        f"{coeff} * gram_penalty(...)": lambda: coeff * gram_penalty(w, m, backend="cpp"),
        f"gram_penalty(..., coeff={coeff})": lambda: gram_penalty(w, m, coeff=coeff, backend="cpp"),
    }
    gemm, _ = common.gemm_peak_step(gemm_n)
    steps = {name: (lambda f=f: common.loss_and_grads(f, w)) for name, f in forms.items()}
    medians = common.interleaved_medians({**steps, GEMM: gemm}, warmup=2, reps=reps)
    return [dict(form=name, median_ms=1e3 * medians[name]) for name in forms]


def op_growth(
    providers: Sequence[str], model: str = "resnet56", few: int = FEW_LAYERS, many: int | None = None, known: dict | None = None
) -> list[dict]:
    """Ops per step over the first ``few`` and the first ``many`` (default: all) layers of ``model`` at
    ratio 0.5: a fused provider's count must not grow with the number of layers. ``known``: provider ->
    count over ``many`` layers already measured."""
    known = known or {}
    rows = []
    for p in providers:
        if p == "compile":  # a second compile just for this count is not worth its minute
            continue
        try:
            few_ops = common.count_aten_ops(get_case(model, 0.5, few).step(p))
            many_ops = known.get(p) or common.count_aten_ops(get_case(model, 0.5, many).step(p))
        except Exception as e:  # noqa: BLE001 - reported in the measured table already
            rows.append(dict(provider=p, note=f"ERROR {type(e).__name__}"))
            continue
        rows.append(dict(provider=p, few_layers=few_ops, many_layers=many_ops))
    return rows


def check_targets(results: dict[tuple[str, float], list[dict]]) -> list[str]:
    """The issue's targets for the cpp backend, one line each: PASS / FAIL / n/a with the figure."""
    lines = []
    for model, ratio, key, op, bound in TARGETS:
        what = {"vs_compile": "× faster than compile", "roofline": "of the min-flop roofline", "aten_ops": "ATen ops/step"}[key]
        shown_bound = f"{bound:.0%}" if key == "roofline" else f"{bound}"
        head = f"{model} ratio {ratio}: cpp {'≥' if op == '>=' else '≤'} {shown_bound} {what}"
        rows = results.get((model, ratio))
        cpp = next((r for r in rows or [] if r["provider"] == "fastreg[cpp]"), None)
        if rows is None:
            lines.append(f"- {head}: not measured in this run")
        elif cpp is None:
            why = _registry.why_unavailable("gram_penalty", "cpp", torch.device("cpu"))
            lines.append(f"- {head}: n/a, the cpp backend cannot run ({why})")
        else:
            value = cpp.get(key)
            ok = value is not None and (value >= bound if op == ">=" else value <= bound) and cpp["agrees"]
            if value is None:
                missing = cpp.get("note") or f"no {key} figure (compile not among the providers?)"
                lines.append(f"- {head}: {'FAIL' if cpp.get('note') else 'not measured'} ({missing})")
                continue
            shown = f"{value:.0%}" if key == "roofline" else f"{value:.2f}" if isinstance(value, float) else str(value)
            lines.append(f"- {head}: {'PASS' if ok else 'FAIL'} ({shown}{'' if cpp['agrees'] else ', DISAGREES with reference'})")
    return lines


TABLE_COLUMNS = (
    ("provider", "provider", ""),
    ("median ms", "median_ms", ".2f"),
    ("× best peer", "vs_best_peer", ".2f"),
    ("× compile", "vs_compile", ".2f"),
    ("ops/step", "aten_ops", "d"),
    ("GFLOP/s", "gflops", ".1f"),
    ("roofline", "roofline", ".1%"),
    ("agrees", "agrees", ""),
    ("note", "note", ""),
)


def run(argv: Sequence[str] | None = None) -> dict:
    """Script mode: measure, print markdown, and return everything measured (for tests)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="full run (the default when not --smoke)")
    parser.add_argument("--smoke", action="store_true", help="seconds: ResNet-56 only, 1 rep, no compile, small GEMM peak")
    parser.add_argument("--slow", action="store_true", help="also ratios 0.3 and 0.9 and VGG-19")
    parser.add_argument("--models", nargs="+", choices=common.MODELS)
    parser.add_argument("--ratios", nargs="+", type=float)
    parser.add_argument("--reps", type=int, help="timed steps per provider (default: per model)")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--layers", type=int, help="only the first LAYERS convs of each model (for quick checks)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(THREADS) first (default: torch's choice)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include torch.compile(reference) (default: yes, except with --smoke)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    smoke = args.smoke or common.smoke_mode()
    models = args.models or (("resnet56",) if smoke else SLOW_MODELS if args.slow else DEFAULT_MODELS)
    ratios = args.ratios or (SLOW_RATIOS if args.slow else DEFAULT_RATIOS)
    include_compile = args.compile if args.compile is not None else not smoke
    providers = provider_names("cpu", include_compile)

    start = time.perf_counter()
    gemm_n = 512 if smoke else 2048
    peak = common.gemm_peak_flops(n=gemm_n, reps=3 if smoke else 5)
    bandwidth = common.read_bandwidth(numel=1 << 20 if smoke else 1 << 25)
    command = "python benchmarks/bench_gram_penalty.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print("## gram_penalty(target='decorrelate', reduction='mean'): forward + backward, L1 masks\n")
    print(f"Machine: {common.machine_description()}  ")
    print(f"GEMM peak {peak / 1e9:.1f} GFLOP/s ({gemm_n}² float32 torch.mm, median; re-measured with every "
          f"table, interleaved with its steps), read bandwidth {bandwidth / 1e9:.1f} GB/s (torch.sum), measured in this run  ")
    print(f"Command: `{command.strip()}`{' (SMOKE: counts too small for real figures)' if smoke else ''}\n")

    results: dict[tuple[str, float], list[dict]] = {}
    peaks: dict[tuple[str, float], float] = {}
    for model in models:
        for ratio in ratios:
            case = get_case(model, ratio, args.layers)
            warmup, reps = SMOKE_REPS if smoke else REPS[model]
            warmup = args.warmup if args.warmup is not None else warmup
            reps = args.reps or reps
            rows, case_peak = measure(case, providers, warmup, reps, gemm_n)
            results[(model, ratio)], peaks[(model, ratio)] = rows, case_peak
            print(f"### {case.label}: min {case.min_flops / 1e9:.3f} GFLOP/step (N-side only "
                  f"{case.nside_flops / 1e9:.3f}, textbook {case.textbook_flops / 1e9:.3f}); GEMM peak "
                  f"{case_peak / 1e9:.1f} GFLOP/s → roofline {1e3 * case.min_flops / case_peak:.2f} ms; "
                  f"medians of {reps} interleaved steps\n")
            print(common.markdown_table(rows, TABLE_COLUMNS) + "\n")

    if ("resnet56", 0.5) in results and not smoke:
        split_providers = [p for p in providers if p in ("fastreg[cpp]", "compile")]
        split = step_split(get_case("resnet56", 0.5, args.layers), split_providers, args.reps or REPS["resnet56"][1], gemm_n)
        print("### Where a ResNet-56 step goes (ratio 0.5; medians, interleaved with the GEMM)\n")
        print(f"`{FLOOR}`: a torch.autograd.Function over the same 55 weights whose backward returns precomputed "
              "gradients (no arithmetic): the engine's own cost for one node over 55 leaves, which every "
              "differentiable implementation pays.\n")
        print(common.markdown_table(split, (("provider", "provider", ""), ("forward ms", "forward_ms", ".2f"),
                                            ("autograd.grad ms", "grad_ms", ".2f"), ("free ms", "free_ms", ".2f"))) + "\n")
        rn56 = {r["provider"]: r for r in results[("resnet56", 0.5)]}
        case56 = get_case("resnet56", 0.5, args.layers)
        b = step_bound(split, 1e3 * case56.min_flops / peaks[("resnet56", 0.5)])
        line = (f"Per step, whatever the implementation: autograd floor {b['floor']:.2f} ms + cold memory traffic "
                f"({READ} + {WRITE}) {b['traffic']:.2f} ms + min-flop work at 100% of the GEMM peak "
                f"{b['roofline']:.2f} ms = {b['serial']:.2f} ms in sequence, {b['overlapped']:.2f} ms with the traffic "
                "wholly hidden under the arithmetic")
        if "compile" in rn56 and rn56["compile"].get("median_s"):
            c = 1e3 * rn56["compile"]["median_s"]
            line += f": at most {c / b['serial']:.1f}× / {c / b['overlapped']:.1f}× compile's {c:.2f} ms"
        print(line + ".\n")
        hot = back_to_back(case56, split_providers, max(3, (args.reps or REPS["resnet56"][1]) // 6))
        line = ("Back to back (each step repeated with nothing in between, so every cache is hot — what no "
                "training step gets; medians): " + ", ".join(f"{p} {t:.2f} ms" for p, t in hot.items()))
        if "compile" in hot and "fastreg[cpp]" in hot:
            line += f"; cpp is {hot['compile'] / hot['fastreg[cpp]']:.2f}× faster than compile"
        print(line + ".\n")

        if "fastreg[cpp]" in providers:
            forms = weighted_forms(get_case("resnet56", 0.5, args.layers), 4 * (args.reps or REPS["resnet56"][1]), gemm_n=gemm_n)
            print("### A weighted penalty on ResNet-56, fastreg[cpp] (ratio 0.5; medians, interleaved with the GEMM)\n")
            print(common.markdown_table(forms, (("loss", "form", ""), ("median ms", "median_ms", ".2f"))) + "\n")

    measured = results.get(("resnet56", 0.5), [])
    growth = op_growth(providers, many=args.layers, known={r["provider"]: r.get("aten_ops") for r in measured})
    many = len(get_case("resnet56", 0.5, args.layers).weights)
    print(f"### Ops dispatched per forward+backward: first {FEW_LAYERS} vs {many} ResNet-56 convs (ratio 0.5)\n")
    print(common.markdown_table(growth, (("provider", "provider", ""), (f"{FEW_LAYERS} layers", "few_layers", "d"),
                                         (f"{many} layers", "many_layers", "d"), ("note", "note", ""))) + "\n")
    targets = check_targets(results)
    print("### Targets (cpp backend)\n")
    print("\n".join(targets))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return dict(results=results, growth=growth, targets=targets, peak_flops=peak, bandwidth=bandwidth, providers=providers)


def main(argv: Sequence[str] | None = None) -> int:
    out = run(argv)
    disagree = [r["provider"] for rows in out["results"].values() for r in rows if not r["agrees"]]
    if disagree:
        print(f"DISAGREES with reference: {sorted(set(disagree))}", file=sys.stderr)
    return 1 if disagree else 0


# ---------------------------------------------------------------------------------------------
# pytest-benchmark mode
# ---------------------------------------------------------------------------------------------
def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ != "test_gram_penalty":
        return
    smoke = metafunc.config.getoption("bench_smoke") or common.smoke_mode()
    slow = metafunc.config.getoption("bench_slow") or os.environ.get("FASTREG_BENCH_SLOW") == "1"
    models = ("resnet56",) if smoke else SLOW_MODELS if slow else DEFAULT_MODELS
    ratios = SLOW_RATIOS if slow and not smoke else DEFAULT_RATIOS
    metafunc.parametrize("model", models)
    metafunc.parametrize("ratio", ratios)
    metafunc.parametrize("provider", provider_names("cpu", include_compile=not smoke))


def test_gram_penalty(benchmark, bench_settings, gemm_peak, bench_record, model, ratio, provider):
    case = get_case(model, ratio)
    step = case.step(provider)  # compiles 'compile' here, outside the timing
    value_err, grad_err = case.disagreement(provider)
    assert max(value_err, grad_err) <= AGREE_RTOL, f"{provider} disagrees with reference: {value_err=:.2e} {grad_err=:.2e}"
    warmup, reps = SMOKE_REPS if bench_settings["smoke"] else REPS[model]
    benchmark.group = f"gram_penalty decorrelate/mean: {case.label}"
    benchmark.pedantic(step, rounds=max(reps, 1), warmup_rounds=warmup, iterations=1)
    median = benchmark.stats.stats.median if benchmark.stats else None
    row = case.row(provider, median, gemm_peak)
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) and v is not None})
    bench_record(benchmark.group, row)


if __name__ == "__main__":
    sys.exit(report.main_with_readme("bench_gram_penalty", main))
