"""The `fastreg bench` demo and the benchmark code in benchmarks/, run in their fast smoke modes.

Timing figures are never asserted (CI machines are busy); what is asserted is what cannot depend on
noise: model shapes, flop counts, agreement with the reference, and op counts.
"""
from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

import fastreg
from fastreg import _registry, bench

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
COMPILED_BACKENDS = ("cpp", "triton")  # fastreg backends that fuse every layer into O(1) ops


def _load(name: str):
    """Import benchmarks/<name>.py (benchmarks/ is not a package)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def common():
    return _load("common")


@pytest.fixture(scope="module")
def bench_gram(common):
    return _load("bench_gram_penalty")


def _skip_unless_runs(backend: str):
    why = _registry.why_unavailable("gram_penalty", backend, torch.device("cpu"))
    if why is not None:
        pytest.skip(f"{backend}: {why}")


# ---------------------------------------------------------------------------------------------
# Shapes and flop counts
# ---------------------------------------------------------------------------------------------
def test_resnet56_has_55_option_a_convs(common):
    shapes = [tuple(w.shape) for w in common.resnet56_conv_weights()]
    assert len(shapes) == 55
    assert shapes[0] == (16, 3, 3, 3)
    assert [sum(s[0] == c for s in shapes) for c in (16, 32, 64)] == [19, 18, 18]
    # stage transitions take the previous stage's width; no 1×1 convs (option A)
    assert shapes[19] == (32, 16, 3, 3) and shapes[37] == (64, 32, 3, 3)
    assert all(s[2:] == (3, 3) for s in shapes)
    assert common.resnet56_projection_shapes() == [(32, 16, 1, 1), (64, 32, 1, 1)]


@pytest.fixture(scope="module")
def resnet50_weights(common):
    return common.resnet50_conv_weights()


def test_resnet50_and_vgg19_match_torchvision(common, resnet50_weights):
    import torchvision

    assert len(resnet50_weights) == 53
    assert tuple(resnet50_weights[0].shape) == (64, 3, 7, 7)
    vgg = [tuple(w.shape) for w in common.vgg19_conv_weights()]
    expected = [c for c in torchvision.models.vgg.cfgs["E"] if c != "M"]
    assert [s[0] for s in vgg] == expected and vgg[0] == (64, 3, 3, 3)


def test_weights_are_reproducible(common):
    a, b = common.resnet56_conv_weights(seed=3), common.resnet56_conv_weights(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[5], common.resnet56_conv_weights(seed=4)[5])


def test_l1_masks_prune_the_smallest_filters(common):
    weights = common.resnet56_conv_weights()
    masks = common.l1_masks(weights, 0.5)
    for w, keep in zip(weights, masks):
        norms = w.detach().reshape(w.shape[0], -1).abs().sum(1)
        assert int((~keep).sum()) == w.shape[0] // 2
        assert norms[~keep].max() <= norms[keep].min()


def test_layer_flops_match_design_formulas(common):
    n, d = 64, 576
    for pruned in (0, 1, 32, 64):
        p = pruned / n
        counts = common.decorrelate_layer_flops(n, d, pruned)
        assert counts["nside"] == pytest.approx((6 * p - 2 * p * p) * n * n * d)
        assert counts["textbook"] == 6 * n * n * d
        assert counts["min"] == min(counts["nside"], counts["dside"])
    assert common.decorrelate_layer_flops(n, d, 32)["dside"] == 4 * n * d * d
    assert common.decorrelate_layer_flops(n, d, 0)["min"] == 0
    with pytest.raises(ValueError, match="pruned"):
        common.decorrelate_layer_flops(n, d, n + 1)


def test_resnet50_flops_match_design_doc(common, resnet50_weights):
    """DESIGN.md §1.1: all ResNet-50 convs at p = 0.5: textbook 116.8, N-side 48.6, best per layer 33.9 GFLOP."""
    weights = resnet50_weights
    masks = common.l1_masks(weights, 0.5)
    assert common.textbook_flops(weights) / 1e9 == pytest.approx(116.8, abs=0.05)
    assert common.decorrelate_nside_flops(weights, masks) / 1e9 == pytest.approx(48.6, abs=0.05)
    assert common.decorrelate_min_flops(weights, masks) / 1e9 == pytest.approx(33.9, abs=0.05)


# ---------------------------------------------------------------------------------------------
# Measuring helpers
# ---------------------------------------------------------------------------------------------
def test_count_aten_ops_counts_forward_and_backward(common):
    a = torch.randn(8, 8, requires_grad=True)
    assert common.count_aten_ops(lambda: torch.mm(a, a)) == 1
    forward_only = common.count_aten_ops(lambda: (a @ a).sum())
    with_backward = common.count_aten_ops(lambda: torch.autograd.grad((a @ a).sum(), a))
    assert with_backward > forward_only >= 2


def test_reference_op_count_grows_with_layers(common):
    """~25 ops per layer per step for the textbook version (DESIGN.md §3: 1,376 for ResNet-56)."""
    weights = common.resnet56_conv_weights()
    masks = common.l1_masks(weights, 0.5)

    def ops(k):
        return common.count_aten_ops(
            lambda: common.loss_and_grads(lambda: fastreg.reference.gram_penalty(weights[:k], masks[:k]), weights[:k])
        )

    assert 20 * 55 <= ops(55) <= 30 * 55
    assert ops(55) > 5 * ops(5)


def test_time_median_and_machine(common):
    assert common.time_median(lambda: None, warmup=0, reps=3) >= 0
    with pytest.raises(ValueError, match="reps"):
        common.time_median(lambda: None, reps=0)
    assert common.gemm_peak_flops(n=128, reps=2) > 0
    assert common.read_bandwidth(numel=1 << 16, reps=2) > 0
    assert "torch" in common.machine_description()


def test_interleaved_setup_runs_untimed_before_every_call():
    calls = []
    setup = {"a": lambda: (calls.append("setup a"), __import__("time").sleep(0.02))}
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    medians = bench.interleaved_medians(fns, warmup=1, reps=3, setup=setup)
    assert calls.count("a") == calls.count("setup a") == 4 and calls.count("b") == 4
    assert all(calls[i - 1] == "setup a" for i, c in enumerate(calls) if c == "a")
    assert medians["a"] < 0.01  # (the 20 ms setup is not in the time)
    with pytest.raises(ValueError, match=r"setup names \['c'\]"):
        bench.interleaved_medians(fns, setup={"c": lambda: None})


def test_add_ratios_against_best_peer(common):
    rows = [
        dict(provider="fastreg[cpp]", median_s=1.0),
        dict(provider="reference", median_s=4.0),
        dict(provider="compile", median_s=2.0),
    ]
    common.add_ratios(rows)
    assert rows[0]["vs_best_peer"] == 2.0 and rows[0]["vs_compile"] == 2.0 and rows[0]["vs_reference"] == 4.0
    assert rows[2]["vs_best_peer"] == 1.0


# ---------------------------------------------------------------------------------------------
# The smoke modes
# ---------------------------------------------------------------------------------------------
def test_gram_benchmark_smoke(bench_gram, capsys):
    out = bench_gram.run(["--smoke", "--layers", "12"])
    printed = capsys.readouterr().out
    rows = out["results"][("resnet56", 0.5)]
    providers = [r["provider"] for r in rows]
    assert providers[-2:] == ["reference", "official"]  # no compile in smoke mode
    for r in rows:
        assert r["agrees"], r
        assert r["aten_ops"] > 0 and r["median_s"] > 0 and r["roofline"] > 0
    by_name = {r["provider"]: r for r in rows}
    assert by_name["official"]["aten_ops"] > 2 * by_name["reference"]["aten_ops"]  # one op per zeroed row
    assert "| provider | median ms |" in printed and "### Targets (cpp backend)" in printed
    growth = {r["provider"]: r for r in out["growth"]}
    assert growth["reference"]["many_layers"] > growth["reference"]["few_layers"] > 0
    assert len(out["targets"]) == len(bench_gram.TARGETS)


def test_gram_step_split_and_bound(bench_gram):
    """The step split (skipped in smoke mode) on a few layers: every provider's parts, the floor, the cold
    memory traffic; and the bound built from them."""
    case = bench_gram.get_case("resnet56", 0.5, 5)
    split = {r["provider"]: r for r in bench_gram.step_split(case, ["reference"], reps=2, gemm_n=64)}
    assert set(split) == {"reference", bench_gram.FLOOR, bench_gram.READ, bench_gram.WRITE}
    for p in ("reference", bench_gram.FLOOR):
        assert all(split[p][k] > 0 for k in ("forward_ms", "grad_ms", "free_ms"))
    assert split[bench_gram.READ]["forward_ms"] > 0 and split[bench_gram.WRITE]["forward_ms"] > 0
    b = bench_gram.step_bound(list(split.values()), roofline_ms=0.5)
    floor = sum(split[bench_gram.FLOOR][k] for k in ("forward_ms", "grad_ms", "free_ms"))
    assert b["floor"] == pytest.approx(floor)
    assert b["serial"] == pytest.approx(floor + b["traffic"] + 0.5)
    assert b["overlapped"] == pytest.approx(floor + max(b["traffic"], 0.5)) and b["overlapped"] <= b["serial"]


def test_gram_back_to_back(bench_gram):
    """The hot-cache step times: one median per provider and the floor, from bursts minus their first step."""
    case = bench_gram.get_case("resnet56", 0.5, 5)
    calls = []
    step = bench_gram.Case.loss_fn

    def counting(self, provider):
        fn = step(self, provider)
        return lambda: (calls.append(provider), fn())[1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_gram.Case, "loss_fn", counting)
        hot = bench_gram.back_to_back(case, ["reference"], rounds=2, burst=3)
    assert set(hot) == {"reference", bench_gram.FLOOR} and all(t > 0 for t in hot.values())
    assert calls == ["reference"] * 6  # 2 rounds of a burst of 3


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_fused_op_count_does_not_grow_with_layers(bench_gram, backend):
    _skip_unless_runs(backend)
    rows = {r["provider"]: r for r in bench_gram.op_growth([f"fastreg[{backend}]", "reference"])}
    fused = rows[f"fastreg[{backend}]"]
    assert fused["many_layers"] == fused["few_layers"], fused  # 5 layers vs all 55
    assert fused["many_layers"] <= 8  # the op-count target for one forward+backward
    assert rows["reference"]["many_layers"] > 10 * fused["many_layers"]


def test_demo_rows_agree_with_reference():
    rows = bench.run_demo("resnet56", 0.5, reps=1, warmup=0, layers=12)
    names = [r["provider"] for r in rows]
    assert names == [f"fastreg[{b}]" for b in fastreg.available_backends("gram_penalty", "cpu")] + ["official"]
    for r in rows:
        assert "error" not in r, r
        assert r["value_rel_err"] < 1e-4 and r["grad_rel_err"] < 1e-4, r
        assert r["aten_ops"] > 0 and r["median_s"] > 0
        assert math.isclose(r["penalty"], rows[0]["penalty"], rel_tol=1e-4)


def test_demo_main_prints_the_table(capsys):
    assert bench.main(["--reps", "1", "--warmup", "0", "--layers", "8"]) == 0
    printed = capsys.readouterr().out
    assert "all providers agree" in printed
    for b in fastreg.available_backends("gram_penalty", "cpu"):
        assert f"| fastreg[{b}] |" in printed
    assert "| official |" in printed


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench.main(["--model", "alexnet"])
    with pytest.raises(ValueError, match="ratio"):
        bench.l1_keep_masks([torch.randn(4, 3)], 1.5)
    with pytest.raises(ValueError, match="depth"):
        bench.resnet_cifar_conv_shapes(57)


def test_tpp_loss_benchmark_smoke(common, capsys):
    """The criterion-step benchmark: its three TPP steps agree (run() checks the gradients before timing)
    and TPPLoss dispatches a small, fixed number of ops against the original code's thousands."""
    rows = {r["provider"]: r for r in _load("bench_tpp_loss").run(smoke=True)}
    assert set(rows) == {"TPPLoss", "TPPLoss in place", "TPPLoss in_loss=False", "original", "cross-entropy"}
    assert rows["TPPLoss"]["ops"] * 10 < rows["original"]["ops"]
    assert rows["TPPLoss in place"]["ops"] < rows["TPPLoss"]["ops"]
    assert rows["TPPLoss in_loss=False"]["ops"] - rows["cross-entropy"]["ops"] <= 6
    assert "| TPPLoss |" in capsys.readouterr().out


def test_gram_grad_inplace_benchmark_smoke(common, capsys):
    """The in-place benchmark: its gradients agree with loss mode's (checked before timing), the call is
    one op, and a real ResNet-56 step with TPPLoss(in_loss=False) dispatches at most 6 ops more than plain CE."""
    out = _load("bench_gram_grad_inplace").run(["--smoke"])
    gram = {r["provider"]: r for r in out["gram"]}
    assert gram["in place"]["ops"] == 1 and gram["loss mode"]["ops"] > 50
    step = {r["provider"]: r for r in out["step"]}
    assert step["TPPLoss(in_loss=False)"]["extra_ops"] <= 6 < step["TPPLoss (loss mode)"]["extra_ops"]
    assert "| in place |" in capsys.readouterr().out
