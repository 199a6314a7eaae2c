"""A run's settings (:class:`Config`, the CLI flags) and its phases (:func:`plan`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..models import canonical_name

METHODS = ("tpp", "ocs", "orthoreg", "l1", "slim", "scratch")
IMPORTANCES = ("l1", "l2", "bn", "fisher", "taylor")  # fastreg.importance
RANKING_METHODS = ("tpp", "orthoreg", "l1", "scratch")  # the methods whose filters are chosen by an importance
BUDGETS = ("E", "B")
ZERO_COUNTS = ("all", "pruned")
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
    zero_count: str = "all"  # TPPPruner: "all" Conv/Linear layers index the zero-out times (original code), or "pruned" ones
    # importance (the methods that rank filters: tpp, orthoreg, l1, scratch)
    importance: str | None = None  # None: fisher for orthoreg, l1 for the others
    importance_batches: int = 0  # training batches a data-driven importance is measured on at pruning time (0: one epoch)
    # OrthoReg: orthogonality-regularized training, pruning in rounds or as an early-bird ticket
    ortho_coeff: float = 1e-4  # λ of λ·Σ_l ‖W_l W_lᵀ − I‖²_F (fastreg.gram_penalty, target "identity", reduction "sum")
    rounds: int = 1
    thresholds: list[float] | None = None  # cumulative % of the prunable filters removed after each round
    early_bird: bool = False
    eb_epsilon: float = 0.1
    eb_window: int = 5
    # scratch (Liu et al. 2019): Scratch-E (the dense training's epochs) or Scratch-B (its FLOPs budget)
    budget: str = "E"
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
            self.reg_epochs = {"tpp": "auto", "slim": SLIM_REG_EPOCHS, "orthoreg": ORTHOREG_REG_EPOCHS}.get(self.method)
        self._validate_ranking()
        if isinstance(self.reg_epochs, str) and self.reg_epochs != "auto":
            raise ValueError(f"{flag('reg_epochs')} must be an int >= 0 or 'auto', got {self.reg_epochs!r}")
        if self.reg_epochs == "auto" and self.method in ("slim", "orthoreg"):
            raise ValueError(f"{flag('reg_epochs')} auto follows TPP's reg schedule; give --method {self.method} a number of epochs")
        if self.method == "tpp" and self.stabilize_iters is None:
            self.stabilize_iters = TPP_STABILIZE_ITERS if self.reg_epochs == "auto" else 0
        least_int = dict.fromkeys(("pretrain_epochs", "finetune_epochs", "jsv_samples", "workers", "threads",
                                   "importance_batches"), 0)
        least_int.update(dict.fromkeys(("batch_size", "log_every", "reg_interval", "jsv_every", "zero_interval", "ocs_window",
                                        "ocs_lam_interval", "rounds", "eb_window"), 1))
        least_int.update({name: 0 for name in ("reg_epochs", "stabilize_iters") if getattr(self, name) not in (None, "auto")})
        for name, least in least_int.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{flag(name)} must be an int >= {least}, got {value!r}")
        for name in ("lw", "reg_delta", "reg_ceiling", "slim_s", "ocs_start_tol", "ocs_prune_tol", "ocs_lam_init", "ocs_lam_delta",
                     "ortho_coeff", "eb_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{flag(name)} must be a finite number >= 0, got {value!r}")
        if self.method == "tpp" and self.reg_epochs == "auto" and self.reg_delta == 0 < self.reg_ceiling:
            raise ValueError(f"{flag('reg_epochs')} auto regularizes until reg reaches {flag('reg_ceiling')}, which "
                             f"{flag('reg_delta')} 0 never does; give {flag('reg_delta')} > 0 or a number of epochs")
        try:
            self.model = canonical_name(self.model)
        except ValueError as exc:
            raise ValueError(f"--{exc}") from None  # ("model must be one of ...": the flag's name)
        return self

    def _validate_ranking(self) -> None:
        """The settings of the ranking methods, OrthoReg's rounds and early-bird, Scratch-B and TPP's zero-out count."""
        if self.importance is not None:
            if self.importance not in IMPORTANCES:
                raise ValueError(f"{flag('importance')} must be one of {IMPORTANCES}, got {self.importance!r}")
            if self.command == "prune" and self.method not in RANKING_METHODS:
                raise ValueError(f"{flag('importance')} applies to the methods that rank filters {RANKING_METHODS}; "
                                 f"--method {self.method} chooses its own")
        if self.budget not in BUDGETS:
            raise ValueError(f"{flag('budget')} must be one of {BUDGETS}, got {self.budget!r}")
        if self.zero_count not in ZERO_COUNTS:
            raise ValueError(f"{flag('zero_count')} must be one of {ZERO_COUNTS}, got {self.zero_count!r}")
        if self.thresholds is not None:
            t = self.thresholds
            if (not isinstance(t, (list, tuple)) or not t or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in t)
                    or not all(0 < v < 100 for v in t) or any(b <= a for a, b in zip(t, t[1:]))):
                raise ValueError(f"{flag('thresholds')} must be increasing percentages in (0, 100), e.g. '[10, 50, 80]', got {t!r}")
            if self.rounds not in (1, len(t)):
                raise ValueError(f"{flag('rounds')} {self.rounds} differs from the {len(t)} {flag('thresholds')}")
            self.rounds = len(t)
        if self.method != "orthoreg" and (self.rounds != 1 or self.thresholds is not None or self.early_bird):
            raise ValueError(f"{flag('rounds')}, {flag('thresholds')} and {flag('early_bird')} are OrthoReg's: --method orthoreg")
        if self.early_bird and self.rounds != 1:
            raise ValueError(f"{flag('early_bird')} draws one ticket: it takes no {flag('rounds')} / {flag('thresholds')}")

    @property
    def importance_kind(self) -> str:
        """The importance that ranks filters: ``--importance``, else fisher for OrthoReg and l1 for the others."""
        return self.importance or ("fisher" if self.method == "orthoreg" else "l1")

    def cumulative_ratios(self) -> list[float]:
        """OrthoReg's cumulative fraction of the prunable filters removed after each round: the
        ``thresholds`` / 100, else ``pruning_ratio``·k/``rounds`` for k = 1 … rounds."""
        if self.thresholds is not None:
            return [v / 100 for v in self.thresholds]
        return [self.pruning_ratio * k / self.rounds for k in range(1, self.rounds + 1)]


SLIM_REG_EPOCHS = 10  # network slimming's regularize phase when --reg-epochs is not given
ORTHOREG_REG_EPOCHS = 10  # OrthoReg's regularized training per round (the early-bird search's longest) when not given
SCRATCH_B_MAX_FACTOR = 2.0  # Scratch-B trains at most twice the dense epochs (Liu et al. 2019)
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
    ratio: float | None = None  # a prune phase's cumulative pruning ratio (OrthoReg's rounds)


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
    from ..pruning import reg_schedule

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


def scratch_b_epochs(epochs: int, dense_flops: float, pruned_flops: float) -> int:
    """Scratch-B's epochs: the dense training's computation, E·F_dense/F_pruned epochs of the pruned
    model rounded to the nearest, at most 2·E (Liu et al. 2019)."""
    if pruned_flops <= 0:
        raise ValueError(f"pruned_flops must be > 0, got {pruned_flops}")
    return min(round(epochs * dense_flops / pruned_flops), math.floor(SCRATCH_B_MAX_FACTOR * epochs))


def plan(cfg: Config, steps_per_epoch: int = 1, scratch_epochs: int | None = None) -> list[Phase]:
    """The phases of a run (see the module docstring). ``scratch_epochs``: the scratch training's
    epochs (Scratch-B's, from the FLOPs; default: ``pretrain_epochs``, Scratch-E)."""
    cfg.validate()
    pretrain = Phase("pretrain", cfg.pretrain_epochs, cfg.lr)
    if cfg.command == "train":
        return [pretrain]
    from_scratch = cfg.method == "ocs" or (cfg.method == "orthoreg" and cfg.early_bird)
    phases = [pretrain] if cfg.pretrained is None and not from_scratch else []
    if cfg.method == "orthoreg":
        if cfg.early_bird:  # the search: regularized training until the ticket's masks settle
            lr = cfg.lr if cfg.pretrained is None else cfg.reg_lr
            return phases + [Phase("regularize", cfg.reg_epochs, lr, "constant"), Phase("prune", 0, ratio=cfg.pruning_ratio),
                             Phase("finetune", cfg.finetune_epochs, cfg.finetune_lr)]
        for ratio in cfg.cumulative_ratios():
            phases += [Phase("regularize", cfg.reg_epochs, cfg.reg_lr, "constant"), Phase("prune", 0, ratio=ratio)]
        return phases + [Phase("finetune", cfg.finetune_epochs, cfg.finetune_lr)]
    if cfg.method == "tpp":
        phases.append(steps_phase("regularize", tpp_schedule(cfg, steps_per_epoch)[0], steps_per_epoch, cfg.reg_lr))
        if cfg.stabilize_iters:
            phases.append(steps_phase("stabilize", cfg.stabilize_iters + 1, steps_per_epoch, cfg.reg_lr))
    if cfg.method == "slim":
        phases.append(Phase("regularize", cfg.reg_epochs, cfg.reg_lr, "constant"))
    if cfg.method == "ocs":  # one cycle: after the pruning decision, the same schedule goes on to its end
        return phases + [Phase("ocs", cfg.pretrain_epochs, cfg.lr), Phase("prune", 0)]
    phases.append(Phase("prune", 0, ratio=cfg.pruning_ratio))
    if cfg.method == "scratch":  # the pruned architecture trained from a fresh init
        phases.append(Phase("finetune", cfg.pretrain_epochs if scratch_epochs is None else scratch_epochs, cfg.lr))
    else:
        phases.append(Phase("finetune", cfg.finetune_epochs, cfg.finetune_lr))
    return phases

