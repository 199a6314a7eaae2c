"""The coverage table of fastreg's pruning on the torchvision classification zoo, computed.

For each family: the full-size model (random init, 1000 classes) — Conv/Linear layers TPPLoss
regularizes at ``pruning_ratio=0.5`` (defaults; ``vit_heads``: ViT-B/16 with its attention heads named too,
``{"*mlp.0": 0.5, "*self_attention": 0.5}``), parameters and FLOPs (multiply-accumulates at the
model's usual input size) before and after physical pruning with its masks — and the status of the
four checks of ``tests/test_zoo.py`` on the family's smallest variant (TPP cpp = reference and
zeroed = pruned; OCSPruner, L1-norm and network slimming zeroed = pruned).

    python tools/model_coverage.py                      # prints the table, writes docs/coverage.md and the README's table
    python tools/model_coverage.py --families resnet vit --no-write
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torchvision import models as tvm

import fastreg

ROOT = Path(__file__).resolve().parents[1]
FULL = {  # family -> (torchvision builder, input size)
    "alexnet": ("alexnet", 224), "vgg_bn": ("vgg16_bn", 224), "resnet": ("resnet50", 224),
    "resnext": ("resnext50_32x4d", 224), "wide_resnet": ("wide_resnet50_2", 224), "densenet": ("densenet121", 224),
    "mobilenet_v2": ("mobilenet_v2", 224), "mobilenet_v3": ("mobilenet_v3_large", 224),
    "efficientnet": ("efficientnet_b0", 224), "efficientnet_v2": ("efficientnet_v2_s", 224),
    "regnet_x": ("regnet_x_400mf", 224), "regnet_y": ("regnet_y_400mf", 224), "squeezenet": ("squeezenet1_1", 224),
    "mnasnet": ("mnasnet1_0", 224), "googlenet": ("googlenet", 224), "inception_v3": ("inception_v3", 299),
    "convnext": ("convnext_tiny", 224), "vit": ("vit_b_16", 224),
    "shufflenet": ("shufflenet_v2_x1_0", 224), "swin": ("swin_t", 224), "maxvit": ("maxvit_t", 224),
    "vit_heads": ("vit_b_16", 224),
}
RATIOS = {"vit_heads": {"*mlp.0": 0.5, "*self_attention": 0.5}}  # (default: the float 0.5)
LABELS = {"vit_heads": "vit_b_16, heads too"}
CHECKS = ("tpp", "ocs", "l1", "slimming")


def load_tests(name: str = "test_zoo"):
    if str(ROOT / "tests") not in sys.path:  # (the test modules import each other's helpers, as under pytest)
        sys.path.insert(0, str(ROOT / "tests"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def full_size_row(family: str) -> dict:
    name, size = FULL[family]
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    crit = fastreg.TPPLoss(model, RATIOS.get(family, 0.5), example_inputs=x)
    small = fastreg.prune(model, crit.keep_masks, x)
    p0, f0 = fastreg.count_params_flops(model, x)
    p1, f1 = fastreg.count_params_flops(small, x)
    layers = sum(1 for m in model.modules() if fastreg.pruning.graph.producer_weight_name(m) is not None)
    return dict(model=LABELS.get(family, name), input=size, layers=f"{len(crit.layers)} / {layers}", params=(p0, p1), flops=(f0, f1))


def check_status(zoo, family: str) -> dict:
    """'ok' or the error of each check of tests/test_zoo.py on the family's smallest variant."""
    status = {}
    if family == "vit_heads":  # (the attention-head tests, on the zoo's small ViT)
        heads = load_tests("test_attention_heads")
        checks = (("tpp", heads.test_vit_tpp_with_heads_backends_agree_and_zeroed_equals_pruned),
                  ("baselines", heads.test_vit_l1_and_ocs_prune_heads))
    else:
        checks = (("tpp", lambda one_thread: zoo.test_tpp(family, one_thread)),
                  ("baselines", lambda one_thread: zoo.test_ocs_l1_slimming(family, one_thread)))
    for check, fn in checks:
        try:
            fn(None)
            result = "ok"
        except Exception as exc:  # report, do not stop the table
            result = f"fails: {type(exc).__name__}: {str(exc)[:60]}"
        if check == "tpp":
            status["tpp"] = result
        else:
            no_bn = family in zoo.NO_BATCHNORM or family == "vit_heads"
            status.update(ocs=result, l1=result, slimming="n/a (no BatchNorm)" if no_bn and result == "ok" else result)
    return status


def m(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}G"


def readme_section(name: str, body: str) -> None:
    """Write ``body`` into the README section ``name`` (benchmarks/report.py's markers)."""
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    report.write_section(name, body, path=report.TOP_README)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=list(FULL))
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/coverage.md or the README")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    zoo = load_tests()
    header = ("| model | layers regularized | params (dense → ratio 0.5) | FLOPs (dense → ratio 0.5) | TPP | OCS | L1 | slimming |\n"
              "|---|---|---|---|---|---|---|---|")
    rows = []
    for family in args.families:
        t = time.perf_counter()
        if family in zoo.UNSUPPORTED:
            reason = zoo.UNSUPPORTED[family]
            rows.append(f"| {FULL[family][0]} | — | — | — | {reason} | — | — | — |")
        else:
            r = full_size_row(family)
            s = check_status(zoo, family)
            (p0, p1), (f0, f1) = r["params"], r["flops"]
            rows.append(
                f"| {r['model']} | {r['layers']} | {m(p0)} → {m(p1)} (−{1 - p1 / p0:.0%}) | "
                f"{m(f0)} → {m(f1)} (−{1 - f1 / f0:.0%}) @{r['input']}px | "
                + " | ".join(s[c] for c in CHECKS) + " |"
            )
        print(rows[-1], f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    text = (
        "# Coverage: the torchvision classification zoo\n\n"
        "Generated by `python tools/model_coverage.py` (do not edit by hand). Params and FLOPs: the full-size "
        "model (random init, 1000 classes), `fastreg.TPPLoss(model, 0.5)` with defaults, physically pruned; FLOPs "
        "are multiply-accumulates at the input size shown. Status columns: the checks of `tests/test_zoo.py` on "
        "the family's smallest variant (TPP: cpp = reference loss and gradients, zeroed = pruned outputs; OCS, "
        "L1, slimming: zeroed = pruned outputs, fewer params and FLOPs).\n\n"
        + header + "\n" + "\n".join(rows) + "\n"
    )
    print("\n" + header + "\n" + "\n".join(rows))
    if not args.no_write:
        (ROOT / "docs" / "coverage.md").write_text(text)
        readme_section("coverage", header + "\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
