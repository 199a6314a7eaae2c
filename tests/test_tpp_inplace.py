"""TPPLoss(in_loss=False): the loss is the base loss and apply_grad_() adds every TPP term's gradient
in place after backward — the same gradients as loss mode over the schedule, with GradScaler, gradient
accumulation, DDP and torch.compile'd steps, in O(1) ATen ops whatever the depth."""
import copy
import os

import pytest
import torch
from torch import nn

from fastreg.bench import count_ops_by_name
from fastreg.models.cifar_resnet import cifar_resnet
from fastreg.pruning import TPPLoss

from test_tpp import X16, resnet20_net, small_net

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(lw=100.0, delta=0.02, interval=2, ceiling=0.05)


def twins(make=small_net, dtype=torch.float64, **kw):
    """(net, loss-mode criterion, twin net, in-place criterion), the twins equal."""
    net, _ = make()
    net.to(dtype)
    twin = copy.deepcopy(net)
    kw = dict(KW, example_inputs=torch.randn(X16, dtype=dtype), **kw)
    return net, TPPLoss(net, 0.5, **kw), twin, TPPLoss(twin, 0.5, in_loss=False, **kw)


def assert_same_grads(a, b, msg="", **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"{msg} {name}: {m}")


@pytest.mark.parametrize("make", [small_net, resnet20_net], ids=["convs_with_bias", "resnet20"])
@pytest.mark.parametrize("target", ["decorrelate", "diagonal"])
def test_gradients_equal_loss_mode_over_the_schedule(make, target):
    net, loss_mode, twin, in_place = twins(make, target=target)
    for k in range(7):  # reg 0, 0, .02, .02, .04, .04, .05
        x, y = torch.randn(X16, dtype=torch.float64), torch.randint(0, 5, (4,))
        net.zero_grad(), twin.zero_grad()
        loss_mode(net(x), y).backward()
        base = in_place(twin(x), y)
        torch.testing.assert_close(base, nn.functional.cross_entropy(twin(x), y))  # the base loss only
        base.backward()
        in_place.apply_grad_()
        assert in_place.iteration == loss_mode.iteration == k + 1 and in_place.reg == loss_mode.reg
        assert_same_grads(net, twin, f"step {k}")


def test_step_schedule_advances_as_a_forward_does():
    net, crit, twin, other = twins()
    for _ in range(5):
        crit(net(torch.randn(X16, dtype=torch.float64)), torch.randint(0, 5, (4,)))
        other.step_schedule()
        assert (other.iteration, other.reg) == (crit.iteration, crit.reg)
    twin.eval()
    assert other.step_schedule() == other.reg and other.iteration == 5


def test_apply_grad_and_apply_l2_refuse_the_other_mode():
    net, loss_mode, twin, in_place = twins()
    with pytest.raises(RuntimeError, match=r"apply_grad_\(\) is for in_loss=False"):
        loss_mode.apply_grad_()
    with pytest.raises(RuntimeError, match=r"with in_loss=False, apply_grad_\(\) applies the L2 terms"):
        in_place.apply_l2_()


def test_missing_gradients_are_created_for_the_gram_term():
    """A pruned conv whose weight has no .grad yet (e.g. frozen data path) gets a zero one plus the term."""
    net, loss_mode, twin, in_place = twins()
    for _ in range(3):  # reg > 0 from the 3rd call
        in_place.step_schedule()
    for p in twin.parameters():
        p.grad = torch.zeros_like(p) if p.dim() != 4 else None
    in_place.apply_grad_()
    assert all(p.grad is not None for p in twin.parameters())


def test_grad_scaler_after_unscale():
    """scaler.scale(loss).backward(); scaler.unscale_(opt); criterion.apply_grad_(); scaler.step(opt):
    the gradients the optimizer sees equal loss mode's under the same scaler."""
    net, loss_mode, twin, in_place = twins(dtype=torch.float32)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, twin)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)]
    for k in range(5):
        x, y = torch.randn(X16), torch.randint(0, 5, (4,))
        for model, crit, opt, scaler in zip((net, twin), (loss_mode, in_place), opts, scalers):
            opt.zero_grad()
            scaler.scale(crit(model(x), y)).backward()
            scaler.unscale_(opt)
            if not crit.in_loss:
                crit.apply_grad_()
        assert_same_grads(net, twin, f"step {k}", rtol=1e-5, atol=1e-6)
        for opt, scaler in zip(opts, scalers):
            scaler.step(opt)
            scaler.update()


def test_gradient_accumulation_once_per_optimizer_step():
    """k micro-batches, each loss / k; loss mode adds reg/k per micro-batch, apply_grad_ once per step.
    (interval = k: reg is constant within a step.)"""
    k = 2
    net, loss_mode, twin, in_place = twins(interval=k)
    for step in range(4):
        net.zero_grad(), twin.zero_grad()
        for _ in range(k):
            x, y = torch.randn(X16, dtype=torch.float64), torch.randint(0, 5, (4,))
            (loss_mode(net(x), y) / k).backward()
            (in_place(twin(x), y) / k).backward()
        in_place.apply_grad_()
        assert in_place.reg == loss_mode.reg
        assert_same_grads(net, twin, f"step {step}")


@pytest.mark.parametrize("compile_forward", [True, False], ids=["forward_compiled", "forward_eager"])
def test_compiled_step_follows_the_schedule_without_recompiling(compile_forward):
    """The forward and loss compiled, apply_grad_ compiled too: the same gradients as eager loss mode, and
    no recompile when reg changes (steps 2, 4: reg is a tensor in both graphs; the first two steps may
    compile again for the per-step plans' first-call checks)."""
    from torch._dynamo.testing import CompileCounter

    net, loss_mode, twin, in_place = twins(dtype=torch.float32)
    counter = CompileCounter()
    torch._dynamo.reset()
    step = lambda x, y: in_place(twin(x), y)  # noqa: E731
    step = torch.compile(step, backend=counter) if compile_forward else step
    apply = torch.compile(in_place.apply_grad_, backend=counter)
    frames = None
    for k in range(6):
        x, y = torch.randn(X16), torch.randint(0, 5, (4,))
        net.zero_grad(), twin.zero_grad()
        loss_mode(net(x), y).backward()
        step(x, y).backward()
        apply()
        assert in_place.reg == loss_mode.reg
        assert_same_grads(net, twin, f"step {k}", rtol=1e-5, atol=1e-6)
        frames = counter.frame_count if k <= 1 else frames
        assert counter.frame_count == frames, f"recompiled at step {k} (reg {in_place.reg})"


def plain_and_in_place_step_ops(depth: int):
    """ATen ops of one training step (forward, backward, and apply_grad_ where used), plain CE vs TPP."""
    torch.manual_seed(0)
    net = cifar_resnet(depth, num_classes=10, width=4)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    crit = TPPLoss(net, 0.5, in_loss=False, delta=0.1, interval=1, example_inputs=x)
    ce = nn.CrossEntropyLoss()
    for _ in range(3):
        crit.step_schedule()  # reg > 0

    def plain():
        ce(net(x), y).backward()

    def in_place():
        crit.step_schedule()
        ce(net(x), y).backward()
        crit.apply_grad_()

    plain(), in_place()  # .grad populated, as in every training step
    return sum(count_ops_by_name(plain).values()), sum(count_ops_by_name(in_place).values())


def test_in_place_mode_adds_at_most_6_ops_to_a_step_whatever_the_depth():
    for depth in (8, 20):
        plain, in_place = plain_and_in_place_step_ops(depth)
        assert in_place - plain <= 6, (depth, plain, in_place)


def _ddp_worker(rank, world, store, x, y, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    net, _ = small_net()
    crit = TPPLoss(net, 0.5, in_loss=False, **KW, example_inputs=torch.randn(X16))
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for k in range(6):
        xs, ys = x[k].chunk(world)[rank], y[k].chunk(world)[rank]
        opt.zero_grad()
        crit(model(xs), ys).backward()
        crit.apply_grad_()
        opt.step()
    if rank == 0:
        torch.save(net.state_dict(), out)
    dist.destroy_process_group()


def test_ddp_two_processes_equal_one(tmp_path):
    import torch.multiprocessing as mp

    x, y = torch.randn(6, 8, 3, 16, 16), torch.randint(0, 5, (6, 8))
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), x, y, out), nprocs=2, join=True)

    net, _ = small_net()
    crit = TPPLoss(net, 0.5, in_loss=False, **KW, example_inputs=torch.randn(X16))
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for k in range(6):
        opt.zero_grad()
        # the mean over the global batch, as DDP's averaged gradients of each half's mean
        loss = sum(crit.base(net(xs), ys) for xs, ys in zip(x[k].chunk(2), y[k].chunk(2))) / 2
        crit.step_schedule()
        loss.backward()
        crit.apply_grad_()
        opt.step()
    got = torch.load(out)
    for key, value in net.state_dict().items():
        if "running" in key or "num_batches" in key:
            continue  # (BN statistics: per process under DDP, over the global batch here)
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4, msg=key)
