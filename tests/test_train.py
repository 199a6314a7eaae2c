"""The trainer: repeatable runs, exact resume from every kind of checkpoint, the run directory
(log, checkpoint, plots, summary), and each pruning method end to end on the bundled digits."""
import json
import math
import os

import pytest
import torch

from fastreg import train
from fastreg.data import load_dataset
from fastreg.train import Config, Trainer


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(tmp_path, name="run", **overrides) -> Config:
    settings = dict(
        command="prune", model="mlp7_linear", dataset="digits", run_dir=str(tmp_path / name), batch_size=128,
        pretrain_epochs=1, reg_epochs=2, finetune_epochs=2, method="tpp", pruning_ratio=0.5, lw=100.0,
        reg_delta=0.05, reg_interval=1, lr=0.05, jsv_samples=4, log_every=2, plots=False, quiet=True,
    )
    settings.update(overrides)
    return Config(**settings)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, digits):
    """One uninterrupted TPP run: (trainer, summary)."""
    torch.set_num_threads(1)  # module fixtures run before the module's one_thread fixture applies
    trainer = Trainer(small_config(tmp_path_factory.mktemp("straight")), digits)
    return trainer, trainer.run()


def final_state(trainer: Trainer) -> dict:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_seed_makes_runs_repeatable(tmp_path, digits, straight):
    a, _ = straight
    b = Trainer(small_config(tmp_path, "b"), digits)
    b.run()
    assert_same_state(final_state(a), final_state(b))
    c = Trainer(small_config(tmp_path, "c", seed=1), digits)
    c.run()
    assert any(not torch.equal(v, final_state(c)[k]) for k, v in final_state(a).items())


class Interrupted(Exception):
    pass


def run_until_checkpoint(cfg: Config, digits, monkeypatch, count: int) -> None:
    """Run ``cfg`` and interrupt it right after its ``count``-th checkpoint is written."""
    saved = []
    original = Trainer.save_checkpoint

    def save_then_maybe_stop(self, *args, **kwargs):
        original(self, *args, **kwargs)
        saved.append(1)
        if len(saved) == count:
            raise Interrupted

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_maybe_stop)
    with pytest.raises(Interrupted):
        Trainer(cfg, digits).run()
    monkeypatch.setattr(Trainer, "save_checkpoint", original)


@pytest.mark.parametrize("stop_after_checkpoints", [2, 3, 4, 5])  # mid-regularize, end of it, after prune, mid-finetune
def test_resume_continues_exactly(tmp_path, digits, monkeypatch, straight, stop_after_checkpoints):
    reference, expected = straight

    cfg = small_config(tmp_path, "interrupted")
    run_until_checkpoint(cfg, digits, monkeypatch, stop_after_checkpoints)

    cfg.resume = True
    resumed = Trainer(cfg, digits)
    got = resumed.run()
    assert resumed.resumed_from > 0  # it did continue from the checkpoint
    assert_same_state(final_state(reference), final_state(resumed))
    for key in ("acc_before_prune", "acc_after_prune", "acc_final", "params", "flops", "jsv_after_prune"):
        assert got[key] == expected[key], key
    # The log holds each step once, in order, as if never interrupted.
    steps = [r["iter"] for r in read_log(cfg.run_dir) if r["event"] == "step"]
    assert steps == sorted(set(steps)) == [r["iter"] for r in read_log(reference.cfg.run_dir) if r["event"] == "step"]


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def stabilize_config(tmp_path, name="stabilize", **overrides) -> Config:
    """TPP as the paper, shortened: reg = min(1, 0.05·k) grows for 20 iterations (2 epochs of 11, the last cut
    short), then 14 + 1 stabilize iterations at τ zero the 7 layers one every 2 (2 epochs, the last cut short)."""
    return small_config(tmp_path, name, reg_epochs="auto", stabilize_iters=14, zero_interval=2, log_every=1, **overrides)


@pytest.fixture(scope="module")
def stabilized(tmp_path_factory, digits):
    """One uninterrupted TPP run with a stabilize phase: (trainer, summary)."""
    torch.set_num_threads(1)
    trainer = Trainer(stabilize_config(tmp_path_factory.mktemp("stabilized")), digits)
    return trainer, trainer.run()


def test_tpp_regularizes_to_the_ceiling_then_stabilizes_with_layerwise_zeroing(stabilized):
    trainer, summary = stabilized
    assert [(p.name, p.epochs, p.steps) for p in trainer.phases] == [
        ("pretrain", 1, None), ("regularize", 2, 20), ("stabilize", 2, 15), ("prune", 0, None), ("finetune", 2, None)]
    steps = [r for r in read_log(trainer.cfg.run_dir) if r["event"] == "step"]
    assert [r["reg"] for r in steps if r["phase"] == "regularize"] == pytest.approx([0.05 * k for k in range(20)])
    stabilize = [r for r in steps if r["phase"] == "stabilize"]
    assert [r["iter"] for r in stabilize] == list(range(11 + 20 + 1, 11 + 20 + 15 + 1))
    assert {r["reg"] for r in stabilize} == {1.0}  # held at τ
    # Every pruned filter was zeroed before the physical pruning, which therefore changes nothing.
    assert summary["acc_after_prune"] == summary["acc_before_prune"]
    assert summary["jsv_after_prune"] == pytest.approx(summary["jsv_before_prune"], rel=1e-4)


@pytest.mark.parametrize("stop_after_checkpoints", [3, 4, 5])  # end of regularize, mid-stabilize, end of stabilize
def test_resume_through_the_stabilize_phase_continues_exactly(tmp_path, digits, monkeypatch, stabilized,
                                                              stop_after_checkpoints):
    reference, expected = stabilized
    cfg = stabilize_config(tmp_path, "interrupted")
    run_until_checkpoint(cfg, digits, monkeypatch, stop_after_checkpoints)
    checkpoint = torch.load(os.path.join(cfg.run_dir, "checkpoint.pt"), weights_only=False)
    if stop_after_checkpoints == 4:  # 11 of the 15 stabilize steps (k = 20 … 30): layers 0 … 4 are zeroed, 5 not yet
        assert checkpoint["regularizer"]["phase"] == "stabilize"
        masks = reference.keep_masks
        zeroed = {n for n, keep in masks.items()
                  if checkpoint["model"][n + ".weight"][~keep].abs().sum() == 0 == checkpoint["model"][n + ".bias"][~keep].abs().sum()}
        assert zeroed == {f"layers.{2 * i}" for i in range(5)} and len(masks) == 6

    cfg.resume = True
    resumed = Trainer(cfg, digits)
    got = resumed.run()
    assert resumed.resumed_from > 0
    assert_same_state(final_state(reference), final_state(resumed))
    for key in ("acc_before_prune", "acc_after_prune", "acc_final", "params", "jsv_after_prune"):
        assert got[key] == expected[key], key


def test_tpp_with_a_budget_of_epochs_holds_the_reg_it_reached(tmp_path, digits):
    """--reg-epochs 1 (11 iterations) with a stabilize phase and K_u = 3: reg grows for 9 iterations
    (to 0.05·3) and is held there while the layers are zeroed; TPPPruner prunes right at the plan's end."""
    cfg = small_config(tmp_path, reg_epochs=1, reg_interval=3, stabilize_iters=14, zero_interval=2, finetune_epochs=0)
    trainer = Trainer(cfg, digits)
    summary = trainer.run()
    assert [(p.name, p.steps) for p in trainer.phases][1:3] == [("regularize", 9), ("stabilize", 15)]
    steps = [r for r in read_log(cfg.run_dir) if r["event"] == "step"]
    held = {r["reg"] for r in steps if r["phase"] == "stabilize"}
    assert len(held) == 1 and held.pop() == pytest.approx(0.15)
    assert summary["acc_after_prune"] == summary["acc_before_prune"]


@pytest.mark.parametrize("overrides, message", [
    (dict(reg_delta=-1.0), r"--reg-delta must be a finite number >= 0, got -1.0"),
    (dict(lw=float("nan")), r"--lw must be a finite number >= 0, got nan"),
    (dict(reg_ceiling=float("inf")), r"--reg-ceiling must be a finite number >= 0, got inf"),
    (dict(method="slim", slim_s=-1e-3), r"--slim-s must be a finite number >= 0"),
    (dict(method="slim"), r"--method slim ranks channels by their BatchNorm scale γ, and mlp7_linear has no affine"),
    (dict(reg_epochs="auto", reg_delta=0.0), r"--reg-epochs auto regularizes until reg reaches --reg-ceiling, which "
                                             r"--reg-delta 0 never does"),
    (dict(zero_count="some"), r"--zero-count must be one of \('all', 'pruned'\), got 'some'"),
    (dict(method="slim", importance="fisher"), r"--importance applies to the methods that rank filters"),
    (dict(method="l1", importance="grasp"), r"--importance must be one of"),
    (dict(method="l1", importance="bn"), r"--importance bn ranks channels by their BatchNorm scale γ, and mlp7_linear"),
    (dict(method="orthoreg", thresholds=[50, 10]), r"--thresholds must be increasing percentages in \(0, 100\)"),
    (dict(method="orthoreg", thresholds=[10, 50], rounds=3), r"--rounds 3 differs from the 2 --thresholds"),
    (dict(method="l1", rounds=2), r"--rounds, --thresholds and --early-bird are OrthoReg's"),
    (dict(method="orthoreg", early_bird=True, rounds=2), r"--early-bird draws one ticket"),
    (dict(method="orthoreg", reg_epochs="auto"), r"--reg-epochs auto follows TPP's reg schedule"),
    (dict(method="scratch", budget="C"), r"--budget must be one of \('E', 'B'\)"),
    (dict(stabilize_iters=-1), r"--stabilize-iters must be an int >= 0, got -1"),
    (dict(zero_interval=0), r"--zero-interval must be an int >= 1, got 0"),
    (dict(method="ocs", ocs_lam_init=-1e-4), r"--ocs-lam-init must be a finite number >= 0"),
    (dict(method="ocs", ocs_window=0), r"--ocs-window must be an int >= 1"),
    (dict(pretrain_epochs=-1), r"--epochs must be an int >= 0"),
    (dict(batch_size=2000), r"--batch-size 2000 is larger than the training set \(1438 samples\)"),
    (dict(batch_size=2000, reg_epochs="auto"), r"--batch-size 2000 is larger than the training set"),
    (dict(batch_size=2000, method="l1"), r"--batch-size 2000 is larger than the training set"),
])
def test_bad_flags_are_rejected_before_any_training(tmp_path, digits, overrides, message):
    """Every setting is checked when the trainer is built, before hours of pretraining, naming the CLI flag."""
    with pytest.raises(ValueError, match=message):
        Trainer(small_config(tmp_path, **overrides), digits)


def test_batch_size_is_checked_per_process(tmp_path, digits, monkeypatch):
    """drop_last per process: 1438 samples over 3 processes are 479 each, a batch of 480 per process is too big."""
    monkeypatch.setattr(train.trainer, "distributed_env", lambda: (0, 3, 0))
    monkeypatch.setattr(train.trainer.dist, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match=r"--batch-size 1440 is larger than the training set \(1438 samples, 479 per process\)"):
        Trainer(small_config(tmp_path, batch_size=1440), digits)
    assert Trainer(small_config(tmp_path, batch_size=1437), digits).steps_per_epoch == 1  # 479 // 479


def test_checkpoint_survives_a_crash_while_writing(tmp_path, digits, monkeypatch):
    cfg = small_config(tmp_path, command="train", pretrain_epochs=3)
    real_save, calls = torch.save, []

    def dies_on_second_checkpoint(obj, path):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise OSError("disk full")
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", dies_on_second_checkpoint)
    with pytest.raises(OSError, match="disk full"):
        Trainer(cfg, digits).run()
    monkeypatch.setattr(torch, "save", real_save)
    assert calls[1].endswith(".tmp")  # written beside, never over, the last good checkpoint
    assert torch.load(os.path.join(cfg.run_dir, "checkpoint.pt"), weights_only=False)["epochs_done"] == 1
    cfg.resume = True
    resumed = Trainer(cfg, digits)
    resumed.run()
    assert resumed.resumed_from == len(digits.train) // cfg.batch_size  # one epoch of steps


def test_resume_refuses_other_settings(tmp_path, digits):
    cfg = small_config(tmp_path, command="train")
    Trainer(cfg, digits).run()
    changed = small_config(tmp_path, command="train", lr=0.2, resume=True, threads=2)
    with pytest.raises(ValueError, match=r"lr: 0.05 -> 0.2"):
        Trainer(changed, digits).run()


def test_run_directory_contents(tmp_path, digits):
    cfg = small_config(tmp_path, plots=True)
    summary = Trainer(cfg, digits).run()
    files = set(os.listdir(cfg.run_dir))
    assert {"log.jsonl", "checkpoint.pt", "summary.json", "finetune.pt", "loss_reg.png", "filter_norms.png", "jsv.png"} <= files
    assert not any(f.endswith(".tmp") for f in files)
    records = read_log(cfg.run_dir)
    assert records[0]["event"] == "config" and records[0]["method"] == "tpp"
    steps = [r for r in records if r["event"] == "step"]
    phases = [r["phase"] for r in steps]
    assert phases.index("regularize") < phases.index("finetune")
    regs = [r["reg"] for r in steps if r["phase"] == "regularize"]
    assert regs == sorted(regs) and regs[-1] > 0  # the growing coefficient
    assert all(r["reg"] is None for r in steps if r["phase"] == "finetune")
    assert sum(r["event"] == "pruned" for r in records) == 1
    with open(os.path.join(cfg.run_dir, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk["params"] == summary["params"] < summary["params_dense"]
    assert summary["flops"] < summary["flops_dense"] and summary["speedup"] > 1
    for key in ("acc_dense", "acc_before_prune", "acc_after_prune", "acc_final"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["reg_ms_per_step"] > 0


def test_checkpoint_reloads_the_pruned_model(digits, straight):
    trainer, summary = straight
    cfg = trainer.cfg
    model, ckpt = train.load_model(os.path.join(cfg.run_dir, "finetune.pt"))
    assert sum(p.numel() for p in model.parameters()) == summary["params"]
    x = digits.test.tensors[0][:8]
    torch.testing.assert_close(model.eval()(x), trainer.model.eval()(x))


@pytest.mark.parametrize("method", ["l1", "scratch"])
def test_baseline_methods(tmp_path, digits, method):
    summary = Trainer(small_config(tmp_path, method=method), digits).run()
    assert summary["method"] == method
    assert summary["params"] < summary["params_dense"]
    assert "reg_ms_per_step" not in summary  # no regularizer


@pytest.mark.parametrize("method", ["slim", "ocs"])
def test_bn_methods_on_the_digits_cnn(tmp_path, digits, method):
    # ocs: a window of r = 1 epoch and τ = 1, so that sparsity learning (λ ≥ λ0 > 0: group lasso and shrink every
    # step, in the timed single-process step) starts after the third epoch's partition, within the 4 epochs
    cfg = small_config(tmp_path, method=method, model="digits_cnn", pretrain_epochs={"slim": 2, "ocs": 4}[method],
                       reg_epochs=1, finetune_epochs=1, slim_s=1e-3, ocs_window=1, ocs_start_tol=1.0)
    trainer = Trainer(cfg, digits)
    summary = trainer.run()
    assert summary["params"] < summary["params_dense"] and summary["flops"] < summary["flops_dense"]
    assert summary["reg_ms_per_step"] > 0
    records = read_log(cfg.run_dir)
    assert any(r["event"] == "step" and r["phase"] == {"slim": "regularize", "ocs": "ocs"}[method] for r in records)
    if method == "ocs":  # pruning_ratio is OCSPruner's FLOPs target
        assert summary["flops"] <= (1 - cfg.pruning_ratio) * summary["flops_dense"] * 1.05
        lams = [r["reg"] for r in records if r["event"] == "step" and r["phase"] == "ocs"]
        assert lams[0] == 0 and lams[-1] >= cfg.ocs_lam_init > 0  # dense, then sparsity learning


def test_timed_step_runs_the_ocs_group_lasso_like_the_untimed_step(tmp_path, digits):
    """Regression: the timed step (every single-process run) called OCSPruner.apply_grad_ before the network's
    backward, so the first step with λ > 0 failed ('params[0].grad is None'). From the same state, a timed and an
    untimed step give the same parameters, and the group lasso and shrinkage do change them."""

    def one_step(timed: bool, lam_init: float) -> dict:
        cfg = small_config(tmp_path, method="ocs", model="digits_cnn", ocs_window=1, ocs_lam_init=lam_init)
        trainer = Trainer(cfg, digits)
        model = trainer.build_model()
        trainer.regularizer = regularizer = train.OCSRegularizer(model, cfg, trainer.example)
        pruner = regularizer.pruner
        while pruner.phase == "dense":  # r = 1: the third partition starts sparsity learning, λ = λ0
            pruner.record_partition(pruner.partition())
        assert pruner.phase == "sparsify" and regularizer.reg == lam_init
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        trainer.train_step(model, digits.train.tensors[0][:64], digits.train.tensors[1][:64], opt, timed)
        return {k: v.clone() for k, v in model.state_dict().items()}

    timed, untimed = one_step(True, 0.5), one_step(False, 0.5)
    assert_same_state(timed, untimed)
    without_lasso = one_step(True, 0.0)
    assert any(not torch.equal(timed[k], without_lasso[k]) for k in timed)


def test_scratch_reinitialises_like_a_freshly_built_model(tmp_path):
    """The scratch baseline re-initialises the pruned architecture with the model family's own init (the CIFAR
    ResNets: Kaiming-normal, fan-out, std √(2 / fan_out)), as a freshly built model, not with PyTorch's defaults."""
    import math

    from torch import nn

    data = fake_cifar()
    cfg = small_config(tmp_path, model="resnet20", method="scratch", batch_size=16, pretrain_epochs=0, finetune_epochs=0,
                       jsv_samples=0)
    trainer = Trainer(cfg, data)
    trainer.run()
    fresh = dict(trainer.build_model().named_modules())
    pruned_convs = 0
    for name, m in trainer.model.named_modules():
        weight = m.weight.detach() if isinstance(m, (nn.Conv2d, nn.Linear)) else None
        if isinstance(m, nn.Conv2d):
            fan_out = weight.shape[0] * weight[0, 0].numel()
            assert float(weight.std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.15), name
            if weight.shape == fresh[name].weight.shape:
                assert float(weight.std()) == pytest.approx(float(fresh[name].weight.detach().std()), rel=0.2), name
            pruned_convs += weight.shape != fresh[name].weight.shape
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
        elif isinstance(m, nn.Linear):
            assert float(weight.std()) == pytest.approx(float(fresh[name].weight.detach().std()), rel=0.2)
    assert pruned_convs == 18  # every block's conv1 (its outputs) and conv2 (its inputs)


def test_l1_prunes_the_smallest_filters(tmp_path, digits):
    trainer = Trainer(small_config(tmp_path, method="l1"), digits)
    model = trainer.build_model()
    norms = {n: m.weight.detach().abs().sum(1) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    pruned, masks = train.prune_by_method("l1", model, 0.5, trainer.example, None)
    assert set(masks) == {f"layers.{2 * i}" for i in range(6)}  # the hidden layers; the classifier keeps its outputs
    for name, keep in masks.items():
        assert keep.sum() == len(keep) // 2
        assert norms[name][keep].min() >= norms[name][~keep].max()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_pretrain_then_prune_from_checkpoint(tmp_path, digits):
    pre = Trainer(small_config(tmp_path, "pre", command="train"), digits)
    pre_summary = pre.run()
    cfg = small_config(tmp_path, "from_ckpt", method="l1", pretrained=os.path.join(pre.cfg.run_dir, "pretrain.pt"))
    trainer = Trainer(cfg, digits)
    assert [p.name for p in trainer.phases] == ["prune", "finetune"]
    summary = trainer.run()
    assert summary["acc_dense"] == summary["acc_before_prune"] == pre_summary["acc_dense"]


def test_bad_configuration_raises(tmp_path, digits):
    with pytest.raises(ValueError, match="--method must be one of"):
        Trainer(small_config(tmp_path, method="magnitude"), digits)
    with pytest.raises(ValueError, match=r"--pruning-ratio must be in \[0, 1\)"):
        Trainer(small_config(tmp_path, pruning_ratio=1.0), digits)
    with pytest.raises(ValueError, match="model must be one of"):
        Trainer(small_config(tmp_path, model="resnet57"), digits)
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet")


def test_missing_torchvision_dataset_says_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        load_dataset("cifar10", str(tmp_path), download=False)


def test_phases_of_each_method():
    names = lambda **kw: [p.name for p in train.plan(Config(**kw))]  # noqa: E731
    assert names(command="train") == ["pretrain"]
    assert names(method="tpp") == ["pretrain", "regularize", "stabilize", "prune", "finetune"]
    assert names(method="tpp", reg_epochs=3) == ["pretrain", "regularize", "prune", "finetune"]  # no stabilize by default
    assert names(method="slim", pretrained="x.pt") == ["regularize", "prune", "finetune"]
    assert names(method="l1") == ["pretrain", "prune", "finetune"]
    assert names(method="ocs") == ["ocs", "prune"]  # one cycle: the ocs phase goes on after its pruning decision
    assert names(method="scratch") == ["pretrain", "prune", "finetune"]
    assert names(method="orthoreg", rounds=2) == ["pretrain", "regularize", "prune", "regularize", "prune", "finetune"]
    assert names(method="orthoreg", early_bird=True) == ["regularize", "prune", "finetune"]  # from scratch
    assert [p.ratio for p in train.plan(Config(method="orthoreg", thresholds=[10, 50])) if p.name == "prune"] == [0.1, 0.5]
    with pytest.raises(ValueError, match="--reg-epochs auto follows TPP"):
        Config(method="slim", reg_epochs="auto").validate()


def phase_steps(cfg: Config, steps_per_epoch: int) -> list[tuple[str, int, int | None]]:
    return [(p.name, p.epochs, p.steps) for p in train.plan(cfg, steps_per_epoch) if p.name in ("regularize", "stabilize")]


def test_tpp_schedule_follows_the_paper():
    """TPP's defaults are the paper's: reg grows by Δ = 1e-4 every K_u = 10 iterations until τ = 1
    (100k iterations), then 10k stabilize iterations at τ; the phases end mid-epoch where reg does."""
    paper = Config(pretrained="x.pt").validate()
    assert (paper.reg_epochs, paper.stabilize_iters, paper.zero_interval) == ("auto", 10000, 100)
    assert (paper.lw, paper.reg_delta, paper.reg_interval, paper.reg_ceiling) == (1000.0, 1e-4, 10, 1.0)
    assert train.tpp_schedule(paper, 390) == (100_000, 1.0)  # reg at the last regularize iteration: 0.9999
    assert phase_steps(paper, 390) == [("regularize", 257, 100_000), ("stabilize", 26, 10_001)]
    # reg = min(1, 0.01·⌊k/2⌋) first reaches 1 at k = 200 (10 epochs of 20); the stabilize phase holds it for
    # 30 more iterations (31 steps from k = 200: TPPPruner prunes at k = 230).
    auto = Config(reg_delta=0.01, reg_interval=2, stabilize_iters=30)
    assert phase_steps(auto, 20) == [("regularize", 10, 200), ("stabilize", 2, 31)]
    # A budget of 3 epochs (60 iterations) with a stabilize phase: reg grows until it would next grow after the
    # budget's last update (k = 56, a multiple of K_u = 7: TPPPruner switches there) and is held at 0.08.
    budget = Config(reg_epochs=3, reg_delta=0.01, reg_interval=7, stabilize_iters=30)
    assert train.tpp_schedule(budget, 20) == (56, pytest.approx(0.08))
    assert phase_steps(budget, 20) == [("regularize", 3, 56), ("stabilize", 2, 31)]
    # ... reaching τ within the budget stops it there; without a stabilize phase the budget is all regularize.
    assert train.tpp_schedule(Config(reg_epochs=30, reg_delta=0.01, reg_interval=2, stabilize_iters=30), 20) == (200, 1.0)
    assert phase_steps(Config(reg_epochs=3, reg_delta=0.01, reg_interval=7), 20) == [("regularize", 3, 60)]
    # Float rounding: the first k at τ is found in the schedule's own arithmetic (0.1·3 = 0.30000000000000004).
    assert train.tpp_schedule(Config(reg_delta=0.1, reg_interval=1, reg_ceiling=0.3, stabilize_iters=5), 4)[0] == 3


def test_trainability_claim_of_the_example(tmp_path):
    """examples/trainability.py, shortened: MLP-7-Linear on digits pruned at ratio 0.9. Right
    after pruning, L1 pruning's mean JSV collapses by orders of magnitude below TPP's, which stays
    near order 1, and TPP keeps far more accuracy."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "trainability.py")
    spec = importlib.util.spec_from_file_location("trainability_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    l1, tpp = example.compare(str(tmp_path), pretrain_epochs=8, reg_epochs=5, finetune_epochs=0, lr=0.05,
                              reg_interval=1, plots=False, jsv_samples=8)
    assert l1["acc_dense"] > 0.9
    assert l1["jsv_after_prune"] < 1e-2 * l1["jsv_before_prune"]  # collapse from the dense network's
    assert tpp["jsv_after_prune"] > 100 * l1["jsv_after_prune"]
    assert tpp["jsv_after_prune"] > 0.1
    assert tpp["acc_after_prune"] > l1["acc_after_prune"] + 0.3
    assert l1["params"] == tpp["params"]  # the same architecture


def fake_cifar():
    """32 random 3×32×32 images in 10 classes (train = test)."""
    from torch.utils.data import TensorDataset

    from fastreg.data import DatasetInfo

    gen = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen))
    return DatasetInfo("fake-cifar", images, images, 10, (3, 32, 32))


def test_cifar_resnet_through_the_trainer(tmp_path):
    """ResNet-20 (residual-coupled layers, as for CIFAR): TPP regularize → prune → finetune on a few
    random 3×32×32 images; the block-internal layers shrink, the checkpoint reloads."""
    data = fake_cifar()
    images = data.train
    cfg = small_config(tmp_path, model="resnet20", batch_size=16, pretrain_epochs=0, reg_epochs=1, finetune_epochs=1,
                       pruning_ratio=0.5, jsv_samples=2)
    trainer = Trainer(cfg, data)
    summary = trainer.run()
    assert 0.4 < summary["param_sparsity"] < 0.6  # half of every block-internal conv1's filters and conv2's inputs
    masks = trainer.keep_masks
    assert masks and all(name.endswith("conv1") and name.startswith("layer") for name in masks)
    assert all(int(keep.sum()) == len(keep) // 2 for keep in masks.values())
    x = images.tensors[0][:2]
    state = torch.load(os.path.join(cfg.run_dir, "checkpoint.pt"), weights_only=False)
    rebuilt = train.physically_prune(trainer.build_model(), state["keep_masks"], x[:1])
    rebuilt.load_state_dict(state["model"])
    torch.testing.assert_close(rebuilt.eval()(x), trainer.model.eval()(x))


def test_scratch_b_epochs_follow_the_flops_ratio(tmp_path, digits):
    """Scratch-E trains the pruned architecture for the dense training's --epochs; Scratch-B for
    --epochs × dense FLOPs / pruned FLOPs (nearest), at most 2×."""
    from fastreg.pruning import count_params_flops, l1_prune

    assert (train.scratch_b_epochs(10, 3.0, 1.0), train.scratch_b_epochs(10, 1.5, 1.0), train.scratch_b_epochs(3, 1.0, 1.0)) == (20, 15, 3)
    for ratio in (0.1, 0.5):
        cfg = small_config(tmp_path, method="scratch", model="digits_cnn", pretrain_epochs=4, pruning_ratio=ratio)
        assert Trainer(cfg, digits).phases[-1] == train.Phase("finetune", 4, cfg.lr)  # Scratch-E
        cfg = small_config(tmp_path, method="scratch", model="digits_cnn", pretrain_epochs=4, pruning_ratio=ratio, budget="B")
        trainer = Trainer(cfg, digits)
        torch.manual_seed(0)
        model = trainer.build_model()
        dense = count_params_flops(model, trainer.example)[1]
        pruned = count_params_flops(l1_prune(model, ratio, trainer.example)[0], trainer.example)[1]
        expected = min(round(4 * dense / pruned), 8)
        assert trainer.phases[-1] == train.Phase("finetune", expected, cfg.lr)
        assert expected == (5 if ratio == 0.1 else 8)  # 1.23× the FLOPs → 5 epochs; 3.5× → capped at 2·4


def test_ocs_continues_the_same_schedule_after_its_pruning_decision(tmp_path, digits):
    """OCSPruner's one cycle: after the decision at epoch t*, the pruned model trains for the remaining epochs on the
    same cosine schedule, lr_k = lr·(1 + cos(πk/K))/2 over all K = T·steps iterations, with no fresh fine-tuning."""
    cfg = small_config(tmp_path, method="ocs", model="digits_cnn", pretrain_epochs=6, lr=0.05, log_every=1, ocs_window=1,
                       ocs_start_tol=1.0, ocs_prune_tol=0.5, ocs_lam_init=1e-3, ocs_lam_delta=1e-3, jsv_samples=0)
    trainer = Trainer(cfg, digits)
    assert [p.name for p in trainer.phases] == ["ocs", "prune"]
    summary = trainer.run()
    steps = [r for r in read_log(cfg.run_dir) if r["event"] == "step"]
    total = 6 * trainer.steps_per_epoch
    assert len(steps) == total
    decision = summary["ocs_prune_epoch"]
    assert 1 <= decision < 6
    pruned_at = next(r["iter"] for r in read_log(cfg.run_dir) if r["event"] == "pruned")
    assert pruned_at == decision * trainer.steps_per_epoch
    cosine = [0.05 * (1 + math.cos(math.pi * k / total)) / 2 for k in range(total)]
    assert [r["lr"] for r in steps] == pytest.approx(cosine, rel=1e-9, abs=1e-12)
    assert trainer.keep_masks and summary["params"] < summary["params_dense"]
    assert summary["acc_final"] == trainer.evaluate(trainer.model)


def test_ocs_resumes_after_its_pruning_decision(tmp_path, digits, monkeypatch):
    """Interrupted after the mid-cycle pruning, the run resumes the pruned model on the same schedule."""
    kwargs = dict(method="ocs", model="digits_cnn", pretrain_epochs=6, lr=0.05, ocs_window=1, ocs_start_tol=1.0,
                  ocs_prune_tol=0.5, ocs_lam_init=1e-3, ocs_lam_delta=1e-3, jsv_samples=0)
    straight = Trainer(small_config(tmp_path, "straight", **kwargs), digits)
    expected = straight.run()
    cfg = small_config(tmp_path, "interrupted", **kwargs)
    assert expected["ocs_prune_epoch"] < 6
    run_until_checkpoint(cfg, digits, monkeypatch, expected["ocs_prune_epoch"])  # right after the pruning
    cfg.resume = True
    resumed = Trainer(cfg, digits)
    got = resumed.run()
    assert resumed.resumed_from > 0
    assert_same_state(final_state(straight), final_state(resumed))
    assert got["acc_final"] == expected["acc_final"]


def test_tpp_on_resnet110_with_the_paper_defaults_runs(tmp_path):
    """10,000 stabilize iterations at interval 100 zero only 99 of ResNet-110's 112 layers: the trainer accepts it
    (the pruner warns, naming the layers it prunes without zeroing) instead of refusing the flags."""
    cfg = small_config(tmp_path, model="resnet110", reg_epochs="auto", stabilize_iters=None, batch_size=16, jsv_samples=0)
    trainer = Trainer(cfg, fake_cifar())
    assert (cfg.stabilize_iters, cfg.zero_interval) == (10000, 100)
    assert [p.steps for p in trainer.phases if p.name == "stabilize"] == [10001]
