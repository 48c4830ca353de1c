"""Building blocks of optimisation-based gradient inversion, as pure functions.

Shapes: a *candidate* holds ``R`` independent restarts of ``N`` images, ``[R, N, C, H, W]``;
the functions below return one value per restart (``[R]``) so that ``R`` restarts are
optimised as one batch and scored separately.

- gradient distances: :func:`cosine_distance` (``1 - cos`` over ALL parameters at once, as in
  Geiping et al. 2020, "Inverting Gradients", and breaching) and :func:`l2_distance`
  (Zhu et al. 2019, DLG);
- image priors: :func:`total_variation` (Geiping et al. 2020) and the BatchNorm-statistics
  prior :func:`bn_prior` with its collector :class:`BNStatistics` (Yin et al. 2021,
  "See through Gradients", GradInversion);
- the simulated client update: :func:`simulated_update` (one FedSGD gradient, or the
  differentiable unrolling :func:`unrolled_delta` of local SGD for FedAvg deltas, Geiping et
  al. 2020 sec. 5), batched over restarts with :func:`torch.func.vmap`;
- optimisation helpers: :class:`NormalisedImages` (the parametrisation and its random-normal
  start), :func:`lr_multiplier` (step decay at 3/8, 5/8, 7/8 of the budget, or cosine).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from attacks.components.diffusion_matching import step_aux
from attacks.components.gradients import Params
from attacks.components.local_optimizers import functional_step, init_state
from fl_sim.records import LocalOptimizer
from fl_sim.tasks.base import Batch

__all__ = ["cosine_distance", "l2_distance", "total_variation", "BNStatistics", "bn_prior",
           "unrolled_delta", "simulated_update", "NormalisedImages", "lr_multiplier",
           "SCHEDULES"]


class _Cosine(torch.autograd.Function):
    """``1 - <g, t> / (|g| |t|)`` per restart with a closed-form backward.

    The backward is ``dD/dg = a t + b g`` per restart (``a = -1/(|g||t|)``,
    ``b = <g,t>/(|g|^3 |t|)``): one fused pass per parameter instead of autograd's chain of
    products, squares and broadcasts over every parameter (measured: ~6 ms of a ResNet-18
    iteration). Only the gradients ``g`` are differentiable; the target is a constant.
    """

    @staticmethod
    def forward(ctx: Any, norm_t: float, targets: tuple[Tensor, ...],
                *grads: Tensor) -> Tensor:
        dot = norm2 = None
        for g, t in zip(grads, targets, strict=True):
            flat = g.flatten(1)
            d, n2 = flat @ t.flatten(), torch.linalg.vector_norm(flat, dim=1).square()
            dot, norm2 = (d, n2) if dot is None else (dot + d, norm2 + n2)
        norm_g = norm2.sqrt().clamp_min(1e-12)  # type: ignore[union-attr]
        ctx.save_for_backward(dot, norm_g, *grads)
        ctx.targets, ctx.norm_t = targets, norm_t
        return 1.0 - dot / (norm_g * norm_t)  # type: ignore[operator]

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        dot, norm_g, *grads = ctx.saved_tensors
        a = -grad_out / (norm_g * ctx.norm_t)
        b = grad_out * dot / (norm_g.pow(3) * ctx.norm_t)
        out = []
        for g, t in zip(grads, ctx.targets, strict=True):
            view = (-1, *([1] * (g.dim() - 1)))
            out.append(torch.addcmul(a.view(view) * t, g, b.view(view)))
        return (None, None, *out)


def cosine_distance(grads: Mapping[str, Tensor], target: Mapping[str, Tensor], *,
                    target_norm: float | None = None) -> Tensor:
    """``1 - <g, t> / (|g| |t|)`` with all parameters flattened into one vector.

    ``grads[name]``: ``[R, *shape]`` (one gradient per restart), ``target[name]``: ``[*shape]``.
    Returns ``[R]`` in [0, 2], differentiable in ``grads`` (closed-form backward). Only names in
    ``target`` are compared. ``target_norm`` (``|t|``) may be passed to skip recomputing it
    every iteration.
    """
    names = list(target)
    norm_t = target_norm if target_norm is not None else math.sqrt(
        sum(float(t.double().pow(2).sum()) for t in target.values()))
    return _Cosine.apply(max(norm_t, 1e-12), tuple(target[k] for k in names),
                         *(grads[k] for k in names))


def l2_distance(grads: Mapping[str, Tensor], target: Mapping[str, Tensor], *,
                target_norm: float | None = None) -> Tensor:
    """``sum_name |g - t|^2`` per restart (DLG's objective). Shapes as :func:`cosine_distance`;
    ``target_norm`` is accepted for interface symmetry and unused."""
    out = 0.0
    for name, t in target.items():
        out = out + (grads[name] - t).flatten(1).pow(2).sum(1)
    return out  # type: ignore[return-value]


def total_variation(images: Tensor) -> Tensor:
    """Anisotropic mean total variation ``mean|dx| + mean|dy|`` per restart.

    ``images``: ``[R, N, C, H, W]`` (Inverting Gradients passes the task-normalised image,
    breaching's convention). Returns ``[R]``.
    """
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs()
    return dx.flatten(1).mean(1) + dy.flatten(1).mean(1)


class BNStatistics:
    """Forward hooks that record the batch mean/variance entering every BatchNorm layer.

    Use as a context manager around a forward pass (also inside ``torch.func.grad``/``vmap``:
    the statistics are computed by the hook at the level of the call and read back as an
    auxiliary output). ``running`` maps each layer to its running-statistic buffer names.
    Raises ``ValueError`` if the model has no BatchNorm layer (the prior is undefined).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = [(name, m) for name, m in model.named_modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no BatchNorm layer: the "
                             "BN-statistics prior needs one")
        self.running = [(f"{n}.running_mean" if n else "running_mean",
                         f"{n}.running_var" if n else "running_var") for n, _ in self.layers]
        self.stats: list[tuple[Tensor, Tensor]] = []

    @contextmanager
    def recording(self) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Record ``(mean [C], var [C])`` per BN call, in call order, into the yielded list."""
        self.stats = []

        def hook(_m: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0]
            dims = [0, *range(2, x.dim())]
            self.stats.append((x.mean(dims), x.var(dims, unbiased=False)))

        handles = [m.register_forward_pre_hook(hook) for _, m in self.layers]
        try:
            yield self.stats
        finally:
            for h in handles:
                h.remove()


def bn_prior(stats: Sequence[tuple[Tensor, Tensor]], buffers: Mapping[str, Tensor],
             running: Sequence[tuple[str, str]]) -> Tensor:
    """GradInversion's BN prior ``sum_l |mu_l - running_mean_l|_2 + |var_l - running_var_l|_2``.

    ``stats``: per BN call ``(mean [.., C], var [.., C])`` (a leading restart dim is allowed);
    several forwards (unrolled steps) are averaged layer-wise. Returns ``[..]``.
    """
    n_layers = len(running)
    total = 0.0
    for i, (mean, var) in enumerate(stats):
        rm, rv = running[i % n_layers]
        total = total + (mean - buffers[rm]).norm(dim=-1) + (var - buffers[rv]).norm(dim=-1)
    return total / max(1, len(stats) // n_layers)  # type: ignore[return-value]


def _step_loss(task: Any, buffers: Mapping[str, Tensor], x: Tensor, y: Tensor,
               bn: BNStatistics | None, aux: Mapping[str, Tensor] | None = None) -> Any:
    """``q -> (loss, bn prior)`` of one step, for ``torch.func.grad(..., has_aux=True)``.

    The prior is computed INSIDE the differentiated function so that no tensor leaks out of
    the transform (a hook's output read after ``grad`` returned would be invalid). ``aux`` is
    the step's private randomness (diffusion ``eps``/``t``; ``{}`` for a classifier).
    """
    aux = {} if aux is None else aux

    def fn(q: Params) -> tuple[Tensor, Tensor]:
        if bn is None:
            return task.loss(q, buffers, Batch(x, y), aux), x.new_zeros(())
        with bn.recording() as stats:
            loss = task.loss(q, buffers, Batch(x, y), aux)
        return loss, bn_prior(stats, buffers, bn.running)
    return fn


def unrolled_delta(task: Any, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                   images: Tensor, labels: Tensor, lr: float, steps: int, batch_size: int,
                   *, bn: BNStatistics | None = None, aux: Mapping[str, Tensor] | None = None,
                   optimizer: LocalOptimizer | None = None) -> tuple[Params, Tensor]:
    """Differentiable ``new - global`` of ``steps`` local steps (Geiping et al. 2020 sec. 5).

    ``images`` ``[n, C, H, W]`` in [0, 1] and ``labels`` ``[n]`` are the client's data in the
    order it used them: step ``k`` takes images ``k*batch_size .. (k+1)*batch_size - 1``
    (indices modulo ``n``, i.e. further epochs repeat the same order). ``optimizer``: the
    client's (:class:`~fl_sim.records.LocalOptimizer`; default plain SGD, the paper's case),
    its state fresh at the first step (:mod:`attacks.components.local_optimizers`); constant ``lr``,
    buffers fixed (eval-mode BatchNorm). Differentiable with respect to
    ``images`` (torch.func, composes with ``vmap``). Returns ``(delta keyed like params, BN
    prior averaged over steps (0 without ``bn``))``. ``aux`` (diffusion ``eps``/``t`` of ALL
    steps, concatenated) is sliced per step: step ``k`` gets rows ``k*batch_size ..``
    (:func:`attacks.components.diffusion_matching.step_aux`). Raises ``ValueError`` for ``steps <
    1`` or ``batch_size < 1``.
    """

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    n = images.shape[0]
    p = dict(params)
    opt = optimizer or LocalOptimizer()
    state = init_state(opt, p)
    prior = images.new_zeros(())
    for k in range(steps):
        idx = [(k * batch_size + j) % n for j in range(batch_size)]
        if idx == list(range(idx[0], idx[0] + batch_size)):
            x, y = images[idx[0]:idx[0] + batch_size], labels[idx[0]:idx[0] + batch_size]
        else:
            x, y = images[idx], labels[idx]
        ak = step_aux(aux, k, batch_size) if aux else None
        g, pk = torch.func.grad(_step_loss(task, buffers, x, y, bn, ak), has_aux=True)(p)
        prior = prior + pk / steps
        if opt.plain_sgd:
            p = {name: p[name] - lr * g[name] for name in p}
        else:
            p, state = functional_step(opt, p, g, state, lr=lr, step=k + 1)
    return {name: p[name] - params[name] for name in params}, prior


def simulated_update(task: Any, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                     images: Tensor, labels: Tensor, *, unroll: tuple[float, int, int] | None,
                     bn: BNStatistics | None = None, aux: Mapping[str, Tensor] | None = None,
                     optimizer: LocalOptimizer | None = None) -> tuple[Params, Tensor | None]:
    """The update candidate ``images`` would produce, batched over restarts.

    ``images``: ``[R, N, C, H, W]``; ``labels``: ``[N]``. ``unroll=None`` gives one gradient
    of the mean loss over the N images (FedSGD); ``unroll=(lr, steps, batch_size)`` gives
    :func:`unrolled_delta` with the client's ``optimizer``. Returns ``({name: [R, *shape]},
    bn_prior [R] or None)``. With
    ``R > 1`` the per-restart updates come from ONE :func:`torch.func.vmap` call; ``R = 1``
    skips vmap (cheaper batching rules). ``aux``: the step(s)' private randomness, shared by
    all restarts (diffusion ``eps``/``t``; see :func:`unrolled_delta` for the per-step rows).
    """

    def one(x: Tensor) -> tuple[Params, Tensor]:
        if unroll is None:
            return torch.func.grad(_step_loss(task, buffers, x, labels, bn, aux),
                                   has_aux=True)(dict(params))
        lr, steps, bs = unroll
        return unrolled_delta(task, params, buffers, x, labels, lr, steps, bs, bn=bn, aux=aux,
                              optimizer=optimizer)

    if images.shape[0] == 1:
        upd, prior = one(images[0])
        upd = {k: v.unsqueeze(0) for k, v in upd.items()}
        prior = prior.unsqueeze(0)
    else:
        upd, prior = torch.func.vmap(one)(images)
    return upd, (prior if bn is not None else None)


class NormalisedImages:
    """Candidate images optimised in the task's normalised coordinates ``z = (x - mean) / std``.

    breaching optimises the normalised image; doing the same keeps its learning rate (0.1) and
    TV weight meaningful while the task still receives pixels ``x = mean + std * z`` in
    [0, 1]. The box constraint ``x in [0, 1]`` becomes ``z in [-mean/std, (1-mean)/std]``.
    ``shape`` is ``[R, N, C, H, W]``; the start is ``z ~ N(0, 1)`` drawn from ``generator``.
    """

    def __init__(self, shape: Sequence[int], mean: Sequence[float], std: Sequence[float], *,
                 generator: torch.Generator, device: str | torch.device = "cpu") -> None:
        c = shape[-3]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"{c} channels but mean/std of length {len(mean)}/{len(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(c, 1, 1)
        self.z = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
        self.z = self.z.to(device).requires_grad_(True)
        self.low, self.high = -self.mean / self.std, (1 - self.mean) / self.std

    def images(self) -> Tensor:
        """Pixels ``[R, N, C, H, W]`` (differentiable in ``z``; unclamped before a step)."""
        return self.z * self.std + self.mean

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project ``z`` onto the valid box (pixels in [0, 1])."""
        self.z.copy_(torch.maximum(torch.minimum(self.z, self.high), self.low))


def _step(progress: float) -> float:
    return 0.1 ** sum(progress >= m for m in (3 / 8, 5 / 8, 7 / 8))


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * 0.999 + 0.001


def _linear(progress: float) -> float:
    return max(1.0 - progress, 0.001)


SCHEDULES = {"step": _step, "cosine": _cosine, "linear": _linear}


def lr_multiplier(schedule: str, iteration: int, max_iterations: int) -> float:
    """Learning-rate factor at ``iteration`` of ``max_iterations``.

    ``"step"``: x0.1 at 3/8, 5/8 and 7/8 of the budget (Geiping et al. 2020 / breaching);
    ``"cosine"``: half-cosine from 1 to 0.001; ``"linear"``: linear to 0.001.
    Raises ``ValueError`` for an unknown schedule.

    >>> [round(lr_multiplier("step", i, 8), 4) for i in (0, 2, 3, 5, 7)]
    [1.0, 1.0, 0.1, 0.01, 0.001]
    """
    try:
        fn = SCHEDULES[schedule]
    except KeyError:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: "
                         f"{', '.join(SCHEDULES)}") from None
    return fn(iteration / max(1, max_iterations))
