"""DDPM training objective (Ho et al., "Denoising Diffusion Probabilistic Models", 2020).

Images enter in [0, 1] and are mapped to the model space [-1, 1] by ``x * 2 - 1`` (the
dataset mean/std handed to the task are kept for reference but not used: DDPM's data range is
fixed). Per example, noise ``eps ~ N(0, I)`` and a timestep ``t ~ U{0, ..., T-1}`` are drawn by
:meth:`DiffusionTask.sample_aux` from an explicit generator; they are the step's private
randomness (GIDM vs GIDM+ differ in whether the attacker knows them). The loss is
``mean((target - model(x_t, t))**2)`` with ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``
and target ``eps`` (or ``x0`` / ``v`` for the other prediction types).

diffusers is imported lazily (at construction), so importing this module is cheap.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fl_sim.registry import TASKS
from fl_sim.tasks.base import (
    Batch,
    NormalizationLike,
    Params,
    StepResult,
    mean_std,
    module_tensors,
    sgd_train_step,
)

PredictionType = Literal["epsilon", "sample", "v_prediction"]


@TASKS.register("diffusion")
class DiffusionTask:
    """DDPM denoising loss around an unconditional ``UNet2DModel``-like noise predictor.

    ``model(sample [B, C, H, W], timestep [B], return_dict=False)[0]`` -> [B, C, H, W]
    (diffusers convention). ``scheduler_config``: a diffusers DDPM/DDIM scheduler config
    (``beta_start``, ``beta_end``, ``trained_betas``, ``clip_sample``, ...), set from a
    ``model.pretrained`` checkpoint (:mod:`fl_sim.diffusers_dirs`) so that its schedule is
    used, not DDPM's defaults. Raises ``ValueError`` for ``num_train_timesteps < 1``.
    """

    name = "diffusion"

    def __init__(self, model: nn.Module,
                 normalization: NormalizationLike | tuple[tuple[float, ...], tuple[float, ...]],
                 *, num_train_timesteps: int = 1000,
                 beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear",
                 prediction_type: PredictionType = "epsilon",
                 scheduler_config: dict[str, Any] | None = None) -> None:
        from diffusers import DDPMScheduler  # lazy: keeps diffusers out of this module's import

        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        self.model = model
        self.mean, self.std = mean_std(normalization)  # recorded only; see module docstring
        self.num_train_timesteps = int(num_train_timesteps)
        self.prediction_type: PredictionType = prediction_type
        # a checkpoint's whole scheduler config (betas, trained_betas, clipping, spacing),
        # filled from ``model.pretrained``; the three named params above take precedence
        extra = {k: v for k, v in (scheduler_config or {}).items() if not k.startswith("_")}
        extra.update(num_train_timesteps=self.num_train_timesteps,
                     beta_schedule=beta_schedule, prediction_type=prediction_type)
        self.scheduler = DDPMScheduler.from_config(extra)
        self.alphas_cumprod: Tensor = self.scheduler.alphas_cumprod.to(torch.float32).clone()

    # -- maths -----------------------------------------------------------------------------
    @staticmethod
    def to_model_space(images: Tensor) -> Tensor:
        """[0, 1] -> [-1, 1] (``x * 2 - 1``); differentiable."""
        return images * 2 - 1

    @staticmethod
    def to_pixel_space(x: Tensor) -> Tensor:
        """[-1, 1] -> [0, 1], clamped."""
        return ((x + 1) / 2).clamp(0, 1)

    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        abar = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.long()]
        return abar.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; x0, eps [B, C, H, W], t [B]."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Regression target of the prediction type: eps, x0, or v = sqrt(abar) eps - ..."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        abar = self._abar(t, x0)
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0

    def predict(self, params: Params, buffers: Params, x_t: Tensor, t: Tensor) -> Tensor:
        """Model output [B, C, H, W] at ``(params, buffers)`` for noisy ``x_t`` and ``t`` [B]."""
        out = functional_call(self.model, (dict(params), dict(buffers)), (x_t, t),
                              {"return_dict": False})
        return out[0] if isinstance(out, (tuple, list)) else out

    # -- task protocol ---------------------------------------------------------------------
    def sample_aux(self, batch: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        """``{"eps": [B, C, H, W] float32, "t": [B] int64}`` drawn from ``generator``.

        Drawn on the generator's device, then moved to the images' device.
        """
        images = batch.images
        gdev = generator.device
        eps = torch.randn(tuple(images.shape), generator=generator, device=gdev,
                          dtype=torch.float32)
        t = torch.randint(0, self.num_train_timesteps, (images.shape[0],), generator=generator,
                          device=gdev, dtype=torch.int64)
        return {"eps": eps.to(images.device), "t": t.to(images.device)}

    def loss(self, params: Params, buffers: Params, batch: Batch,
             aux: Mapping[str, Tensor]) -> Tensor:
        """Scalar ``mean((target - model(x_t, t))**2)``; needs ``aux["eps"]``, ``aux["t"]``.

        Differentiable in the params, the images and ``aux["eps"]``. Raises ``KeyError`` if
        ``aux`` lacks ``eps`` or ``t``.
        """
        try:
            eps, t = aux["eps"], aux["t"]
        except KeyError as exc:
            raise KeyError(f"diffusion loss needs aux 'eps' and 't', missing {exc}") from None
        x0 = self.to_model_space(batch.images)
        pred = self.predict(params, buffers, self.add_noise(x0, eps, t), t)
        return F.mse_loss(pred, self.target(x0, eps, t))

    def train_step(self, optimizer: torch.optim.Optimizer, batch: Batch,
                   generator: torch.Generator) -> StepResult:
        """One optimiser step on ``self.model`` (train mode); returns the eps/t it drew."""
        return sgd_train_step(self, optimizer, batch, generator)

    @torch.no_grad()
    def evaluate(self, images: Tensor, labels: Tensor | None = None, *, batch_size: int = 256,
                 generator: torch.Generator | None = None) -> dict[str, float]:
        """Held-out ``{"loss"}`` over ``images`` [N, C, H, W] in [0, 1] (labels unused).

        Without a ``generator`` a fixed one (seed 0) is used, so repeated evaluations of the
        same model agree. Raises ``ValueError`` if ``images`` is empty.
        """
        n = int(images.shape[0])
        if n == 0:
            raise ValueError("evaluate() needs at least one example")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        params, buffers = module_tensors(self.model)
        total = 0.0
        try:
            for start in range(0, n, batch_size):
                x = images[start:start + batch_size].to(device)
                batch = Batch(x, torch.zeros(x.shape[0], dtype=torch.int64, device=device))
                loss = self.loss(params, buffers, batch, self.sample_aux(batch, generator))
                total += float(loss) * x.shape[0]
        finally:
            self.model.train(was_training)
        return {"loss": total / n}

    @torch.no_grad()
    def sample(self, num_images: int, generator: torch.Generator, *,
               num_inference_steps: int = 50, scheduler: Literal["ddim", "ddpm"] = "ddim",
               eta: float = 0.0) -> Tensor:
        """Generate ``num_images`` images [N, C, H, W] in [0, 1] (Song et al. DDIM or DDPM).

        Raises ``ValueError`` for ``num_images < 1``, ``num_inference_steps`` outside
        [1, num_train_timesteps] or an unknown ``scheduler``.
        """
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}], "
                             f"got {num_inference_steps}")
        sched = self._sampling_scheduler(scheduler)
        step_kwargs: dict[str, Any] = {"generator": generator}
        if scheduler == "ddim":
            step_kwargs["eta"] = eta
        cfg = self.model.config  # diffusers models carry sample_size / in_channels
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        device = next(self.model.parameters()).device
        x = torch.randn((num_images, cfg.in_channels, size, size), generator=generator,
                        device=generator.device).to(device)
        was_training = self.model.training
        self.model.eval()
        try:
            sched.set_timesteps(num_inference_steps, device=device)
            for t in sched.timesteps:
                tt = t.expand(num_images).to(device)
                out = self.model(x, tt, return_dict=False)[0]
                x = sched.step(out, t, x, return_dict=False, **step_kwargs)[0]
        finally:
            self.model.train(was_training)
        return self.to_pixel_space(x)

    def _sampling_scheduler(self, kind: str) -> Any:
        from diffusers import DDIMScheduler  # lazy: keeps diffusers out of this module's import

        if kind == "ddim":
            return DDIMScheduler.from_config(self.scheduler.config)
        if kind == "ddpm":
            return copy.deepcopy(self.scheduler)
        raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {kind!r}")
