"""The ``fastreg`` command (also ``python -m fastreg``).

    fastreg                      the main job: prune a small CNN on the bundled 8×8 digits with TPP, OCS,
                                 OrthoReg (Fisher), L1 and slimming side by side, and print one table
    fastreg train ...            pretrain a model from scratch
    fastreg prune --method M ... regularize → prune → finetune (M: tpp, ocs, orthoreg, l1, slim, scratch)
    fastreg eval CHECKPOINT      accuracy, params, FLOPs, mean JSV, orthogonality per layer of a checkpoint
    fastreg bench ...            the gram-penalty benchmark (every backend side by side)

Examples:
    fastreg --methods tpp,orthoreg
    fastreg train --model resnet56 --dataset cifar10 --download --epochs 160
    fastreg prune --method orthoreg --model vgg13 --dataset cifar100 --thresholds '[10, 50, 80]'
    fastreg eval runs/prune-vgg13-cifar100-orthoreg/finetune.pt

Several processes: ``torchrun --standalone --nproc_per_node=2 -m fastreg prune ...``. Errors are one
line naming the flag; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from typing import Sequence

DEMO_DIR = "runs/demo"
DEMO_METHODS = ("tpp", "ocs", "orthoreg", "l1", "slim")
COMMANDS = ("demo", "train", "prune", "eval", "bench")

EXAMPLES = {
    "demo": """example:
  fastreg demo --methods tpp,orthoreg,l1     (the same as: fastreg --methods tpp,orthoreg,l1)""",
    "train": """example:
  fastreg train --model resnet56 --dataset cifar10 --download --epochs 160 --run-dir runs/r56""",
    "prune": """examples:
  fastreg prune --method tpp --pretrained runs/r56/pretrain.pt --model resnet56 --dataset cifar10
  fastreg prune --method orthoreg --model vgg13 --dataset cifar100 --thresholds '[10, 50, 80]'
  fastreg prune --method orthoreg --model mobilenet_v1 --dataset cifar100 --early-bird --pruning-ratio 0.25
  fastreg prune --method l1 --importance taylor --pretrained runs/r56/pretrain.pt --model resnet56 --dataset cifar10
  fastreg prune --method scratch --budget B --model vgg19 --dataset cifar10""",
    "eval": """example:
  fastreg eval runs/prune-resnet56-cifar10-tpp/finetune.pt --jsv-samples 16""",
}


def _epochs_or_auto(text: str):
    return text if text == "auto" else int(text)


def _percent_list(text: str) -> list[float]:
    """``'[10, 50, 80]'`` → [10.0, 50.0, 80.0]."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise argparse.ArgumentTypeError(f"expected a list of percentages like '[10, 50, 80]', got {text!r}")
    return [float(v) for v in values]


def _method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in DEMO_METHODS]
    if not methods or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(DEMO_METHODS)}, got {text!r}")
    return methods


def _add_debug(p: argparse.ArgumentParser, top: bool = False) -> None:
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show the full traceback of an error")


def _add_common(p: argparse.ArgumentParser, command: str) -> None:
    from .train import Config

    d = Config()
    g = p.add_argument_group("run")
    g.add_argument("--model", default=d.model, help="digits_cnn, mlp7_linear, resnet20/56/110, vgg19, resnet18/34/50 (default %(default)s)")
    g.add_argument("--dataset", default=d.dataset, help="digits (bundled), mnist, cifar10, cifar100 (default %(default)s)")
    g.add_argument("--data-dir", default=d.data_dir, help="where torchvision datasets live (default %(default)s)")
    g.add_argument("--download", action="store_true", help="download the torchvision dataset if missing")
    g.add_argument("--run-dir", default=None, help="output directory (default runs/<command>-<model>-<dataset>[-<method>])")
    g.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (default %(default)s)")
    g.add_argument("--threads", type=int, default=d.threads, help="CPU threads per process (0: torch's default)")
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers (default %(default)s)")
    g.add_argument("--epochs", dest="pretrain_epochs", type=int, default=d.pretrain_epochs,
                   help="pretraining epochs (train; prune without --pretrained; ocs one-cycle) (default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="pretraining learning rate, cosine schedule (default %(default)s)")
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--log-every", type=int, default=d.log_every, help="log a step record every N iterations")
    g.add_argument("--jsv-samples", type=int, default=d.jsv_samples, help="test samples for mean JSV (0: skip)")
    g.add_argument("--jsv-every", type=int, default=d.jsv_every, help="fine-tuning epochs between mean-JSV measurements")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    if command != "prune":
        return
    g = p.add_argument_group("pruning")
    g.add_argument("--method", default=d.method, choices=("tpp", "ocs", "orthoreg", "l1", "slim", "scratch"))
    g.add_argument("--pruning-ratio", type=float, default=d.pruning_ratio,
                   help="fraction of filters removed per layer (ocs: fraction of FLOPs removed; orthoreg, slim: of all "
                        "prunable filters, one global ranking) (default %(default)s)")
    g.add_argument("--importance", default=None, choices=("l1", "l2", "bn", "fisher", "taylor"),
                   help="what ranks the filters of tpp, orthoreg, l1 and scratch (fastreg.importance; default: fisher "
                        "for orthoreg, l1 for the others)")
    g.add_argument("--importance-batches", type=int, default=d.importance_batches,
                   help="training batches fisher / taylor are measured on at pruning time (0: one epoch)")
    g.add_argument("--pretrained", default=None, help="checkpoint of `fastreg train` (pretrain.pt); else pretrain first")
    g.add_argument("--reg-epochs", type=_epochs_or_auto, default=d.reg_epochs,
                   help="regularization epochs (tpp, slim); 'auto' (tpp): until reg reaches τ, K_u·⌈τ/Δ⌉ iterations, as "
                        "the original schedule; N (tpp): reg grows for N epochs (at most to τ), then --stabilize-iters at "
                        "the reg reached, if given (default: auto for tpp, 10 for slim)")
    g.add_argument("--reg-lr", type=float, default=d.reg_lr, help="constant learning rate while regularizing")
    g.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    g.add_argument("--finetune-lr", type=float, default=d.finetune_lr, help="fine-tuning learning rate, cosine schedule")
    g = p.add_argument_group("TPP (fastreg.TPPLoss; the stabilize phase: fastreg.pruning.TPPPruner)")
    g.add_argument("--lw", type=float, default=d.lw, help="weight of the gram decorrelation term")
    g.add_argument("--reg-delta", type=float, default=d.reg_delta, help="Δ: reg grows by Δ every --reg-interval iterations")
    g.add_argument("--reg-interval", type=int, default=d.reg_interval, help="K_u")
    g.add_argument("--reg-ceiling", type=float, default=d.reg_ceiling, help="τ: the largest reg")
    g.add_argument("--target", default=d.target, choices=("decorrelate", "diagonal", "identity"))
    g.add_argument("--stabilize-iters", type=int, default=d.stabilize_iters,
                   help="iterations at the final reg before pruning, the pruned filters (+ BN γ, β) of layer i zeroed "
                        "after every step from (i + 1)·--zero-interval on (default: 10000, the paper's CIFAR value, "
                        "after --reg-epochs auto; 0, no stabilize phase, after a number of --reg-epochs)")
    g.add_argument("--zero-interval", type=int, default=d.zero_interval,
                   help="stabilize iterations between zeroing one layer and the next (default %(default)s)")
    g.add_argument("--zero-count", default=d.zero_count, choices=("all", "pruned"),
                   help="which layers index the zero-out times: all Conv/Linear layers (the original code; on deep "
                        "models the last ones are pruned without being zeroed, with a warning) or only the pruned ones")
    g = p.add_argument_group("OrthoReg (orthogonality-regularized training, then importance-ranked pruning)")
    g.add_argument("--ortho-coeff", type=float, default=d.ortho_coeff,
                   help="λ of λ·Σ_l ‖W_l W_lᵀ − I‖²_F over the prunable layers' filters (default %(default)s)")
    g.add_argument("--rounds", type=int, default=d.rounds,
                   help="prune in N rounds of --reg-epochs regularized training each, to --pruning-ratio·k/N after round k")
    g.add_argument("--thresholds", type=_percent_list, default=None,
                   help="cumulative %% of the prunable filters removed after each round, e.g. '[10, 50, 80]'")
    g.add_argument("--early-bird", action="store_true",
                   help="train from scratch and prune when consecutive epochs' masks differ in < --eb-epsilon of the "
                        "channels for --eb-window epochs (at most --reg-epochs epochs)")
    g.add_argument("--eb-epsilon", type=float, default=d.eb_epsilon, help="ε of the normalized Hamming distance (default %(default)s)")
    g.add_argument("--eb-window", type=int, default=d.eb_window, help="epochs the distance stays below ε (default %(default)s)")
    g = p.add_argument_group("scratch (the pruned architecture trained from a fresh init)")
    g.add_argument("--budget", default=d.budget, choices=("E", "B"),
                   help="E: --epochs epochs; B: the dense training's FLOPs, --epochs × dense/pruned FLOPs, at most 2× "
                        "(default %(default)s)")
    g = p.add_argument_group("network slimming")
    g.add_argument("--slim-s", type=float, default=d.slim_s, help="s in grad(γ) += s·sign(γ)")
    g = p.add_argument_group("OCSPruner schedule (defaults: the paper's Table 8)")
    g.add_argument("--ocs-window", type=int, default=d.ocs_window, help="r: epochs averaged in J_avg (default %(default)s)")
    g.add_argument("--ocs-start-tol", type=float, default=d.ocs_start_tol,
                   help="τ: sparsity learning starts when J_avg^t − J_avg^(t−r) <= τ (default %(default)s)")
    g.add_argument("--ocs-prune-tol", type=float, default=d.ocs_prune_tol,
                   help="ε: prune when J_avg^t >= 1 − ε (default %(default)s)")
    g.add_argument("--ocs-lam-init", type=float, default=d.ocs_lam_init, help="λ0: λ in the first sparsity epoch (default %(default)s)")
    g.add_argument("--ocs-lam-delta", type=float, default=d.ocs_lam_delta,
                   help="δ: λ_t = λ_(t−1) + δ·⌊(t − t_start)/Δt⌋ (default %(default)s)")
    g.add_argument("--ocs-lam-interval", type=int, default=d.ocs_lam_interval, help="Δt in epochs (default %(default)s)")


def config_from_args(args: argparse.Namespace):
    from .train import Config

    names = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(command=args.command, **{k: v for k, v in vars(args).items() if k in names and k not in ("run_dir", "command")})
    suffix = f"-{cfg.method}" if cfg.command == "prune" else ""
    cfg.run_dir = args.run_dir or os.path.join("runs", f"{cfg.command}-{cfg.model}-{cfg.dataset}{suffix}")
    return cfg


def run_training(cfg) -> dict:
    import torch.distributed as dist

    from .train import Trainer

    try:
        summary = Trainer(cfg).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if _is_main():
        print(json.dumps(summary, indent=2))
        print(f"run directory: {cfg.run_dir}", file=sys.stderr)
    return summary


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# -------------------------------------------------------------------------------------------------
# eval
# -------------------------------------------------------------------------------------------------
def evaluate_checkpoint(path: str, jsv_samples: int = 16, data_dir: str | None = None) -> dict:
    """Accuracy, params, FLOPs, mean JSV and per-layer orthogonality of a trainer checkpoint."""
    import torch

    from . import metrics
    from .data import first_batch, load_dataset
    from .train import load_model

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r}: no such file (a .pt file written by `fastreg train` / `fastreg prune`)")
    model, ckpt = load_model(path)
    cfg = ckpt["config"]
    data = load_dataset(cfg["dataset"], data_dir or cfg["data_dir"], False)
    example = first_batch(data.test, 1)[0]
    params, flops = metrics.params_flops(model, example)
    out = {
        "checkpoint": path, "model": cfg["model"], "dataset": cfg["dataset"],
        "pruned": bool(ckpt.get("keep_masks")),
        "acc": metrics.accuracy(model, torch.utils.data.DataLoader(data.test, batch_size=256)),
        "params": params, "flops": flops,
        "mean_jsv": metrics.mean_jsv(model, first_batch(data.test, jsv_samples)[0]) if jsv_samples else None,
        "orthogonality": metrics.orthogonality_per_layer(model),
    }
    return out


# -------------------------------------------------------------------------------------------------
# the main job: TPP, OCS, OrthoReg, L1 and slimming on the bundled digits
# -------------------------------------------------------------------------------------------------
# TPP's schedule, shortened: reg grows to τ = 1 in 200 iterations (Δ = 0.01 every 2), then a stabilize phase of
# 20 iterations (the paper's 10% of the growth: 10k after 100k) zeroing the 5 layers one every 4 iterations.
DEMO_SETTINGS = dict(
    model="digits_cnn", dataset="digits", batch_size=64, pretrain_epochs=12, lr=0.1,
    pruning_ratio=0.75, reg_epochs="auto", reg_lr=0.01, finetune_epochs=6, finetune_lr=0.01,
    lw=100.0, reg_delta=1e-2, reg_interval=2, reg_ceiling=1.0, stabilize_iters=20, zero_interval=4,
    jsv_samples=16, jsv_every=3, log_every=5, threads=1,
)
# What each method changes: OCS trains from scratch for the same 12 epochs, its schedule shortened to decide
# within them (window 2, looser tolerances, faster-growing λ); OrthoReg prunes in 2 rounds of 3 regularized
# epochs (Fisher importance); slimming regularizes |γ| for 4 epochs.
DEMO_METHOD_SETTINGS = {
    "ocs": dict(ocs_window=2, ocs_start_tol=0.02, ocs_prune_tol=0.02, ocs_lam_init=1e-3, ocs_lam_delta=1e-3),
    "orthoreg": dict(reg_epochs=3, rounds=2),
    "slim": dict(reg_epochs=4),
}


def demo(run_dir: str = DEMO_DIR, seed: int = 0, quiet: bool = False, methods: Sequence[str] = DEMO_METHODS,
         **overrides) -> list[dict]:
    """Pretrain the digits CNN once, then prune it with each of ``methods`` (OCS trains its own from
    scratch); returns the summaries, each with its wall time ``wall_seconds``."""
    from .train import Config, Trainer

    settings = {**DEMO_SETTINGS, **overrides}
    pre = Config(command="train", run_dir=os.path.join(run_dir, "pretrain"), seed=seed, quiet=quiet, **settings)
    pretrain_summary = Trainer(pre).run()
    results = []
    for method in methods:
        method_settings = {**settings, **{k: v for k, v in DEMO_METHOD_SETTINGS.get(method, {}).items() if k not in overrides}}
        cfg = Config(command="prune", method=method, pretrained=os.path.join(pre.run_dir, "pretrain.pt"),
                     run_dir=os.path.join(run_dir, method), seed=seed, quiet=quiet, **method_settings)
        t0 = time.perf_counter()
        summary = Trainer(cfg).run()
        summary["wall_seconds"] = time.perf_counter() - t0
        if method != "ocs":  # (OCS's dense accuracy is that of its own run at the pruning decision)
            summary["acc_dense"] = pretrain_summary["acc_dense"]
        results.append(summary)
    return results


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_table(results: Sequence[dict]) -> str:
    """One row per method: accuracies (dense, right before pruning, right after, after fine-tuning),
    params, FLOPs (per image), mean JSV right after pruning, regularizer time per step (the
    regularized objective's forward + backward on the logits, i.e. everything the method adds) and
    the method's wall time (its run after the shared pretraining; OCS's includes its own training)."""
    head = ["method", "acc dense", "acc before prune", "acc after prune", "acc finetuned",
            "params", "FLOPs", "mean JSV after prune", "reg ms/step", "wall s"]
    rows = []
    for r in results:
        reg_ms = r.get("reg_ms_per_step")
        rows.append([
            r["method"], f"{100 * r['acc_dense']:.2f}%", f"{100 * r['acc_before_prune']:.2f}%",
            f"{100 * r['acc_after_prune']:.2f}%", f"{100 * r['acc_final']:.2f}%",
            f"{_fmt_count(r['params'])} ({100 * r['param_sparsity']:.0f}% fewer)",
            f"{_fmt_count(r['flops'])} ({r['speedup']:.2f}× less)",
            "-" if r.get("jsv_after_prune") is None else f"{r['jsv_after_prune']:.4g}",
            "-" if reg_ms is None else f"{reg_ms:.2f}",
            "-" if r.get("wall_seconds") is None else f"{r['wall_seconds']:.1f}",
        ])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def run_demo(args: argparse.Namespace) -> list[dict]:
    t0 = time.perf_counter()
    results = demo(args.run_dir, args.seed, args.quiet, args.methods)
    first = results[0]
    import torch

    from . import choose_backend

    backend = choose_backend("gram_penalty", torch.device("cpu"))
    print(f"{first['model']} on the bundled 8×8 digits (scikit-learn), pruning ratio {first['pruning_ratio']} "
          f"(per layer: tpp, l1; of the FLOPs: ocs; of all prunable filters: orthoreg, slim); dense: {_fmt_count(first['params_dense'])} params, {_fmt_count(first['flops_dense'])} FLOPs per image; "
          f"gram penalty backend: {backend}, {torch.get_num_threads()} thread(s)")
    print(format_table(results))
    print(f"total {time.perf_counter() - t0:.0f} s; runs, logs and plots in {args.run_dir}/")
    return results


# -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastreg", description="Train, prune and evaluate networks with fast structured-pruning regularizers.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--version", action="version", version=f"fastreg {__version__}")
    _add_debug(parser, top=True)
    sub = parser.add_subparsers(dest="command")

    def add(name: str, help: str, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        if kwargs.get("add_help", True):
            _add_debug(p)
        return p

    demo_p = add("demo", f"{', '.join(DEMO_METHODS)} side by side on the bundled digits (what `fastreg` alone runs)")
    demo_p.add_argument("--methods", type=_method_list, default=list(DEMO_METHODS),
                        help=f"comma-separated subset of {','.join(DEMO_METHODS)} (default: all)")
    demo_p.add_argument("--run-dir", default=DEMO_DIR)
    demo_p.add_argument("--seed", type=int, default=0)
    demo_p.add_argument("--quiet", action="store_true")
    _add_common(add("train", "pretrain a model"), "train")
    _add_common(add("prune", "regularize → prune → finetune"), "prune")
    ev = add("eval", "evaluate a checkpoint: accuracy, params, FLOPs, mean JSV, degree of orthogonality per layer")
    ev.add_argument("checkpoint")
    ev.add_argument("--jsv-samples", type=int, default=16)
    ev.add_argument("--data-dir", default=None, help="where the dataset lives (default: the run's --data-dir)")
    add("bench", "gram-penalty benchmark: every backend side by side (arguments go to fastreg.bench)", add_help=False)
    return parser


def one_line(exc: BaseException) -> str:
    """``fastreg: error: <message>``, the message's lines joined."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"fastreg: error: {message} (--debug shows the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from . import bench  # lazily: the benchmark pulls in every backend

        return bench.main(argv[1:]) or 0
    if not argv or (argv[0].startswith("-") and not {"-h", "--help", "--version"} & set(argv) and argv != ["--debug"]):
        argv = ["demo"] + argv  # `fastreg --methods tpp,l1` runs the main job
    elif argv == ["--debug"]:
        argv = ["--debug", "demo"]
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        if args.command == "demo":
            run_demo(args)
        elif args.command in ("train", "prune"):
            run_training(config_from_args(args))
        elif args.command == "eval":
            print(json.dumps(evaluate_checkpoint(args.checkpoint, args.jsv_samples, args.data_dir), indent=2))
        else:
            build_parser().print_help()
    except KeyboardInterrupt:
        print("fastreg: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; the traceback with --debug
        if debug:
            traceback.print_exc()
        print(one_line(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
