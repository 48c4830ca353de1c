"""A differentiable DDIM sampler: latent ``x_T`` -> image in K deterministic steps.

Song, Meng, Ermon, "Denoising Diffusion Implicit Models", ICLR 2021, with ``eta = 0``: from
``x_t`` the noise predictor gives ``eps_hat = unet(x_t, t)``, then

    x0_hat   = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
    x_prev   = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat,

for the K timesteps of diffusers' ``DDIMScheduler.set_timesteps`` (same spacing, same
``final_alpha_cumprod``, same optional clipping of ``x0_hat``), so its output equals diffusers'
sampling loop to float tolerance (``tests/unit/test_ddim_sampler.py``). Unlike diffusers' loop it
is an ordinary differentiable function: gradients flow to ``x_T`` and, when the UNet runs on
functional parameters (:func:`torch.func.functional_call`), to those parameters too, so a
per-image copy of the weights can be optimised (GIAS-style attacks). ``checkpoint=True`` wraps
every step in :func:`torch.utils.checkpoint.checkpoint` (non-reentrant): activation memory is
bounded by one UNet call instead of K, at the price of one more forward per step in backward.

Prior-based attacks (``gidm``, ``gidm_plus``, later the generative-prior attacks) share this
module. It imports nothing from diffusers: any ``UNet2DModel``-like module with the call
``unet(sample [B, C, H, W], timestep [B], return_dict=False)[0]`` works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint as torch_checkpoint

__all__ = ["DDIMSampler", "ddim_timesteps"]

_SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(num_train_timesteps: int, num_steps: int, *, spacing: str = "leading",
                   steps_offset: int = 0) -> list[int]:
    """The K sampling timesteps, high to low, exactly as ``DDIMScheduler.set_timesteps``.

    >>> ddim_timesteps(1000, 4)
    [750, 500, 250, 0]

    Raises ``ValueError`` for ``num_steps`` outside [1, num_train_timesteps] or an unknown
    ``spacing`` (allowed: leading, trailing, linspace).
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        return [k * ratio + steps_offset for k in reversed(range(num_steps))]
    if spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        out, t = [], float(num_train_timesteps)
        while t > 0 and len(out) < num_steps:
            out.append(int(round(t)) - 1)
            t -= ratio
        return out
    if spacing == "linspace":
        if num_steps == 1:
            return [0]
        step = (num_train_timesteps - 1) / (num_steps - 1)
        return [int(round(k * step)) for k in reversed(range(num_steps))]
    raise ValueError(f"unknown timestep spacing {spacing!r}; allowed: {', '.join(_SPACINGS)}")


@dataclass
class DDIMSampler:
    """Deterministic DDIM (eta = 0) over a UNet, differentiable end to end.

    ``alphas_cumprod``: ``[T]`` (the training schedule, e.g. ``DiffusionTask.alphas_cumprod``
    or ``Prior.alphas_cumprod``); ``timesteps``: the K sampling timesteps, high to low
    (:func:`ddim_timesteps`); ``final_alpha_cumprod``: ``abar`` after the last step (1.0 with
    diffusers' ``set_alpha_to_one``); ``clip_sample``: clamp ``x0_hat`` to
    ``[-clip_range, clip_range]`` at each step as diffusers does (the clamp has zero gradient
    where it binds); ``prediction_type``: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
    The step between consecutive timesteps follows diffusers: ``prev = t - T // K``.
    """

    unet: nn.Module
    alphas_cumprod: Tensor
    timesteps: Sequence[int]
    final_alpha_cumprod: float = 1.0
    clip_sample: bool = False
    clip_range: float = 1.0
    prediction_type: str = "epsilon"

    @classmethod
    def from_scheduler(cls, unet: nn.Module, scheduler: Any, num_steps: int) -> DDIMSampler:
        """The sampler diffusers' ``DDIMScheduler.from_config(scheduler.config)`` would run.

        ``scheduler``: any diffusers scheduler (DDPM or DDIM) or its ``config`` mapping.
        Raises ``ValueError`` for a bad ``num_steps`` or spacing.
        """
        from diffusers import DDIMScheduler

        cfg = getattr(scheduler, "config", scheduler)
        ddim = DDIMScheduler.from_config(cfg)
        c = ddim.config
        steps = ddim_timesteps(c.num_train_timesteps, num_steps, spacing=c.timestep_spacing,
                               steps_offset=c.steps_offset)
        return cls(unet=unet, alphas_cumprod=ddim.alphas_cumprod.to(torch.float32).clone(),
                   timesteps=steps, final_alpha_cumprod=float(ddim.final_alpha_cumprod),
                   clip_sample=bool(c.clip_sample) and not c.thresholding,
                   clip_range=float(c.clip_sample_range), prediction_type=c.prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def _abar_prev(self, t: int) -> float | Tensor:
        prev = t - self.num_train_timesteps // len(self.timesteps)
        return self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod

    def _model(self, params: Mapping[str, Tensor] | None,
               buffers: Mapping[str, Tensor] | None, x: Tensor, t: Tensor) -> Tensor:
        if params is None:
            out = self.unet(x, t, return_dict=False)
        else:
            out = functional_call(self.unet, (dict(params), dict(buffers or {})), (x, t),
                                  {"return_dict": False}, strict=False)
        return out[0] if isinstance(out, (tuple, list)) else out

    def step(self, x: Tensor, t: int, params: Mapping[str, Tensor] | None = None,
             buffers: Mapping[str, Tensor] | None = None) -> Tensor:
        """One DDIM update ``x_t [B, C, H, W] -> x_prev`` at integer timestep ``t``."""
        abar = self.alphas_cumprod.to(x.device)
        a_t = abar[t]
        a_prev = self._abar_prev(t)
        a_prev = a_prev.to(x.device) if isinstance(a_prev, Tensor) else x.new_tensor(a_prev)
        tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        out = self._model(params, buffers, x, tt)
        if self.prediction_type == "epsilon":
            x0, eps = (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
        elif self.prediction_type == "sample":
            x0 = out
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        elif self.prediction_type == "v_prediction":
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
        else:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; allowed: "
                             "epsilon, sample, v_prediction")
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    def sample(self, x_T: Tensor, *, params: Mapping[str, Tensor] | None = None,
               buffers: Mapping[str, Tensor] | None = None, checkpoint: bool = False) -> Tensor:
        """Run the K steps from ``x_T [B, C, H, W]``; returns ``x_0`` in model space [-1, 1].

        ``params``/``buffers``: run the UNet functionally on these tensors (name -> tensor, as
        ``named_parameters``/``named_buffers``; missing names fall back to the module's own),
        so the result is differentiable in them; ``None`` uses the module's own weights.
        ``checkpoint``: recompute each step's activations in backward (same values and
        gradients, memory of one step). The output is not clamped (see :meth:`images`).
        """
        x = x_T
        for t in self.timesteps:
            if checkpoint and torch.is_grad_enabled():
                x = torch_checkpoint(self.step, x, int(t), params, buffers,
                                     use_reentrant=False)
            else:
                x = self.step(x, int(t), params, buffers)
        return x

    def images(self, x_T: Tensor, **kwargs: Any) -> Tensor:
        """:meth:`sample` mapped to pixels ``[B, C, H, W]`` in [0, 1] (``(x + 1) / 2``, clamped)."""
        return ((self.sample(x_T, **kwargs) + 1) / 2).clamp(0, 1)
