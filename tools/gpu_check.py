"""One-command validation of fastreg on an NVIDIA GPU, written up as one markdown report.

    bash tools/gpu_check.sh [--wheels DIR] [--report PATH] [--budget SECONDS]

Needs a CUDA build of torch (any supported version) already installed, the CUDA toolkit (nvcc) to
build the extension, and no network: the pure-Python dependencies that are missing are installed
from the wheels in ``--wheels DIR`` (``pip download -d DIR torch-pruning tqdm pytest hypothesis ...``
on a machine with network). Stages, each in its own process with its own time limit (the budget is
shared out; a failing or timed-out stage is recorded and the next one runs):

  environment  the GPU, driver, CUDA, torch, Triton, nvcc and compute-sanitizer found
  deps         the missing pure-Python dependencies, from --wheels (pip --no-index)
  build        the extension for this GPU's arch (setup.py build_ext --inplace, FASTREG_CUDA=1)
  tests        every test that needs CUDA: the cuda and triton backends against the reference,
               values and gradients, every dtype (Triton compiled for the GPU, not interpreted)
  sanitizer    every CUDA op once under compute-sanitizer --tool memcheck
  tpp_step     a TPP training step under torch.cuda.set_sync_debug_mode("error"), then the same
               step captured in a CUDA graph, replayed and compared with the eager step
  bench_gram   gram penalty forward+backward on ResNet-56 and ResNet-50 conv shapes: fastreg cuda
               and triton (and the in-place gram_penalty_grad_ where the package has it),
               torch.compile(reference), the original loop; CUDA kernels per step (torch.profiler);
               group_norms along dim 0 and dim 1 (achieved bandwidth)
  bench_step   one ResNet-50 training step (bf16 autocast, batch 64) with and without TPP

Without a GPU it says so and exits 0, running nothing. Exit status: 0 when every stage passed, 1
otherwise (the report says which).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REPORT = os.path.join(ROOT, "runs", "gpu_check", "report.md")
DEFAULT_BUDGET_S = 470  # the whole run, under 8 minutes on one H100
MIN_STAGE_S = 5.0  # a stage left less time than this is skipped
TAIL_LINES = 40


# ---------------------------------------------------------------------------------------------
# Running stages
# ---------------------------------------------------------------------------------------------
@dataclass
class Result:
    status: str  # "ok", "failed", "timed out", "skipped"
    seconds: float = 0.0
    summary: str = ""
    details: str = ""


@dataclass
class Stage:
    name: str
    cap_s: float  # its own time limit
    run: Callable[["Context", float], Result]
    reserve_s: float = 15.0  # what it needs at least: kept free by the stages before it


@dataclass
class Context:
    python: str
    env: dict
    wheels: str | None = None
    facts: dict = field(default_factory=dict)  # found by one stage, used by later ones


def run_command(cmd: Sequence[str], timeout: float, env: dict | None = None, cwd: str = ROOT) -> tuple[int | None, str]:
    """(exit status, or None when killed at ``timeout`` seconds; stdout and stderr together). The
    command runs in its own process group, all of which is killed on timeout."""
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def command_result(rc: int | None, out: str, summary: str = "") -> Result:
    status = "timed out" if rc is None else "ok" if rc == 0 else "failed"
    if not summary:
        summary = "" if rc in (0, None) else f"exit status {rc}"
    return Result(status, summary=summary, details=f"```\n{tail(out)}\n```" if status != "ok" else "")


def run_stages(stages: Sequence[Stage], ctx: Context, budget_s: float) -> list[tuple[Stage, Result]]:
    """Every stage in order, each within min(its cap, what the budget leaves once the later stages'
    reserves are kept); an exception or a stage out of time is recorded, never fatal."""
    deadline = time.monotonic() + budget_s
    results = []
    for i, stage in enumerate(stages):
        reserve = sum(s.reserve_s for s in stages[i + 1:])
        limit = min(stage.cap_s, deadline - time.monotonic() - reserve)
        print(f"[gpu_check] {stage.name} (limit {limit:.0f} s)", flush=True)
        start = time.monotonic()
        if limit < MIN_STAGE_S:
            result = Result("skipped", summary="no time left in the budget")
        else:
            try:
                result = stage.run(ctx, limit)
            except Exception:  # a defect of the stage itself: recorded like any failure
                result = Result("failed", summary="the stage raised", details=f"```\n{traceback.format_exc()}```")
        result.seconds = time.monotonic() - start
        print(f"[gpu_check] {stage.name}: {result.status} {result.summary}", flush=True)
        results.append((stage, result))
    return results


def python_stage(name: str) -> Callable[[Context, float], Result]:
    """A stage that runs ``stage_<name>()`` of this file in a fresh Python process (a sticky CUDA error
    or a crash ends that process only); the function returns the stage's markdown."""
    def run(ctx: Context, limit: float) -> Result:
        with _tempfile() as out_path:
            rc, out = run_command([ctx.python, os.path.abspath(__file__), "--stage", name, "--stage-output", out_path],
                                  limit, ctx.env)
            body = open(out_path).read() if os.path.exists(out_path) else ""
        result = command_result(rc, out)
        if body:
            first, _, rest = body.partition("\n")
            result.summary = first if rc == 0 else (result.summary + "; " + first).strip("; ")
            result.details = rest.strip() + ("\n\n" + result.details if result.details else "")
        return result
    return run


class _tempfile:
    def __enter__(self) -> str:
        import tempfile

        fd, self.path = tempfile.mkstemp(prefix="gpu_check_", suffix=".md")
        os.close(fd)
        os.unlink(self.path)
        return self.path

    def __exit__(self, *exc) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


# ---------------------------------------------------------------------------------------------
# The stages run from the parent process
# ---------------------------------------------------------------------------------------------
def _probe(ctx: Context, code: str, timeout: float = 60) -> dict:
    rc, out = run_command([ctx.python, "-c", code], timeout, ctx.env)
    if rc != 0:
        raise RuntimeError(tail(out, 10))
    return json.loads(out.strip().splitlines()[-1])


ENV_PROBE = r"""
import json, torch
info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "gpu": None}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                sms=p.multi_processor_count, count=torch.cuda.device_count())
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["triton"] = f"unavailable ({type(e).__name__})"
print(json.dumps(info))
"""


def find_tool(name: str) -> str | None:
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import build_env

    root = build_env.cuda_toolkit_root() or os.environ.get("CUDA_HOME")
    cand = [os.path.join(root, "bin", name)] if root else []
    cand += [os.path.join(p, name) for p in ("/usr/local/cuda/bin", "/usr/local/cuda/compute-sanitizer")]
    found = shutil.which(name)
    return found or next((c for c in cand if os.path.exists(c)), None)


def stage_environment(ctx: Context, limit: float) -> Result:
    info = _probe(ctx, ENV_PROBE, limit)
    ctx.facts.update(info)
    rc, smi = run_command(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], 20) \
        if shutil.which("nvidia-smi") else (None, "")
    nvcc = find_tool("nvcc")
    nvcc_version = run_command([nvcc, "--version"], 20)[1].strip().splitlines()[-1] if nvcc else "not found"
    sanitizer = find_tool("compute-sanitizer")
    ctx.facts["sanitizer"] = sanitizer
    rows = [
        ("GPU", f"{info.get('gpu')} (compute capability {info.get('capability')}, {info.get('memory_gib')} GiB, "
                f"{info.get('sms')} SMs; {info.get('count')} visible)"),
        ("driver", smi.strip().split(",")[-1].strip() if rc == 0 and smi.strip() else "unknown (no nvidia-smi)"),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda']})"),
        ("Triton", info["triton"]),
        ("nvcc", nvcc_version),
        ("compute-sanitizer", sanitizer or "not found"),
        ("CPU", _cpu_model()),
        ("Python", platform.python_version()),
        ("fastreg commit", run_command(["git", "rev-parse", "--short", "HEAD"], 10)[1].strip() or "unknown"),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if info.get("gpu") is None:
        return Result("failed", summary="torch sees no GPU", details=table)
    return Result("ok", summary=str(info["gpu"]), details=table)


PURE_DEPENDENCIES = ("torch-pruning", "tqdm", "matplotlib", "scikit-learn", "pytest", "pytest-benchmark", "hypothesis",
                     "ninja")


def stage_deps(ctx: Context, limit: float) -> Result:
    """Install from --wheels whichever dependency is missing (torch and torchvision must be there)."""
    modules = {"torch-pruning": "torch_pruning", "scikit-learn": "sklearn", "pytest-benchmark": "pytest_benchmark"}
    probe = "import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in %r}))"
    names = {d: modules.get(d, d.replace("-", "_")) for d in PURE_DEPENDENCIES + ("torchvision",)}
    present = _probe(ctx, probe % sorted(set(names.values())), limit)
    missing = [d for d in PURE_DEPENDENCIES if not present[names[d]]]
    notes = [] if present["torchvision"] else ["torchvision is not installed: the model tests and ResNet-50 stages fail"]
    if not missing:
        return Result("ok", summary="all present" + (f"; {notes[0]}" if notes else ""))
    if not ctx.wheels:
        return Result("failed", summary=f"missing {', '.join(missing)} and no --wheels folder given")
    rc, out = run_command([ctx.python, "-m", "pip", "install", "--no-index", "--find-links", ctx.wheels, *missing],
                          limit, ctx.env)
    result = command_result(rc, out)
    result.summary = f"installed {', '.join(missing)}" if rc == 0 else f"pip could not install {', '.join(missing)}"
    return result


def stage_build(ctx: Context, limit: float) -> Result:
    env = dict(ctx.env, FASTREG_CUDA="1", MAX_JOBS=str(os.cpu_count() or 4))
    env.setdefault("TORCH_CUDA_ARCH_LIST", ctx.facts.get("capability") or "")
    if not env["TORCH_CUDA_ARCH_LIST"]:
        del env["TORCH_CUDA_ARCH_LIST"]
    rc, out = run_command([ctx.python, "setup.py", "build_ext", "--inplace", "-q"], limit, env)
    if rc == 0:
        probe = ("import json, fastreg; print(json.dumps(fastreg.available_backends('gram_penalty', 'cuda')))")
        backends = _probe(ctx, probe, 60)
        ctx.facts["backends"] = backends
        ok = "cuda" in backends
        return Result("ok" if ok else "failed", summary=f"arch {env.get('TORCH_CUDA_ARCH_LIST', 'auto')}; "
                      f"backends on cuda: {', '.join(backends)}", details="" if ok else f"```\n{tail(out)}\n```")
    return command_result(rc, out)


# Test files with the device-parametrised tests; -k keeps those that run on the GPU.
TEST_FILES = ("tests/test_fused.py", "tests/test_gram_penalty.py", "tests/test_gram_cpp.py", "tests/test_tpp.py")
TEST_FILTER = "cuda or triton"


def stage_tests(ctx: Context, limit: float) -> Result:
    cmd = [ctx.python, "-m", "pytest", *TEST_FILES, "-q", "-p", "no:cacheprovider", "-rfE", "-k", TEST_FILTER]
    rc, out = run_command(cmd, limit, ctx.env)
    lines = out.strip().splitlines()
    summary = next((l.strip("= ") for l in reversed(lines) if " passed" in l or " failed" in l or " error" in l), "")
    result = command_result(rc, out, summary)
    if rc is not None and rc != 0:
        failed = [l for l in lines if l.startswith(("FAILED", "ERROR"))]
        result.details = "```\n" + "\n".join(failed[:60]) + "\n```\n\n" + result.details
    return result


def stage_sanitizer(ctx: Context, limit: float) -> Result:
    sanitizer = ctx.facts.get("sanitizer") or find_tool("compute-sanitizer")
    if not sanitizer:
        return Result("skipped", summary="compute-sanitizer not found (it ships with the CUDA toolkit)")
    cmd = [sanitizer, "--tool", "memcheck", "--error-exitcode", "86", "--print-limit", "20",
           ctx.python, os.path.abspath(__file__), "--stage", "ops_once", "--stage-output", os.devnull]
    rc, out = run_command(cmd, limit, dict(ctx.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1"))
    errors = next((l for l in out.splitlines() if "ERROR SUMMARY" in l), "")
    result = command_result(rc, out, errors.replace("=", "").strip())
    if rc == 86:
        result.summary = "memcheck found errors: " + result.summary
    return result


# ---------------------------------------------------------------------------------------------
# The stages run in a child process (python tools/gpu_check.py --stage NAME)
# ---------------------------------------------------------------------------------------------
def _cuda_timer(fns: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, float]:
    """Median milliseconds per call of each function, timed with CUDA events in interleaved rounds."""
    import statistics

    import torch

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


def _device_ops(fn: Callable[[], object]) -> int:
    """CUDA kernels, copies and memsets of one call (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


_partial_path: str | None = None  # child mode: where a stage's markdown goes


def _partial(summary: str, sections: Sequence[str]) -> str:
    """The stage's markdown so far, also written out at once: a stage stopped at its time limit still
    reports the sections it finished."""
    text = summary + "\n" + "\n\n".join(sections)
    if _partial_path:
        with open(_partial_path, "w") as f:
            f.write(text)
    return text


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stage_ops_once() -> str:
    """Every CUDA op of the cuda backend once on small tensors, checked against the reference."""
    import torch

    import fastreg
    from fastreg import _registry, reference

    dev = torch.device("cuda")
    torch.manual_seed(0)
    params = [torch.randn(s, device=dev) for s in ((16, 8, 3, 3), (16,), (10, 16))]
    masks = [torch.arange(p.shape[0], device=dev) % 3 != 0 for p in params]
    grads = [torch.randn_like(p) for p in params]
    op = lambda name: _registry.op("cuda", name)  # noqa: E731
    checked = []
    norms = op("group_norms")(params, 2, 0)
    torch.testing.assert_close(list(norms), reference.group_norms(params, 2, 0))
    checked.append("group_norms")
    ids = [torch.arange(p.shape[0], device=dev) % 4 - 1 for p in params]
    torch.testing.assert_close(op("group_saliency")(params, [0] * 3, ids, 3),
                               reference.group_saliency(params, [0] * 3, ids, 3))
    checked.append("group_saliency")
    for name in ("l2_grad_", "group_lasso_grad_"):
        out = [g.clone() for g in grads]
        op(name)(out, params, masks, [0] * 3, 0.5, None)
        checked.append(name)
    out = [p.clone() for p in params]
    op("shrink_")(out, masks, [0] * 3, 0.5, None)
    op("group_lasso_grad_grouped_")([g.clone() for g in grads], params, [0] * 3, ids,
                                    torch.tensor([True, False, True], device=dev), 0.5, None)
    checked += ["shrink_", "group_lasso_grad_grouped_"]
    weights = [torch.randn(s, device=dev, requires_grad=True) for s in ((16, 8, 3, 3), (32, 16, 3, 3))]
    wmasks = [torch.arange(w.shape[0], device=dev) % 2 == 0 for w in weights]
    loss = fastreg.gram_penalty(weights, wmasks, target="decorrelate", reduction="mean", backend="cuda")
    loss.backward()
    torch.testing.assert_close(loss, reference.gram_penalty([w.detach() for w in weights], wmasks, "decorrelate", "mean"))
    checked.append("gram_penalty (forward + backward)")
    torch.cuda.synchronize()
    return f"{len(checked)} ops\n" + ", ".join(checked)


def _tpp_setup(batch: int = 64):
    import torch

    import fastreg
    from fastreg.models import get_model

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = get_model("resnet56", 10).to(dev)
    x, y = torch.randn(batch, 3, 32, 32, device=dev), torch.randint(0, 10, (batch,), device=dev)
    # interval 1 and Δ = τ: the regularization is on (at τ) from the first step, so the gram penalty runs.
    crit = fastreg.TPPLoss(model, 0.5, delta=0.1, ceiling=0.1, interval=1, example_inputs=x[:2])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return model, opt, step


def stage_tpp_step() -> str:
    import copy

    import torch

    model, opt, step = _tpp_setup()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    lines = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        torch.cuda.synchronize()
        lines.append("- sync debug mode \"error\": one TPP training step made no host sync")
    except RuntimeError as e:
        torch.cuda.set_sync_debug_mode(0)
        raise RuntimeError(f"a TPP training step synchronises with the host: {e}") from None
    finally:
        torch.cuda.set_sync_debug_mode(0)

    # CUDA graph: warm up on a side stream, capture one step, replay; compare with the same step eager.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step()
    state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    graph.replay()
    torch.cuda.synchronize()
    replayed = [p.detach().clone() for p in model.parameters()], captured_loss.detach().clone()
    model.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    eager_loss = step()
    torch.cuda.synchronize()
    worst = max(float((a - p).abs().max() / p.abs().max().clamp_min(1e-12))
                for a, p in zip(replayed[0], model.parameters()))
    if not torch.allclose(replayed[1], eager_loss.detach(), rtol=1e-4, atol=1e-5) or worst > 1e-4:
        raise RuntimeError(f"the replayed step differs from the eager one: loss {float(replayed[1]):.6g} vs "
                           f"{float(eager_loss):.6g}, parameters up to {worst:.2e} (relative)")
    lines.append(f"- CUDA graph: the captured step replays like the eager step (loss {float(eager_loss):.6g}, "
                 f"parameters within {worst:.1e} relative)")
    return "no host sync; captured in a CUDA graph\n" + "\n".join(lines)


def _gram_grad_inplace(weights, masks, backend: str):
    """fastreg.gram_penalty_grad_ (when the package has it) as a step: w.grad += ∂penalty/∂w."""
    import inspect

    import torch

    import fastreg

    fn = getattr(fastreg, "gram_penalty_grad_", None)
    if fn is None:
        return None
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in (("target", "decorrelate"), ("reduction", "mean"), ("backend", backend)) if k in accepted}
    for w in weights:  # (accumulated into from then on: the values are not checked here)
        if w.grad is None:
            w.grad = torch.zeros_like(w)
    return lambda: fn(weights, masks, **kwargs)


def stage_bench_gram() -> str:
    import torch

    import fastreg
    from fastreg import bench, reference

    dev = torch.device("cuda")
    sections = []
    headline = []
    compiled = torch.compile(lambda w, m: reference.gram_penalty(w, m, "decorrelate", "mean"), dynamic=False)
    for model, (warmup, reps) in (("resnet56", (5, 30)), ("resnet50", (3, 15))):
        weights = [w.requires_grad_() for w in bench.model_conv_weights(model, device=dev)]
        masks = bench.l1_keep_masks(weights, 0.5)
        losses = {f"fastreg {b}": (lambda b=b: fastreg.gram_penalty(weights, masks, target="decorrelate",
                                                                     reduction="mean", backend=b))
                  for b in fastreg.available_backends("gram_penalty", dev) if b != "reference"}
        losses["torch.compile(reference)"] = lambda: compiled(weights, masks)
        losses["reference (eager)"] = lambda: reference.gram_penalty(weights, masks, "decorrelate", "mean")
        losses["original loop"] = lambda: reference.gram_penalty_official(weights, masks)
        steps = {name: (lambda f=f: bench.loss_and_grads(f, weights)) for name, f in losses.items()}
        start = time.monotonic()
        expected = steps["reference (eager)"]()
        errors, failures = {}, []
        for name, step in steps.items():
            try:
                got = step()
                errors[name] = max(bench.max_disagreement([got[0].detach()], [expected[0].detach()])[1],
                                   bench.max_disagreement(got[1], expected[1])[1])
            except Exception as e:  # one provider failing leaves the others timed
                failures.append(f"- {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        compile_s = time.monotonic() - start
        for name in [n for n in steps if n not in errors]:
            del steps[name]
        inplace = _gram_grad_inplace(weights, masks, "cuda")
        if inplace is not None:
            steps["fastreg gram_penalty_grad_ (in place)"] = inplace
        times = _cuda_timer(steps, warmup, reps)
        ops = {name: _device_ops(step) for name, step in steps.items()}
        base = times.get("torch.compile(reference)")
        loop = times.get("original loop")
        rows = [(name, f"{ms:.3f}", f"{base / ms:.2f}x" if base else "–", f"{loop / ms:.2f}x" if loop else "–",
                 ops[name], f"{errors[name]:.1e}" if name in errors else "–") for name, ms in times.items()]
        table = _markdown_table(("provider", "median ms / step", "vs compile", "vs original loop",
                                 "CUDA kernels / step", "max rel. error"), rows)
        sections.append(f"**{model}** ({len(weights)} convs, ratio 0.5; {reps} interleaved rounds, "
                        f"first calls incl. compilation {compile_s:.1f} s)\n\n{table}" + ("\n\n" + "\n".join(failures) if failures else ""))
        if "fastreg cuda" in times and base:
            headline.append(f"{model}: cuda {times['fastreg cuda']:.3f} ms ({base / times['fastreg cuda']:.1f}x compile)")
        if failures:
            headline.append(f"{model}: {len(failures)} provider(s) failed")
        for w in weights:
            w.grad = None
        _partial("; ".join(headline), sections)

    # group_norms along dim 0 (one slice = contiguous rows) and dim 1 (strided slices).
    weights = bench.model_conv_weights("resnet50", device=dev)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    norm_steps = {f"dim {d}": (lambda d=d: fastreg.group_norms(weights, dim=d, flat=True, backend="cuda")) for d in (0, 1)}
    times = _cuda_timer(norm_steps, 5, 30)
    rows = [(name, f"{ms * 1000:.1f}", f"{nbytes / (ms / 1000) / 1e9:.0f}") for name, ms in times.items()]
    sections.append("**group_norms (cuda), ResNet-50 conv weights** (fp32, one read of "
                    f"{nbytes / 2**20:.0f} MiB)\n\n" + _markdown_table(("slices along", "median µs", "GB/s"), rows))
    return _partial("; ".join(headline), sections)


def stage_bench_step() -> str:
    import torch
    import torch.nn.functional as F
    import torchvision

    import fastreg

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=1000).to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 224, 224, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (64,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.monotonic()
    crit = fastreg.TPPLoss(model, 0.5, delta=1e-3, ceiling=1e-3, interval=1, example_inputs=x[:2])
    setup_s = time.monotonic() - start

    def train(criterion):
        def step():
            opt.zero_grad(set_to_none=False)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = criterion(model(x), y)
            loss.backward()
            opt.step()
        return step

    times = _cuda_timer({"without TPP": train(F.cross_entropy), "with TPP": train(crit)}, 3, 10)
    plain, tpp = times["without TPP"], times["with TPP"]
    rows = [(name, f"{ms:.1f}", f"{(ms / plain - 1) * 100:+.1f} %") for name, ms in times.items()]
    return (f"TPP adds {(tpp / plain - 1) * 100:+.1f} % to a step ({plain:.1f} → {tpp:.1f} ms)\n"
            f"ResNet-50, batch 64, 224×224, bf16 autocast, channels_last, SGD; 10 interleaved rounds; "
            f"TPPLoss set-up (graph tracing, masks) {setup_s:.1f} s\n\n"
            + _markdown_table(("training step", "median ms", "vs without"), rows))


CHILD_STAGES = {"ops_once": stage_ops_once, "tpp_step": stage_tpp_step, "bench_gram": stage_bench_gram,
                "bench_step": stage_bench_step}


def stages() -> list[Stage]:
    return [
        Stage("environment", 60, stage_environment, reserve_s=10),
        Stage("deps", 60, stage_deps, reserve_s=5),
        Stage("build", 200, stage_build, reserve_s=60),
        Stage("tests", 120, stage_tests, reserve_s=30),
        Stage("sanitizer", 60, stage_sanitizer, reserve_s=20),
        Stage("tpp_step", 45, python_stage("tpp_step"), reserve_s=20),
        Stage("bench_gram", 150, python_stage("bench_gram"), reserve_s=40),
        Stage("bench_step", 60, python_stage("bench_step"), reserve_s=30),
    ]


# ---------------------------------------------------------------------------------------------
# Report and entry point
# ---------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(results: Sequence[tuple[Stage, Result]], facts: dict, budget_s: float) -> str:
    total = sum(r.seconds for _, r in results)
    lines = [f"# fastreg GPU check: {facts.get('gpu', 'unknown GPU')}", "",
             f"torch {facts.get('torch', '?')} (CUDA {facts.get('torch_cuda', '?')}), Triton {facts.get('triton', '?')}; "
             f"{total:.0f} s in all (budget {budget_s:.0f} s).", "",
             _markdown_table(("stage", "status", "seconds", "summary"),
                             [(s.name, r.status, f"{r.seconds:.0f}", r.summary.replace("|", "/")) for s, r in results]), ""]
    for stage, result in results:
        if result.details:
            lines += [f"## {stage.name}", "", result.details, ""]
    return "\n".join(lines)


def gpu_present() -> tuple[bool, str]:
    """(whether a CUDA GPU is usable, why not), asking torch when it is installed, else nvidia-smi."""
    try:
        import torch
    except ImportError:
        if shutil.which("nvidia-smi") and run_command(["nvidia-smi", "-L"], 20)[0] == 0:
            return True, ""
        return False, "no NVIDIA GPU found (torch is not installed and nvidia-smi finds none)"
    if not torch.cuda.is_available():
        why = "torch is a CPU-only build" if torch.version.cuda is None else "torch finds no CUDA GPU"
        return False, f"no CUDA GPU found ({why})"
    return True, ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--wheels", help="folder of wheels for the missing pure-Python dependencies (no network)")
    parser.add_argument("--report", default=DEFAULT_REPORT, help="markdown report path (default %(default)s)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for every stage together")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # child mode: run one Python stage
    parser.add_argument("--stage-output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.stage:
        global _partial_path
        sys.path.insert(0, ROOT)
        _partial_path = args.stage_output
        text = CHILD_STAGES[args.stage]()
        with open(args.stage_output, "w") as f:
            f.write(text)
        return 0

    present, why = gpu_present()
    if not present:
        print(f"gpu_check: {why}; nothing to check, nothing run.")
        return 0
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTREG_BACKEND", "FASTREG_LIBRARY")}
    env["TRITON_INTERPRET"] = "0"  # Triton compiled for the GPU (tests/conftest.py would default it to 1)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    ctx = Context(python=sys.executable, env=env, wheels=args.wheels)
    chosen = [s for s in stages() if not args.only or s.name in args.only or s.name == "environment"]
    results = run_stages(chosen, ctx, args.budget)
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    with open(args.report, "w") as f:
        f.write(report(results, ctx.facts, args.budget))
    print(f"gpu_check: report written to {args.report}")
    return 0 if all(r.status == "ok" for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
