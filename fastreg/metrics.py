"""Metrics the pruning papers report: top-1 accuracy, mean JSV, degree of orthogonality per
layer, params, FLOPs, sparsity and speedup (DESIGN.md §1.4).

FLOPs follow the convention of the pruning literature (TPP, OCSPruner, Li et al.): one
multiply-accumulate counts as one FLOP, so ResNet-50 at 224×224 is 4.1 GFLOPs.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from . import reference


@torch.no_grad()
def top1_accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str = "cpu") -> tuple[int, int]:
    """(correct, total) of argmax predictions over ``batches``; the caller divides (and may
    all-reduce both counts first). The model is evaluated in eval mode and restored after."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    model.train(was_training)
    return correct, total


def accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy in [0, 1]."""
    correct, total = top1_accuracy(model, batches, device)
    return correct / max(total, 1)


def input_output_jacobians(model: nn.Module, inputs: Tensor, max_elements: int = 1 << 24) -> Tensor:
    """Per-sample Jacobians ∂f(x_i)/∂x_i, shape [B, outputs, numel(x_i)] (eval mode).

    Computed with ``vmap(jacrev)``; at most about ``max_elements`` Jacobian entries are formed at
    once (samples in chunks, and output rows in chunks for large models such as ImageNet ResNets).
    """
    was_training = model.training
    model.eval()
    try:
        def single(x: Tensor) -> Tensor:
            return model(x.unsqueeze(0)).squeeze(0).flatten()

        n_in = inputs[0].numel()
        with torch.no_grad():
            n_out = single(inputs[0]).numel()
        rows = max(1, min(n_out, max_elements // n_in))
        samples = max(1, max_elements // (n_out * n_in))
        jacobian = torch.func.jacrev(single, chunk_size=rows if rows < n_out else None)
        chunks = []
        for chunk in inputs.split(samples):
            try:
                chunks.append(torch.func.vmap(jacobian)(chunk))
            except (RuntimeError, NotImplementedError):  # modules vmap cannot batch: one sample at a time
                chunks.append(torch.stack([torch.autograd.functional.jacobian(single, x) for x in chunk]))
        jac = torch.cat(chunks)
    finally:
        model.train(was_training)
    return jac.reshape(inputs.shape[0], -1, inputs[0].numel()).detach()


def mean_jsv(model: nn.Module, inputs: Tensor) -> float:
    """Mean JSV: mean singular value of the input–output Jacobian J_i = ∂f(x_i)/∂x_i, averaged
    over the batch: (1/B) Σ_i mean(σ(J_i)). The trainability measure of TPP / OPP."""
    jac = input_output_jacobians(model, inputs).double()
    return float(torch.linalg.svdvals(jac).mean())


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d and Linear of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@torch.no_grad()
def orthogonality_per_layer(model: nn.Module) -> dict[str, float]:
    """Degree of orthogonality ‖diag(G)‖_F / ‖G‖_F, G = W Wᵀ, of every Conv2d / Linear weight."""
    return {name: float(reference.orthogonality(m.weight)) for name, m in prunable_layers(model).items()}


@torch.no_grad()
def filter_norms(model: nn.Module, p: int = 1) -> dict[str, Tensor]:
    """The ℓp norm of every output filter (row of W) of every Conv2d / Linear."""
    return {name: reference.as_rows(m.weight).norm(p=p, dim=1).cpu() for name, m in prunable_layers(model).items()}


def params_flops(model: nn.Module, example_inputs: Tensor) -> tuple[int, int]:
    """(params, FLOPs) for one forward of ``example_inputs`` (FLOPs per batch, MACs convention):
    ``fastreg.pruning.count_params_flops``."""
    from .pruning import count_params_flops

    return count_params_flops(model, example_inputs)


def sparsity(dense: int, pruned: int) -> float:
    """Fraction removed, 1 − pruned / dense (of params or FLOPs)."""
    return 1.0 - pruned / dense if dense else 0.0


def speedup(dense_flops: int, pruned_flops: int) -> float:
    """Theoretical speedup dense FLOPs / pruned FLOPs (the papers' "speedup" column)."""
    return dense_flops / pruned_flops if pruned_flops else float("inf")
