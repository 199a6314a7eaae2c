"""Training plots saved in the run directory (matplotlib, Agg backend: no display needed).

- ``loss_reg.png``: training loss vs iteration, with the regularization coefficient on a second axis
  and the phases shaded;
- ``filter_norms.png``: histograms of the L1 norms of kept vs pruned filters at several points of
  the regularization phase (norms normalised per layer by the layer's largest norm);
- ``jsv.png``: mean JSV vs epoch (fine-tuning, and right after pruning).
"""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_reg(records: Sequence[dict], path: str) -> str | None:
    """Loss (left axis) and reg coefficient (right axis) vs iteration from the step records."""
    steps = [r for r in records if r.get("event") == "step"]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    iters = [r["iter"] for r in steps]
    ax.plot(iters, [r["loss"] for r in steps], lw=1, color="tab:blue", label="loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.set_yscale("log")
    spans: list[tuple[str, list[int]]] = []  # consecutive steps of one phase (OrthoReg's rounds repeat a phase)
    for r in steps:
        if not spans or spans[-1][0] != r["phase"]:
            spans.append((r["phase"], []))
        spans[-1][1].append(r["iter"])
    colors = {phase: f"C{i}" for i, phase in enumerate(dict.fromkeys(p for p, _ in spans))}
    for phase, its in spans:
        ax.axvspan(min(its), max(its), alpha=0.08, color=colors[phase])
        ax.text(min(its), ax.get_ylim()[1], phase, va="top", fontsize=8)
    if any(r.get("reg") is not None for r in steps):
        ax2 = ax.twinx()
        with_reg = [r for r in steps if r.get("reg") is not None]
        ax2.plot([r["iter"] for r in with_reg], [r["reg"] for r in with_reg], color="tab:red", lw=1.5)
        ax2.set_ylabel("reg coefficient", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_filter_norms(snapshots: Sequence[dict], path: str, max_panels: int = 4) -> str | None:
    """One histogram panel per snapshot ({"iter", "kept": [...], "pruned": [...]}), evenly chosen."""
    if not snapshots:
        return None
    if len(snapshots) > max_panels:
        step = (len(snapshots) - 1) / (max_panels - 1)
        snapshots = [snapshots[round(i * step)] for i in range(max_panels)]
    fig, axes = plt.subplots(1, len(snapshots), figsize=(3.2 * len(snapshots), 3), squeeze=False, sharey=True)
    for ax, snap in zip(axes[0], snapshots):
        bins = [i / 30 for i in range(31)]
        ax.hist(snap["kept"], bins=bins, alpha=0.6, label="kept", color="tab:green")
        ax.hist(snap["pruned"], bins=bins, alpha=0.6, label="pruned", color="tab:red")
        ax.set_title(f"iter {snap['iter']}", fontsize=9)
        ax.set_xlabel("filter L1 norm / layer max")
    axes[0][0].set_ylabel("filters")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_jsv(records: Sequence[dict], path: str) -> str | None:
    """Mean JSV of the epoch records that carry one, vs iteration."""
    points = [r for r in records if r.get("mean_jsv") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["iter"] for r in points], [r["mean_jsv"] for r in points], "o-")
    for r in points:
        if r.get("event") == "pruned":
            ax.annotate("pruned", (r["iter"], r["mean_jsv"]), fontsize=8)
    values = [r["mean_jsv"] for r in points]
    if min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean JSV")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_all(run_dir: str, records: Sequence[dict], norm_snapshots: Sequence[dict]) -> list[str]:
    """Write every plot that has data; returns the paths written."""
    made = [
        plot_loss_reg(records, os.path.join(run_dir, "loss_reg.png")),
        plot_filter_norms(norm_snapshots, os.path.join(run_dir, "filter_norms.png")),
        plot_jsv(records, os.path.join(run_dir, "jsv.png")),
    ]
    return [p for p in made if p]
