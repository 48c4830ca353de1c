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
per-image copy of the weights can be optimised (GIAS-style attacks).

Memory (gradient checkpointing, ``checkpoint=``, :data:`CHECKPOINT_MODES`): back-propagating
through K steps keeps K UNet calls' activations alive. ``"sampler"`` wraps every step in
:func:`torch.utils.checkpoint.checkpoint` (non-reentrant): activations of one UNet call instead of
K, at the price of one more UNet forward per step in backward (all steps but the last, which is
back-propagated first and would save nothing). ``"full"`` also checkpoints the
UNet's blocks (diffusers' ``enable_gradient_checkpointing``, only for the duration of the call),
for when one UNet call alone is too large; it costs another forward. diffusers' own block
checkpointing recomputes with the module's *registered* weights, so under
:func:`~torch.func.functional_call` its gradients are silently wrong (measured: max abs error
0.91 in d/dx on a small UNet); ours recomputes each block with the weights it ran on (the
functional ones), double backward included. ``"auto"`` measures once per input shape the bytes
one step saves for backward and recomputes only as many steps as needed to keep the others'
activations within :data:`AUTO_BUDGET_BYTES` (none when all K fit; ``"full"`` when one step
alone does not): :meth:`DDIMSampler.checkpoint_plan`. ``docs/how-to/memory.md`` has the
figures.

Prior-based attacks (``gidm``, ``gidm_plus``, later the generative-prior attacks) share this
module. It imports nothing from diffusers: any ``UNet2DModel``-like module with the call
``unet(sample [B, C, H, W], timestep [B], return_dict=False)[0]`` works.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint as torch_checkpoint

__all__ = ["AUTO_BUDGET_BYTES", "CHECKPOINT_MODES", "Checkpoint", "DDIMSampler", "ddim_timesteps"]

logger = logging.getLogger(__name__)

#: a ``checkpoint`` option: a mode, or the older boolean (True = "sampler", False = "none")
Checkpoint = Literal["auto", "none", "sampler", "full", True, False]
#: the gradient-checkpointing modes of :meth:`DDIMSampler.sample` (and of the attacks using it)
CHECKPOINT_MODES: tuple[str, ...] = ("auto", "none", "sampler", "full")
#: ``"auto"`` keeps the K steps' saved activations when they need at most this many bytes
AUTO_BUDGET_BYTES = 1 << 30

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
    #: ``"auto"``'s decision per input (shape, dtype, device, functional or not)
    _auto: dict[tuple[Any, ...], tuple[str, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

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
             buffers: Mapping[str, Tensor] | None = None, blocks: bool = False) -> Tensor:
        """One DDIM update ``x_t [B, C, H, W] -> x_prev`` at integer timestep ``t``.

        ``blocks``: checkpoint the UNet's blocks during this call (``"full"`` mode)."""
        abar = self.alphas_cumprod.to(x.device)
        a_t = abar[t]
        a_prev = self._abar_prev(t)
        a_prev = a_prev.to(x.device) if isinstance(a_prev, Tensor) else x.new_tensor(a_prev)
        tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        if blocks:
            with _block_checkpointing(self.unet):
                out = self._model(params, buffers, x, tt)
        else:
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
               buffers: Mapping[str, Tensor] | None = None,
               checkpoint: Checkpoint = "none") -> Tensor:
        """Run the K steps from ``x_T [B, C, H, W]``; returns ``x_0`` in model space [-1, 1].

        ``params``/``buffers``: run the UNet functionally on these tensors (name -> tensor, as
        ``named_parameters``/``named_buffers``; missing names fall back to the module's own),
        so the result is differentiable in them; ``None`` uses the module's own weights.
        ``checkpoint``: one of :data:`CHECKPOINT_MODES` (``True``/``False`` mean ``"sampler"`` /
        ``"none"``): recompute activations in backward (same values and gradients, less
        memory; see the module docstring). Ignored without autograd. The output is not clamped
        (see :meth:`images`). Raises ``ValueError`` for an unknown mode, or ``"full"`` on a UNet
        without diffusers' gradient checkpointing.
        """
        mode, recomputed = self.checkpoint_plan(checkpoint, x_T, params, buffers)
        blocks = mode == "full"
        x = x_T
        for i, t in enumerate(self.timesteps):
            if i < recomputed:
                x = torch_checkpoint(self.step, x, int(t), params, buffers, blocks,
                                     use_reentrant=False)
            else:
                x = self.step(x, int(t), params, buffers, blocks)
        return x

    def resolve_checkpoint(self, checkpoint: Checkpoint, x_T: Tensor,
                           params: Mapping[str, Tensor] | None = None,
                           buffers: Mapping[str, Tensor] | None = None) -> str:
        """The mode :meth:`sample` runs: ``"none"``, ``"sampler"`` or ``"full"``."""
        return self.checkpoint_plan(checkpoint, x_T, params, buffers)[0]

    def checkpoint_plan(self, checkpoint: Checkpoint, x_T: Tensor,
                        params: Mapping[str, Tensor] | None = None,
                        buffers: Mapping[str, Tensor] | None = None) -> tuple[str, int]:
        """``(mode, m)``: :meth:`sample` recomputes the first ``m`` of its K steps in backward.

        ``"sampler"`` / ``"full"``: ``m = K - 1`` (the last step is back-propagated first,
        while its activations are the only ones alive: recomputing it would cost a forward
        and save no peak memory). ``"auto"`` decides once per input shape/dtype/device (one
        probing UNet forward, :meth:`step_activation_bytes`): it keeps as many of the last
        steps' activations as :data:`AUTO_BUDGET_BYTES` holds (at least one) and recomputes
        the others, the fewest recomputations within the budget; ``"full"`` when one step
        alone exceeds the budget. Without autograd: ``("none", 0)``.
        """
        mode = {True: "sampler", False: "none"}.get(checkpoint, checkpoint)  # type: ignore[call-overload]
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"unknown checkpoint mode {checkpoint!r}; allowed: "
                             f"{', '.join(CHECKPOINT_MODES)}")
        if mode == "full" and not _supports_block_checkpointing(self.unet):
            raise ValueError(f"checkpoint='full' needs a diffusers model with gradient "
                             f"checkpointing; {type(self.unet).__name__} has none")
        k = len(self.timesteps)
        if not torch.is_grad_enabled() or mode == "none":
            return "none", 0
        if mode != "auto":
            return mode, k - 1
        key = (tuple(x_T.shape), x_T.dtype, x_T.device, params is None)
        if key not in self._auto:
            per_step = self.step_activation_bytes(x_T, params, buffers)
            kept = min(k, AUTO_BUDGET_BYTES // max(per_step, 1))
            if kept >= k:
                plan = ("none", 0)
            elif kept >= 1 or not _supports_block_checkpointing(self.unet):
                plan = ("sampler", k - max(kept, 1))
            else:
                plan = ("full", k - 1)
            self._auto[key] = plan
            logger.info("checkpoint='auto': %d steps x %.1f MiB of activations per step at "
                        "input %s, budget %.0f MiB -> %r, %d steps recomputed", k,
                        per_step / 2**20, tuple(x_T.shape), AUTO_BUDGET_BYTES / 2**20, *plan)
        return self._auto[key]

    def step_activation_bytes(self, x_T: Tensor, params: Mapping[str, Tensor] | None = None,
                              buffers: Mapping[str, Tensor] | None = None) -> int:
        """Bytes one step saves for backward at input ``x_T [B, C, H, W]`` (the first timestep).

        Runs one UNet forward under a hook that counts what autograd saves (the probe holds one
        step's activations until it returns); weights, buffers and the input are not counted,
        storages shared by several saved tensors count once.
        """
        known = {int(v.untyped_storage().data_ptr()) for v in
                 [*self.unet.parameters(), *self.unet.buffers(),
                  *(params or {}).values(), *(buffers or {}).values()]}
        seen: set[int] = set()
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            storage = t.untyped_storage()
            ptr = int(storage.data_ptr())
            if ptr not in known and ptr not in seen:
                seen.add(ptr)
                total += storage.nbytes()
            return t  # kept alive while counting: a freed storage's address can be reused

        x = x_T.detach().requires_grad_(True)
        known.add(int(x.untyped_storage().data_ptr()))
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _same):
            self.step(x, int(self.timesteps[0]), params, buffers)
        return total

    def images(self, x_T: Tensor, **kwargs: Any) -> Tensor:
        """:meth:`sample` mapped to pixels ``[B, C, H, W]`` in [0, 1] (``(x + 1) / 2``, clamped)."""
        return ((self.sample(x_T, **kwargs) + 1) / 2).clamp(0, 1)


def _same(t: Tensor) -> Tensor:
    return t


def _supports_block_checkpointing(unet: nn.Module) -> bool:
    return bool(getattr(unet, "_supports_gradient_checkpointing", False)) and hasattr(
        unet, "enable_gradient_checkpointing")


def _checkpoint_block(block: nn.Module, *args: Any) -> Any:
    """diffusers' per-block checkpoint function, recomputing with the weights the block RAN on.

    Inside :func:`~torch.func.functional_call` the block's parameters are the functional
    tensors; they are captured here, so the recomputation in backward (after the functional
    call has restored the module's own weights) uses them again.
    """
    state = {**dict(block.named_parameters()), **dict(block.named_buffers())}

    def run(*inputs: Any) -> Any:
        return functional_call(block, state, inputs, strict=False)
    return torch_checkpoint(run, *args, use_reentrant=False)


@contextmanager
def _block_checkpointing(unet: nn.Module) -> Iterator[None]:
    """Checkpoint the UNet's blocks for the duration of one call (never left switched on)."""
    unet.enable_gradient_checkpointing(_checkpoint_block)  # type: ignore[operator]
    try:
        yield
    finally:
        unet.disable_gradient_checkpointing()  # type: ignore[operator]
