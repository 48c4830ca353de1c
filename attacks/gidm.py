"""GIDM: gradient inversion of a federated diffusion model through its own sampler.

Huang, Hong, Chen, Roos, "Gradient Inversion of Federated Diffusion Models" (arXiv
2405.20380), the attack with eps and t KNOWN (GIDM; GIDM+ searches for them:
:mod:`attacks.gidm_plus`). Threat model: an honest-but-curious server that sees one client's
FedSGD gradient (or FedAvg delta) of the DDPM loss and is granted the client's noise ``eps``
and timesteps ``t`` (knowledge ``eps``, ``t``). Two phases, both minimising the distance
between the update a candidate would produce and the observed one
(:class:`attacks.components.diffusion_matching.DiffusionMatching`):

1. **latent search** -- the candidate is ``x = G(z)``, the deterministic DDIM sampler
   (:class:`attacks.components.ddim_sampler.DDIMSampler`, K steps) of a diffusion prior: by default
   the very global model the client was trained from (the record's ``global_params``), as in the
   paper; optionally ``prior = "PATH"``, a prior saved by ``fl-sim train-prior``. Only ``z``
   (``[N, C, H, W]``, started ``~ N(0, I)``) is optimised, so the search stays on the prior's
   image manifold;
2. **pixel fine-tuning** -- starting from the phase-1 image, the pixels themselves are
   optimised (box ``[0, 1]``), which recovers what the prior cannot represent.

Each phase keeps its best candidate by matching distance, and phase 2 starts from phase 1's
best, so the returned images never match worse than phase 1's (checked at the end).

Deviations from the paper, and why: the distance is the squared L2 distance of the updates
divided by ``|observed|^2`` (the paper: plain L2; the scale makes one learning rate work for
any model size and timestep); phase 1 runs Adam with a cosine learning-rate decay; phase 2
runs L-BFGS by default (DLG's optimiser: on the digits case Adam on pixels stalled near
10 dB after 100-220 iterations while L-BFGS reached 44 dB in 100; ``phase2_optimizer =
"adam"`` keeps Adam); the sampler's ``x0`` clipping follows the prior's
scheduler config (diffusers' default: clip); the images' gradient of the matching distance
is by default a forward finite difference of input gradients at weights moved along
``d distance / d update`` (no double backward; relative error ~1e-3, see
:class:`~attacks.components.diffusion_matching.DiffusionMatching`). FedAvg deltas are matched by
unrolling the client's local steps with each step's own eps/t and the client's optimiser as
the record states it (SGD, momentum, Adam; the paper treats FedSGD only).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from attacks.base import Attack, Reconstruction
from attacks.components.ddim_sampler import CHECKPOINT_MODES, Checkpoint, DDIMSampler
from attacks.components.diffusion_matching import (
    SECOND_ORDER,
    DiffusionMatching,
    granted_aux,
    is_diffusion,
)
from attacks.components.gradients import (
    attack_task,
    mean_gradient_target,
    split_state,
    target_from_record,
)
from attacks.components.local_optimizers import describe as describe_optimizer
from attacks.components.objectives import lr_multiplier
from attacks.components.progress import report as report_progress
from fl_sim.errors import ConfigError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS

logger = logging.getLogger(__name__)

MultiStep = Literal["auto", "unroll", "single"]
#: called as ``callback(phase, iteration, images [N, C, H, W])`` after each step
Callback = Callable[[int, int, Tensor], None]


def _check(name: str, ok: bool, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"gidm.{name}: got {value!r}; allowed: {allowed}")


def build_sampler(record: ObservationRecord, task: Any, params: dict[str, Tensor],
                  buffers: dict[str, Tensor], *, prior: str | None, num_steps: int,
                  device: torch.device) -> tuple[Callable[..., Tensor], str]:
    """``(z [N, C, H, W] -> x0 in [-1, 1], description)`` of the attack's prior.

    ``prior=None``: the record's global model (functional call at ``params``/``buffers``) with
    the task's scheduler; otherwise the prior at that path: an fl-sim prior or a local
    diffusers pipeline / UNet directory (:func:`fl_sim.priors.open_prior`). Raises
    :class:`~fl_sim.errors.ConfigError` when the prior's image shape differs from the record's.
    """
    if prior is None:
        sampler = DDIMSampler.from_scheduler(task.model, task.scheduler, num_steps)

        def sample(z: Tensor, **kw: Any) -> Tensor:
            return sampler.sample(z, params=params, buffers=buffers, **kw)
        return sample, "global model"
    from fl_sim.priors import open_prior

    # an fl-sim prior or a local diffusers pipeline / UNet directory (its own scheduler; a
    # bare UNet directory without one samples with the record's training schedule)
    loaded = open_prior(prior, where="gidm.prior", device=device, scheduler=task.scheduler)
    spec = record.spec
    if (loaded.in_channels, loaded.image_size) != (spec.in_channels, spec.image_size):
        raise ConfigError(f"gidm.prior: {prior} makes {loaded.in_channels}x"
                          f"{loaded.image_size}x{loaded.image_size} images; the record's model "
                          f"takes {spec.in_channels}x{spec.image_size}x{spec.image_size}")
    sampler = DDIMSampler.from_scheduler(loaded.unet, loaded.scheduler, num_steps)
    return sampler.sample, str(prior)


def _optimise(start: Tensor, to_images: Callable[[Tensor], Tensor],
              matching: DiffusionMatching, *, iterations: int, lr: float, box: bool,
              best: tuple[float, Tensor] | None, phase: int,
              callback: Callback | None) -> tuple[float, Tensor, list[float]]:
    """Adam on ``start`` (cosine lr), keeping the best images by matching distance.

    Returns ``(best distance, best images [N, C, H, W] detached, distance per iteration)``;
    ``best`` seeds the running best (phase 2 starts from phase 1's).
    """
    var = start.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([var], lr=lr)
    best_loss, best_images = best if best is not None else (math.inf, None)
    history: list[float] = []
    for it in range(iterations):
        report_progress(f"phase {phase}", it, iterations)
        for group in opt.param_groups:
            group["lr"] = lr * lr_multiplier("cosine", it, iterations)
        images = to_images(var)
        loss = matching(images)
        value = float(loss.detach())
        history.append(value)
        if value < best_loss:  # the images this loss was measured at (before the step)
            best_loss, best_images = value, images.detach().clone()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if box:
            with torch.no_grad():
                var.clamp_(0, 1)
        if callback is not None:
            callback(phase, it, images.detach())
    with torch.no_grad():
        images = to_images(var)
    return (*_keep_best(matching, images, (best_loss, best_images)), history)


def _lbfgs(start: Tensor, to_images: Callable[[Tensor], Tensor], matching: DiffusionMatching,
           *, iterations: int, lr: float, best: tuple[float, Tensor] | None, phase: int,
           callback: Callback | None) -> tuple[float, Tensor, list[float]]:
    """L-BFGS (strong-Wolfe line search) on ``start`` for up to ``iterations`` iterations, as
    DLG optimises pixels; unconstrained, the images are clamped to [0, 1] when scored. Keeps
    the best clamped images by matching distance; same returns as :func:`_optimise`.

    Tried on the digits case and dropped: clamping inside the objective (pixels freeze on the
    bounds: batch 1 fell from 67 to 13 dB, although batch 4 improved from 10.9 to 13.0 dB)
    and a straight-through clamp (breaks the line search: no progress at batch 1 or 4).
    Unconstrained L-BFGS drifts out of the box at batch 4, where the clamped result loses
    most of its progress (documented in docs/results.md, GIDM quality)."""
    var = start.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([var], lr=lr, max_iter=iterations, history_size=100,
                            tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    history: list[float] = []

    def closure() -> Tensor:
        opt.zero_grad()
        loss = matching(to_images(var))
        loss.backward()
        history.append(float(loss.detach()))
        report_progress(f"phase {phase}", len(history), iterations)
        if callback is not None:
            callback(phase, len(history) - 1, to_images(var).detach())
        return loss

    opt.step(closure)
    with torch.no_grad():
        images = to_images(var).clamp(0, 1)
    return (*_keep_best(matching, images, best), history)


def _lbfgsb(start: Tensor, matching: DiffusionMatching, *, iterations: int,
            best: tuple[float, Tensor] | None, phase: int,
            callback: Callback | None) -> tuple[float, Tensor, list[float]]:
    """scipy's L-BFGS-B on the pixels, INSIDE the box [0, 1] (projected steps, no clamping
    after the fact): up to ``iterations`` iterations, memory 100. Same returns as
    :func:`_optimise`. Added because on a better-trained global model (5000 prior steps) the
    unconstrained L-BFGS lowers the distance by leaving the box, and the clamped result is
    worse than its start (phase 2 then keeps phase 1's images)."""
    from scipy.optimize import minimize

    shape, dtype, device = start.shape, start.dtype, start.device
    history: list[float] = []

    def value_and_grad(flat: Any) -> tuple[float, Any]:
        x = torch.from_numpy(flat).to(device=device, dtype=dtype).reshape(shape)
        x.requires_grad_(True)
        loss = matching(x)
        (grad,) = torch.autograd.grad(loss, x)
        history.append(float(loss.detach()))
        report_progress(f"phase {phase}", len(history), iterations)
        if callback is not None:
            callback(phase, len(history) - 1, x.detach())
        return history[-1], grad.detach().cpu().double().numpy().ravel()

    x0 = start.detach().clamp(0, 1).cpu().double().numpy().ravel()
    res = minimize(value_and_grad, x0, jac=True, method="L-BFGS-B",
                   bounds=[(0.0, 1.0)] * x0.size,
                   options={"maxiter": iterations, "maxcor": 100, "ftol": 0.0, "gtol": 0.0})
    images = torch.from_numpy(res.x).to(device=device, dtype=dtype).reshape(shape)
    return (*_keep_best(matching, images, best), history)


def _keep_best(matching: DiffusionMatching, images: Tensor,
               best: tuple[float, Tensor | None] | None) -> tuple[float, Tensor]:
    """``(distance, images)`` of an optimiser's final ``images`` or of the running ``best``,
    whichever matches better (``best`` None or without images: the final ones)."""
    final = float(matching_no_graph(matching, images))
    if best is None or best[1] is None or final < best[0]:
        return final, images.detach().clone()
    return best  # type: ignore[return-value]


def matching_no_graph(matching: DiffusionMatching, images: Tensor) -> Tensor:
    """The matching distance of ``images`` without keeping any graph (scoring only)."""
    with torch.enable_grad():
        return matching(images.detach()).detach()


@ATTACKS.register("gidm")
class GIDM(Attack):
    """GIDM (Huang et al. 2024): latent search through the DDIM sampler, then pixels.

    Hyper-parameters: ``phase1_iterations`` (latent search; 0 skips phase 1: pixel-only
    gradient matching from a random start, the paper's baseline) and ``phase2_iterations``
    (pixel fine-tuning); ``sampler_steps`` K of the DDIM sampler; ``lr_latent`` / ``lr_pixels``
    (Adam, cosine decay); ``prior``: ``None`` = the record's global model, or the path of a
    prior saved by ``fl-sim train-prior``; ``checkpoint``: gradient checkpointing of the
    sampler (:data:`~attacks.components.ddim_sampler.CHECKPOINT_MODES`): ``"auto"`` (default:
    the last steps kept up to half the one-step footprint, the others recomputed, ``auto_plan``),
    ``"none"``, ``"sampler"`` (recompute each step in backward: memory of one UNet call
    instead of K, K - 1 more UNet forwards per iteration) or ``"full"`` (also the UNet's
    blocks); ``true`` / ``false`` mean ``"sampler"`` / ``"none"`` (docs/how-to/memory.md);
    ``distance``: ``"l2"`` (default) or ``"cosine"``; ``phase2_optimizer``: ``"lbfgs"``
    (default; L-BFGS with a strong-Wolfe line search, ``phase2_iterations`` = its iterations,
    each one or a few matching evaluations, step ``lr_pixels_lbfgs``), ``"adam"``
    (``lr_pixels``, cosine decay, box-projected) or ``"lbfgsb"`` (scipy's L-BFGS-B inside the
    box [0, 1], ``phase2_iterations`` iterations); ``multi_step`` for FedAvg deltas:
    ``"unroll"`` the client's local steps (each with its own eps/t rows; with the record's
    local optimiser: plain SGD, SGD with momentum / weight decay, or Adam with its state
    fresh each round, :mod:`attacks.components.local_optimizers`), ``"single"`` (match the delta as
    one mean gradient; needs one eps/t row per image; refused for Adam, whose delta is no scaled
    gradient) or ``"auto"`` (unroll when ``local_steps > 1`` or the client used Adam);
    ``second_order``: ``"finite_difference"`` (default) /
    ``"central_difference"`` (the images' gradient of the matching distance from input
    gradients at perturbed weights, both phases, FedSGD records: an engineering deviation
    from the paper, see :class:`~attacks.components.diffusion_matching.DiffusionMatching`; ~1.7x
    less CPU per attack at the same iterations, PSNR unchanged on the digits cases) or
    ``"exact"`` (double back-propagation; always used for unrolled FedAvg deltas). Returns
    images ``[N, C, H, W]`` (N = the batch for a
    gradient, ``num_examples`` for a delta), no labels; ``extras`` holds both phases'
    budgets and matching distances and the phase-1 images (``phase1_images``, scored by the
    attack runner). Raises :class:`~fl_sim.errors.ThreatModelError` without eps/t and
    :class:`~fl_sim.errors.ConfigError` for a non-diffusion record or a bad value.
    """

    view = "server"
    tasks = ("diffusion",)

    def __init__(self, *, phase1_iterations: int = 200, phase2_iterations: int = 200,
                 sampler_steps: int = 10, lr_latent: float = 0.1, lr_pixels: float = 0.02,
                 prior: str | None = None, checkpoint: Checkpoint = "auto",
                 distance: Literal["l2", "cosine"] = "l2",
                 phase2_optimizer: Literal["lbfgs", "adam", "lbfgsb"] = "lbfgs",
                 lr_pixels_lbfgs: float = 1.0, multi_step: MultiStep = "auto",
                 second_order: str = "finite_difference") -> None:
        _check("phase1_iterations", phase1_iterations >= 0, phase1_iterations, ">= 0")
        _check("phase2_iterations", phase2_iterations >= 0, phase2_iterations, ">= 0")
        _check("phase1_iterations", phase1_iterations + phase2_iterations >= 1,
               phase1_iterations, "phase1 + phase2 iterations >= 1")
        _check("sampler_steps", sampler_steps >= 1, sampler_steps, ">= 1")
        _check("lr_latent", lr_latent > 0, lr_latent, "> 0")
        _check("lr_pixels", lr_pixels > 0, lr_pixels, "> 0")
        _check("checkpoint", isinstance(checkpoint, bool) or checkpoint in CHECKPOINT_MODES,
               checkpoint, ", ".join(CHECKPOINT_MODES))
        _check("distance", distance in ("l2", "cosine"), distance, "l2, cosine")
        _check("multi_step", multi_step in ("auto", "unroll", "single"), multi_step,
               "auto, unroll, single")
        _check("phase2_optimizer", phase2_optimizer in ("lbfgs", "adam", "lbfgsb"),
               phase2_optimizer, "lbfgs, adam, lbfgsb")
        _check("lr_pixels_lbfgs", lr_pixels_lbfgs > 0, lr_pixels_lbfgs, "> 0")
        _check("second_order", second_order in SECOND_ORDER, second_order,
               ", ".join(SECOND_ORDER))
        self.second_order = second_order
        self.phase2_optimizer, self.lr_pixels_lbfgs = phase2_optimizer, lr_pixels_lbfgs
        self.phase1_iterations, self.phase2_iterations = phase1_iterations, phase2_iterations
        self.sampler_steps, self.lr_latent, self.lr_pixels = sampler_steps, lr_latent, lr_pixels
        self.prior, self.checkpoint, self.distance = prior, checkpoint, distance
        self.multi_step = multi_step

    @property
    def iterations(self) -> int:
        """Total budget (both phases), as the attack runner records it."""
        return self.phase1_iterations + self.phase2_iterations

    def required_knowledge(self) -> tuple[str, ...]:
        return ("eps", "t")

    def matching(self, record: ObservationRecord) -> tuple[DiffusionMatching, int]:
        """The record's :class:`DiffusionMatching` on ``self.device`` and its image count."""
        task = attack_task(record, device=self.device)
        if not is_diffusion(task):
            raise ConfigError(f"gidm: attacks diffusion updates; the record's task is "
                              f"{record.spec.task!r}")
        params, buffers = split_state(task, record.global_params)
        aux = granted_aux(record, task, attack="gidm")
        rows = int(aux["t"].shape[0])
        unroll = None
        if record.update_kind == "delta" and (
                self.multi_step == "unroll" or (self.multi_step == "auto" and (
                    record.local_steps > 1 or record.optimizer.name != "sgd"))):
            if record.lr <= 0 or record.batch_size < 1 or record.local_steps < 1:
                raise ConfigError("gidm.multi_step: unrolling needs lr > 0, local_steps >= 1 "
                                  f"and batch_size >= 1 in the record; got {record.lr}, "
                                  f"{record.local_steps}, {record.batch_size}")
            unroll = (float(record.lr), int(record.local_steps), int(record.batch_size))
            if rows != unroll[1] * unroll[2]:
                raise ConfigError(f"gidm: granted eps/t hold {rows} rows; {unroll[1]} local "
                                  f"steps of batch size {unroll[2]} need {unroll[1] * unroll[2]}")
            n = int(record.num_examples)
            target = target_from_record(record, task)
        else:
            n = rows  # one eps/t row per image of the (mean) gradient
            target = mean_gradient_target(record, task)
        dev = self.device
        match = DiffusionMatching(task, params, buffers, {k: v.to(dev) for k, v in target.items()},
                                  {k: v.to(dev) for k, v in aux.items()}, unroll=unroll,
                                  distance=self.distance, second_order=self.second_order,
                                  optimizer=record.optimizer)
        return match, n

    def reconstruct(self, record: ObservationRecord, *, generator: torch.Generator,
                    callback: Callback | None = None) -> Reconstruction:
        """Run both phases on ``record``; images ``[N, C, H, W]`` in [0, 1] on CPU."""
        match, n = self.matching(record)
        spec = record.spec
        shape = (n, spec.in_channels, spec.image_size, spec.image_size)
        z0 = torch.randn(shape, generator=generator).to(self.device)
        best: tuple[float, Tensor] | None = None
        p1_loss, p1_images, prior_name = math.nan, None, None
        if self.phase1_iterations:
            sample, prior_name = build_sampler(record, match.task, match.params, match.buffers,
                                               prior=self.prior, num_steps=self.sampler_steps,
                                               device=self.device)

            def from_latent(z: Tensor) -> Tensor:
                return ((sample(z, checkpoint=self.checkpoint) + 1) / 2).clamp(0, 1)
            p1_loss, p1_images, _ = _optimise(z0, from_latent, match,
                                              iterations=self.phase1_iterations,
                                              lr=self.lr_latent, box=False, best=None, phase=1,
                                              callback=callback)
            best = (p1_loss, p1_images)
            start = p1_images
        else:  # pixel-only baseline: a random start in the box
            start = torch.rand(shape, generator=generator).to(self.device)
        loss, images = best if best is not None else (math.inf, start)
        if self.phase2_iterations and self.phase2_optimizer == "lbfgs":
            loss, images, _ = _lbfgs(start, lambda x: x, match,
                                     iterations=self.phase2_iterations,
                                     lr=self.lr_pixels_lbfgs, best=best, phase=2,
                                     callback=callback)
        elif self.phase2_iterations and self.phase2_optimizer == "lbfgsb":
            loss, images, _ = _lbfgsb(start, match, iterations=self.phase2_iterations,
                                      best=best, phase=2, callback=callback)
        elif self.phase2_iterations:
            loss, images, _ = _optimise(start, lambda x: x, match,
                                        iterations=self.phase2_iterations, lr=self.lr_pixels,
                                        box=True, best=best, phase=2, callback=callback)
        # by construction (phase 2 keeps a running best seeded with phase 1's): never worse
        assert not (loss > p1_loss), (loss, p1_loss)
        extras: dict[str, Any] = {
            "phase1_iterations": self.phase1_iterations,
            "phase2_iterations": self.phase2_iterations, "sampler_steps": self.sampler_steps,
            "prior": prior_name, "distance": self.distance,
            "phase2_optimizer": self.phase2_optimizer,
            "second_order": self.second_order,
            "phase1_matching_loss": p1_loss, "phase2_matching_loss": loss,
            "unrolled_steps": match.unroll[1] if match.unroll else 0}
        assumed: dict[str, Any] = {"eps": "granted", "t": "granted",
                                   "prior": prior_name or "none (pixels only)"}
        if match.unroll is not None:
            lr, steps, bs = match.unroll
            assumed["local_training"] = {"lr": lr, "local_steps": steps, "batch_size": bs,
                                         "batch_order": "sequential",
                                         "optimizer": describe_optimizer(match.optimizer, lr)}
        if p1_images is not None:
            extras["phase1_images"] = p1_images.clamp(0, 1)
        return Reconstruction(images=images.clamp(0, 1), labels=None, matching_loss=loss,
                              iterations=self.iterations,
                              knowledge=assumed, extras=extras)
