"""Kernel-level tests of the Triton gram penalty (fastreg/kernels/gram.py), beyond the
backend-parametrized tests of test_gram_penalty.py: multi-tile layers, the pruned-first row
order, fully written outputs, bf16, non-contiguous weights, and the device-table cache.
Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py): shapes are kept small."""
from __future__ import annotations

import pytest
import torch

from fastreg import _registry, reference

WHY_NOT = _registry.why_unavailable("gram_penalty", "triton", torch.device("cpu"))
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))
triton_gram = pytest.importorskip("fastreg.kernels.gram", reason="triton is not installed")


def triton_op(weights, masks, target, reduction, need_grad=True, coeff=1.0):
    return torch.ops.fastreg_triton.gram_penalty_and_grads(weights, [] if target == "identity" else masks, target, reduction,
                                                           coeff, need_grad)


def expected(weights, masks, target, reduction):
    """Reference values (float64) and ∂penalty_l/∂W_l with the reduction's 1/N² applied."""
    w64 = [w.double() for w in weights]
    ms = masks if target != "identity" else [None] * len(weights)
    value = reference.gram_penalty(w64, ms, target, reduction)
    grads = [
        reference.gram_penalty_grad(w, m, target) / (w.shape[0] ** 2 if reduction == "mean" else 1)
        for w, m in zip(w64, ms)
    ]
    return value, grads


@pytest.fixture
def nan_filled_buffers(monkeypatch):
    """Every buffer the kernels claim to write fully starts as NaN (or -1 for ints)."""

    def filled(*shape, dtype, device):
        t = torch.empty(*shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else -1)

    monkeypatch.setattr(triton_gram, "_uninitialized", filled)


@pytest.fixture
def small_tiles(monkeypatch):
    """16×16 row/column tiles and 32-wide D blocks, so that small layers span several tiles."""
    options = triton_gram._launch_options
    monkeypatch.setattr(
        triton_gram, "_launch_options", lambda *args: dict(options(*args), BLOCK_M=16, BLOCK_N=16, BLOCK_D=32)
    )


# With small tiles: layers spanning several row tiles and D blocks, with a row tile that mixes
# pruned and kept rows in pruned-first order.
MULTI_TILE = [(37, 70), (20, 4, 3, 3), (17, 1)]


@pytest.mark.parametrize("target", reference.TARGETS)
@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
def test_multi_tile_layers_match_reference(target, reduction, nan_filled_buffers, small_tiles):
    ws = [torch.randn(s, dtype=torch.float64) / s[0] ** 0.5 for s in MULTI_TILE]
    ms = [torch.rand(s[0]) < 0.6 for s in MULTI_TILE]
    ms[2][:] = True  # a layer with nothing pruned: decorrelate must write zero gradients
    value, grads = triton_op(ws, ms, target, reduction)
    exp_value, exp_grads = expected(ws, ms, target, reduction)
    torch.testing.assert_close(value, exp_value, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, exp_grads):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("how", ["none", "all", "first", "last"])
def test_pruned_first_order(how, nan_filled_buffers):
    n = [5, 40, 1]
    masks = [torch.rand(k) < 0.5 for k in n]
    for m in masks:
        if how == "none":
            m[:] = True
        elif how == "all":
            m[:] = False
        elif how == "first":
            m[:] = True
            m[0] = False
        elif how == "last":
            m[:] = True
            m[-1] = False
    rows2d = [torch.randn(k, 3) for k in n]
    plan = triton_gram._Plan([(w.data_ptr(), *w.shape) for w in rows2d], masks, 16, torch.device("cpu"))
    order = torch.full((plan.total_rows,), -1, dtype=torch.int32)
    n_pruned = torch.full((plan.n_layers,), -1, dtype=torch.int32)
    triton_gram._pruned_first_order_kernel[(plan.n_layers,)](plan.layers, order, n_pruned, BLOCK=16)
    for m, got in zip(masks, order.split(n)):
        assert got.tolist() == torch.argsort(m.int(), stable=True).tolist()  # pruned (False) first, ascending
    assert n_pruned.tolist() == [int((~m).sum()) for m in masks]


def test_bfloat16_loads_upcast_in_kernel():
    shapes = [(6, 2, 2, 2), (18, 5)]
    ws = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    ms = [torch.rand(s[0]) < 0.5 for s in shapes]
    value, grads = triton_op(ws, ms, "decorrelate", "mean")
    exp_value, exp_grads = expected(ws, ms, "decorrelate", "mean")
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), exp_value, rtol=1e-5, atol=1e-6)  # exact products in fp32
    for g, e in zip(grads, exp_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), e, rtol=1e-2, atol=1e-2)  # one bf16 rounding of the result


def test_non_contiguous_weights_get_contiguous_gradients():
    """As the C++ kernels and the fake return them (a compiled graph trusts the fake's strides)."""
    conv = torch.randn(8, 3, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)
    linear_t = torch.randn(5, 12, dtype=torch.float64).t()  # 12×5 view with strides (1, 12)
    ws = [conv, linear_t]
    ms = [torch.rand(w.shape[0]) < 0.5 for w in ws]
    value, grads = triton_op(ws, ms, "diagonal", "sum")
    exp_value, exp_grads = expected(ws, ms, "diagonal", "sum")
    torch.testing.assert_close(value, exp_value)
    for g, w, e in zip(grads, ws, exp_grads):
        assert g.shape == w.shape and g.is_contiguous()
        torch.testing.assert_close(g, e)


def test_device_tables_are_cached_and_masks_read_every_call():
    ws = [torch.randn(9, 4, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)]
    ms = [torch.rand(w.shape[0]) < 0.5 for w in ws]
    triton_gram._TABLES.clear()
    first, _ = triton_op(ws, ms, "decorrelate", "none")
    plans = [t for k, t in triton_gram._TABLES.items() if k[0] == "plan"]
    ms[0].logical_not_()  # masks change in place between steps: same addresses, new content
    ws[1].mul_(2)
    second, _ = triton_op(ws, ms, "decorrelate", "none")
    assert [t for k, t in triton_gram._TABLES.items() if k[0] == "plan"] == plans and len(plans) == 1
    torch.testing.assert_close(second, expected(ws, ms, "decorrelate", "none")[0])
    assert not torch.allclose(first, second)


def test_without_grad_returns_no_gradients_and_same_value(small_tiles):
    ws = [torch.randn(s, dtype=torch.float64) for s in MULTI_TILE]
    ms = [torch.rand(s[0]) < 0.5 for s in MULTI_TILE]
    with_grad, grads = triton_op(ws, ms, "decorrelate", "sum", True)
    without, none = triton_op(ws, ms, "decorrelate", "sum", False)
    assert none == [] and len(grads) == len(ws)
    torch.testing.assert_close(with_grad, without, rtol=0, atol=0)


# The interpreter runs the kernels' arithmetic; compiling them for real GPUs (no GPU needed:
# Triton lowers to PTX and runs ptxas) checks what the interpreter does not: constexpr globals,
# dot operand types and precisions, pointer casts. Runs in a fresh process without TRITON_INTERPRET.
COMPILE_FOR_GPU = r'''
import os, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastreg.kernels import gram as G

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_kernel(fn, pointers, constexprs, arch):
    """Compile for sm_<arch> and check that ptxas did not spill registers (STACK:0)."""
    signature = dict(pointers, **{k: "constexpr" for k in constexprs})
    options = {"num_warps": OPTIONS["num_warps"], "num_stages": OPTIONS["num_stages"]}
    kernel = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32), options=options
    )
    if os.path.exists(CUOBJDUMP):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        assert "STACK:0 " in usage, f"{fn} spills registers on sm_{arch}: {usage}"
    return kernel

dtype, target, need_grad, arch = getattr(torch, sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
acc = torch.float64 if dtype == torch.float64 else torch.float32
OPTIONS = G._launch_options(torch.device("cuda"), dtype, acc)
opts = {k: v for k, v in OPTIONS.items() if k not in ("num_warps", "num_stages")}
acc_name = "fp64" if acc == torch.float64 else "fp32"
TABLES = {"layers": "*i64", "tiles": "*i64", "order": "*i32", "n_pruned": "*i32"}
# target 0 (decorrelate): the in-place op's variant (adds into the gradients, times a device coeff)
in_place = dict(ACCUMULATE=need_grad and target == 0, HAS_COEFF=target == 0)
rows = compile_kernel(
    G._gram_rows_kernel,
    dict(TABLES, grad_ptrs="*i64", scratch="*" + acc_name, partials="*" + acc_name, coeff="*" + acc_name),
    dict(TARGET=target, MEAN=True, NEED_GRAD=need_grad, W_DTYPE=G._TL_DTYPES[dtype], ACC_DTYPE=G._TL_DTYPES[acc],
         **in_place, **opts),
    arch,
)
assert "mma" in rows.asm["ptx"] or arch < 80, "the gram tile should use tensor cores on sm_80+"
opts.pop("GRAM_DTYPE")
kept = compile_kernel(
    G._kept_rows_grad_kernel,
    dict(TABLES, grad_ptrs="*i64", scratch="*" + acc_name, coeff="*" + acc_name),
    dict(MEAN=True, W_DTYPE=G._TL_DTYPES[dtype], ACC_DTYPE=G._TL_DTYPES[acc], **in_place, **opts),
    arch,
)
OPTIONS.update(num_warps=4, num_stages=3)  # the launcher's defaults for the small kernels
compile_kernel(G._pruned_first_order_kernel, {"layers": "*i64", "order": "*i32", "n_pruned": "*i32"}, {"BLOCK": 256}, arch)
compile_kernel(G._layer_sums_kernel, {"layers": "*i64", "partials": "*" + acc_name, "per_layer": "*" + acc_name}, {"BLOCK": 64}, arch)
print("compiled")
'''


@pytest.mark.parametrize(
    "dtype, target, need_grad, arch",
    [("float32", 0, 1, 80), ("float16", 1, 1, 80), ("bfloat16", 2, 0, 90), ("float64", 0, 1, 80)],
)
def test_kernels_compile_for_cuda(dtype, target, need_grad, arch):
    import subprocess
    import sys

    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton install has no NVIDIA backend")
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_GPU, dtype, str(target), str(need_grad), str(arch)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_cpu_tensors_without_interpreter_raise_a_clear_error():
    import subprocess
    import sys

    script = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import torch, fastreg\n"
        "torch.ops.fastreg_triton.gram_penalty_and_grads([torch.randn(3, 2)], [torch.ones(3, dtype=torch.bool)], 'decorrelate', 'mean', 1.0, False)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "only under TRITON_INTERPRET=1" in done.stderr, done.stderr[-2000:]
