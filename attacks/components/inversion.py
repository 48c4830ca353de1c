"""The optimisation engine of Inverting Gradients (Geiping et al., NeurIPS 2020).

Split from :mod:`attacks.inverting_gradients` (the attack plug-in, which builds an
:class:`InversionProblem` from a record): :func:`invert` optimises ``R`` restarts of ``N``
candidate images as one ``[R, N, C, H, W]`` batch against the problem's target update with
Adam on the sign of the gradient, successive halving of the restarts
(:func:`attacks.components.restarts.pruning_schedule`) and, for FedAvg deltas, differentiable
unrolling of
the client's local optimiser (:class:`Unroll`, :mod:`attacks.components.local_optimizers`). Also
used by :mod:`attacks.peer_inversion` and the benchmarks. An optional ``adapt`` transform
(:mod:`attacks.adaptive`) is applied to each candidate's update before the distance.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attacks.components.gradients import Params
from attacks.components.objectives import (
    BNStatistics,
    NormalisedImages,
    bn_prior,
    cosine_distance,
    l2_distance,
    lr_multiplier,
    simulated_update,
    total_variation,
)
from attacks.components.progress import report as report_progress
from attacks.components.restarts import pruning_schedule, sliced_adam
from attacks.components.second_order import LeanSecondOrder
from fl_sim.records import LocalOptimizer
from fl_sim.tasks.base import Batch

__all__ = ["Unroll", "InversionProblem", "Inversion", "invert", "Callback"]

#: called as ``callback(iteration, images [R, N, C, H, W])`` after each step (benchmarks)
Callback = Callable[[int, Tensor], None]


@dataclass(frozen=True)
class Unroll:
    """How to simulate a multi-step update: each of ``clients`` clients takes ``steps``
    steps of its local ``optimizer`` (plain SGD unless given; state fresh each round) at
    ``lr`` on ``batch_size`` of its own images; their deltas are averaged."""

    lr: float
    steps: int
    batch_size: int
    clients: int = 1
    optimizer: LocalOptimizer = field(default_factory=LocalOptimizer)


@dataclass
class InversionProblem:
    """Everything the optimisation needs, built from one record (no ground truth).

    ``target``: the observed update per parameter (sign-flipped, scaled delta when a delta is
    matched as one gradient); ``labels``: ``[N]``; ``unroll``: None for gradient matching;
    ``aux``: the client's private randomness the loss needs (diffusion ``eps [S, C, H, W]``
    and ``t [S]``, all local steps' rows; ``{}`` for a classifier); ``groups``: for gradient
    matching, the images form ``groups`` equal batches with separate forward passes (clients
    of a FedSGD aggregate in train-mode BatchNorm: each its own batch statistics), and the
    update is the mean of their gradients.
    """

    task: Any
    params: Params
    buffers: Params
    target: Params
    labels: Tensor
    unroll: Unroll | None
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    aux: Mapping[str, Tensor] = field(default_factory=dict)
    groups: int = 1


def _update_fn(problem: InversionProblem, bn: BNStatistics | None, double_backward: str = "lean"
               ) -> Callable[[Tensor], tuple[Params, Tensor | None]]:
    """``images [R, N, C, H, W] -> ({name: [R, ...]}, bn prior [R] | None)`` of the problem."""
    u = problem.unroll
    if u is None:
        return _gradient_fn(problem, bn, double_backward)
    if u.clients == 1:
        plan = (u.lr, u.steps, u.batch_size)

        def fn(images: Tensor) -> tuple[Params, Tensor | None]:
            return simulated_update(problem.task, problem.params, problem.buffers, images,
                                    problem.labels, unroll=plan, bn=bn, aux=problem.aux,
                                    optimizer=u.optimizer)
        return fn

    def several(images: Tensor) -> tuple[Params, Tensor | None]:
        # FedAvg over `clients` equal-sized clients: mean of each client's unrolled delta.
        per = images.shape[1] // u.clients
        total: dict[str, Tensor] = {}
        prior: Tensor | None = None
        for c in range(u.clients):
            upd, pc = simulated_update(
                problem.task, problem.params, problem.buffers,
                images[:, c * per:(c + 1) * per], problem.labels[c * per:(c + 1) * per],
                unroll=(u.lr, u.steps, u.batch_size), bn=bn, optimizer=u.optimizer)
            for k, v in upd.items():
                total[k] = total[k] + v / u.clients if k in total else v / u.clients
            if pc is not None:
                prior = pc / u.clients if prior is None else prior + pc / u.clients
        return total, prior
    return several


def _grouped_gradient_fn(problem: InversionProblem, bn: BNStatistics | None
                         ) -> Callable[[Tensor], tuple[Params, Tensor | None]]:
    """Mean of the gradients of ``problem.groups`` equal image groups, each forwarded alone."""
    g = problem.groups

    def fn(images: Tensor) -> tuple[Params, Tensor | None]:
        per = images.shape[1] // g
        total: dict[str, Tensor] = {}
        prior: Tensor | None = None
        for c in range(g):
            upd, pc = simulated_update(problem.task, problem.params, problem.buffers,
                                       images[:, c * per:(c + 1) * per],
                                       problem.labels[c * per:(c + 1) * per], unroll=None,
                                       bn=bn, aux=problem.aux)
            for k, v in upd.items():
                total[k] = total[k] + v / g if k in total else v / g
            if pc is not None:
                prior = pc / g if prior is None else prior + pc / g
        return total, prior
    return fn


@dataclass
class Inversion:
    """Result of :func:`invert`.

    ``images [S, N, C, H, W]`` in [0, 1], ``objective [S]`` and ``distance [S]`` at the final
    (clamped) images of the ``S`` restarts that ran the whole budget, whose original indices
    are ``survivors``; ``pruning`` lists each halving (iteration, objective per candidate,
    kept/dropped original indices); ``evaluations`` counts image-gradient evaluations
    (restarts x iterations, plus the final scoring pass of the survivors). ``start [R, N, C,
    H, W]`` are the random starting images of all ``R`` restarts in [0, 1] (scored as the
    attack's floor: the "random-start PSNR" a defense pushes the attack towards).
    """

    images: Tensor
    objective: Tensor
    distance: Tensor
    survivors: list[int]
    pruning: list[dict[str, Any]]
    evaluations: int
    start: Tensor


def _gradient_fn(problem: InversionProblem, bn: BNStatistics | None, double_backward: str
                 ) -> Callable[[Tensor], tuple[Params, Tensor | None]]:
    """The FedSGD gradient of the candidates: vmapped :func:`simulated_update` for ``R > 1``,
    plain double-backprop autograd for ``R = 1`` (no ``torch.func`` wrappers: the common
    single-restart case and the tail of successive halving), built inside
    :class:`~attacks.components.second_order.LeanSecondOrder` when ``double_backward == "lean"``.
    Same values either way (to float rounding)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in problem.params.items()}
    names = list(leaves)
    order = [leaves[k] for k in names]
    grouped = _grouped_gradient_fn(problem, bn) if problem.groups > 1 else None

    def loss_of(x: Tensor) -> Tensor:
        if problem.groups == 1:
            return problem.task.loss(leaves, problem.buffers, Batch(x, problem.labels),
                                     problem.aux)
        per = x.shape[0] // problem.groups  # mean of the groups' losses: mean gradient
        return sum(problem.task.loss(leaves, problem.buffers,
                                     Batch(x[c * per:(c + 1) * per],
                                           problem.labels[c * per:(c + 1) * per]), problem.aux)
                   for c in range(problem.groups)) / problem.groups

    def fn(images: Tensor) -> tuple[Params, Tensor | None]:
        if images.shape[0] != 1 and grouped is not None:
            return grouped(images)
        if images.shape[0] != 1:
            return simulated_update(problem.task, problem.params, problem.buffers, images,
                                    problem.labels, unroll=None, bn=bn, aux=problem.aux)
        outer = torch.is_grad_enabled() and images.requires_grad
        lean = LeanSecondOrder() if outer and double_backward == "lean" else None
        with torch.enable_grad(), lean or contextlib.nullcontext():
            prior = None
            if bn is None:
                loss = loss_of(images[0])
            else:
                with bn.recording() as stats:
                    loss = loss_of(images[0])
                prior = bn_prior(stats, problem.buffers, bn.running).unsqueeze(0)
        with torch.enable_grad():
            grads = (lean.parameter_grads(loss, order, create_graph=True) if lean is not None
                     else torch.autograd.grad(loss, order, create_graph=outer))
        upd = {k: g.unsqueeze(0) for k, g in zip(names, grads, strict=True)}
        if not outer:
            upd = {k: g.detach() for k, g in upd.items()}
            prior = None if prior is None else prior.detach()
        return upd, prior
    return fn


def invert(problem: InversionProblem, *, max_iterations: int, restarts: int, lr: float,
           tv_weight: float, bn_prior_weight: float = 0.0, schedule: str = "step",
           distance: str = "cosine", restart_pruning: str = "halving", keep: int = 1,
           double_backward: str = "lean", generator: torch.Generator,
           callback: Callback | None = None,
           adapt: Callable[[Params], Params] | None = None) -> Inversion:
    """Optimise ``restarts`` candidate batches at once (Geiping et al. 2020, Alg. in sec. 4).

    All restarts start together as one ``[R, N, C, H, W]`` batch. With
    ``restart_pruning="halving"`` the batch is halved at the iterations of
    :func:`pruning_schedule` (keeping the restarts of lowest current objective, ties to the
    lower index; the image tensor and Adam's moments are sliced alike) until ``keep`` remain;
    ``"none"`` runs every restart for the whole budget (the paper's protocol). The callback
    sees the current survivors only. ``double_backward="lean"`` builds single-restart
    gradients inside :class:`~attacks.components.second_order.LeanSecondOrder` (``"autograd"``:
    stock formulas). ``adapt`` (an :class:`~attacks.adaptive.Adaptation`) transforms every
    candidate update before the distance (adaptive attacks on defended updates). Raises
    ``ValueError`` if the BN prior is asked for on a model without BatchNorm.
    """
    bn = BNStatistics(problem.task.model) if bn_prior_weight > 0 else None
    update_of = _update_fn(problem, bn, double_backward)
    dist = cosine_distance if distance == "cosine" else l2_distance
    # contiguous once: the distances flatten the target every iteration (a non-contiguous
    # gradient, e.g. a strided conv's from a module backward, would be copied each time)
    target = {k: v.contiguous() for k, v in problem.target.items()}
    target_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in target.values()))
    n = int(problem.labels.shape[0])
    device = next(iter(problem.params.values())).device
    cand = NormalisedImages((restarts, n, *problem.shape), problem.mean, problem.std,
                            generator=generator, device=device)

    def objective(z: Tensor) -> tuple[Tensor, Tensor]:
        images = z * cand.std + cand.mean
        upd, prior = update_of(images)
        if adapt is not None:
            upd = adapt(upd)
        d = dist(upd, target, target_norm=target_norm)
        total = d + tv_weight * total_variation(z) if tv_weight else d
        if prior is not None:
            total = total + bn_prior_weight * prior
        return total, d

    start = cand.images().detach().clamp(0, 1)
    plan = dict(pruning_schedule(restarts, max_iterations, keep)
                if restart_pruning == "halving" else [])
    alive = list(range(restarts))
    pruning: list[dict[str, Any]] = []
    evaluations = 0
    opt = torch.optim.Adam([cand.z], lr=lr)
    for it in range(max_iterations):
        report_progress("iterations", it, max_iterations)
        for group in opt.param_groups:
            group["lr"] = lr * lr_multiplier(schedule, it, max_iterations)
        total, _ = objective(cand.z)
        (grad,) = torch.autograd.grad(total.sum(), cand.z)
        evaluations += len(alive)
        if it in plan:
            # total = objective of the current (clamped) images: the final choice's criterion
            scores = total.detach().tolist()
            order = sorted(range(len(alive)), key=lambda i: (scores[i], i))[:plan[it]]
            order.sort()
            pruning.append({"iteration": it, "candidates": list(alive),
                            "objectives": scores,
                            "kept": [alive[i] for i in order],
                            "dropped": [a for i, a in enumerate(alive) if i not in order]})
            idx = torch.tensor(order, device=device)
            alive = [alive[i] for i in order]
            cand.z, opt = sliced_adam(opt, cand.z, idx)
            grad = grad[idx]
        cand.z.grad = grad.sign_()
        opt.step()
        cand.clamp_()
        if callback is not None:
            callback(it, cand.images().detach())
    with torch.no_grad():
        total, d = objective(cand.z)
    evaluations += len(alive)
    return Inversion(cand.images().detach().clamp_(0, 1), total.detach(), d.detach(), alive,
                     pruning, evaluations, start)
