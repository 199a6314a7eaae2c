"""The trainer: repeatable runs, exact resume from every kind of checkpoint, the run directory
(log, checkpoint, plots, summary), and each pruning method end to end on the bundled digits."""
import json
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


@pytest.mark.parametrize("stop_after_checkpoints", [2, 3, 4, 5])  # mid-regularize, end of it, after prune, mid-finetune
def test_resume_continues_exactly(tmp_path, digits, monkeypatch, straight, stop_after_checkpoints):
    reference, expected = straight

    cfg = small_config(tmp_path, "interrupted")
    saved = []
    original = Trainer.save_checkpoint

    def save_then_maybe_stop(self, *args, **kwargs):
        original(self, *args, **kwargs)
        saved.append(1)
        if len(saved) == stop_after_checkpoints:
            raise Interrupted

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_maybe_stop)
    with pytest.raises(Interrupted):
        Trainer(cfg, digits).run()
    monkeypatch.setattr(Trainer, "save_checkpoint", original)

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
    cfg = small_config(tmp_path, method=method, model="digits_cnn", pretrain_epochs=2, reg_epochs=1, finetune_epochs=1,
                       slim_s=1e-3)
    trainer = Trainer(cfg, digits)
    summary = trainer.run()
    assert summary["params"] < summary["params_dense"] and summary["flops"] < summary["flops_dense"]
    assert summary["reg_ms_per_step"] > 0
    records = read_log(cfg.run_dir)
    assert any(r["event"] == "step" and r["phase"] == {"slim": "regularize", "ocs": "ocs"}[method] for r in records)
    if method == "ocs":  # pruning_ratio is OCSPruner's FLOPs target
        assert summary["flops"] <= (1 - cfg.pruning_ratio) * summary["flops_dense"] * 1.05


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
    with pytest.raises(ValueError, match="method must be one of"):
        Trainer(small_config(tmp_path, method="magnitude"), digits)
    with pytest.raises(ValueError, match="pruning_ratio"):
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
    assert names(method="tpp") == ["pretrain", "regularize", "prune", "finetune"]
    assert names(method="slim", pretrained="x.pt") == ["regularize", "prune", "finetune"]
    assert names(method="l1") == ["pretrain", "prune", "finetune"]
    assert names(method="ocs") == ["ocs", "prune", "finetune"]
    # 'auto': reg = min(1, 0.01·⌊k/2⌋) reaches τ = 1 at k = 200, i.e. 10 epochs of 20 steps, + 1 at τ.
    auto = train.plan(Config(reg_epochs="auto", reg_delta=0.01, reg_interval=2), steps_per_epoch=20)
    assert [(p.name, p.epochs) for p in auto][1] == ("regularize", 11)
    with pytest.raises(ValueError, match="reg_epochs='auto'"):
        Config(method="slim", reg_epochs="auto").validate()


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


def test_cifar_resnet_through_the_trainer(tmp_path):
    """ResNet-20 (residual-coupled layers, as for CIFAR): TPP regularize → prune → finetune on a few
    random 3×32×32 images; the block-internal layers shrink, the checkpoint reloads."""
    from torch.utils.data import TensorDataset

    from fastreg.data import DatasetInfo

    gen = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen))
    data = DatasetInfo("fake-cifar", images, images, 10, (3, 32, 32))
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
