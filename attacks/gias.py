"""GIAS: gradient inversion through a generative image prior, here a diffusion model.

Jeon, Kim, Lee, Kim, Ok, "Gradient Inversion with Generative Image Prior", NeurIPS 2021.
Threat model: an honest-but-curious server (view ``server``) sees one client's FedSGD gradient
(or FedAvg delta) of a CLASSIFIER and owns a generative model of natural images of the same
shape, trained on public data disjoint from the client's (``prior``: a path saved by
``fl-sim train-prior``). The image of slot ``i`` is ``x_i = G_{w_i}(z_i)`` where ``G`` is the
prior's deterministic DDIM sampler (:class:`attacks.components.ddim_sampler.DDIMSampler`, K =
``sampler_steps`` steps, eta 0, output mapped to [0, 1]). Both phases minimise Inverting
Gradients' objective, ``1 - cos(update(x), observed)`` (or the L2 distance), with the update
of a candidate batch computed by :mod:`attacks.components.inversion` (FedSGD gradient, or the
client's local SGD unrolled for a FedAvg delta, exactly as ``inverting_gradients`` does):

1. **latent search** -- ``w_i = w`` (the frozen prior); only the latents ``z [N, C, H, W]``
   (started ``~ N(0, I)`` from the attack's generator) are optimised, Adam with cosine decay;
2. **parameter search** -- ``z`` is fixed at phase 1's best; each image gets its OWN copy
   ``w_i`` of the prior's parameters (started at ``w``), optimised by Adam (``lr_params``,
   cosine decay) on the matching distance plus ``drift_weight * sum_i |w_i - w|^2 / |w|^2``,
   so the image can leave the prior's range while staying close to a natural image.

Shapes: ``N`` images of ``[C, H, W]`` = the record's classifier input; the prior must make
images of exactly that shape. Returns images ``[N, C, H, W]`` in [0, 1] after phase 2 and the
labels used; ``extras["phase1_images"]`` (scored by the attack runner as ``phase1_psnr`` /
``phase1_ssim``), each phase's matching distance and seconds.

Deviations from the paper, and why: the prior is a small DDPM sampled by DDIM instead of
StyleGAN2 (none can be downloaded here; the sampler is differentiable in ``x_T`` and in the
UNet's parameters, which is all GIAS needs); the latent is ``x_T`` itself (no mapping network,
no latent-norm penalty: DDIM's ``x_T`` is a Gaussian of the image's own shape); phase 2 keeps
``z`` fixed (the paper's parameter search also starts from, and keeps, the phase-1 latent) and
regularises the drift with a relative squared-L2 penalty (the paper bounds the drift by a small
step size and few iterations; the penalty makes that explicit and tunable); per-image copies
are run as a LOOP of batch-1 functional calls of the sampler (``torch.func.functional_call``
with a per-image parameter dict): vmap over diffusers' UNet is not guaranteed to have batching
rules for every op, while the loop costs N batch-1 sampler calls, about what one batch-N call
costs for this tiny UNet on CPU. Each phase returns its best batch by matching distance seen
during the run (phase 2 seeded with phase 1's), so phase 2 never matches worse than phase 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from attacks.base import Attack, Reconstruction
from attacks.components.ddim_sampler import CHECKPOINT_MODES, Checkpoint, DDIMSampler
from attacks.components.inversion import InversionProblem, _update_fn
from attacks.components.objectives import cosine_distance, l2_distance, lr_multiplier
from attacks.components.progress import report as report_progress
from attacks.inverting_gradients import InvertingGradients, LabelSource, MultiStep
from fl_sim.errors import ConfigError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS

#: called as ``callback(phase, iteration, images [N, C, H, W])`` after each step
Callback = Callable[[int, int, Tensor], None]
Params = dict[str, Tensor]


def _check(name: str, ok: bool, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"gias.{name}: got {value!r}; allowed: {allowed}")


class Matching:
    """``images [N, C, H, W] -> distance`` (scalar) of an :class:`InversionProblem`."""

    def __init__(self, problem: InversionProblem, distance: str) -> None:
        self.update_of = _update_fn(problem, None, "lean")
        self.dist = cosine_distance if distance == "cosine" else l2_distance
        self.target = {k: v.contiguous() for k, v in problem.target.items()}
        self.norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in self.target.values()))

    def __call__(self, images: Tensor) -> Tensor:
        upd, _ = self.update_of(images.unsqueeze(0))
        return self.dist(upd, self.target, target_norm=self.norm)[0]


def _to_pixels(x: Tensor) -> Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def search_latent(sampler: DDIMSampler, match: Matching, z0: Tensor, *, iterations: int,
                  lr: float, callback: Callback | None = None,
                  checkpoint: Checkpoint = "none"
                  ) -> tuple[float, Tensor, Tensor, list[float]]:
    """Phase 1: Adam (cosine decay) on the latents ``z0 [N, C, H, W]`` through the frozen
    prior (``checkpoint``: the sampler's gradient checkpointing). Returns ``(best distance,
    its latents, its images [N, C, H, W], history)``."""
    z = z0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    best = (math.inf, z.detach().clone(), None)
    history: list[float] = []
    for it in range(iterations + 1):  # the extra pass only scores the final latents
        report_progress("phase 1", it, iterations + 1)
        images = _to_pixels(sampler.sample(z, checkpoint=checkpoint))
        loss = match(images)
        value = float(loss.detach())
        history.append(value)
        if value < best[0]:
            best = (value, z.detach().clone(), images.detach().clone())
        if it == iterations:
            break
        for group in opt.param_groups:
            group["lr"] = lr * lr_multiplier("cosine", it, iterations)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(1, it, images.detach())
    return best[0], best[1], best[2], history[:-1]


def _per_image(sampler: DDIMSampler, z: Tensor, weights: list[Params], buffers: Params,
               checkpoint: Checkpoint = "none") -> Tensor:
    """``x_i = G_{w_i}(z_i)`` for every image (a loop of batch-1 functional sampler calls)."""
    return torch.cat([_to_pixels(sampler.sample(z[i:i + 1], params=w, buffers=buffers,
                                                 checkpoint=checkpoint))
                      for i, w in enumerate(weights)])


def search_parameters(sampler: DDIMSampler, match: Matching, z: Tensor, *, iterations: int,
                      lr: float, drift_weight: float, best: tuple[float, Tensor],
                      callback: Callback | None = None, checkpoint: Checkpoint = "none"
                      ) -> tuple[float, Tensor, list[float], float]:
    """Phase 2: Adam (cosine decay) on one copy of the prior's parameters per image.

    Objective: ``match(images) + drift_weight * sum_i |w_i - w|^2 / |w|^2``. ``best`` =
    ``(distance, images)`` of phase 1 seeds the running best. Returns ``(best distance, best
    images [N, C, H, W], distance history, final relative drift (mean over images))``.
    """
    unet = sampler.unet
    base = {k: v.detach() for k, v in unet.named_parameters()}
    buffers = {k: v.detach() for k, v in unet.named_buffers()}
    base_sq = sum(float(v.pow(2).sum()) for v in base.values())
    weights = [{k: v.clone().requires_grad_(True) for k, v in base.items()}
               for _ in range(z.shape[0])]
    opt = torch.optim.Adam([v for w in weights for v in w.values()], lr=lr)
    best_loss, best_images = best
    history: list[float] = []

    def drift() -> Tensor:
        return sum(sum((w[k] - base[k]).pow(2).sum() for k in base) for w in weights) / base_sq

    for it in range(iterations + 1):
        report_progress("phase 2", it, iterations + 1)
        images = _per_image(sampler, z, weights, buffers, checkpoint)
        loss = match(images)
        value = float(loss.detach())
        history.append(value)
        if value < best_loss:
            best_loss, best_images = value, images.detach().clone()
        if it == iterations:
            break
        for group in opt.param_groups:
            group["lr"] = lr * lr_multiplier("cosine", it, iterations)
        total = loss + drift_weight * drift() if drift_weight else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if callback is not None:
            callback(2, it, images.detach())
    with torch.no_grad():
        final_drift = float(drift()) / max(len(weights), 1)
    return best_loss, best_images, history[:-1], final_drift


@ATTACKS.register("gias")
class GIAS(Attack):
    """GIAS (Jeon et al. 2021) with a diffusion prior: latent search, then per-image weights.

    Hyper-parameters: ``prior`` (REQUIRED): path of a prior saved by ``fl-sim train-prior``
    making images of the classifier's channels and size, meant to be trained on public data
    disjoint from the victims' (not assumed: the scorer measures the overlap of its training
    images with the victims, result ``prior_overlap``, :mod:`fl_sim.prior_overlap`);
    ``phase1_iterations`` (100) Adam steps on the DDIM latents (``lr_latent`` 0.1, cosine
    decay); ``phase2_iterations`` (50) Adam steps on per-image
    copies of the prior's parameters (``lr_params`` 1e-4, cosine decay; 0 returns phase 1's
    images); ``drift_weight`` (0.1) of the relative parameter-drift penalty;
    ``sampler_steps`` (5) K of the DDIM sampler; ``distance``: ``"cosine"`` (Inverting
    Gradients', default) or ``"l2"``; ``labels``: ``"granted"`` (knowledge ``labels``),
    ``"idlg"``, ``"batch"`` or ``"auto"`` (as ``inverting_gradients``); ``multi_step`` for
    FedAvg deltas: ``"unroll"`` / ``"single"`` / ``"auto"`` (as ``inverting_gradients``,
    same assumptions about the client's local training); ``checkpoint``: gradient
    checkpointing of the sampler in both phases (``"auto"`` default: the last steps kept
    up to half the one-step footprint, the others recomputed; ``"none"``, ``"sampler"``,
    ``"full"``; docs/how-to/memory.md). Raises
    :class:`~fl_sim.errors.ConfigError` for a missing ``prior`` value, a bad parameter or a
    prior of another image shape; :class:`~fl_sim.errors.MissingResourceError` when the path
    does not exist; :class:`~fl_sim.errors.DataError` when it is not a prior.
    """

    view = "server"
    tasks = ("classifier",)

    def __init__(self, *, prior: str | None = None, phase1_iterations: int = 100,
                 phase2_iterations: int = 50, sampler_steps: int = 5, lr_latent: float = 0.1,
                 lr_params: float = 1e-4, drift_weight: float = 0.1,
                 distance: Literal["cosine", "l2"] = "cosine", labels: LabelSource = "auto",
                 multi_step: MultiStep = "auto", checkpoint: Checkpoint = "auto") -> None:
        _check("checkpoint", isinstance(checkpoint, bool) or checkpoint in CHECKPOINT_MODES,
               checkpoint, ", ".join(CHECKPOINT_MODES))
        self.checkpoint = checkpoint
        _check("prior", isinstance(prior, str) and prior.strip() != "", prior,
               "the path of a prior saved by `fl-sim train-prior` (required)")
        _check("phase1_iterations", phase1_iterations >= 0, phase1_iterations, ">= 0")
        _check("phase2_iterations", phase2_iterations >= 0, phase2_iterations, ">= 0")
        _check("sampler_steps", sampler_steps >= 1, sampler_steps, ">= 1")
        _check("lr_latent", lr_latent > 0, lr_latent, "> 0")
        _check("lr_params", lr_params > 0, lr_params, "> 0")
        _check("drift_weight", drift_weight >= 0, drift_weight, ">= 0")
        _check("distance", distance in ("cosine", "l2"), distance, "cosine, l2")
        self._ig = InvertingGradients(labels=labels, multi_step=multi_step, distance=distance)
        self.prior, self.sampler_steps = prior, sampler_steps
        self.phase1_iterations, self.phase2_iterations = phase1_iterations, phase2_iterations
        self.lr_latent, self.lr_params, self.drift_weight = lr_latent, lr_params, drift_weight
        self.distance, self.labels, self.multi_step = distance, labels, multi_step

    @property
    def iterations(self) -> int:
        """Total budget (both phases), as the attack runner records it."""
        return self.phase1_iterations + self.phase2_iterations

    def required_knowledge(self) -> tuple[str, ...]:
        return ("labels",) if self.labels == "granted" else ()

    def reconstruct(self, record: ObservationRecord, *, generator: torch.Generator,
                    callback: Callback | None = None) -> Reconstruction:
        """Both phases on ``record``; images ``[N, C, H, W]`` in [0, 1] after phase 2."""
        assert self.prior is not None  # checked in __init__
        from fl_sim.priors import load_prior_for  # lazy: diffusers

        prior = load_prior_for(self.prior, record.spec, attack="gias", device=self.device)
        if record.spec.task != "classifier":
            raise ConfigError(f"gias: attacks classifier updates; the record's task is "
                              f"{record.spec.task!r}")
        self._ig.device = self.device
        problem, label_source = self._ig.problem(record, generator=generator)
        match = Matching(problem, self.distance)
        sampler = DDIMSampler.from_scheduler(prior.unet, prior.scheduler, self.sampler_steps)
        z0 = torch.randn((len(problem.labels), *problem.shape),
                         generator=generator).to(self.device)
        t0 = time.perf_counter()
        p1_loss, z, p1_images, _ = search_latent(sampler, match, z0,
                                                 iterations=self.phase1_iterations,
                                                 lr=self.lr_latent, callback=callback,
                                                 checkpoint=self.checkpoint)
        t1 = time.perf_counter()
        loss, images, _, drift = search_parameters(
            sampler, match, z, iterations=self.phase2_iterations, lr=self.lr_params,
            drift_weight=self.drift_weight, best=(p1_loss, p1_images), callback=callback,
            checkpoint=self.checkpoint)
        t2 = time.perf_counter()
        meta = prior.metadata
        assumed = {**self._ig._assumed(record, problem, label_source), "prior": str(self.prior),
                   "prior_data": {"data": meta.get("data"), "filter": meta.get("filter"),
                                  "num_examples": meta.get("num_examples")}}
        extras: dict[str, Any] = {
            "phase1_images": p1_images.clamp(0, 1), "phase1_matching_loss": p1_loss,
            "phase2_matching_loss": loss, "phase1_seconds": t1 - t0, "phase2_seconds": t2 - t1,
            "relative_drift": drift, "sampler_steps": self.sampler_steps,
            "phase1_iterations": self.phase1_iterations,
            "phase2_iterations": self.phase2_iterations, "distance": self.distance}
        return Reconstruction(images=images.clamp(0, 1), labels=problem.labels.clone(),
                              matching_loss=loss, iterations=self.iterations,
                              knowledge=assumed, extras=extras)
