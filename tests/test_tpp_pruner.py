"""TPPPruner's stabilize phase on deep models: zero-out times past the phase, and counting only the pruned layers."""
import warnings

import pytest
import torch

from fastreg.models.cifar_resnet import cifar_resnet
from fastreg.pruning import TPPPruner
from fastreg.pruning.graph import LAYER_TYPES

X16 = (2, 3, 16, 16)


def layer_order(net):
    return [n for n, m in net.named_modules() if isinstance(m, LAYER_TYPES)]


def test_resnet110_paper_defaults_run_and_name_the_unzeroed_layers():
    """ResNet-110 has 112 Conv/Linear layers: with 10,000 stabilize iterations and interval 100, layer i is zeroed
    from iteration (i + 1)·100, so layers 100 … 111 never are. The pruned ones among them are named in a warning."""
    torch.manual_seed(0)
    net = cifar_resnet(110, num_classes=10, width=4)
    order = layer_order(net)
    assert len(order) == 112
    with pytest.warns(UserWarning) as record:
        pruner = TPPPruner(net, 0.5, example_inputs=torch.randn(X16))  # the paper's defaults: 10000, 100
    pruned = [n for n in order if n in pruner.keep_masks]
    late = [n for n in pruned if order.index(n) >= 100]
    assert late and pruner.unzeroed_layers == late
    message = str(record[0].message)
    assert all(name in message for name in late) and "zero_count='pruned'" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # counting only the 54 pruned layers: every one zeroed by iteration 5400
        counted = TPPPruner(net, 0.5, zero_count="pruned", example_inputs=torch.randn(X16))
    assert counted.unzeroed_layers == []
    assert max(counted.zero_time(g) for g, _ in counted.criterion._group_masks) == len(pruned) * 100


def pruned_rows_are_zero(net, masks):
    modules = dict(net.named_modules())
    return {n: bool((modules[n].weight.detach()[~keep] == 0).all()) for n, keep in masks.items()}


@pytest.mark.parametrize("zero_count", ["all", "pruned"])
def test_which_layers_are_zeroed_before_pruning(zero_count):
    """ResNet-20 (22 layers, 9 pruned), 9 stabilize iterations at interval 1: counting every layer, only the pruned
    layers among the first 9 are zeroed when the phase ends; counting the pruned layers, all 9 are."""
    torch.manual_seed(1)
    net = cifar_resnet(20, num_classes=5, width=8)
    order = layer_order(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = TPPPruner(net, 0.5, delta=0.5, interval=1, stabilize_iters=9, zero_interval=1, zero_count=zero_count,
                           example_inputs=torch.randn(X16))
    x, y = torch.randn(X16), torch.randint(0, 5, (2,))
    while pruner.phase != "prune":
        pruner(net(x), y)
        pruner.step()
    zeroed = pruned_rows_are_zero(net, pruner.keep_masks)
    if zero_count == "pruned":
        assert all(zeroed.values()) and pruner.unzeroed_layers == []
    else:
        expected = {n: order.index(n) < 9 for n in pruner.keep_masks}
        assert zeroed == expected and any(expected.values()) and not all(expected.values())
        assert pruner.unzeroed_layers == [n for n, early in expected.items() if not early]
    small = pruner.prune()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())


def test_bad_zero_count():
    net = cifar_resnet(20, num_classes=5, width=8)
    with pytest.raises(ValueError, match="zero_count must be one of"):
        TPPPruner(net, 0.5, zero_count="every", example_inputs=torch.randn(X16))


@pytest.mark.parametrize("mode", [dict(in_loss=False), dict(l2_in_loss=False)])
def test_apply_grad_adds_what_loss_mode_differentiates(mode):
    """pruner.apply_grad_() after backward gives loss mode's gradients, for every term out of the loss
    (in_loss=False) or the L2 terms alone (l2_in_loss=False), through regularize and stabilize; nothing after."""
    torch.manual_seed(2)
    net = cifar_resnet(20, num_classes=5, width=8)
    x, y = torch.randn(X16), torch.randint(0, 5, (2,))
    kwargs = dict(delta=0.25, interval=1, stabilize_iters=2, zero_interval=1, zero_count="pruned", example_inputs=x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_loss, in_place = TPPPruner(net, 0.5, **kwargs), TPPPruner(net, 0.5, **kwargs, **mode)
    phases = []
    for _ in range(6):  # reg 0, 0.25, 0.5, 0.75 while regularizing, then 1 while stabilizing
        grads = []
        for pruner in (in_loss, in_place):
            net.zero_grad(set_to_none=True)
            pruner(net(x), y).backward()
            pruner.apply_grad_()
            grads.append([p.grad.clone() for p in net.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        phases.append((in_loss.step(), in_place.step()))
    assert ("stabilize", "stabilize") in phases and in_place.reg == 1.0
    assert in_place.criterion.in_loss == ("in_loss" not in mode)
    in_place.phase = "finetune"
    net.zero_grad(set_to_none=True)
    in_place(net(x), y).backward()
    before = [p.grad.clone() for p in net.parameters()]
    in_place.apply_grad_()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, net.parameters()))


def test_the_trainer_applies_tpp_in_place():
    """The trainer's TPP builds its criterion with in_loss=False (every term added after backward)."""
    from fastreg.train import Config
    from fastreg.train.methods import TPPRegularizer

    net = cifar_resnet(20, num_classes=5, width=8)
    cfg = Config(model="resnet20", method="tpp", stabilize_iters=0)
    regularizer = TPPRegularizer(net, cfg, torch.randn(X16), ceiling=1.0)
    assert regularizer.criterion.in_loss is False
