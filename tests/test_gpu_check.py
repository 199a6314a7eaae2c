"""tools/gpu_check.py: the no-GPU path (what CI runs) and the stage runner's independence of stages."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path of a machine without a GPU")
@pytest.mark.parametrize("entry", ["python", "shell"])
def test_without_a_gpu_says_so_and_runs_nothing(tmp_path, entry):
    report = tmp_path / "report.md"
    cmd = ([sys.executable, SCRIPT] if entry == "python" else ["bash", os.path.join(ROOT, "tools", "gpu_check.sh")])
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(cmd + ["--report", str(report)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "no CUDA GPU found" in run.stdout and "nothing run" in run.stdout
    assert not report.exists()
    assert "[gpu_check]" not in run.stdout  # no stage started


def test_stages_are_independent(gpu_check, monkeypatch):
    """A failing, a raising and a timed-out stage are recorded; the stages after them still run; a stage
    the budget cannot fit is skipped; the report lists every stage with its status."""
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 0.5)
    ran = []

    def command(code: str):
        def run(ctx, limit):
            ran.append(code)
            rc, out = gpu_check.run_command([sys.executable, "-c", code], limit)
            return gpu_check.command_result(rc, out)
        return run

    def raises(ctx, limit):
        raise ValueError("a defect in the stage")

    Stage = gpu_check.Stage
    stages = [
        Stage("passes", 30, command("print('fine')"), reserve_s=0),
        Stage("fails", 30, command("import sys; print('boom'); sys.exit(3)"), reserve_s=0),
        Stage("raises", 30, raises, reserve_s=0),
        Stage("hangs", 1, command("import time; time.sleep(60)"), reserve_s=0),
        Stage("after", 30, command("print('still ran')"), reserve_s=0),
    ]
    ctx = gpu_check.Context(python=sys.executable, env=dict(os.environ))
    results = gpu_check.run_stages(stages, ctx, budget_s=60)
    status = {s.name: r.status for s, r in results}
    assert status == {"passes": "ok", "fails": "failed", "raises": "failed", "hangs": "timed out", "after": "ok"}
    assert ran[-1] == "print('still ran')"
    by_name = {s.name: r for s, r in results}
    assert "boom" in by_name["fails"].details and "exit status 3" in by_name["fails"].summary
    assert "ValueError: a defect in the stage" in by_name["raises"].details
    assert by_name["hangs"].seconds < 30
    text = gpu_check.report(results, {"gpu": "Test GPU", "torch": torch.__version__}, 60)
    assert text.startswith("# fastreg GPU check: Test GPU")
    for name, st in status.items():
        assert f"| {name} | {st} |" in text
    late = gpu_check.run_stages([Stage("late", 30, command("print('no')"))], ctx, budget_s=0.2)
    assert late[0][1].status == "skipped" and ran[-1] != "print('no')"


def test_reserve_shortens_earlier_stages(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 0.5)
    limits = {}

    def record(name):
        def run(ctx, limit):
            limits[name] = limit
            return gpu_check.Result("ok")
        return run

    stages = [gpu_check.Stage("first", 100, record("first"), reserve_s=0),
              gpu_check.Stage("second", 100, record("second"), reserve_s=40)]
    gpu_check.run_stages(stages, gpu_check.Context(python=sys.executable, env={}), budget_s=60)
    assert limits["first"] <= 20.5 and limits["second"] > 50
