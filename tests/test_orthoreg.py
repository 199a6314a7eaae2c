"""OrthoReg in the trainer: orthogonality-regularized rounds reach the cumulative ratios exactly; early-bird tickets."""
import os

import pytest
import torch

from fastreg.data import load_dataset
from fastreg.importance import EarlyBird
from fastreg.pruning import channel_groups, resolve_ratios
from fastreg.train import Config, Trainer, load_model
from fastreg.train.methods import OrthoRegRegularizer


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def config(tmp_path, name="run", **overrides) -> Config:
    settings = dict(command="prune", method="orthoreg", model="digits_cnn", dataset="digits", run_dir=str(tmp_path / name),
                    batch_size=256, pretrain_epochs=0, reg_epochs=1, finetune_epochs=0, lr=0.05, jsv_samples=0,
                    log_every=1, plots=False, quiet=True, threads=1)
    settings.update(overrides)
    return Config(**settings)


def prunable_channels(model, example):
    groups = channel_groups(model, example)
    return [g for g, r in zip(groups, resolve_ratios(groups, 0.5)) if r > 0]


@pytest.mark.parametrize("importance, thresholds, rounds, ratio", [
    ("fisher", [10, 50, 80], 1, 0.5),  # OrthoReg's --thresholds '[10, 50, 80]'
    ("l2", None, 2, 0.6),  # --rounds 2: 30% then 60%
])
def test_rounds_reach_the_cumulative_ratios_exactly(tmp_path, digits, monkeypatch, importance, thresholds, rounds, ratio):
    """digits_cnn has 32 + 32 + 64 + 64 = 192 prunable channels: after round k exactly ⌈t_k·192⌉ of them are gone,
    counted over the dense model's channels (the keep masks compose across rounds), and the checkpoint reloads."""
    cfg = config(tmp_path, importance=importance, thresholds=thresholds, rounds=rounds, pruning_ratio=ratio)
    trainer = Trainer(cfg, digits)
    pruned_after_round = []
    original_prune = Trainer.prune

    def prune_and_count(self, model):
        model = original_prune(self, model)
        pruned_after_round.append(sum(int((~m).sum()) for m in self.keep_masks.values()))
        return model

    monkeypatch.setattr(Trainer, "prune", prune_and_count)
    trainer.run()
    targets = [0.1, 0.5, 0.8] if thresholds else [0.3, 0.6]
    assert pruned_after_round == [int(-(-round(t * 192, 9) // 1)) for t in targets]  # ⌈t·192⌉: 20, 96, 154 / 58, 116
    assert [p.name for p in trainer.phases] == ["pretrain"] + ["regularize", "prune"] * len(targets) + ["finetune"]
    assert sum(m.numel() for m in trainer.keep_masks.values()) == 192
    assert all(int(m.sum()) >= 1 for m in trainer.keep_masks.values())
    rebuilt, _ = load_model(os.path.join(cfg.run_dir, "finetune.pt"))
    x = digits.test.tensors[0][:4] if hasattr(digits.test, "tensors") else torch.stack([digits.test[i][0] for i in range(4)])
    torch.testing.assert_close(rebuilt.eval()(x), trainer.model.eval()(x))


def test_orthogonality_term_is_the_identity_gram_penalty(digits):
    """OrthoReg's objective: CE + λ·Σ_l ‖W Wᵀ − I‖²_F over the prunable layers' filters."""
    import torch.nn.functional as F

    from fastreg import reference

    cfg = Config(command="prune", method="orthoreg", model="digits_cnn", ortho_coeff=0.3).validate()
    torch.manual_seed(0)
    from fastreg.models import get_model

    model = get_model("digits_cnn", 10, 1)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    reg = OrthoRegRegularizer(model, cfg, x[:1], 0.5)
    reg.close()
    logits = model(x)
    weights = [m.weight for n, m in model.named_modules() if n in ("features.0", "features.3", "features.7", "features.10")]
    want = F.cross_entropy(logits, y) + 0.3 * reference.gram_penalty(weights, None, "identity", "sum")
    torch.testing.assert_close(reg.loss(logits, y), want)
    grads = torch.autograd.grad(reg.loss(logits, y), weights, retain_graph=True)
    want_grads = torch.autograd.grad(want, weights)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


def test_early_bird_draws_when_the_masks_settle():
    """Masks that change until epoch 3 and stay from then on: with window 2 the ticket is drawn after epoch 5,
    holding epoch 3's masks; with window 1 after epoch 4."""
    gen = torch.Generator().manual_seed(0)
    masks = [[torch.rand(20, generator=gen) > 0.5, torch.rand(12, generator=gen) > 0.5] for _ in range(3)]
    masks += [[~m for m in masks[2]]] * 6  # epoch 3 differs from epoch 2 in every channel; stays from then on
    for window, expected in ((2, 5), (1, 4)):
        eb = EarlyBird(0.1, window)
        drawn = next(epoch for epoch, m in enumerate(masks) if eb.update(m))
        assert drawn == expected and all(torch.equal(a, b) for a, b in zip(eb.previous, masks[3]))
    eb = EarlyBird(0.1, 2)
    for m in masks[:3]:
        eb.update(m)
    state = eb.state_dict()
    other = EarlyBird(0.1, 2)
    other.load_state_dict(state)
    assert other.distances == eb.distances and not other.drawn
    with pytest.raises(ValueError, match="window must be a positive int"):
        EarlyBird(0.1, 0)


def test_early_bird_in_the_trainer_prunes_at_the_known_epoch(tmp_path, digits, monkeypatch):
    """A synthetic run: the importance scores are random until epoch 3 (0-based) and fixed afterwards. With
    --eb-window 2 the search ends after epoch 5 (6 of the 10 allowed epochs), prunes with the settled masks,
    and fine-tunes; the search trains from scratch (no pretraining)."""
    fixed = None

    def begin_epoch(self):
        self.epoch_seen = getattr(self, "epoch_seen", -1) + 1

    def scores(self):
        nonlocal fixed
        epoch = getattr(self, "epoch_seen", -1)  # (-1: the snapshot before the first epoch)
        if epoch < 3:
            gen = torch.Generator().manual_seed(100 + epoch)
            return [torch.rand(g.num_channels, generator=gen) for g in self.candidates]
        if fixed is None:
            gen = torch.Generator().manual_seed(7)
            fixed = [torch.rand(g.num_channels, generator=gen) for g in self.candidates]
        return fixed

    monkeypatch.setattr(OrthoRegRegularizer, "begin_epoch", begin_epoch)
    monkeypatch.setattr(OrthoRegRegularizer, "scores", scores)
    cfg = config(tmp_path, early_bird=True, eb_window=2, reg_epochs=10, pruning_ratio=0.5, finetune_epochs=1)
    trainer = Trainer(cfg, digits)
    assert [p.name for p in trainer.phases] == ["regularize", "prune", "finetune"]
    trainer.run()
    import json

    with open(os.path.join(cfg.run_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    search_epochs = [r["epoch"] for r in records if r["event"] == "epoch" and r["phase"] == "regularize"]
    assert search_epochs == list(range(6))
    pruned = sum(int((~m).sum()) for m in trainer.keep_masks.values())
    assert pruned == 96  # ⌈0.5·192⌉
    for g_scores, (name, keep) in zip(fixed, trainer.keep_masks.items()):
        assert not bool((~keep).any()) or g_scores[keep].min() > g_scores[~keep].max(), name


def test_data_driven_importance_for_one_shot_methods(tmp_path, digits):
    """--method l1 --importance taylor: the per-layer count of L1 pruning, ranked by the measured Taylor scores."""
    cfg = config(tmp_path, method="l1", importance="taylor", importance_batches=2, pretrain_epochs=1, pruning_ratio=0.5)
    trainer = Trainer(cfg, digits)
    trainer.run()
    assert {n: int((~m).sum()) for n, m in trainer.keep_masks.items()} == {
        "features.0": 16, "features.3": 16, "features.7": 32, "features.10": 32}


def test_the_regularizer_raises_the_degree_of_orthogonality_that_eval_reports():
    """Minimizing OrthoReg's term makes the filters more orthogonal: ‖diag(G)‖/‖G‖ per layer (``fastreg eval``) rises."""
    from fastreg import metrics
    from fastreg.models import get_model

    torch.manual_seed(0)
    model = get_model("digits_cnn", 10, 1)
    cfg = Config(command="prune", method="orthoreg", model="digits_cnn", ortho_coeff=0.1, importance="l1").validate()
    reg = OrthoRegRegularizer(model, cfg, torch.zeros(1, 1, 8, 8), 0.5)
    from fastreg import reference

    before = metrics.orthogonality_per_layer(model)
    penalty_before = float(reference.gram_penalty([w.detach() for w in reg.weights], None, "identity", "sum"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = torch.zeros(1, 10, requires_grad=True)
    for _ in range(30):
        opt.zero_grad()
        (reg.loss(logits, torch.zeros(1, dtype=torch.long)) - reg.loss(logits, torch.zeros(1, dtype=torch.long)).detach()).backward()
        opt.step()
    after = metrics.orthogonality_per_layer(model)
    regularized = ["features.0", "features.3", "features.7", "features.10"]
    assert all(after[n] > before[n] for n in regularized), (before, after)
    assert float(reference.gram_penalty([w.detach() for w in reg.weights], None, "identity", "sum")) < 0.5 * penalty_before  # rows grow towards unit norm, off-diagonals shrink
    assert after["classifier"] == before["classifier"]  # not a prunable layer: not regularized
