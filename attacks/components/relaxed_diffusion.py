"""GIDM+'s objective: the DDPM loss at real timesteps and the joint matching over x0, eps, t.

Huang et al., "Gradient Inversion of Federated Diffusion Models" (arXiv 2405.20380), GIDM+.
:func:`relaxed_loss` is :meth:`fl_sim.tasks.diffusion.DiffusionTask.loss` with ``t`` real
(``abar`` interpolated linearly between integer steps, :func:`abar_at`; diffusers' UNet takes
float timesteps), so the timestep is a variable of the optimisation. :func:`objective` scores
``R`` candidates ``(x0, eps, t)`` at once (FedSGD gradients through ``torch.func.vmap``) and
:func:`optimise` runs Adam on them. The attack itself, with the search over t, is
:mod:`attacks.gidm_plus`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attacks.components.gradients import Params
from attacks.components.objectives import l2_distance, total_variation
from attacks.components.progress import report as report_progress

__all__ = ["abar_at", "relaxed_loss", "Problem", "Candidates", "eps_prior",
           "candidate_gradients", "matching_distance", "time_embedding_distance", "Render",
           "Weights", "objective", "optimise"]


# -- the relaxed DDPM loss -------------------------------------------------------------------
def abar_at(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """``abar`` at real-valued timesteps ``t`` (any shape), linear between integer steps.

    Equals ``alphas_cumprod[t]`` at integer ``t``; differentiable in ``t``; ``t`` is clamped to
    ``[0, T - 1]``.
    """
    top = alphas_cumprod.shape[0] - 1
    t = t.clamp(0, top)
    lo = t.detach().floor().clamp(max=top - 1).long() if top > 0 else t.detach().long()
    if top == 0:
        return alphas_cumprod[lo]
    w = t - lo.to(t.dtype)
    ac = alphas_cumprod.to(device=t.device, dtype=t.dtype)
    return ac[lo] * (1 - w) + ac[lo + 1] * w


def relaxed_loss(task: Any, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                 x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """:meth:`DiffusionTask.loss` at REAL timesteps: ``x0`` [B, C, H, W] in model space
    [-1, 1], ``eps`` [B, C, H, W], ``t`` [B] float. Equal to the task's loss at integer t."""
    abar = abar_at(task.alphas_cumprod, t).view(-1, *([1] * (x0.dim() - 1)))
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    pred = task.predict(params, buffers, x_t, t)
    kind = task.prediction_type
    target = (eps if kind == "epsilon" else x0 if kind == "sample"
              else abar.sqrt() * eps - (1 - abar).sqrt() * x0)
    return F.mse_loss(pred, target)


# -- the matching problem --------------------------------------------------------------------
@dataclass
class Problem:
    """What the optimisation needs from one record (no ground truth): the task, the global
    ``params``/``buffers``, the observed mean gradient ``target`` and its squared norm, the
    batch shape ``[B, C, H, W]`` and the number of training timesteps ``T``."""

    task: Any
    params: Params
    buffers: Params
    target: Params
    target_sq: float
    shape: tuple[int, int, int, int]
    num_timesteps: int
    time_params: tuple[str, ...] = ()


@dataclass
class Candidates:
    """``R`` candidate solutions: ``x`` [R, B, C, H, W] (model space, leaf), ``eps`` (same
    shape, leaf), ``t`` [R, B] (real timesteps, leaf)."""

    x: Tensor
    eps: Tensor
    t: Tensor

    def select(self, idx: Tensor) -> Candidates:
        """New leaves holding candidates ``idx`` (detached copies)."""
        return Candidates(*(v.detach()[idx].clone().requires_grad_(True)
                            for v in (self.x, self.eps, self.t)))


def eps_prior(eps: Tensor) -> Tensor:
    """Gaussian-moment penalty ``mean_b[mean(eps_b)^2 + (var(eps_b) - 1)^2]`` -> [R]."""
    flat = eps.flatten(2)
    return (flat.mean(-1).square() + (flat.var(-1) - 1).square()).mean(-1)


def candidate_gradients(problem: Problem, x: Tensor, eps: Tensor, t: Tensor) -> Params:
    """FedSGD gradients ``{name: [R, ...]}`` of the R candidates (vmapped, differentiable)."""
    def one(xi: Tensor, ei: Tensor, ti: Tensor) -> Params:
        def loss_of(p: Params) -> Tensor:
            return relaxed_loss(problem.task, p, problem.buffers, xi, ei, ti)
        return torch.func.grad(loss_of)(dict(problem.params))

    if x.shape[0] == 1:
        return {k: v.unsqueeze(0) for k, v in one(x[0], eps[0], t[0]).items()}
    return torch.func.vmap(one)(x, eps, t)


def matching_distance(grads: Params, target: Params, target_sq: float) -> Tensor:
    """``|g - g_obs|^2 / |g_obs|^2`` per candidate -> [R] (GIDM's ``"l2"`` distance)."""
    return l2_distance(grads, target) / max(target_sq, 1e-30)


def time_embedding_distance(grads: Params, target: Params, names: tuple[str, ...]) -> Tensor:
    """``1 - cos`` between candidate and observed gradients of the time-embedding MLP -> [R].

    For one image the first layer's weight gradient is the outer product ``delta emb(t)^T``
    (sinusoidal embedding of t), so its direction depends on t alone; 0 without ``names``.
    """
    if not names:
        return next(iter(grads.values())).new_zeros(next(iter(grads.values())).shape[0])
    g = torch.cat([grads[k].flatten(1) for k in names], 1)
    tgt = torch.cat([target[k].flatten() for k in names])
    return 1 - F.cosine_similarity(g, tgt.unsqueeze(0), dim=1, eps=1e-12)


#: ``v [R, B, C, H, W] -> x0`` in model space: a prior's sampler (phase 1) or None (pixels)
Render = Callable[[Tensor], Tensor] | None


@dataclass(frozen=True)
class Weights:
    """Objective weights and step sizes of one optimisation stage: ``lr`` of the image
    variable (latent or pixels), ``eps_lr``, ``t_lr`` (timesteps per step)."""

    eps_weight: float
    tv_weight: float
    lr: float
    t_lr: float
    t_weight: float = 1.0
    eps_lr: float = 0.05


def objective(problem: Problem, cand: Candidates, w: Weights, render: Render = None
              ) -> tuple[Tensor, Tensor]:
    """``(total [R], matching distance [R])`` of the candidates (``cand.x`` is rendered to
    images first when ``render`` is given)."""
    x = cand.x if render is None else render(cand.x)
    grads = candidate_gradients(problem, x, cand.eps, cand.t)
    dist = matching_distance(grads, problem.target, problem.target_sq)
    total = dist + w.eps_weight * eps_prior(cand.eps)
    if w.t_weight:
        total = total + w.t_weight * time_embedding_distance(grads, problem.target,
                                                             problem.time_params)
    if w.tv_weight:
        total = total + w.tv_weight * total_variation(x)
    return total, dist


def optimise(problem: Problem, cand: Candidates, w: Weights, iterations: int, *,
             move_t: bool, decay: bool = True, render: Render = None) -> Tensor:
    """Adam on x (or the latent), eps (and t if ``move_t``) for ``iterations`` steps, cosine
    decay if ``decay``; pixels clamped to [-1, 1] and t to [0, T - 1] after each step.
    Returns the final total objective [R] (no grad)."""
    groups = [{"params": [cand.x], "lr": w.lr}]
    if cand.eps.requires_grad:
        groups.append({"params": [cand.eps], "lr": w.eps_lr})
    if move_t:
        groups.append({"params": [cand.t], "lr": w.t_lr})
    opt = torch.optim.Adam(groups)
    base = [g["lr"] for g in opt.param_groups]
    for it in range(iterations):
        report_progress("iterations", it, iterations)
        if decay:
            f = 0.5 * (1 + math.cos(math.pi * it / iterations)) * 0.95 + 0.05
            for g, b in zip(opt.param_groups, base, strict=True):
                g["lr"] = b * f
        total, _ = objective(problem, cand, w, render)
        opt.zero_grad(set_to_none=True)
        total.sum().backward()
        opt.step()
        with torch.no_grad():
            if render is None:
                cand.x.clamp_(-1, 1)
            cand.t.clamp_(0, problem.num_timesteps - 1)
    with torch.no_grad():
        total, _ = objective(problem, cand, w, render)
    return total.detach()
