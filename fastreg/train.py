"""The standard trainer behind ``fastreg train`` and ``fastreg prune``.

A run is a list of phases, each a number of epochs (the ``prune`` phase is instantaneous):

    train:                  pretrain
    prune --method tpp:     [pretrain] → regularize (TPPLoss: reg grows to τ) → stabilize (reg held at τ, the pruned
                            filters zeroed layer by layer: fastreg.pruning.TPPPruner) → prune → finetune
    prune --method slim:    [pretrain] → regularize (SlimmingLoss, + s·Σ|γ|) → prune (global |γ| threshold) → finetune
    prune --method ocs:     ocs (training from scratch with OCSPruner; ends at its pruning decision) → prune → finetune
    prune --method l1:      [pretrain] → prune (L1-norm masks) → finetune
    prune --method scratch: [pretrain] → prune (L1-norm architecture) → re-initialise → finetune

(``[pretrain]`` is skipped when ``--pretrained`` gives a checkpoint of ``fastreg train``.) TPP's
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
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from . import metrics
from .data import DatasetInfo, first_batch, load_dataset
from .models import canonical_name, get_model

METHODS = ("tpp", "ocs", "l1", "slim", "scratch")
REGULARIZED_PHASES = ("regularize", "stabilize", "ocs")  # the phases whose regularizer time is measured


@dataclass
class Config:
    """Every setting of a run (the CLI flags of ``fastreg train`` / ``fastreg prune``)."""

    command: str = "prune"  # "train" or "prune"
    model: str = "digits_cnn"
    dataset: str = "digits"
    data_dir: str = "./data"
    download: bool = False
    run_dir: str = "runs/default"
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads per process (0: torch's default)
    batch_size: int = 64  # global batch (split over processes)
    workers: int = 0
    # pretraining (``train``, or ``prune`` without --pretrained)
    pretrained: str | None = None
    pretrain_epochs: int = 20
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # pruning
    method: str = "tpp"
    pruning_ratio: float = 0.5
    reg_epochs: int | str | None = None  # None: "auto" for tpp (until reg reaches τ), 10 for slim
    reg_lr: float = 0.01
    finetune_epochs: int = 10
    finetune_lr: float = 0.01
    # TPP (TPPLoss / TPPPruner keywords; the defaults are the original code's, for CIFAR-size data)
    lw: float = 1000.0
    reg_delta: float = 1e-4
    reg_interval: int = 10
    reg_ceiling: float = 1.0
    target: str = "decorrelate"
    stabilize_iters: int | None = None  # None: 10000 after reg_epochs "auto", 0 (no stabilize phase) after N epochs
    zero_interval: int = 100
    # network slimming
    slim_s: float = 1e-4
    # OCSPruner's schedule (its defaults: the OCSPruner paper's Table 8)
    ocs_window: int = 5
    ocs_start_tol: float = 1e-4
    ocs_prune_tol: float = 1e-3
    ocs_lam_init: float = 1e-4
    ocs_lam_delta: float = 1e-4
    ocs_lam_interval: int = 1
    # reporting
    log_every: int = 10
    jsv_samples: int = 16
    jsv_every: int = 1  # fine-tuning epochs between mean-JSV measurements (and the last epoch)
    plots: bool = True
    quiet: bool = False

    def validate(self) -> "Config":
        """Check every setting before anything runs (errors name the CLI flag), and fill in the
        method-dependent defaults of ``reg_epochs`` and ``stabilize_iters``."""
        if self.command not in ("train", "prune"):
            raise ValueError(f"command must be 'train' or 'prune', got {self.command!r}")
        if self.method not in METHODS:
            raise ValueError(f"{flag('method')} must be one of {METHODS}, got {self.method!r}")
        if not 0.0 <= self.pruning_ratio < 1.0:
            raise ValueError(f"{flag('pruning_ratio')} must be in [0, 1), got {self.pruning_ratio}")
        if self.reg_epochs is None:
            self.reg_epochs = {"tpp": "auto", "slim": SLIM_REG_EPOCHS}.get(self.method)
        if isinstance(self.reg_epochs, str) and self.reg_epochs != "auto":
            raise ValueError(f"{flag('reg_epochs')} must be an int >= 0 or 'auto', got {self.reg_epochs!r}")
        if self.reg_epochs == "auto" and self.method == "slim":
            raise ValueError(f"{flag('reg_epochs')} auto follows TPP's reg schedule; give network slimming a number of epochs")
        if self.method == "tpp" and self.stabilize_iters is None:
            self.stabilize_iters = TPP_STABILIZE_ITERS if self.reg_epochs == "auto" else 0
        least_int = dict.fromkeys(("pretrain_epochs", "finetune_epochs", "jsv_samples", "workers", "threads"), 0)
        least_int.update(dict.fromkeys(("batch_size", "log_every", "reg_interval", "jsv_every", "zero_interval", "ocs_window",
                                        "ocs_lam_interval"), 1))
        least_int.update({name: 0 for name in ("reg_epochs", "stabilize_iters") if getattr(self, name) not in (None, "auto")})
        for name, least in least_int.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{flag(name)} must be an int >= {least}, got {value!r}")
        for name in ("lw", "reg_delta", "reg_ceiling", "slim_s", "ocs_start_tol", "ocs_prune_tol", "ocs_lam_init", "ocs_lam_delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{flag(name)} must be a finite number >= 0, got {value!r}")
        if self.method == "tpp" and self.reg_epochs == "auto" and self.reg_delta == 0 < self.reg_ceiling:
            raise ValueError(f"{flag('reg_epochs')} auto regularizes until reg reaches {flag('reg_ceiling')}, which "
                             f"{flag('reg_delta')} 0 never does; give {flag('reg_delta')} > 0 or a number of epochs")
        self.model = canonical_name(self.model)
        return self


SLIM_REG_EPOCHS = 10  # network slimming's regularize phase when --reg-epochs is not given
TPP_STABILIZE_ITERS = 10000  # the TPP code's stabilize phase on CIFAR-size data (40000 on ImageNet)


def flag(name: str) -> str:
    """The CLI flag of a :class:`Config` field: ``reg_delta`` → ``--reg-delta`` (``pretrain_epochs``: ``--epochs``)."""
    return "--epochs" if name == "pretrain_epochs" else "--" + name.replace("_", "-")


@dataclass
class Phase:
    name: str  # pretrain | regularize | stabilize | ocs | prune | finetune
    epochs: int
    lr: float = 0.0
    schedule: str = "cosine"  # "cosine" (per iteration, to 0) or "constant"
    steps: int | None = None  # the phase ends after this many steps (its last epoch cut short); None: all epochs


def steps_phase(name: str, steps: int, steps_per_epoch: int, lr: float) -> Phase:
    """A constant-lr phase of ``steps`` iterations (⌈steps / steps_per_epoch⌉ epochs, the last one cut short)."""
    return Phase(name, math.ceil(steps / steps_per_epoch), lr, "constant", steps)


def updates_to_ceiling(delta: float, ceiling: float) -> int | None:
    """The fewest GReg updates m with Δ·m ≥ τ, in the float arithmetic of ``reg_schedule``
    (None when Δ = 0 < τ: reg never gets there)."""
    if ceiling <= 0:
        return 0
    if delta <= 0:
        return None
    m = math.ceil(ceiling / delta)
    while m > 0 and delta * (m - 1) >= ceiling:
        m -= 1
    while delta * m < ceiling:
        m += 1
    return m


def tpp_schedule(cfg: Config, steps_per_epoch: int) -> tuple[int, float]:
    """(k, reg held): TPP's regularize phase is iterations 0 … k − 1 of reg_i = min(τ, Δ·⌊i / K_u⌋),
    the stabilize phase then holds reg at ``reg held`` = reg_k for ``stabilize_iters`` + 1 iterations
    (``fastreg.pruning.TPPPruner``: from the iteration reg reaches it) and zeroes the pruned filters.

    ``reg_epochs="auto"``: k = K_u·⌈τ/Δ⌉, the first iteration at τ. ``reg_epochs=N`` (B = N·steps_per_epoch
    iterations) with a stabilize phase: reg grows for at most B iterations, k = K_u·min(⌈τ/Δ⌉, ⌊B / K_u⌋)
    (the stabilize phase starts where reg would next grow); without one (``stabilize_iters=0``): k = B."""
    from .pruning import reg_schedule

    cfg.validate()
    budget = None if cfg.reg_epochs == "auto" else cfg.reg_epochs * steps_per_epoch
    if budget is not None and not cfg.stabilize_iters:
        k = budget
    else:
        updates = updates_to_ceiling(cfg.reg_delta, cfg.reg_ceiling)
        if budget is not None:
            updates = 0 if updates is None else min(updates, budget // cfg.reg_interval)
        k = updates * cfg.reg_interval
    return k, reg_schedule(k, cfg.reg_delta, cfg.reg_interval, cfg.reg_ceiling)


def plan(cfg: Config, steps_per_epoch: int = 1) -> list[Phase]:
    """The phases of a run (see the module docstring)."""
    cfg.validate()
    pretrain = Phase("pretrain", cfg.pretrain_epochs, cfg.lr)
    if cfg.command == "train":
        return [pretrain]
    phases = [pretrain] if cfg.pretrained is None and cfg.method != "ocs" else []
    if cfg.method == "tpp":
        phases.append(steps_phase("regularize", tpp_schedule(cfg, steps_per_epoch)[0], steps_per_epoch, cfg.reg_lr))
        if cfg.stabilize_iters:
            phases.append(steps_phase("stabilize", cfg.stabilize_iters + 1, steps_per_epoch, cfg.reg_lr))
    if cfg.method == "slim":
        phases.append(Phase("regularize", cfg.reg_epochs, cfg.reg_lr, "constant"))
    if cfg.method == "ocs":
        phases.append(Phase("ocs", cfg.pretrain_epochs, cfg.lr))
    phases.append(Phase("prune", 0))
    phases.append(Phase("finetune", cfg.finetune_epochs, cfg.lr if cfg.method == "scratch" else cfg.finetune_lr))
    return phases


# -------------------------------------------------------------------------------------------------
# distributed helpers
# -------------------------------------------------------------------------------------------------
def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def choose_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to ``path`` + '.tmp', then os.replace: a reader never sees a partial file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------
# pruning methods: what the regularize phase adds to a step, and which filters are kept
# -------------------------------------------------------------------------------------------------
class Regularizer:
    """What a method adds to a training step. ``loss`` returns the objective, ``after_backward``
    edits gradients in place; ``keep_masks`` (module name → bool, True = kept) picks the filters."""

    reg: float | None = None

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target)

    def after_backward(self) -> None:
        pass

    def after_step(self, lr: float) -> None:
        pass

    def end_epoch(self, epoch: int) -> bool:
        """Called after every epoch; True ends the phase early (OCSPruner decided to prune)."""
        return False

    def keep_masks(self) -> dict[str, Tensor] | None:
        """The filters this method keeps, if it has chosen them already (TPP, OCSPruner)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _fastreg_api(name: str) -> Any:
    """``fastreg.pruning.<name>`` (the pruning workflow); a clear error when it is missing."""
    from . import pruning

    obj = getattr(pruning, name, None)
    if obj is None:
        raise RuntimeError(f"fastreg.pruning.{name} is not available in this build of fastreg")
    return obj


class TPPRegularizer(Regularizer):
    """TPP: ``fastreg.TPPLoss`` (gram decorrelation + growing L2 / BN terms on pruned filters) with reg
    capped at ``ceiling``; with a stabilize phase (``stabilize_iters`` > 0) inside
    ``fastreg.pruning.TPPPruner``, which holds reg there for ``stabilize_iters`` iterations while it zeroes
    the pruned filters, biases, BN γ and β of the i-th Conv/Linear layer after every step from stabilize
    iteration (i + 1)·``zero_interval`` on, and prunes at the end of it."""

    def __init__(self, model: nn.Module, cfg: Config, example_inputs: Tensor, ceiling: float):
        kwargs = dict(lw=cfg.lw, delta=cfg.reg_delta, interval=cfg.reg_interval, ceiling=ceiling, target=cfg.target,
                      example_inputs=example_inputs)
        self.pruner = None
        if cfg.stabilize_iters:
            self.pruner = _fastreg_api("TPPPruner")(model, cfg.pruning_ratio, stabilize_iters=cfg.stabilize_iters,
                                                    zero_interval=cfg.zero_interval, **kwargs)
            self.criterion = self.pruner.criterion
        else:
            self.criterion = _fastreg_api("TPPLoss")(model, cfg.pruning_ratio, **kwargs)
        self.objective = self.pruner or self.criterion  # the pruner refuses a step once its stabilize phase is over

    @property
    def reg(self) -> float:
        return float(self.criterion.reg)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.objective(logits, target)

    def after_step(self, lr: float) -> None:
        if self.pruner is not None:
            self.pruner.step()

    def keep_masks(self) -> dict[str, Tensor]:
        return dict(self.criterion.keep_masks)

    def prune(self, model: nn.Module, example_inputs: Tensor) -> nn.Module:
        """The pruned model: ``TPPPruner.prune`` (zero every pruned slice, remove it; it refuses before the
        end of the stabilize phase), or without a stabilize phase the pruned filters removed."""
        if self.pruner is not None:
            return self.pruner.prune(example_inputs)
        return physically_prune(model, self.keep_masks(), example_inputs)

    def state_dict(self) -> dict[str, Any]:
        return (self.pruner or self.criterion).state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        (self.pruner or self.criterion).load_state_dict(state)


class SlimRegularizer(Regularizer):
    """Network slimming (Liu et al. 2017): ``fastreg.pruning.SlimmingLoss``, base loss + s·Σ|γ|
    over every BatchNorm scale; the masks come from one global |γ| threshold at pruning time."""

    def __init__(self, model: nn.Module, cfg: Config):
        self.criterion = _fastreg_api("SlimmingLoss")(model, cfg.slim_s)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.criterion(logits, target)


class OCSRegularizer(Regularizer):
    """OCSPruner one-cycle sparsity learning (``fastreg.pruning.OCSPruner``): group lasso after
    backward, in-place shrinkage after the step, the partition / stability schedule per epoch.
    ``pruning_ratio`` is OCSPruner's target fraction of FLOPs removed."""

    def __init__(self, model: nn.Module, cfg: Config, example_inputs: Tensor):
        self.pruner = _fastreg_api("OCSPruner")(
            model, cfg.pruning_ratio, example_inputs=example_inputs, window=cfg.ocs_window, start_tol=cfg.ocs_start_tol,
            prune_tol=cfg.ocs_prune_tol, lam_init=cfg.ocs_lam_init, lam_delta=cfg.ocs_lam_delta,
            lam_interval=cfg.ocs_lam_interval,
        )

    @property
    def reg(self) -> float:
        return float(self.pruner.lam)

    def after_backward(self) -> None:
        self.pruner.apply_grad_()

    def after_step(self, lr: float) -> None:
        self.pruner.shrink_(lr)

    def end_epoch(self, epoch: int) -> bool:
        return self.pruner.end_epoch() == "prune"

    def keep_masks(self) -> dict[str, Tensor]:
        masks = dict(self.pruner.keep_masks)
        if not masks:  # the schedule never decided to prune: the current partition
            partition = self.pruner.partition()
            masks = {n: m for g, m in zip(self.pruner.groups, partition) if not bool(m.all()) for n in g.producers}
        return masks

    def state_dict(self) -> dict[str, Any]:
        return self.pruner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruner.load_state_dict(state)


def physically_prune(model: nn.Module, keep_masks: dict[str, Tensor], example_inputs: Tensor) -> nn.Module:
    """``fastreg.prune``: remove the pruned filters, their BN channels and the next layers' inputs."""
    return _fastreg_api("prune")(model, keep_masks, example_inputs, inplace=True)


def prune_by_method(method: str, model: nn.Module, ratio: float, example_inputs: Tensor,
                    regularizer: Regularizer | None) -> tuple[nn.Module, dict[str, Tensor]]:
    """(pruned model, keep masks): TPP / OCSPruner masks from their regularizer, the smallest BN
    |γ| under one global threshold (slim), the smallest-L1 filters (l1, and scratch's architecture)."""
    if method == "tpp":
        return regularizer.prune(model, example_inputs), regularizer.keep_masks()
    if method == "ocs":
        masks = regularizer.keep_masks()
        return physically_prune(model, masks, example_inputs), masks
    if method == "slim":
        return _fastreg_api("slimming_prune")(model, ratio, example_inputs)
    return _fastreg_api("l1_prune")(model, ratio, example_inputs)


# -------------------------------------------------------------------------------------------------
# the trainer
# -------------------------------------------------------------------------------------------------
class Trainer:
    """Runs the phases of :func:`plan` for ``cfg``; ``run()`` returns the summary dict."""

    def __init__(self, cfg: Config, dataset: DatasetInfo | None = None):
        self.cfg = cfg.validate()
        self.rank, self.world, local_rank = distributed_env()
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo")
        if cfg.batch_size % self.world:
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes {self.world}")
        self.device = choose_device(cfg.device, local_rank)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.is_main = self.rank == 0
        self.data = dataset or self.load_data()
        self.example = first_batch(self.data.test, 1)[0].to(self.device)
        self.jsv_inputs = first_batch(self.data.test, cfg.jsv_samples)[0].to(self.device) if cfg.jsv_samples else None
        self.steps_per_epoch = self.count_steps_per_epoch()
        self.check_model_fits_method()
        self.phases = plan(cfg, self.steps_per_epoch)
        self.log_path = os.path.join(cfg.run_dir, "log.jsonl")
        self.ckpt_path = os.path.join(cfg.run_dir, "checkpoint.pt")
        self.records: list[dict] = []
        self.norm_snapshots: list[dict] = []
        self.summary: dict[str, Any] = {"model": cfg.model, "dataset": self.data.name, "command": cfg.command}
        if cfg.command == "prune":
            self.summary.update(method=cfg.method, pruning_ratio=cfg.pruning_ratio)
        self.keep_masks: dict[str, Tensor] | None = None
        self.regularizer: Regularizer | None = None
        self.iteration = 0
        self.resumed_from: int | None = None  # the checkpoint's iteration when resuming
        self.reg_seconds = 0.0
        self.reg_steps = 0
        self.optimizer_state: dict | None = None  # the last phase's, for a phase that goes on with it

    def count_steps_per_epoch(self) -> int:
        """Steps per epoch of every process: ⌊⌊n / world⌋ / (batch_size / world)⌋ (the sampler and the
        loader drop incomplete batches); an error naming --batch-size if that is 0."""
        n, per_process = len(self.data.train), len(self.data.train) // self.world
        steps = per_process // (self.cfg.batch_size // self.world)
        if steps == 0:
            where = f"{n} samples" + (f", {per_process} per process" if self.world > 1 else "")
            raise ValueError(f"--batch-size {self.cfg.batch_size} is larger than the training set ({where}): an epoch "
                             "would have no complete batch (incomplete batches are dropped)")
        return steps

    def check_model_fits_method(self) -> None:
        """The checks that need the network, before any training (on the meta device: no memory, no
        init): network slimming needs an affine BatchNorm; TPP's stabilize phase must last until every
        Conv/Linear layer has been zeroed (``fastreg.pruning.TPPPruner``'s rule)."""
        cfg = self.cfg
        if cfg.command != "prune" or not (cfg.method == "slim" or (cfg.method == "tpp" and cfg.stabilize_iters)):
            return
        from .pruning.graph import LAYER_TYPES, NORM_TYPES

        with torch.device("meta"):
            model = get_model(cfg.model, self.data.num_classes, self.data.in_channels, self.data.input_shape)
        if cfg.method == "slim" and not any(isinstance(m, NORM_TYPES) and m.affine for m in model.modules()):
            raise ValueError(f"--method slim ranks channels by their BatchNorm scale γ, and {cfg.model} has no affine "
                             "BatchNorm layer: choose another --method or --model")
        layers = sum(isinstance(m, LAYER_TYPES) for m in model.modules())
        if cfg.method == "tpp" and cfg.stabilize_iters < cfg.zero_interval * layers:  # as TPPPruner counts them
            raise ValueError(
                f"--stabilize-iters {cfg.stabilize_iters} < --zero-interval {cfg.zero_interval} × {layers} Conv/Linear layers "
                f"of {cfg.model}: the stabilize phase would end before every layer is zeroed; give --stabilize-iters >= "
                f"{cfg.zero_interval * layers} or a smaller --zero-interval"
            )

    def load_data(self) -> DatasetInfo:
        """The dataset; with ``download`` and several processes, the main process fetches it first."""
        cfg = self.cfg
        if self.world > 1 and cfg.download:
            if self.is_main:
                load_dataset(cfg.dataset, cfg.data_dir, download=True)
            dist.barrier()
        return load_dataset(cfg.dataset, cfg.data_dir, cfg.download and self.world == 1)

    # ---- logging -------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        self.records.append(record)
        if self.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def say(self, text: str) -> None:
        if self.is_main and not self.cfg.quiet:
            print(text, file=sys.stderr, flush=True)

    # ---- model, data, optimizer ----------------------------------------------------------------
    def build_model(self) -> nn.Module:
        seed_everything(self.cfg.seed)
        return get_model(self.cfg.model, self.data.num_classes, self.data.in_channels, self.data.input_shape).to(self.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def train_loader(self) -> tuple[DataLoader, DistributedSampler]:
        sampler = DistributedSampler(
            self.data.train, num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.cfg.seed, drop_last=True
        )
        loader = DataLoader(
            self.data.train, batch_size=self.cfg.batch_size // self.world, sampler=sampler,
            drop_last=True, num_workers=self.cfg.workers,
        )
        return loader, sampler

    def evaluate(self, model: nn.Module) -> float:
        """Top-1 accuracy on the test set (each process scores a shard; counts are all-reduced)."""
        shard = Subset(self.data.test, range(self.rank, len(self.data.test), self.world))
        correct, total = metrics.top1_accuracy(model, DataLoader(shard, batch_size=256), self.device)
        if self.world > 1:
            counts = torch.tensor([correct, total], dtype=torch.float64, device=self.device)
            dist.all_reduce(counts)
            correct, total = counts.tolist()
        return correct / max(total, 1)

    def mean_jsv(self, model: nn.Module) -> float | None:
        """Mean JSV on the first ``jsv_samples`` test inputs (main process only: it only logs)."""
        if self.jsv_inputs is None or not self.is_main:
            return None
        return metrics.mean_jsv(model, self.jsv_inputs)

    def make_optimizer(self, model: nn.Module, phase: Phase, steps: int):
        opt = torch.optim.SGD(model.parameters(), lr=phase.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)
        if phase.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        return opt, sched

    def make_regularizer(self, model: nn.Module, phase: Phase) -> Regularizer:
        if phase.name == "stabilize" and isinstance(self.regularizer, TPPRegularizer):
            return self.regularizer  # the regularize phase's TPPPruner goes on
        if phase.name in ("regularize", "stabilize") and self.cfg.method == "tpp":
            return TPPRegularizer(model, self.cfg, self.example, tpp_schedule(self.cfg, self.steps_per_epoch)[1])
        if phase.name == "regularize" and self.cfg.method == "slim":
            return SlimRegularizer(model, self.cfg)
        if phase.name == "ocs":
            return OCSRegularizer(model, self.cfg, self.example)
        return Regularizer()

    # ---- checkpoints ---------------------------------------------------------------------------
    def architecture(self) -> dict[str, Any]:
        """What :func:`load_model` needs to rebuild the network of a checkpoint."""
        return {"config": dataclasses.asdict(self.cfg), "num_classes": self.data.num_classes,
                "input_shape": self.data.input_shape, "keep_masks": self.keep_masks}

    def save_checkpoint(self, model, phase_index, epochs_done, opt, sched) -> None:
        if self.is_main:
            atomic_save({
                **self.architecture(),
                "phase_index": phase_index,
                "epochs_done": epochs_done,
                "iteration": self.iteration,
                "model": model.state_dict(),
                "optimizer": opt.state_dict() if opt else None,
                "scheduler": sched.state_dict() if sched else None,
                "regularizer": self.regularizer.state_dict() if self.regularizer else None,
                "rng": rng_state(),
                "summary": self.summary,
                "norm_snapshots": self.norm_snapshots,
                "reg_timing": (self.reg_seconds, self.reg_steps),
            }, self.ckpt_path)
        if self.world > 1:
            dist.barrier()

    def pruned_model(self, keep_masks: dict[str, Tensor]) -> nn.Module:
        """A fresh model of this config pruned to ``keep_masks`` (the architecture of a checkpoint)."""
        return physically_prune(self.build_model(), keep_masks, self.example)

    def load_pretrained(self, model: nn.Module) -> None:
        ckpt = torch.load(self.cfg.pretrained, map_location=self.device, weights_only=False)
        if ckpt.get("keep_masks"):
            raise ValueError(f"pretrained checkpoint {self.cfg.pretrained!r} is a pruned model; give a dense one")
        if ckpt["config"]["model"] != self.cfg.model:
            raise ValueError(
                f"pretrained checkpoint {self.cfg.pretrained!r} holds a {ckpt['config']['model']}, not a {self.cfg.model}"
            )
        model.load_state_dict(ckpt["model"])

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            os.makedirs(cfg.run_dir, exist_ok=True)
        start_phase, start_epoch, resume_state = 0, 0, None
        model = self.build_model()
        if cfg.resume and os.path.exists(self.ckpt_path):
            resume_state = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
            self.check_same_run(resume_state["config"])
            start_phase, start_epoch = resume_state["phase_index"], resume_state["epochs_done"]
            self.iteration = self.resumed_from = resume_state["iteration"]
            self.keep_masks = resume_state["keep_masks"]
            self.summary = resume_state["summary"]
            self.norm_snapshots = resume_state["norm_snapshots"]
            self.reg_seconds, self.reg_steps = resume_state["reg_timing"]
            if self.keep_masks is not None:
                model = self.pruned_model(self.keep_masks)
            model.load_state_dict(resume_state["model"])
            self.restore_log()
            self.say(f"resumed {self.ckpt_path} at iteration {self.iteration}")
        else:
            if self.is_main and os.path.exists(self.log_path):
                os.remove(self.log_path)
            if cfg.pretrained:
                self.load_pretrained(model)
            self.log({"event": "config", **dataclasses.asdict(cfg), "world_size": self.world})
            self.summary["params_dense"], self.summary["flops_dense"] = metrics.params_flops(model, self.example)
            if cfg.pretrained:
                self.summary["acc_dense"] = self.evaluate(model)
        wall = time.perf_counter()
        for index in range(start_phase, len(self.phases)):
            phase = self.phases[index]
            if phase.name == "prune":
                model = self.prune(model)
                self.save_checkpoint(model, index + 1, 0, None, None)
                continue
            model = self.run_phase(model, index, phase, start_epoch if index == start_phase else 0,
                                   resume_state if index == start_phase else None)
            resume_state = None
        self.summary["wall_seconds"] = self.summary.get("wall_seconds", 0.0) + time.perf_counter() - wall
        if self.reg_steps:
            self.summary["reg_ms_per_step"] = 1e3 * self.reg_seconds / self.reg_steps
        if self.is_main:
            with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
                json.dump(self.summary, f, indent=2)
            if cfg.plots:
                from . import plots  # matplotlib: imported only when plotting

                self.summary["plots"] = plots.save_all(cfg.run_dir, self.records, self.norm_snapshots)
        self.model = model
        return self.summary

    # Settings that may change between a run and its resumption (they do not change the result).
    RESUMABLE_CHANGES = ("resume", "quiet", "threads", "workers", "plots", "download", "data_dir", "device")

    def check_same_run(self, saved: dict) -> None:
        """Resuming with other settings would not continue the same trajectory: refuse, naming them."""
        current = dataclasses.asdict(self.cfg)
        changed = sorted(k for k in current if k not in self.RESUMABLE_CHANGES and saved.get(k) != current[k])
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise ValueError(f"resume: {self.ckpt_path} was written with other settings ({diffs}); use another --run-dir")

    def restore_log(self) -> None:
        """Keep the log records up to the checkpoint's iteration (later ones are replayed)."""
        if not os.path.exists(self.log_path):
            return
        with open(self.log_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        self.records = [r for r in records if r.get("iter", 0) <= self.iteration and r.get("event") != "resumed"]
        if self.is_main:
            tmp = self.log_path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            os.replace(tmp, self.log_path)
        self.log({"event": "resumed", "iter": self.iteration})

    def prune(self, model: nn.Module) -> nn.Module:
        """Choose the masks, record the before/after metrics, remove the pruned filters."""
        cfg = self.cfg
        self.summary["acc_before_prune"] = self.evaluate(model)
        self.summary["jsv_before_prune"] = self.mean_jsv(model)
        model, masks = prune_by_method(cfg.method, model, cfg.pruning_ratio, self.example, self.regularizer)
        self.keep_masks = {name: mask.detach().cpu() for name, mask in masks.items()}
        self.summary["params"], self.summary["flops"] = metrics.params_flops(model, self.example)
        self.summary["acc_after_prune"] = self.evaluate(model)
        self.summary["jsv_after_prune"] = self.mean_jsv(model)
        self.summary["speedup"] = metrics.speedup(self.summary["flops_dense"], self.summary["flops"])
        self.summary["param_sparsity"] = metrics.sparsity(self.summary["params_dense"], self.summary["params"])
        if cfg.method == "scratch":  # Liu et al. 2019: keep the architecture, train it from scratch
            model = _fastreg_api("scratch_reinit")(model, seed=cfg.seed + 1)
        self.regularizer = None
        self.log({"event": "pruned", "iter": self.iteration, "acc": self.summary["acc_after_prune"],
                  "mean_jsv": self.summary["jsv_after_prune"], "params": self.summary["params"],
                  "flops": self.summary["flops"], "acc_before": self.summary["acc_before_prune"]})
        self.say(f"pruned: acc {self.summary['acc_before_prune']:.4f} -> {self.summary['acc_after_prune']:.4f}, "
                 f"params {self.summary['params_dense']} -> {self.summary['params']}, "
                 f"FLOPs {self.summary['flops_dense']} -> {self.summary['flops']}")
        return model

    def snapshot_norms(self, model: nn.Module, masks: dict[str, Tensor]) -> None:
        """Per-layer-normalised L1 filter norms of kept and pruned filters (for the histogram)."""
        norms = metrics.filter_norms(model)
        kept, pruned = [], []
        for name, keep in masks.items():
            if name in norms:
                n = norms[name] / norms[name].max().clamp_min(1e-12)
                kept += n[keep.cpu()].tolist()
                pruned += n[~keep.cpu()].tolist()
        self.norm_snapshots.append({"iter": self.iteration, "kept": kept, "pruned": pruned})

    def clock(self) -> float:
        """perf_counter after the device's queued work (CUDA kernels run asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def train_step(self, model: nn.Module, x: Tensor, y: Tensor, opt: torch.optim.Optimizer, timed: bool) -> Tensor:
        """One step: forward, the method's objective, backward, its gradient edits, the optimizer
        step, its in-place updates. ``timed``: the regularizer's share is measured by a split
        backward — the objective on detached logits (every regularizer term reaches the parameters
        directly), then the network's backward from the logits' gradient — and by timing its
        gradient edits (which need every gradient, so they come after both) and in-place updates."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        logits = model(x)
        opt.zero_grad(set_to_none=True)
        lr = opt.param_groups[0]["lr"]
        if not timed:
            loss = self.regularizer.loss(logits, y)
            loss.backward()
            self.regularizer.after_backward()
            opt.step()
            self.regularizer.after_step(lr)
            return loss
        leaf = logits.detach().requires_grad_()
        t0 = self.clock()
        loss = self.regularizer.loss(leaf, y)
        loss.backward()
        seconds = self.clock() - t0
        logits.backward(leaf.grad)
        t0 = self.clock()
        self.regularizer.after_backward()
        seconds += self.clock() - t0
        opt.step()
        t0 = self.clock()
        self.regularizer.after_step(lr)
        self.reg_seconds += seconds + self.clock() - t0
        self.reg_steps += 1
        return loss

    def run_phase(self, model: nn.Module, index: int, phase: Phase, start_epoch: int, resume_state: dict | None) -> nn.Module:
        cfg = self.cfg
        loader, sampler = self.train_loader()
        opt, sched = self.make_optimizer(model, phase, phase.epochs * len(loader) if phase.steps is None else phase.steps)
        self.regularizer = self.make_regularizer(model, phase)
        if resume_state is not None:
            if resume_state["optimizer"] is not None:
                opt.load_state_dict(resume_state["optimizer"])
                sched.load_state_dict(resume_state["scheduler"])
            if resume_state["regularizer"] is not None:
                self.regularizer.load_state_dict(resume_state["regularizer"])
            set_rng_state(resume_state["rng"])
        elif phase.name == "stabilize":  # TPP: one optimizer from the regularize phase on, as the original code
            opt.load_state_dict(self.optimizer_state)
        elif phase.name == "regularize" and phase.epochs and self.regularizer.keep_masks() is not None:
            self.snapshot_norms(model, self.regularizer.keep_masks())
        ddp_model = self.wrap(model)
        timed = self.world == 1 and phase.name in REGULARIZED_PHASES
        from tqdm.auto import tqdm

        show = self.is_main and not cfg.quiet and sys.stderr.isatty()
        first_epoch = sum(p.epochs for p in self.phases[:index])
        for epoch in range(start_epoch, phase.epochs):
            sampler.set_epoch(first_epoch + epoch)
            model.train()
            steps = len(loader) if phase.steps is None else min(len(loader), phase.steps - epoch * len(loader))
            bar = tqdm(itertools.islice(loader, steps), total=steps, desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
                       disable=not show, leave=False)
            for x, y in bar:
                lr = opt.param_groups[0]["lr"]
                loss = self.train_step(ddp_model, x, y, opt, timed)
                sched.step()
                self.iteration += 1
                if self.iteration % cfg.log_every == 0:
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(f"loss became {loss_value} at iteration {self.iteration} ({phase.name})")
                    self.log({"event": "step", "phase": phase.name, "epoch": first_epoch + epoch, "iter": self.iteration,
                              "loss": loss_value, "reg": self.regularizer.reg, "lr": lr})
                    reg = {} if self.regularizer.reg is None else {"reg": f"{self.regularizer.reg:.2e}"}
                    bar.set_postfix(loss=f"{loss_value:.3f}", **reg)
            finished_early = self.regularizer.end_epoch(epoch)
            acc = self.evaluate(model)
            record = {"event": "epoch", "phase": phase.name, "epoch": first_epoch + epoch, "iter": self.iteration, "acc": acc}
            if phase.name == "finetune" and ((epoch + 1) % cfg.jsv_every == 0 or epoch + 1 == phase.epochs):
                record["mean_jsv"] = self.mean_jsv(model)
            if phase.name in ("regularize", "stabilize"):
                if self.regularizer.keep_masks() is not None:
                    self.snapshot_norms(model, self.regularizer.keep_masks())
                record["reg"] = self.regularizer.reg
            self.log(record)
            self.say(f"{phase.name} epoch {epoch + 1}/{phase.epochs}: acc {acc:.4f}")
            self.save_checkpoint(model, index, phase.epochs if finished_early else epoch + 1, opt, sched)
            if finished_early:
                self.say(f"{phase.name}: the pruning decision came after epoch {epoch + 1}")
                break
        key = {"pretrain": "acc_dense", "finetune": "acc_final", "ocs": "acc_dense"}.get(phase.name)
        if key and phase.epochs:
            self.summary[key] = self.evaluate(model)
        if phase.name in ("pretrain", "finetune") and self.is_main:
            atomic_save({**self.architecture(), "model": model.state_dict()}, os.path.join(cfg.run_dir, f"{phase.name}.pt"))
        self.optimizer_state = opt.state_dict()
        return model


def load_model(checkpoint: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model, checkpoint dict) of a checkpoint written by the trainer; pruned architectures are
    rebuilt from the saved keep masks before the weights are loaded."""
    ckpt = torch.load(checkpoint, map_location=device, weights_only=False)
    num_classes, input_shape = ckpt["num_classes"], tuple(ckpt["input_shape"])
    torch.manual_seed(ckpt["config"]["seed"])
    model = get_model(ckpt["config"]["model"], num_classes, input_shape[0], input_shape).to(device)
    if ckpt.get("keep_masks"):
        model = physically_prune(model, ckpt["keep_masks"], torch.zeros(1, *input_shape, device=device))
    model.load_state_dict(ckpt["model"])
    return model, ckpt
