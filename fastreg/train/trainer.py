"""The trainer: runs the phases of :func:`~fastreg.train.config.plan`, logs, checkpoints, resumes."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .. import metrics
from ..data import DatasetInfo, first_batch, load_dataset
from ..models import get_model
from ..pruning import l1_prune, scratch_reinit
from ..importance import estimate_importance
from .config import REGULARIZED_PHASES, Config, Phase, plan, scratch_b_epochs, tpp_schedule
from .methods import (
    OCSRegularizer,
    OrthoRegRegularizer,
    Regularizer,
    SlimRegularizer,
    TPPRegularizer,
    compose_masks,
    physically_prune,
    prune_by_method,
)
from .runtime import atomic_save, choose_device, distributed_env, rng_state, seed_everything, set_rng_state

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
        self.phases = plan(cfg, self.steps_per_epoch, self.scratch_epochs())
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
        init): network slimming, and the ``bn`` importance, need an affine BatchNorm."""
        cfg = self.cfg
        uses_bn = cfg.command == "prune" and (cfg.method == "slim" or (cfg.importance == "bn"))
        if not uses_bn:
            return
        from ..pruning.graph import NORM_TYPES

        with torch.device("meta"):
            model = get_model(cfg.model, self.data.num_classes, self.data.in_channels, self.data.input_shape)
        if not any(isinstance(m, NORM_TYPES) and m.affine for m in model.modules()):
            what = "--method slim" if cfg.method == "slim" else "--importance bn"
            raise ValueError(f"{what} ranks channels by their BatchNorm scale γ, and {cfg.model} has no affine "
                             "BatchNorm layer: choose another --method, --importance or --model")

    def scratch_epochs(self) -> int | None:
        """The scratch training's epochs: ``--epochs`` (Scratch-E), or for ``--budget B`` the dense
        training's FLOPs, ``scratch_b_epochs`` of the dense and pruned architecture's FLOPs (the
        architecture does not depend on the weights: a per-layer count of filters)."""
        cfg = self.cfg
        if cfg.command != "prune" or cfg.method != "scratch" or cfg.budget == "E":
            return None
        with torch.random.fork_rng(devices=[]):
            model = get_model(cfg.model, self.data.num_classes, self.data.in_channels, self.data.input_shape).to(self.device)
            dense = metrics.params_flops(model, self.example)[1]
            pruned = metrics.params_flops(l1_prune(model, cfg.pruning_ratio, self.example)[0], self.example)[1]
        return scratch_b_epochs(cfg.pretrain_epochs, dense, pruned)

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

    def continue_schedule(self, model: nn.Module, phase: Phase, opt, sched):
        """A new optimizer over a pruned model's parameters whose learning rate continues ``sched`` where it
        is (the same schedule to its end; the momentum buffers start afresh)."""
        new_opt, new_sched = self.make_optimizer(model, phase, 1)
        new_sched.load_state_dict(sched.state_dict())
        for group, old in zip(new_opt.param_groups, opt.param_groups):
            group["lr"], group["initial_lr"] = old["lr"], old.get("initial_lr", phase.lr)
        return new_opt, new_sched

    def make_regularizer(self, model: nn.Module, phase: Phase, index: int) -> Regularizer:
        cfg = self.cfg
        if phase.name == "stabilize" and isinstance(self.regularizer, TPPRegularizer):
            return self.regularizer  # the regularize phase's TPPPruner goes on
        if phase.name in ("regularize", "stabilize") and cfg.method == "tpp":
            return TPPRegularizer(model, cfg, self.example, tpp_schedule(cfg, self.steps_per_epoch)[1], self.importance_scores)
        if phase.name == "regularize" and cfg.method == "slim":
            return SlimRegularizer(model, cfg)
        if phase.name == "regularize" and cfg.method == "orthoreg":
            ratio = next(p.ratio for p in self.phases[index:] if p.name == "prune")
            return OrthoRegRegularizer(model, cfg, self.example, ratio, self.keep_masks)
        if phase.name == "ocs" and self.keep_masks is None:  # (after the pruning decision: plain training)
            return OCSRegularizer(model, cfg, self.example)
        return Regularizer()

    def importance_scores(self, model: nn.Module, groups) -> list[Tensor]:
        """``--importance`` of every channel of ``groups``: from the weights, or (fisher, taylor) measured on
        ``--importance-batches`` training batches (0: one epoch), the parameters left as they are."""
        cfg = self.cfg
        loader, sampler = self.train_loader()
        sampler.set_epoch(0)
        count = cfg.importance_batches or len(loader)
        return estimate_importance(model, groups, cfg.importance_kind, itertools.islice(loader, count), device=self.device)

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
        if not os.path.isfile(self.cfg.pretrained):
            raise FileNotFoundError(f"--pretrained {self.cfg.pretrained!r}: no such checkpoint file")
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
                if self.cfg.method == "ocs" and self.keep_masks is not None:
                    continue  # OCSPruner decided during its cycle
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
                from .. import plots  # matplotlib: imported only when plotting

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
        """Choose the masks, record the before/after metrics, remove the pruned filters. The keep masks
        are over the dense model's channels (OrthoReg's rounds compose them)."""
        cfg = self.cfg
        if hasattr(self.regularizer, "close"):
            self.regularizer.close()  # (OrthoReg's importance hooks)
        self.summary["acc_before_prune"] = self.evaluate(model)
        self.summary["jsv_before_prune"] = self.mean_jsv(model)
        model, masks = prune_by_method(cfg.method, model, cfg.pruning_ratio, self.example, self.regularizer, cfg.importance,
                                       self.importance_scores)
        self.keep_masks = compose_masks(self.keep_masks, {name: mask.detach().cpu() for name, mask in masks.items()})
        self.summary["params"], self.summary["flops"] = metrics.params_flops(model, self.example)
        self.summary["acc_after_prune"] = self.evaluate(model)
        self.summary["jsv_after_prune"] = self.mean_jsv(model)
        self.summary["speedup"] = metrics.speedup(self.summary["flops_dense"], self.summary["flops"])
        self.summary["param_sparsity"] = metrics.sparsity(self.summary["params_dense"], self.summary["params"])
        if cfg.method == "scratch":  # Liu et al. 2019: keep the architecture, train it from scratch
            model = scratch_reinit(model, seed=cfg.seed + 1)
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
        self.regularizer = self.make_regularizer(model, phase, index)
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
            self.regularizer.begin_epoch()
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
            if finished_early:
                self.say(f"{phase.name}: the pruning decision came after epoch {epoch + 1}")
            if finished_early and phase.name == "ocs":  # one cycle: prune, then the same schedule goes on
                self.summary["ocs_prune_epoch"] = epoch + 1
                model = self.prune(model)
                self.regularizer = Regularizer()
                opt, sched = self.continue_schedule(model, phase, opt, sched)
                ddp_model = self.wrap(model)
                finished_early = False
            self.save_checkpoint(model, index, phase.epochs if finished_early else epoch + 1, opt, sched)
            if finished_early:
                break
        key = {"pretrain": "acc_dense", "finetune": "acc_final", "ocs": "acc_final"}.get(phase.name)
        if key and phase.epochs:
            self.summary[key] = self.evaluate(model)
        if phase.name == "ocs":  # (trained from scratch: its dense accuracy is the one at the pruning decision)
            self.summary.setdefault("acc_dense", self.summary.get("acc_before_prune", self.summary.get("acc_final")))
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

