"""Solve a DDPM client's private noise from the output layer's gradient (GIDM+'s eps, issue 25).

Not from the GIDM+ paper (Huang et al. 2024, arXiv 2405.20380), which optimises eps as a free
variable; this is our reading of the UNet's LAST layer. For the DDPM loss
``L = mean((eps_theta(x_t, t) - eps)**2)`` over ``N = B*C*H*W`` values, write
``r = eps_theta(x_t, t) - eps`` (the residual, ``[B, C, H, W]``) and ``F`` the output
convolution's input (``conv_out`` after ``conv_norm_out`` and ``conv_act``, ``[B, C_in, H, W]``).
``conv_out``'s gradients are LINEAR in ``r`` with coefficients from ``F`` alone::

    dL/dW[o, i, dy, dx] = 2/N sum_b sum_p r[b, o, p] * F[b, i, p + (dy, dx)]
    dL/db[o]            = 2/N sum_b sum_p r[b, o, p]

i.e. per output channel ``o`` the system ``M r_o = y_o`` with ``M = [unfold(F); 1]``
(``C_in*9 + 1`` rows, ``B*H*W`` columns). Given a candidate ``x_t`` (and t), the observed
``conv_out`` gradient therefore fixes ``r`` -- hence ``eps = eps_theta(x_t, t) - r`` and
``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` -- without any optimisation over eps:

- batch 1 on the tiny digits UNet: 32*9 + 1 = 289 equations for 256 unknowns, full rank
  (measured: rank 256, condition 1.8e3-3.6e3 at t = 50 / 300 / 800 with the tests' prior); at the
  TRUE ``x_t`` the solve returns eps with relative error 2e-6 to 5e-6 (x0 at 92-127 dB);
- batch B > 1: ``256 B`` unknowns, so the system is under-determined; :func:`solve_residual`
  then returns the solution nearest ``r0 = eps_theta(x_t, t)`` (the eps of smallest norm that
  explains the layer: the MAP of the Gaussian prior ``eps ~ N(0, I)`` under the exact
  constraint). For ``B = 1`` this is the ordinary least-squares solution.

The search is then over ``x_t`` alone (:func:`xt_distance`, :func:`search_xt`): the full
gradient matching distance with eps from the solve, differentiated through the solve
(variable projection). What it does and does not buy is measured in ``benchmarks/RESULTS.md``
(issue 25) and summarised in :class:`attacks.gidm_plus.GIDMPlus`'s docstring.

Raises :class:`~fl_sim.errors.ConfigError` for a model without a ``conv_out`` convolution or a
task that does not predict eps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attacks.components.relaxed_diffusion import Problem, abar_at, matching_distance
from fl_sim.errors import ConfigError

__all__ = ["output_features", "solve_residual", "solved_noise", "xt_distance", "x0_from",
           "search_xt"]


def _conv_out(task: Any) -> torch.nn.Conv2d:
    conv = getattr(task.model, "conv_out", None)
    if not isinstance(conv, torch.nn.Conv2d) or getattr(task, "prediction_type",
                                                         "epsilon") != "epsilon":
        raise ConfigError("eps_solve='last_layer' needs an eps-predicting UNet whose last layer "
                          "is a Conv2d named conv_out (diffusers' UNet2DModel)")
    return conv


def output_features(problem: Problem, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(F [B, C_in, H, W], eps_theta(x_t, t) [B, C, H, W])``: the output convolution's input
    and the model's prediction at the global parameters (differentiable in ``x_t``)."""
    conv = _conv_out(problem.task)
    box: dict[str, Tensor] = {}
    hook = conv.register_forward_pre_hook(lambda _m, args: box.__setitem__("f", args[0]))
    try:
        pred = problem.task.predict(problem.params, problem.buffers, x_t, t)
    finally:
        hook.remove()
    return box["f"], pred


def solve_residual(features: Tensor, pred: Tensor, grad_weight: Tensor, grad_bias: Tensor, *,
                   ridge: float = 1e-8) -> Tensor:
    """The residual ``r = pred - eps`` [B, C, H, W] that explains ``conv_out``'s gradient.

    ``features`` [B, C_in, H, W] (the layer's input), ``pred`` [B, C, H, W], the observed
    ``grad_weight`` [C, C_in, k, k] and ``grad_bias`` [C] of the MEAN loss over the B*C*H*W
    values. Over-determined (B = 1 at 16x16): least squares; under-determined: the solution
    nearest ``pred`` (eps of least norm). ``ridge`` (relative to the mean diagonal of the Gram
    matrix) keeps the solve finite. Double precision, differentiable in ``features``/``pred``.
    """
    b, c, h, w = pred.shape
    k = grad_weight.shape[-1]
    n = b * c * h * w
    u = F.unfold(features.double(), k, padding=k // 2)                  # [B, C_in*k*k, HW]
    m = torch.cat([u, torch.ones_like(u[:, :1])], 1)                    # [B, K, HW]
    m = m.permute(1, 0, 2).reshape(m.shape[1], b * h * w)               # [K, B*HW]
    y = torch.cat([grad_weight.flatten(1), grad_bias[:, None]], 1).double().T * (n / 2)
    r0 = pred.double().permute(1, 0, 2, 3).reshape(c, b * h * w).T     # [B*HW, C]
    res = y - m @ r0
    rows, cols = m.shape
    if rows >= cols:
        gram = m.T @ m
        eye = torch.eye(cols, dtype=gram.dtype, device=gram.device)
        d = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * eye, m.T @ res)
    else:
        gram = m @ m.T
        eye = torch.eye(rows, dtype=gram.dtype, device=gram.device)
        d = m.T @ torch.linalg.solve(gram + ridge * gram.diagonal().mean() * eye, res)
    return (r0 + d).T.reshape(c, b, h, w).permute(1, 0, 2, 3).to(pred.dtype)


def solved_noise(problem: Problem, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(eps [B, C, H, W], eps_theta(x_t, t))``: the noise the observed ``conv_out`` gradient
    implies at ``x_t`` and ``t`` [B] (differentiable in ``x_t``)."""
    feats, pred = output_features(problem, x_t, t)
    r = solve_residual(feats, pred, problem.target["conv_out.weight"],
                       problem.target["conv_out.bias"])
    return pred - r, pred


def xt_distance(problem: Problem, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(|g - g_obs|^2 / |g_obs|^2, eps)`` of a candidate ``x_t`` [B, C, H, W] whose eps is
    solved (:func:`solved_noise`): the variable-projection objective over x_t alone."""
    eps, _ = solved_noise(problem, x_t, t)

    def loss_of(p: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(problem.task.predict(p, problem.buffers, x_t, t), eps)

    grads = torch.func.grad(loss_of)(dict(problem.params))
    batched = {k: v.unsqueeze(0) for k, v in grads.items()}
    return matching_distance(batched, problem.target, problem.target_sq)[0], eps


def x0_from(problem: Problem, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (model space, not clamped)."""
    abar = abar_at(problem.task.alphas_cumprod, t).view(-1, *([1] * (x_t.dim() - 1)))
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def search_xt(problem: Problem, x_t: Tensor, t: Tensor, *, iterations: int
              ) -> tuple[Tensor, Tensor, float, list[float]]:
    """L-BFGS (strong-Wolfe line search, memory 100) on ``x_t`` [B, C, H, W] at fixed ``t``
    [B] for up to ``iterations`` iterations, eps solved at every evaluation.

    Returns ``(x_t, eps, distance, history)`` of the best evaluated point (the history is the
    distance of each evaluation)."""
    var = x_t.detach().clone().requires_grad_(True)
    t = t.detach()
    best: list[Any] = [math.inf, var.detach().clone()]
    history: list[float] = []
    if iterations > 0:
        opt = torch.optim.LBFGS([var], lr=1.0, max_iter=iterations, history_size=100,
                                tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            dist, _ = xt_distance(problem, var, t)
            dist.backward()
            value = float(dist.detach())
            history.append(value)
            if value < best[0]:
                best[:] = [value, var.detach().clone()]
            return dist

        opt.step(closure)
    with torch.enable_grad():
        final, _ = xt_distance(problem, var.detach(), t)
    if float(final) < best[0]:
        best[:] = [float(final), var.detach().clone()]
    with torch.no_grad():
        eps, _ = solved_noise(problem, best[1], t)
    return best[1], eps, best[0], history
