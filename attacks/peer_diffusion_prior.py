"""Curious peer + diffusion prior: invert the others' aggregate, then restore with a DDPM.

Wilson, Yue, Wong, Dai, "Federated Learning Nodes Can Reconstruct Peers' Image Data" (arXiv
2410.04661): a participating client (view ``peer``) derives the other clients' aggregate
update from consecutive global models minus its own contribution (the framework's peer
record, exactly what :mod:`attacks.peer_inversion` consumes), inverts it with the multi-step
objective (Inverting Gradients' cosine matching, each other client's local SGD unrolled for
FedAvg deltas: :class:`~attacks.peer_inversion.PeerInversion`, reused unchanged), and then
RESTORES the noisy reconstructions with a diffusion model trained on public data.

Restoration = projection onto the prior's range through its deterministic DDIM sampler ``G``
(:class:`attacks.components.ddim_sampler.DDIMSampler`, ``sampler_steps`` steps, eta 0). For each
reconstruction ``r [C, H, W]`` in [0, 1] the latent ``x_T`` is optimised,

    min_{x_T}  mean((P G(x_T) - P r)^2)  [+ latent_weight * (mean(x_T^2) - 1)^2],

with Adam (``lr_latent``, cosine decay) for ``projection_iterations`` steps; ``P`` is
``fidelity_pool x fidelity_pool`` average pooling. The image returned is ``G(x_T)``.
Why pooled: ``G`` is expressive enough to reproduce almost any 16x16 image, so full-resolution
MSE drags the projection back onto the reconstruction's artefacts (measured on the digits
case: SSIM 0.893 at the start of the projection, 0.768 after 20 iterations at ``P = 1``;
a pix2pix-zero-style whiteness penalty on ``x_T`` did not stop it). Matching only the
coarse content trusts what gradient inversion gets right (layout, stroke positions) and
leaves the fine detail to the prior, as measurement-consistent diffusion restoration (DDRM,
DDNM) does for a known degradation operator.

Initial latent: ``latent_init = "inversion"`` (default) is the DDIM inversion of ``r`` (the
sampler's steps run backwards, ``eps`` predicted at the current point): ``G`` of it is already
the prior's version of the reconstruction (the restoration's main effect: measured +1.9 dB,
SSIM 0.805 -> 0.893 before any iteration), and the iterations then pull its coarse content
towards ``r``'s. ``"random"`` starts from ``N(0, I)`` drawn from the attack's generator: a
random digit, which the coarse pooled fidelity does not pull far enough (measured SSIM 0.722
after 40 iterations vs 0.890 from the inversion, ``benchmarks/RESULTS.md``).

Deviations from the paper, and why: the paper enhances its reconstructions with large
pretrained diffusion models; here the restoration is the pooled latent projection above
through the project's shared differentiable sampler (no new sampler code), with a prior saved
by ``fl-sim train-prior`` on public data of the classifier's image shape (no pretrained weights
can be downloaded here). The prior is meant to have seen data disjoint from the peers'; the
attack cannot check that (it never sees the victims): the scorer measures the overlap of the
prior's training images with the attacked ones (result ``prior_overlap``,
:mod:`fl_sim.prior_overlap`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from attacks.base import Reconstruction
from attacks.components.ddim_sampler import CHECKPOINT_MODES, Checkpoint, DDIMSampler
from attacks.components.objectives import lr_multiplier
from attacks.components.progress import report as report_progress
from attacks.inverting_gradients import (
    AuxSource,
    Distance,
    DoubleBackward,
    LabelSource,
    MultiStep,
    RestartPruning,
    Schedule,
)
from attacks.peer_inversion import PeerInversion
from fl_sim.errors import ConfigError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS

LatentInit = Literal["inversion", "random"]
#: called as ``callback(iteration, images [R, N, C, H, W])`` during the inversion (IG's)
Callback = Callable[[int, Tensor], None]


def _check(name: str, ok: bool, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"peer_diffusion_prior.{name}: got {value!r}; allowed: {allowed}")


def _abar_before(sampler: DDIMSampler, t: int) -> Tensor | float:
    """``abar`` of the level a DDIM step at ``t`` lands on (the step's ``prev`` level)."""
    prev = t - sampler.num_train_timesteps // len(sampler.timesteps)
    return sampler.alphas_cumprod[prev] if prev >= 0 else sampler.final_alpha_cumprod


@torch.no_grad()
def ddim_invert(sampler: DDIMSampler, x0: Tensor) -> Tensor:
    """DDIM inversion: ``x0 [B, C, H, W]`` in model space [-1, 1] -> a latent ``x_T``.

    Runs the sampler's steps backwards (Song et al. 2021, sec. 4.3: the eta = 0 sampler as an
    ODE that also encodes), each from ``t_prev`` up to ``t`` with ``eps`` predicted at the
    current point and timestep ``t`` (the usual approximation),
    so ``sampler.sample(ddim_invert(sampler, x0))`` is close to ``x0`` for images the prior can
    produce. Raises :class:`~fl_sim.errors.ConfigError` unless the prior predicts ``epsilon``.
    """
    if sampler.prediction_type != "epsilon":
        raise ConfigError("peer_diffusion_prior.latent_init: 'inversion' needs an epsilon-"
                          f"prediction prior; this one predicts {sampler.prediction_type!r} "
                          "(use latent_init = \"random\")")
    abar = sampler.alphas_cumprod.to(x0.device)
    x = x0
    for t in reversed(list(sampler.timesteps)):
        a_from = _abar_before(sampler, int(t))
        a_from = a_from.to(x.device) if isinstance(a_from, Tensor) else x.new_tensor(a_from)
        a_to = abar[int(t)]
        tt = torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device)
        out = sampler.unet(x, tt, return_dict=False)
        eps = out[0] if isinstance(out, (tuple, list)) else out
        x0_hat = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        x = a_to.sqrt() * x0_hat + (1 - a_to).sqrt() * eps
    return x


def project(sampler: DDIMSampler, target: Tensor, z0: Tensor, *, iterations: int, lr: float,
            pool: int = 1, latent_weight: float = 0.0, checkpoint: Checkpoint = "none"
            ) -> tuple[Tensor, Tensor, list[float]]:
    """Optimise the latent so that the sampled image matches ``target`` ``[N, C, H, W]``.

    ``target`` in [0, 1]; ``z0`` the starting latent (same shape). Adam with a cosine decay on
    ``sum_i mse(P G(z_i), P target_i) + latent_weight * sum_i (mean(z_i^2) - 1)^2``, where ``P``
    is ``pool x pool`` average pooling (identity for 1): only the target's coarse content is
    matched, the finer one is left to the prior. A sum over images: each image's latent gets
    its own gradient, independent of N. ``checkpoint``: the sampler's gradient checkpointing.
    Returns ``(images [N, C, H, W] in [0, 1], latent, per-iteration mean pooled MSE)`` of the
    final latent.
    """
    def measure(x: Tensor) -> Tensor:
        return torch.nn.functional.avg_pool2d(x, pool) if pool > 1 else x

    want = measure(target)
    z = z0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    history: list[float] = []
    for it in range(iterations):
        report_progress("projection", it, iterations)
        for group in opt.param_groups:
            group["lr"] = lr * lr_multiplier("cosine", it, iterations)
        generated = (sampler.sample(z, checkpoint=checkpoint) + 1) / 2
        mse = (measure(generated) - want).pow(2).flatten(1).mean(1)
        loss = mse.sum()
        if latent_weight:
            loss = loss + latent_weight * (z.pow(2).flatten(1).mean(1) - 1).pow(2).sum()
        history.append(float(mse.mean().detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        images = sampler.images(z)
    return images, z.detach(), history


@ATTACKS.register("peer_diffusion_prior")
class PeerDiffusionPrior(PeerInversion):
    """Curious peer (Wilson et al. 2024): peer inversion, then projection onto a diffusion prior.

    ``prior`` (REQUIRED): path of a prior saved by ``fl-sim train-prior`` whose images have the
    classifier's channels and size; meant to be trained on public data disjoint from the
    peers' (measured by the scorer: ``prior_overlap``).
    ``projection_iterations`` (20) Adam steps on the DDIM latent (``lr_latent`` 0.05, cosine
    decay; 0 = the DDIM round trip alone) through a ``sampler_steps``-step (5) sampler,
    matching ``fidelity_pool`` x ``fidelity_pool`` (4) average-pooled images (1 = full
    resolution); ``latent_weight`` (0) of the latent-norm term; ``latent_init``:
    ``"inversion"`` (default: DDIM inversion of the reconstruction) or ``"random"`` (seeded
    ``N(0, I)``); ``checkpoint``: gradient checkpointing of the projection's sampler
    (``"auto"`` default: the last steps kept up to half the one-step footprint, the others
    recomputed; ``"none"``, ``"sampler"``, ``"full"``; docs/how-to/memory.md). Every
    other parameter is :class:`~attacks.peer_inversion.PeerInversion`'s
    (same defaults), used unchanged for the inversion. Returns ``images [num_examples, C, H,
    W]`` AFTER the prior and the inversion's labels; ``extras["before_images"]`` are the plain
    peer reconstructions (scored by the attack runner as ``before_psnr`` / ``before_ssim``
    beside ``psnr`` / ``ssim``); ``extras`` also holds the projection's final pooled MSE, the
    full-resolution MSE between the images after and before, and each phase's seconds.
    Raises :class:`~fl_sim.errors.ConfigError` for a missing ``prior`` value, a bad
    parameter, a ``fidelity_pool`` above the image size or a prior of another image shape;
    :class:`~fl_sim.errors.MissingResourceError` when the path does not exist;
    :class:`~fl_sim.errors.DataError` when it is not a prior.
    """

    view = "peer"

    def __init__(self, *, prior: str | None = None, projection_iterations: int = 20,
                 sampler_steps: int = 5, lr_latent: float = 0.05, fidelity_pool: int = 4,
                 latent_weight: float = 0.0, latent_init: LatentInit = "inversion",
                 max_iterations: int = 600, restarts: int = 1, lr: float = 0.1,
                 tv_weight: float = 0.2,
                 labels: LabelSource = "auto", bn_prior_weight: float = 0.0,
                 multi_step: MultiStep = "auto", schedule: Schedule = "step",
                 distance: Distance = "cosine", restart_pruning: RestartPruning = "halving",
                 restart_keep: int = 1, double_backward: DoubleBackward = "lean",
                 aux: AuxSource = "none", adaptive: bool = False,
                 checkpoint: Checkpoint = "auto") -> None:
        super().__init__(max_iterations=max_iterations, restarts=restarts, lr=lr,
                         tv_weight=tv_weight, labels=labels, bn_prior_weight=bn_prior_weight,
                         multi_step=multi_step, schedule=schedule, distance=distance,
                         restart_pruning=restart_pruning, restart_keep=restart_keep,
                         double_backward=double_backward, aux=aux, adaptive=adaptive)
        _check("prior", isinstance(prior, str) and prior.strip() != "", prior,
               "the path of a prior saved by `fl-sim train-prior` (required)")
        _check("projection_iterations", projection_iterations >= 0, projection_iterations,
               ">= 0")
        _check("sampler_steps", sampler_steps >= 1, sampler_steps, ">= 1")
        _check("lr_latent", lr_latent > 0, lr_latent, "> 0")
        _check("fidelity_pool", fidelity_pool >= 1, fidelity_pool, ">= 1")
        _check("latent_weight", latent_weight >= 0, latent_weight, ">= 0")
        _check("latent_init", latent_init in ("inversion", "random"), latent_init,
               "inversion, random")
        self.prior = prior
        self.projection_iterations, self.sampler_steps = projection_iterations, sampler_steps
        self.lr_latent, self.latent_weight = lr_latent, latent_weight
        self.fidelity_pool = fidelity_pool
        self.latent_init = latent_init
        _check("checkpoint", isinstance(checkpoint, bool) or checkpoint in CHECKPOINT_MODES,
               checkpoint, ", ".join(CHECKPOINT_MODES))
        self.checkpoint = checkpoint

    def reconstruct(self, record: ObservationRecord, *, generator: torch.Generator,
                    callback: Callback | None = None) -> Reconstruction:
        """Peer inversion of ``record``, then each image projected onto the prior."""
        assert self.prior is not None  # checked in __init__
        # the prior first: a bad path or shape fails before minutes of inversion
        from fl_sim.priors import load_prior_for  # lazy: diffusers

        prior = load_prior_for(self.prior, record.spec, attack="peer_diffusion_prior",
                               device=self.device)
        _check("fidelity_pool", self.fidelity_pool <= record.spec.image_size, self.fidelity_pool,
               f"<= the image size {record.spec.image_size}")
        sampler = DDIMSampler.from_scheduler(prior.unet, prior.scheduler, self.sampler_steps)
        start = time.perf_counter()
        plain = super().reconstruct(record, generator=generator, callback=callback)
        inverted = time.perf_counter()
        before = plain.images.to(self.device)
        if self.latent_init == "inversion":
            z0 = ddim_invert(sampler, before * 2 - 1)
        else:
            z0 = torch.randn(before.shape, generator=generator).to(self.device)
        after, _, history = project(sampler, before, z0, iterations=self.projection_iterations,
                                    lr=self.lr_latent, pool=self.fidelity_pool,
                                    latent_weight=self.latent_weight,
                                    checkpoint=self.checkpoint)
        projected = time.perf_counter()
        extras: dict[str, Any] = {
            **plain.extras, "before_images": before.detach().clone(),
            "projection_iterations": self.projection_iterations,
            "sampler_steps": self.sampler_steps, "latent_init": self.latent_init,
            "fidelity_pool": self.fidelity_pool,
            "pooled_mse": history[-1] if history else math.nan,
            "mse_after_to_before": _mse(after, before),
            "inversion_seconds": inverted - start, "projection_seconds": projected - inverted}
        return Reconstruction(images=after, labels=plain.labels,
                              matching_loss=plain.matching_loss, iterations=plain.iterations,
                              knowledge=self._assumed_prior(plain.knowledge, prior),
                              extras=extras)

    def _assumed_prior(self, assumed: Mapping[str, Any], prior: Any) -> dict[str, Any]:
        meta = prior.metadata  # what `fl-sim train-prior` recorded about the prior's data
        return {**dict(assumed), "prior": str(self.prior),
                "prior_data": {"data": meta.get("data"), "filter": meta.get("filter"),
                               "num_examples": meta.get("num_examples")}}


def _mse(a: Tensor, b: Tensor) -> float:
    return float((a - b).pow(2).mean()) if a.numel() else math.nan
