"""Gradient matching on diffusion updates: the client's noise and timesteps, step by step.

A DDPM client's loss (:class:`~fl_sim.tasks.diffusion.DiffusionTask`) depends on its private
per-example noise ``eps`` and timestep ``t`` as much as on its images, so an attack can only
recompute the client's update when it is given (or searches for) them. Under the server's
threat model they can be granted from ground truth: ``record.knowledge["eps"]`` ``[S, C, H, W]``
and ``["t"]`` ``[S]``, concatenated over the client's local steps along dim 0 (step ``k`` of
batch size ``B`` owns rows ``k*B .. k*B+B-1``; :func:`fl_sim.views._grant_from_truth`).

Shared by every attack on diffusion updates (Inverting Gradients / DLG with ``aux="granted"``,
``gidm``, ``gidm_plus``):

- :func:`is_diffusion`, :func:`granted_aux` (the knowledge check, one clear error) and
  :func:`step_aux` (one local step's rows);
- :func:`diffusion_update`: the differentiable update candidate images would produce (one
  FedSGD gradient, or the unrolled FedAvg delta with each step's own eps/t);
- :class:`DiffusionMatching`: ``images [N, C, H, W] -> distance to the observed update`` (the
  objective GIDM's two phases minimise), with an optional ``aux`` override so that GIDM+ can
  make eps (and a relaxed t) variables of the same objective.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attacks.components.gradients import Params
from attacks.components.local_optimizers import functional_step, init_state
from attacks.components.second_order import LeanSecondOrder
from fl_sim.errors import ConfigError, ThreatModelError
from fl_sim.records import LocalOptimizer, ObservationRecord
from fl_sim.tasks.base import Batch

__all__ = ["AUX_KEYS", "is_diffusion", "granted_aux", "step_aux", "diffusion_update",
           "gradient_distance", "DiffusionMatching"]

#: the knowledge a diffusion update's loss needs beyond the images
AUX_KEYS = ("eps", "t")
#: how :class:`DiffusionMatching` differentiates the distance with respect to the images
SECOND_ORDER = ("exact", "finite_difference", "central_difference")


def is_diffusion(task: Any) -> bool:
    """True for a task whose loss needs the per-example ``eps``/``t`` (DDPM)."""
    return getattr(task, "name", None) == "diffusion"


def granted_aux(record: ObservationRecord, task: Any, *, attack: str, hint: str = ""
                ) -> dict[str, Tensor]:
    """The granted ``{"eps": [S, C, H, W] float32, "t": [S] int64}`` of a diffusion record.

    Returns ``{}`` for a task that needs no aux (classifiers). Raises
    :class:`~fl_sim.errors.ThreatModelError` naming the knowledge to grant when ``eps`` or
    ``t`` is missing (``hint`` says how, e.g. the attack option that asks for it), and
    :class:`~fl_sim.errors.ConfigError` when their shapes disagree with each other or with the
    model's image shape.
    """
    if not is_diffusion(task):
        return {}
    missing = [k for k in AUX_KEYS if k not in record.knowledge]
    if missing:
        raise ThreatModelError(
            f"{attack}: a diffusion update's loss needs the client's noise and timesteps; "
            f"knowledge {missing} was not granted" + (f" ({hint})" if hint else ""))
    eps = torch.as_tensor(record.knowledge["eps"]).to(torch.float32)
    t = torch.as_tensor(record.knowledge["t"]).long().flatten()
    spec = record.spec
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    if eps.dim() != 4 or tuple(eps.shape[1:]) != shape or eps.shape[0] != t.shape[0]:
        raise ConfigError(f"{attack}: granted eps {tuple(eps.shape)} and t {tuple(t.shape)} "
                          f"do not describe [S, {shape}] noise and [S] timesteps")
    return {"eps": eps, "t": t}


def step_aux(aux: Mapping[str, Tensor], step: int, batch_size: int) -> dict[str, Tensor]:
    """Rows ``step*batch_size .. (step+1)*batch_size - 1`` of every aux tensor (``{}`` stays
    ``{}``): the eps/t local step ``step`` drew. Raises ``ConfigError`` if there are fewer."""
    lo, hi = step * batch_size, (step + 1) * batch_size
    out = {}
    for k, v in aux.items():
        if v.shape[0] < hi:
            raise ConfigError(f"aux {k!r} holds {v.shape[0]} rows; local step {step} of "
                              f"batch size {batch_size} needs rows {lo}..{hi - 1}")
        out[k] = v[lo:hi]
    return out


def diffusion_update(task: Any, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                     images: Tensor, aux: Mapping[str, Tensor], *,
                     unroll: tuple[float, int, int] | None = None, lean: bool = False,
                     optimizer: LocalOptimizer | None = None) -> Params:
    """The update ``images [N, C, H, W]`` (in [0, 1]) would produce, differentiably.

    ``unroll=None``: the gradient of the mean diffusion loss with ``aux`` (``eps [N, ...]``,
    ``t [N]``) at ``params`` (FedSGD). ``unroll=(lr, steps, batch_size)``: ``new - params``
    after ``steps`` steps of the client's ``optimizer`` (plain SGD by default; SGD with
    momentum / weight decay or Adam, state fresh each round:
    :mod:`attacks.components.local_optimizers`),
    step ``k`` on images ``k*B .. k*B+B-1`` (modulo N) with
    aux rows :func:`step_aux` ``(aux, k, B)`` (FedAvg; the client's order of steps). The result
    is connected to ``images`` (and to ``aux`` where it requires grad): double
    back-propagation. Keys as ``params``. ``lean`` (FedSGD only) builds the gradient inside
    :class:`~attacks.components.second_order.LeanSecondOrder` (same values; the double backward
    skips the convolutions' weight-side work), so the result may only be differentiated with respect
    to ``images`` / ``aux``, not the parameters. Off by default: on the tiny UNet the mode's
    Python dispatch over every op cost more than it saved (measured 4.1-4.8 vs 2.7 plain steps
    per matching evaluation at batch 1).
    """
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    names = list(leaves)
    order = [leaves[k] for k in names]
    if unroll is None:
        mode = LeanSecondOrder() if lean else None
        with torch.enable_grad():
            with mode or contextlib.nullcontext():
                loss = task.loss(leaves, buffers, Batch(images, _dummy_labels(images)), aux)
            grads = (mode.parameter_grads(loss, order, create_graph=True) if mode is not None
                     else torch.autograd.grad(loss, order, create_graph=True))
        return dict(zip(names, grads, strict=True))
    lr, steps, bs = unroll
    n = images.shape[0]
    p: dict[str, Tensor] = dict(leaves)
    opt = optimizer or LocalOptimizer()
    state = init_state(opt, p)
    with torch.enable_grad():
        for k in range(steps):
            idx = [(k * bs + j) % n for j in range(bs)]
            x = images[idx]
            loss = task.loss(p, buffers, Batch(x, _dummy_labels(x)), step_aux(aux, k, bs))
            g = torch.autograd.grad(loss, [p[m] for m in names], create_graph=True)
            if opt.plain_sgd:
                p = {m: p[m] - lr * gm for m, gm in zip(names, g, strict=True)}
            else:
                p, state = functional_step(opt, p, dict(zip(names, g, strict=True)), state,
                                           lr=lr, step=k + 1)
    return {m: p[m] - leaves[m] for m in names}


def _dummy_labels(images: Tensor) -> Tensor:
    return torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)


class _ScaledL2(torch.autograd.Function):
    """``sum_i |u_i - t_i|^2 / |t|^2`` over tensor lists, with a closed-form backward
    ``2 (u_i - t_i) / |t|^2`` (one fused pass per tensor instead of autograd's chain of
    subtract / square / sum nodes over every parameter)."""

    @staticmethod
    def forward(ctx: Any, scale: float, targets: tuple[Tensor, ...], *upd: Tensor) -> Tensor:
        diffs = torch._foreach_sub(list(upd), list(targets))
        ctx.save_for_backward(*diffs)
        ctx.scale = scale
        return torch.stack(torch._foreach_norm(diffs)).square().sum() * scale

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        diffs = ctx.saved_tensors
        return (None, None, *torch._foreach_mul(list(diffs), grad_out * (2 * ctx.scale)))


def gradient_distance(update: Mapping[str, Tensor], target: Mapping[str, Tensor], *,
                      distance: str, target_norm: float) -> Tensor:
    """Scalar distance over all parameters: ``"l2"`` = ``sum |u - t|^2 / |t|^2`` (squared
    Euclidean, scaled by the target so that its size does not set the step size), or
    ``"cosine"`` = ``1 - <u, t> / (|u| |t|)``. Raises ``ValueError`` for another name."""
    if distance == "l2":
        names = list(target)
        return _ScaledL2.apply(1.0 / max(target_norm, 1e-12) ** 2,
                               tuple(target[k] for k in names), *(update[k] for k in names))
    if distance == "cosine":
        dot = sum((update[k] * t).sum() for k, t in target.items())
        norm = torch.sqrt(sum(update[k].pow(2).sum() for k in target))  # type: ignore[arg-type]
        return 1 - dot / (norm.clamp_min(1e-12) * max(target_norm, 1e-12))  # type: ignore
    raise ValueError(f"unknown distance {distance!r}; allowed: l2, cosine")


def _input_grad(task: Any, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                images: Tensor, aux: Mapping[str, Tensor]) -> Tensor:
    """``dL/dx [N, C, H, W]`` of the diffusion loss at constant ``params`` (no weight grads)."""
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        loss = task.loss(params, buffers, Batch(x, _dummy_labels(x)), aux)
        return torch.autograd.grad(loss, x)[0]


class _FiniteDifferenceMatching(torch.autograd.Function):
    """``distance(g(x), target)`` with ``d/dx`` by a finite difference, no double backward
    (an engineering step, not in the GIDM paper).

    The distance depends on ``x`` only through ``g(x) = dL(x; theta)/dtheta``, so its
    ``x``-gradient is ``J(x)^T u`` with ``u = d distance / d g`` (cheap: ``g`` and the target),
    and ``J(x)^T u = d/dx <u, dL/dtheta> = d/de dL(x; theta + e u)/dx`` at ``e = 0``. Forward:
    one forward + backward for ``g`` and ``dL(x; theta)/dx`` together, then ``u``. Backward,
    ``"forward"`` scheme: ``(dL(x; theta + e u)/dx - dL(x; theta)/dx) / e``, one more forward
    + input-only backward (~2.0 plain training steps in all); ``"central"``: ``(dL(x; theta +
    e u)/dx - dL(x; theta - e u)/dx) / 2e``, two (~2.7-3.0). ``e = rel_step * |theta| / |u|``.
    """

    @staticmethod
    def forward(ctx: Any, matching: DiffusionMatching, images: Tensor) -> Tensor:
        names = list(matching.target)
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True) for k, v in matching.params.items()}
            x = images.detach().requires_grad_(True)
            loss = matching.task.loss(leaves, matching.buffers, Batch(x, _dummy_labels(x)),
                                      matching.aux)
            *g, gx = torch.autograd.grad(loss, [leaves[k] for k in names] + [x])
            g = [gi.detach().requires_grad_(True) for gi in g]
            dist = gradient_distance(dict(zip(names, g, strict=True)), matching.target,
                                     distance=matching.distance,
                                     target_norm=matching.target_norm)
            u = torch.autograd.grad(dist, g)
        ctx.matching, ctx.names, ctx.u = matching, names, u
        ctx.save_for_backward(x.detach(), gx)
        return dist.detach()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, Tensor]:
        x, gx = ctx.saved_tensors
        m: DiffusionMatching = ctx.matching
        u = dict(zip(ctx.names, ctx.u, strict=True))
        u_norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in u.values()))
        if u_norm == 0.0:
            return None, torch.zeros_like(x)
        central = m.second_order == "central_difference"
        e = (m.fd_rel_step or (1e-4 if central else 1e-5)) * max(m.params_norm, 1e-12) / u_norm
        plus = {k: (v + e * u[k]) if k in u else v for k, v in m.params.items()}
        gp = _input_grad(m.task, plus, m.buffers, x, m.aux)
        if not central:
            return None, (gp - gx) * (grad_out / e)
        minus = {k: (v - e * u[k]) if k in u else v for k, v in m.params.items()}
        gm = _input_grad(m.task, minus, m.buffers, x, m.aux)
        return None, (gp - gm) * (grad_out / (2 * e))


@dataclass
class DiffusionMatching:
    """``images [N, C, H, W] -> distance(update(images), observed update)`` of one record.

    ``target``: the observed update (a FedSGD gradient, or the FedAvg delta when ``unroll``
    is set); ``aux``: the granted ``eps``/``t`` (all local steps' rows); ``distance``: see
    :func:`gradient_distance`; ``lean``: see :func:`diffusion_update`. Calling it with
    ``aux=`` overrides the granted aux (GIDM+ passes its eps / t variables). Everything must
    sit on one device.

    ``second_order``: how ``d distance / d images`` is computed. ``"exact"`` (default): double
    back-propagation through the parameter gradient. ``"finite_difference"`` /
    ``"central_difference"`` (FedSGD with the granted aux only; otherwise the exact path is
    used): :class:`_FiniteDifferenceMatching`, a forward / central difference of the input
    gradient at ``params + e u`` (``e = fd_rel_step * |params| / |u|``; ``fd_rel_step`` 0 =
    1e-5 forward, 1e-4 central) -- an engineering deviation, not in the paper, that avoids
    the slow CPU conv double backward. Same distance value; measured gradient error on the
    tiny digits UNet (relative L2 to the exact gradient): ~1.3e-3 forward, ~8e-5 central.
    """

    task: Any
    params: Params
    buffers: Params
    target: Params
    aux: Mapping[str, Tensor]
    unroll: tuple[float, int, int] | None = None
    distance: str = "l2"
    #: the client's local optimiser, modelled when ``unroll`` is set
    optimizer: LocalOptimizer = field(default_factory=LocalOptimizer)
    lean: bool = False
    second_order: str = "exact"
    fd_rel_step: float = 0.0
    target_norm: float = field(init=False)
    params_norm: float = field(init=False)

    def __post_init__(self) -> None:
        if self.second_order not in SECOND_ORDER:
            raise ConfigError(f"second_order: got {self.second_order!r}; allowed: "
                              f"{', '.join(SECOND_ORDER)}")
        self.target = {k: v.contiguous() for k, v in self.target.items()}
        self.target_norm = math.sqrt(sum(float(t.double().pow(2).sum())
                                         for t in self.target.values()))
        self.params_norm = math.sqrt(sum(float(self.params[k].double().pow(2).sum())
                                         for k in self.target))

    def update(self, images: Tensor, aux: Mapping[str, Tensor] | None = None) -> Params:
        """The update ``images`` would produce (:func:`diffusion_update`)."""
        return diffusion_update(self.task, self.params, self.buffers, images,
                                self.aux if aux is None else aux, unroll=self.unroll,
                                lean=self.lean, optimizer=self.optimizer)

    def __call__(self, images: Tensor, aux: Mapping[str, Tensor] | None = None) -> Tensor:
        """Scalar matching distance, differentiable in ``images`` (and ``aux`` tensors)."""
        if (self.second_order != "exact" and aux is None
                and self.unroll is None):
            return _FiniteDifferenceMatching.apply(self, images)
        return gradient_distance(self.update(images, aux), self.target,
                                 distance=self.distance, target_norm=self.target_norm)
