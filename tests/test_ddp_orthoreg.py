"""OrthoReg with the Fisher importance on two processes (gloo) follows the 1-process run: the per-step d_c are
averaged over the processes, so both choose the same channels in every round."""
import json
import os
import subprocess
import sys

import torch

from fastreg.data import load_dataset
from fastreg.train import Config, Trainer, load_model

ARGS = dict(model="mlp7_linear", dataset="digits", batch_size=128, pretrain_epochs=1, reg_epochs=1, finetune_epochs=1,
            method="orthoreg", rounds=2, pruning_ratio=0.5, lr=0.05, jsv_samples=0, log_every=1)


def test_two_processes_choose_the_channels_of_one(tmp_path):
    ddp_dir = str(tmp_path / "ddp")
    flags = ["--run-dir", ddp_dir, "--quiet", "--device", "cpu"]
    for key, value in ARGS.items():
        flags += ["--" + ("epochs" if key == "pretrain_epochs" else key.replace("_", "-")), str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "fastreg", "prune", *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = Trainer(Config(command="prune", run_dir=str(tmp_path / "single"), quiet=True, plots=False, **ARGS),
                         load_dataset("digits"))
        single.run()
    finally:
        torch.set_num_threads(threads)
    ckpt = torch.load(os.path.join(ddp_dir, "finetune.pt"), weights_only=False)
    assert set(ckpt["keep_masks"]) == set(single.keep_masks)
    for name, keep in single.keep_masks.items():
        assert torch.equal(ckpt["keep_masks"][name], keep), name
    ddp_model, _ = load_model(os.path.join(ddp_dir, "finetune.pt"))
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp_model.state_dict()[key], value, atol=1e-5, rtol=1e-4, msg=key)
    with open(os.path.join(ddp_dir, "log.jsonl")) as f:
        assert json.loads(f.readline())["world_size"] == 2
