"""Torch-Pruning's sparse-training loop with fastreg's drop-in: one changed import.

A CIFAR-layout ResNet-20 (one input channel) is trained on scikit-learn's 8×8 digits (bundled:
nothing is downloaded) with DepGraph's group-norm sparsity, then Torch-Pruning's own ``step()``
removes half of every prunable group's channels. The loop runs twice from the same seed, once with
``tp.pruner.GroupNormPruner`` and once with ``fastreg.torch_pruning.GroupNormPruner``; nothing else
differs. Each pruned model is then fine-tuned for two epochs. Printed per pruner: the median time
of ``regularize()`` and its share of the training step, test accuracy after sparse training, right
after ``step()`` and after fine-tuning, parameters and FLOPs, and whether the two pruned models have
the same layer shapes. (The two runs' gradients agree to float32 rounding at each step, which
``tests/test_torch_pruning.py`` checks; training amplifies those differences, so the runs are compared
by their results, not weight by weight.) Six epochs of sparse training do not drive half of the
channels to zero, so accuracy right after ``step()`` falls with either pruner and fine-tuning brings it
back; with a stronger ``reg`` the short run's accuracy swings from seed to seed.

    python examples/torch_pruning_loop.py                # about 12 s on 2 CPU cores
    python examples/torch_pruning_loop.py --epochs 2     # shorter
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch_pruning as tp
from torch.nn import functional as F
from torch.utils.data import DataLoader

import fastreg.torch_pruning
from fastreg.data import load_dataset
from fastreg.metrics import accuracy, params_flops
from fastreg.models import get_model

PRUNERS = {"Torch-Pruning": tp.pruner.GroupNormPruner, "fastreg": fastreg.torch_pruning.GroupNormPruner}


def train_and_prune(pruner_cls, epochs: int = 6, finetune_epochs: int = 2, seed: int = 0, batch_size: int = 64,
                    lr: float = 0.02, reg: float = 5e-3, ratio: float = 0.5) -> dict:
    """The Torch-Pruning loop: ``update_regularizer()`` each epoch, ``regularize()`` after each
    backward, ``step()`` at the end; then plain fine-tuning. Returns timings, accuracies and sizes."""
    torch.manual_seed(seed)
    data = load_dataset("digits")
    model = get_model("resnet20", data.num_classes, in_channels=data.in_channels)
    example_inputs = data.train.tensors[0][:1]
    pruner = pruner_cls(model, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                        pruning_ratio=ratio, ignored_layers=[model.fc], reg=reg)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(data.train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    test = DataLoader(data.test, batch_size=256)
    reg_s, step_s = [], []
    for _ in range(epochs):
        pruner.update_regularizer()
        model.train()
        for x, y in loader:
            start = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            before_reg = time.perf_counter()
            pruner.regularize(model)
            after_reg = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad()
            reg_s.append(after_reg - before_reg)
            step_s.append(time.perf_counter() - start)
    acc_trained = accuracy(model, test)
    params, flops = params_flops(model, example_inputs)
    pruner.step()
    pruned_params, pruned_flops = params_flops(model, example_inputs)
    acc_pruned = accuracy(model, test)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr / 5, momentum=0.9)
    for _ in range(finetune_epochs):
        model.train()
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    return dict(reg_ms=1e3 * statistics.median(reg_s), reg_share=sum(reg_s) / sum(step_s), acc_trained=acc_trained,
                acc_pruned=acc_pruned, acc_finetuned=accuracy(model, test), params=(params, pruned_params),
                flops=(flops, pruned_flops), shapes={k: tuple(v.shape) for k, v in model.state_dict().items()})


def compare(epochs: int = 6, finetune_epochs: int = 2, seed: int = 0) -> dict[str, dict]:
    return {name: train_and_prune(cls, epochs=epochs, finetune_epochs=finetune_epochs, seed=seed)
            for name, cls in PRUNERS.items()}


def report(results: dict[str, dict]) -> str:
    lines = ["| pruner | regularize() ms (median) | share of the step | test acc. sparse-trained | right after step() "
             "| fine-tuned | params | FLOPs |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['reg_ms']:.2f} | {100 * r['reg_share']:.0f}% | {100 * r['acc_trained']:.1f}% | "
                     f"{100 * r['acc_pruned']:.1f}% | {100 * r['acc_finetuned']:.1f}% | "
                     f"{r['params'][0] / 1e3:.1f}K → {r['params'][1] / 1e3:.1f}K | "
                     f"{r['flops'][0] / 1e6:.2f}M → {r['flops'][1] / 1e6:.2f}M |")
    ours, theirs = results["fastreg"], results["Torch-Pruning"]
    same = "the same" if ours["shapes"] == theirs["shapes"] else "different"
    lines += ["", f"regularize(): fastreg {theirs['reg_ms'] / ours['reg_ms']:.0f}× faster; {same} pruned layer shapes"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="sparse-training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(report(compare(args.epochs, args.finetune_epochs, args.seed)))


if __name__ == "__main__":
    main()
