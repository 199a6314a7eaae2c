"""The standard trainer behind ``fastreg train`` and ``fastreg prune``.

A run is a list of phases, each a number of epochs (the ``prune`` phase is instantaneous):

    train:                  pretrain
    prune --method tpp:     [pretrain] → regularize (TPPLoss: reg grows to τ) → stabilize (reg held at τ, the pruned
                            filters zeroed layer by layer: fastreg.pruning.TPPPruner) → prune → finetune
    prune --method slim:    [pretrain] → regularize (SlimmingLoss, + s·Σ|γ|) → prune (global |γ| threshold) → finetune
    prune --method ocs:     ocs (training from scratch with OCSPruner for --epochs; at its pruning decision t* the
                            model is pruned and trains on, on the same learning-rate schedule, for the remaining
                            epochs: one cycle, no separate fine-tuning) → [prune, if it never decided]
    prune --method orthoreg: [pretrain] → (regularize (+ λ·Σ‖WWᵀ − I‖², importance accumulated) → prune to the
                            round's cumulative ratio) × rounds → finetune; with --early-bird: regularize from scratch
                            until the masks settle (fastreg.importance.EarlyBird) → prune → finetune
    prune --method l1:      [pretrain] → prune (L1-norm masks, or --importance) → finetune
    prune --method scratch: [pretrain] → prune (L1-norm architecture) → re-initialise → finetune for --epochs
                            (Scratch-E) or --epochs × dense/pruned FLOPs, at most 2× (Scratch-B: --budget B)

(``[pretrain]`` is skipped when ``--pretrained`` gives a checkpoint of ``fastreg train``.) Modules:
:mod:`~fastreg.train.config` (settings, phases), :mod:`~fastreg.train.methods` (what each method adds to a
step), :mod:`~fastreg.train.trainer` (the loop, logs, checkpoints), :mod:`~fastreg.train.runtime`. TPP's
regularize and stabilize phases are counted in iterations (DESIGN.md §1.2): both may end mid-epoch,
and they share one optimizer (see :func:`tpp_schedule`).

Everything a run produces lives in ``run_dir``: ``log.jsonl`` (one JSON record per logged step,
epoch and event), ``checkpoint.pt`` (written atomically after every epoch: temp file +
``os.replace``), ``summary.json`` and the plots of :mod:`fastreg.plots`. ``resume=True``
continues from the checkpoint exactly: model, optimizer, scheduler, regularizer state and every
RNG state are restored, and the data order is a function of (seed, epoch) only.

Several processes (``torchrun --nproc_per_node=N -m fastreg prune ...``): DistributedDataParallel
(gloo on CPU, nccl on GPU) with a DistributedSampler; ``batch_size`` is the global batch, split
evenly over the processes, and exactly the same samples form each global step. Networks without
BatchNorm follow the 1-process trajectory up to float rounding; with BatchNorm the batch
statistics are per process, as in plain DDP.
"""
from .config import METHODS, Config, Phase, flag, plan, scratch_b_epochs, steps_phase, tpp_schedule, updates_to_ceiling
from .methods import (
    OCSRegularizer,
    OrthoRegRegularizer,
    Regularizer,
    SlimRegularizer,
    TPPRegularizer,
    physically_prune,
    prune_by_method,
)
from .runtime import atomic_save, choose_device, distributed_env, rng_state, seed_everything, set_rng_state
from .trainer import Trainer, load_model

__all__ = [
    "METHODS",
    "Config",
    "OCSRegularizer",
    "OrthoRegRegularizer",
    "Phase",
    "Regularizer",
    "SlimRegularizer",
    "TPPRegularizer",
    "Trainer",
    "atomic_save",
    "choose_device",
    "distributed_env",
    "flag",
    "load_model",
    "physically_prune",
    "plan",
    "prune_by_method",
    "rng_state",
    "scratch_b_epochs",
    "seed_everything",
    "set_rng_state",
    "steps_phase",
    "tpp_schedule",
    "updates_to_ceiling",
]
