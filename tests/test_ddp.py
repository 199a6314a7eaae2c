"""Two processes (``torchrun --nproc_per_node=2 -m fastreg prune ...``, gloo on CPU) follow the
1-process trajectory with the same global batch, within float tolerance."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastreg.data import load_dataset
from fastreg.train import Config, Trainer, load_model

ARGS = dict(
    model="mlp7_linear", dataset="digits", batch_size=128, pretrain_epochs=1, reg_epochs=1, finetune_epochs=1,
    method="tpp", pruning_ratio=0.5, lw=100.0, reg_delta=0.05, reg_interval=1, lr=0.05, jsv_samples=4, log_every=1,
)


def cli_flags(run_dir: str) -> list[str]:
    flags = ["--run-dir", run_dir, "--quiet", "--device", "cpu"]
    for key, value in ARGS.items():
        flags += ["--" + ("epochs" if key == "pretrain_epochs" else key.replace("_", "-")), str(value)]
    return flags


def test_two_processes_match_one(tmp_path):
    ddp_dir = str(tmp_path / "ddp")
    cmd = [
        # --standalone: torchrun binds its rendezvous store to a free port itself (a port picked here and
        # bound later could be taken in between by another run).
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "fastreg", "prune", *cli_flags(ddp_dir),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]

    with open(os.path.join(ddp_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert records[0]["event"] == "config" and records[0]["world_size"] == 2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = Trainer(Config(command="prune", run_dir=str(tmp_path / "single"), quiet=True, plots=False, **ARGS),
                         load_dataset("digits"))
        expected = single.run()
    finally:
        torch.set_num_threads(threads)

    ddp_model, _ = load_model(os.path.join(ddp_dir, "finetune.pt"))
    got = ddp_model.state_dict()
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4, msg=key)
    # Every process advances the regularizer schedule once per global step, like the 1-process run.
    with open(os.path.join(ddp_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["params"] == expected["params"]
    assert summary["acc_final"] == pytest.approx(expected["acc_final"], abs=1 / 359)
    ddp_regs = [r["reg"] for r in records if r.get("event") == "step"]
    single_regs = [r["reg"] for r in single.records if r.get("event") == "step"]
    assert ddp_regs == single_regs
