"""The lean double backward (attacks/components/second_order.py) and the closed-form cosine
backward.

Both must give stock autograd's values (checked in float64 against plain autograd on
convolutions of every flavour the models use) while doing less work: the lean second pass
performs exactly the input-side convolutions and no weight-side one (counted in FLOPs).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attack_cases import cifar_images, cifar_labels, make_record, make_spec, make_task
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from attacks.components.objectives import cosine_distance, l2_distance
from attacks.components.second_order import LeanSecondOrder
from attacks.inverting_gradients import InvertingGradients, invert
from fl_sim.errors import ConfigError
from fl_sim.tasks import build_task


def _net() -> nn.Module:
    """Every conv flavour in the zoo: bias/no bias, stride 2, k5 pad 2, groups, dilation,
    reflect padding ('same' string padding falls back to stock), BatchNorm (eval), pooling."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2, stride=2), nn.Sigmoid(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    ).double().eval()


def _grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor, lean: bool):
    params = list(net.parameters())
    if not lean:
        loss = F.cross_entropy(net(x), y)
        return torch.autograd.grad(loss, params, create_graph=True)
    mode = LeanSecondOrder()
    with mode:
        loss = F.cross_entropy(net(x), y)
    return mode.parameter_grads(loss, params, create_graph=True)


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_lean_double_backward_equals_autograd_float64(distance):
    net = _net()
    with torch.no_grad():  # non-trivial running statistics for the eval-mode BatchNorm
        net[3].running_mean.uniform_(-0.5, 0.5)
        net[3].running_var.uniform_(0.5, 2.0)
    names = [n for n, _ in net.named_parameters()]
    x0 = torch.rand(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 4])
    target = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    dist = cosine_distance if distance == "cosine" else l2_distance
    out = {}
    for lean in (False, True):
        x = x0.clone().requires_grad_(True)
        g = _grads(net, x, y, lean)
        d = dist({n: t.unsqueeze(0) for n, t in zip(names, g, strict=True)}, target)
        (gx,) = torch.autograd.grad(d.sum(), x)
        out[lean] = ([t.detach() for t in g], d.detach(), gx)
    for a, b in zip(out[False][0], out[True][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # first-order: identical
    torch.testing.assert_close(out[False][1], out[True][1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[False][2], out[True][2], rtol=1e-9, atol=1e-12)
    assert out[True][2].abs().sum() > 0


def _pass2_flops(lean: bool) -> int:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(32 * 8 * 8, 10))
    x = torch.rand(2, 3, 8, 8).requires_grad_(True)
    g = _grads(net, x, torch.tensor([1, 2]), lean)
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(sum((t * t).sum() for t in g), x)
    counts = counter.get_flop_counts()["Global"]
    return sum(v for k, v in counts.items() if "conv" in str(k))


def test_lean_second_pass_does_only_the_input_side_convolutions():
    # conv FLOPs of one unit (forward-sized convolution) per layer, batch 2 on 8x8
    unit0, unit1 = 2 * 2 * 16 * 3 * 9 * 64, 2 * 2 * 32 * 16 * 9 * 64
    # layer 1: conv(ggx, W) + conv(x, ggW) + input-grad(gy, ggW) + input-grad(dy, W);
    # layer 0 has no ggx (its input gradient is not part of the parameter gradient)
    assert _pass2_flops(lean=True) == 3 * unit0 + 4 * unit1
    # stock autograd also computes the weight-side term conv(ggI, gO) of layer 1 (and more)
    assert _pass2_flops(lean=False) >= 3 * unit0 + 5 * unit1


def test_parameters_are_constants_after_parameter_grads():
    net = _net()
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64).requires_grad_(True)
    mode = LeanSecondOrder()
    with mode:
        loss = F.cross_entropy(net(x), torch.tensor([2]))
    g = mode.parameter_grads(loss, list(net.parameters()), create_graph=True)
    assert not mode.parameters_wanted
    conv_w = net[2].weight
    second = torch.autograd.grad(sum(t.sum() for t in g), [x, conv_w], allow_unused=True)
    assert second[0] is not None and second[0].abs().sum() > 0
    assert second[1] is None  # documented: no second derivative w.r.t. parameters


def test_cosine_closed_form_backward_matches_autograd_reference():
    gen = torch.Generator().manual_seed(0)
    target = {"a": torch.randn(4, 3, generator=gen, dtype=torch.float64),
              "b": torch.randn(5, generator=gen, dtype=torch.float64)}
    grads = {k: torch.randn(3, *v.shape, generator=gen, dtype=torch.float64,
                            requires_grad=True) for k, v in target.items()}

    def reference(gs):
        flat = torch.cat([gs[k].flatten(1) for k in target], 1)
        t = torch.cat([v.flatten() for v in target.values()])
        return 1 - flat @ t / (flat.norm(dim=1) * t.norm())

    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    ours = torch.autograd.grad((cosine_distance(grads, target) * weights).sum(),
                               list(grads.values()))
    ref = torch.autograd.grad((reference(grads) * weights).sum(), list(grads.values()))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.autograd.gradcheck(lambda a, b: cosine_distance({"a": a, "b": b}, target),
                             (grads["a"], grads["b"]))


def _assert_same_steps(task, spec, images, labels, iterations: int) -> None:
    """``invert`` with the lean and the stock double backward: same images, same objective,
    fewer FLOPs."""
    record = make_record(task, spec, images, labels, knowledge={"labels": labels})
    problem, _ = InvertingGradients(labels="granted").problem(
        record, generator=torch.Generator().manual_seed(0))
    runs, flops = {}, {}
    for db in ("autograd", "lean"):
        with FlopCounterMode(display=False) as counter:
            runs[db] = invert(problem, max_iterations=iterations, restarts=1, lr=0.1,
                              tv_weight=0.2, double_backward=db,
                              generator=torch.Generator().manual_seed(0))
        flops[db] = counter.get_total_flops()
    torch.testing.assert_close(runs["lean"].images, runs["autograd"].images)
    torch.testing.assert_close(runs["lean"].objective, runs["autograd"].objective)
    # and the lean option is really in use: less arithmetic for the same steps (measured
    # 0.88-0.89 of stock on these cases; exactly 1.0 if the option were ignored)
    assert flops["lean"] < 0.95 * flops["autograd"]


def test_inversion_lean_and_autograd_take_the_same_steps(one_thread):
    spec = make_spec("convnet", {"width": 16}, image_size=16)
    task = build_task(spec, seed=0)
    task.model.eval()
    images = F.adaptive_avg_pool2d(cifar_images(2), 16)
    _assert_same_steps(task, spec, images, cifar_labels(2), iterations=8)


def test_reference_convnet_case_lean_equals_autograd_first_iterations(one_thread):
    """The ConvNet-64 reference model (BatchNorm, 2.9 M parameters) on a real image."""
    task, spec = make_task("convnet")
    _assert_same_steps(task, spec, cifar_images(1), cifar_labels(1), iterations=3)


def test_double_backward_option_validated():
    with pytest.raises(ConfigError, match="double_backward"):
        InvertingGradients(double_backward="fast")
