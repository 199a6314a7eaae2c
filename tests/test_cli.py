"""The ``fastreg`` command: train → eval → prune → eval through ``main(argv)``, the no-argument
main job (shortened), ``bench`` delegation, ``python -m fastreg``."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import fastreg
from fastreg import cli

SMALL = ["--model", "mlp7_linear", "--batch-size", "128", "--jsv-samples", "2", "--threads", "1", "--quiet"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def last_json(text: str) -> dict:
    return json.loads(text[text.index("{"):])


def test_train_eval_prune_eval(tmp_path, capsys):
    pre_dir, pruned_dir = str(tmp_path / "pre"), str(tmp_path / "pruned")
    assert cli.main(["train", "--epochs", "2", "--run-dir", pre_dir, *SMALL]) == 0
    trained = last_json(capsys.readouterr().out)
    assert trained["command"] == "train" and trained["acc_dense"] > 0.5

    cli.main(["eval", os.path.join(pre_dir, "pretrain.pt"), "--jsv-samples", "2"])
    dense = last_json(capsys.readouterr().out)
    assert dense["acc"] == pytest.approx(trained["acc_dense"])
    assert dense["pruned"] is False and dense["params"] == trained["params_dense"]
    assert len(dense["orthogonality"]) == 7 and dense["mean_jsv"] > 0

    cli.main(["prune", "--method", "l1", "--pruning-ratio", "0.5", "--pretrained", os.path.join(pre_dir, "pretrain.pt"),
              "--finetune-epochs", "1", "--run-dir", pruned_dir, *SMALL])
    pruned = last_json(capsys.readouterr().out)
    assert pruned["acc_dense"] == pytest.approx(trained["acc_dense"])

    cli.main(["eval", os.path.join(pruned_dir, "finetune.pt"), "--jsv-samples", "0"])
    after = last_json(capsys.readouterr().out)
    assert after["pruned"] is True
    assert after["params"] == pruned["params"] < dense["params"]
    assert after["acc"] == pytest.approx(pruned["acc_final"])


def test_no_arguments_runs_the_main_job(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for key, value in dict(pretrain_epochs=1, reg_epochs=1, finetune_epochs=1, jsv_samples=2, batch_size=128).items():
        monkeypatch.setitem(cli.DEMO_SETTINGS, key, value)
    monkeypatch.setattr(sys, "argv", ["fastreg"])
    assert cli.main() == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for column in ("acc dense", "acc after prune", "acc finetuned", "params", "FLOPs", "mean JSV after prune", "reg ms/step",
                   "wall s"):
        assert column in columns
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines
            if line.startswith("| ") and not line.startswith("| method")}
    assert list(rows) == ["tpp", "ocs", "orthoreg", "l1", "slim"]  # the five methods, in this order
    assert rows["l1"][columns.index("reg ms/step")] == "-"  # L1 has no regularizer to time
    assert all(float(row[columns.index("wall s")]) > 0 for row in rows.values())
    assert os.path.exists(tmp_path / cli.DEMO_DIR / "tpp" / "loss_reg.png")
    with open(tmp_path / cli.DEMO_DIR / "tpp" / "log.jsonl") as f:
        phases = {json.loads(line).get("phase") for line in f}
    assert {"regularize", "stabilize", "finetune"} <= phases  # TPP's pipeline, stabilize phase included


def test_the_main_job_follows_tpps_schedule_in_short():
    """The demo grows reg to τ (auto), then stabilizes for a tenth of the growth, as the paper's 10k after 100k."""
    from fastreg.train import Config, plan

    cfg = Config(**cli.DEMO_SETTINGS)
    phases = {p.name: p.steps for p in plan(cfg, steps_per_epoch=22)}
    assert cfg.reg_epochs == "auto" and phases["regularize"] == 200 and phases["stabilize"] == 20 + 1


def parse(*argv):
    return cli.config_from_args(cli.build_parser().parse_args(["prune", *argv])).validate()


def test_pruning_schedule_flags():
    paper = parse()  # TPP with the paper's schedule: reg to τ, then 10k stabilize iterations zeroing every 100
    assert (paper.reg_epochs, paper.stabilize_iters, paper.zero_interval) == ("auto", 10000, 100)
    assert parse("--reg-epochs", "5").stabilize_iters == 0  # a budget of epochs: no stabilize phase unless asked
    assert (parse("--reg-epochs", "5", "--stabilize-iters", "300", "--zero-interval", "3").stabilize_iters) == 300
    assert parse("--method", "slim").reg_epochs == 10
    ocs = parse("--method", "ocs", "--ocs-window", "3", "--ocs-start-tol", "0.01", "--ocs-prune-tol", "0.002",
                "--ocs-lam-init", "0.001", "--ocs-lam-delta", "0.003", "--ocs-lam-interval", "2")
    assert (ocs.ocs_window, ocs.ocs_start_tol, ocs.ocs_prune_tol) == (3, 0.01, 0.002)
    assert (ocs.ocs_lam_init, ocs.ocs_lam_delta, ocs.ocs_lam_interval) == (0.001, 0.003, 2)

    from fastreg.data import load_dataset
    from fastreg.train import OCSRegularizer, Trainer

    ocs.model, ocs.run_dir = "digits_cnn", "unused"
    trainer = Trainer(ocs, load_dataset("digits"))
    pruner = OCSRegularizer(trainer.build_model(), ocs, trainer.example).pruner
    assert (pruner.window, pruner.start_tol, pruner.prune_tol) == (3, 0.01, 0.002)
    assert (pruner.lam_init, pruner.lam_delta, pruner.lam_interval) == (0.001, 0.003, 2)


@pytest.mark.parametrize("argv, message", [
    (["--reg-delta", "-1"], r"--reg-delta must be a finite number >= 0, got -1.0"),
    (["--method", "slim", "--model", "mlp7_linear"], r"--method slim ranks channels by their BatchNorm scale"),
    (["--method", "slim", "--importance", "fisher"], r"--importance applies to the methods that rank filters"),
    (["--batch-size", "2000", "--method", "l1"], r"--batch-size 2000 is larger than the training set \(1438 samples\)"),
    (["--model", "resnet-7"], r"--model must be one of \[.*\], got 'resnet-7'"),
    (["--pretrained", "missing.pt"], r"--pretrained 'missing.pt': no such checkpoint file"),
])
def test_bad_pruning_flags_fail_before_pretraining_in_one_line(tmp_path, capsys, argv, message):
    """A bad setting: exit status 2, one line on stderr naming the flag, no traceback; --debug shows it."""
    import re

    argv = ["prune", "--model", "digits_cnn", "--run-dir", str(tmp_path), "--quiet", *argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fastreg: error: ") and re.search(message, err)
    assert "Traceback" not in err and "--debug" in err
    assert not os.path.exists(tmp_path / "checkpoint.pt")
    assert cli.main([*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and re.search(message, err.splitlines()[-1])


def test_version_and_help_show_examples(capsys):
    from fastreg import __version__

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"fastreg {__version__}"
    for command in ([], ["demo"], ["train"], ["prune"], ["eval"]):
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
        out = capsys.readouterr().out
        assert "example" in out.lower() and "fastreg " in out.split("xample", 1)[1], command
    with pytest.raises(SystemExit):
        cli.main(["prune", "--help"])
    out = capsys.readouterr().out
    for flag in ("--importance", "--rounds", "--thresholds", "--early-bird", "--budget", "--zero-count", "--debug"):
        assert flag in out


def test_bad_list_flags_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prune", "--thresholds", "10,50"])
    assert "argument --thresholds: expected a list of percentages like '[10, 50, 80]'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--methods", "tpp,magnitude"])
    assert "argument --methods: expected a comma-separated subset of tpp,ocs,orthoreg,l1,slim" in capsys.readouterr().err


def test_orthoreg_and_scratch_flags():
    cfg = parse("--method", "orthoreg", "--thresholds", "[10, 50, 80]", "--importance", "taylor", "--ortho-coeff", "0.1")
    assert (cfg.rounds, cfg.cumulative_ratios(), cfg.importance_kind, cfg.ortho_coeff) == (3, [0.1, 0.5, 0.8], "taylor", 0.1)
    assert parse("--method", "orthoreg").importance_kind == "fisher" and parse("--method", "l1").importance_kind == "l1"
    eb = parse("--method", "orthoreg", "--early-bird", "--eb-epsilon", "0.05", "--eb-window", "3")
    assert (eb.early_bird, eb.eb_epsilon, eb.eb_window) == (True, 0.05, 3)
    assert parse("--method", "scratch", "--budget", "B").budget == "B"
    assert parse("--zero-count", "pruned").zero_count == "pruned"


def test_bench_is_delegated(monkeypatch):
    seen = []
    fake = types.ModuleType("fastreg.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fastreg.bench", fake)
    monkeypatch.setattr(fastreg, "bench", fake, raising=False)
    assert cli.main(["bench", "--quick", "--backend", "cpp"]) == 0
    assert seen == [["--quick", "--backend", "cpp"]]


def test_format_table():
    row = dict(method="tpp", acc_dense=0.99, acc_before_prune=0.98, acc_after_prune=0.97, acc_final=0.985,
               params=1500, param_sparsity=0.9, flops=2_000_000, speedup=4.0, jsv_after_prune=1.234, reg_ms_per_step=2.5)
    table = cli.format_table([row, dict(row, method="l1", reg_ms_per_step=None, jsv_after_prune=0.001)])
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1  # aligned
    assert "97.00%" in lines[2] and "1.50k (90% fewer)" in lines[2] and "2.00M (4.00× less)" in lines[2]
    assert lines[3].rstrip(" |").endswith("-")


def test_bad_flags_exit_with_usage(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prune", "--method", "magnitude"])
    assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m_fastreg_help():
    done = subprocess.run([sys.executable, "-m", "fastreg", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("train", "prune", "eval", "bench"):
        assert command in done.stdout


def write_idx(path, array) -> None:
    """An uncompressed IDX file (the MNIST format): magic, dims, big-endian, then the bytes."""
    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_mnist_from_data_dir_without_download(tmp_path):
    """The torchvision path: MNIST read from --data-dir (a tiny hand-written copy; nothing downloaded)."""
    import numpy as np

    from fastreg.data import load_dataset

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 6)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))
    data = load_dataset("mnist", str(tmp_path), download=False)
    assert (data.num_classes, data.input_shape, len(data.train), len(data.test)) == (10, (1, 28, 28), 12, 6)
    x, y = data.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= int(y) < 10
