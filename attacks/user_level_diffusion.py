"""User-level gradient inversion with a diffusion prior: one representative image of a user.

Li et al., "Exploring User-level Gradient Inversion with a Diffusion Prior" (arXiv
2409.07291): a client holds MANY images of ONE person (the ``by_identity`` partitioner, batch
10 and more); at that batch size per-sample reconstruction fails, but the update still carries
the person's identity. The attack recovers one representative image of the user by
diffusion-guided gradient matching:

    min_{z_1..z_K}  1 - cos( grad_theta CE(f(G(z_k)), y)_{k=1..K} , g_obs )
                    + latent_weight * sum_k (mean(z_k^2) - 1)^2

``G`` is the deterministic DDIM sampler (:class:`attacks.components.ddim_sampler.DDIMSampler`,
``sampler_steps`` steps) of a frozen prior, ``z_k [C, H, W]`` its latents, ``K =
num_generated``; the gradient is the classifier's mean cross-entropy gradient of the K
generated images (double back-propagation through the classifier, first-order through the
UNet); ``g_obs`` is the observed update read as a mean gradient
(:func:`attacks.components.gradients.mean_gradient_target`: a FedAvg delta is rescaled by
``-1 / (lr * local_steps)``). Adam on the latents, cosine-decayed learning rate.

Why a batch of K, and why its pixel MEAN as the representative: a B-image update of one
person is a sum of B per-image gradients; K < B generated images matching it are K samples of
that person's appearance under the prior (with K = 1 one face would have to explain the
pose and lighting variation of the whole batch; K = 1 was not measured). The person's
identity is what the K images
share; their mean keeps it and averages out pose/lighting, like the paper's single
user-level output. ``representative = "medoid"`` returns instead the generated image closest
to that mean (a sharp sample, not an average). All K images are in
``extras["generated_images"]``. Measured on Olivetti 16x16, 10 users (benchmarks/RESULTS.md):
top-1 identity 0.20 with the mean, 0.30 with the medoid (same latents), chance 0.025.

Label: the user's label (= identity under ``by_identity``) is read from the last layer's bias
update (iDLG's sign rule: the one class whose bias gradient is negative; all B images share
it), or granted with ``labels = "given"`` (knowledge ``labels``, the most common one used).

Shapes: record of a classifier on ``[B, C, H, W]`` images; the prior must make ``C x H x W``
images. Returns ``images [1, C, H, W]`` in [0, 1] and ``labels [1]``.

Raises :class:`~fl_sim.errors.ConfigError` (bad parameter, missing ``prior``, prior of
another image shape, a record without a classifier bias to read the label from),
:class:`~fl_sim.errors.MissingResourceError` / :class:`~fl_sim.errors.DataError` (prior path
missing / not a prior).

Deviations from the paper: the paper guides a large pretrained latent diffusion model
(Stable Diffusion class) with the gradient-matching loss at each denoising step; no weights
can be downloaded here, so the prior is a small UNet trained by ``fl-sim train-prior`` on the
OTHER users' images only (identity filter), and instead of guidance during sampling the
latents are optimised through the whole few-step deterministic sampler (as ``gidm`` /
``peer_diffusion_prior`` do with the project's shared sampler). Only the FedSGD gradient or a
FedAvg delta read as one mean gradient are matched (no unrolling of local steps).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from torch import Tensor

from attacks.base import Attack, Reconstruction
from attacks.components.ddim_sampler import CHECKPOINT_MODES, Checkpoint, DDIMSampler
from attacks.components.gradients import (
    attack_task,
    mean_gradient_target,
    parameter_gradients,
    split_state,
)
from attacks.components.objectives import cosine_distance, lr_multiplier
from attacks.components.progress import report as report_progress
from fl_sim.errors import ConfigError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS
from fl_sim.tasks.base import Batch

Representative = Literal["mean", "medoid"]


def _check(name: str, ok: bool, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"user_level_diffusion.{name}: got {value!r}; allowed: {allowed}")


def infer_user_label(target: dict[str, Tensor], num_classes: int) -> int:
    """The user's label from a mean-gradient ``target``: the class whose last-layer bias
    gradient is the most negative (with one label in the batch it is the only negative one).
    Raises :class:`~fl_sim.errors.ConfigError` when no ``[num_classes]`` bias exists."""
    biases = [v for v in target.values() if v.dim() == 1 and v.shape[0] == num_classes]
    if not biases:
        raise ConfigError("user_level_diffusion.labels: the classifier has no last-layer bias "
                          "to read the user's label from; use labels = \"given\"")
    return int(biases[-1].argmin())


@ATTACKS.register("user_level_diffusion")
class UserLevelDiffusion(Attack):
    """User-level inversion (Li et al. 2024): K prior samples matched to one user's update.

    ``prior`` (REQUIRED): path of a ``fl-sim train-prior`` prior of the classifier's image
    shape, trained on OTHER users' images. ``num_generated`` K (4) latents; ``iterations``
    (150) Adam steps at ``lr`` (0.05, cosine decay) through a ``sampler_steps``-step (4) DDIM
    sampler; ``latent_weight`` (0.1) of the latent-norm term; ``representative``: ``"mean"``
    (default) or ``"medoid"``; ``labels``: ``"auto"`` (bias sign rule) or ``"given"``;
    ``checkpoint``: gradient checkpointing of the sampler (``"auto"`` default: the last steps
    kept up to half the one-step footprint, the others recomputed, ``auto_plan``; ``"none"``,
    ``"sampler"``, ``"full"``; docs/how-to/memory.md).
    """

    view = "server"

    def __init__(self, *, prior: str | None = None, num_generated: int = 4,
                 iterations: int = 150, lr: float = 0.05, sampler_steps: int = 4,
                 latent_weight: float = 0.1, representative: Representative = "mean",
                 labels: Literal["auto", "given"] = "auto",
                 checkpoint: Checkpoint = "auto") -> None:
        _check("prior", isinstance(prior, str) and prior.strip() != "", prior,
               "the path of a prior saved by `fl-sim train-prior` (required)")
        _check("num_generated", num_generated >= 1, num_generated, ">= 1")
        _check("iterations", iterations >= 1, iterations, ">= 1")
        _check("lr", lr > 0, lr, "> 0")
        _check("sampler_steps", sampler_steps >= 1, sampler_steps, ">= 1")
        _check("latent_weight", latent_weight >= 0, latent_weight, ">= 0")
        _check("representative", representative in ("mean", "medoid"), representative,
               "mean, medoid")
        _check("labels", labels in ("auto", "given"), labels, "auto, given")
        self.prior, self.num_generated, self.iterations = prior, num_generated, iterations
        self.lr, self.sampler_steps, self.latent_weight = lr, sampler_steps, latent_weight
        self.representative, self.labels = representative, labels
        _check("checkpoint", isinstance(checkpoint, bool) or checkpoint in CHECKPOINT_MODES,
               checkpoint, ", ".join(CHECKPOINT_MODES))
        self.checkpoint = checkpoint

    def required_knowledge(self) -> tuple[str, ...]:
        return ("labels",) if self.labels == "given" else ()

    def _label(self, record: ObservationRecord, target: dict[str, Tensor]) -> int:
        if self.labels == "given":
            given = torch.as_tensor(record.knowledge["labels"]).flatten()
            return int(torch.mode(given).values)
        return infer_user_label(target, record.spec.num_classes)

    def reconstruct(self, record: ObservationRecord, *,
                    generator: torch.Generator) -> Reconstruction:
        """Optimise K latents so the generated batch's gradient matches the record's."""
        assert self.prior is not None  # checked in __init__
        from fl_sim.priors import load_prior_for  # lazy: diffusers

        prior = load_prior_for(self.prior, record.spec, attack="user_level_diffusion",
                               device=self.device)
        sampler = DDIMSampler.from_scheduler(prior.unet, prior.scheduler, self.sampler_steps)
        task = attack_task(record, device=self.device)
        params, buffers = split_state(task, record.global_params, device=self.device)
        target = {k: v.to(self.device) for k, v in mean_gradient_target(record, task).items()}
        label = self._label(record, target)
        spec = record.spec
        shape = (self.num_generated, spec.in_channels, spec.image_size, spec.image_size)
        z = torch.randn(shape, generator=generator).to(self.device).requires_grad_(True)
        y = torch.full((self.num_generated,), label, dtype=torch.int64, device=self.device)
        opt = torch.optim.Adam([z], lr=self.lr)
        start, history = time.perf_counter(), []
        for it in range(self.iterations):
            report_progress("iterations", it, self.iterations)
            for group in opt.param_groups:
                group["lr"] = self.lr * lr_multiplier("cosine", it, self.iterations)
            images = (sampler.sample(z, checkpoint=self.checkpoint) + 1) / 2
            grads = parameter_gradients(task, params, buffers, Batch(images.clamp(0, 1), y),
                                        create_graph=True)
            dist = cosine_distance({k: g.unsqueeze(0) for k, g in grads.items()}, target)[0]
            loss = dist + self.latent_weight * (z.pow(2).flatten(1).mean(1) - 1).pow(2).sum()
            history.append(float(dist.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            generated = sampler.images(z)
        rep = self._represent(generated)
        return Reconstruction(
            images=rep, labels=torch.tensor([label]),
            matching_loss=history[-1], iterations=self.iterations,
            knowledge={"labels": "given" if self.labels == "given" else "bias_sign",
                     "prior": str(self.prior),
                     "prior_data": {"data": prior.metadata.get("data"),
                                    "filter": prior.metadata.get("filter"),
                                    "num_examples": prior.metadata.get("num_examples")}},
            extras={"generated_images": generated.detach(), "label": label,
                    "representative": self.representative, "distance_history": history[::10],
                    "seconds": time.perf_counter() - start})

    def _represent(self, generated: Tensor) -> Tensor:
        """``[K, C, H, W] -> [1, C, H, W]``: the pixel mean, or the image nearest to it."""
        mean = generated.mean(0, keepdim=True)
        if self.representative == "mean":
            return mean
        k = int((generated - mean).pow(2).flatten(1).sum(1).argmin())
        return generated[k:k + 1]
