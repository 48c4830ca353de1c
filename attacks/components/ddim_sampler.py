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
functional ones), double backward included. ``"auto"`` (the attacks' default) measures once
per input shape the bytes one step saves for backward and recomputes as few steps as its
policy allows, :func:`auto_plan`: it keeps the last steps' activations up to HALF a one-step
footprint (the weights plus one step's activations) beyond the one step that is always held, and
recomputes the others; nothing when all K steps' activations together are under
:data:`AUTO_FLOOR_BYTES`; ``"full"`` when one step alone does not fit half the device's free
memory. :meth:`DDIMSampler.checkpoint_plan`; ``docs/how-to/memory.md`` has the figures.

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

__all__ = ["AUTO_BUDGET_BYTES", "AUTO_EXTRA_FRACTION", "AUTO_FLOOR_BYTES", "CHECKPOINT_MODES",
           "Checkpoint", "DDIMSampler", "auto_plan", "ddim_timesteps", "free_memory_bytes"]

logger = logging.getLogger(__name__)

#: a ``checkpoint`` option: a mode, or the older boolean (True = "sampler", False = "none")
Checkpoint = Literal["auto", "none", "sampler", "full", True, False]
#: the gradient-checkpointing modes of :meth:`DDIMSampler.sample` (and of the attacks using it)
CHECKPOINT_MODES: tuple[str, ...] = ("auto", "none", "sampler", "full")
#: ``"auto"`` keeps extra steps' activations up to this fraction of the one-step footprint
AUTO_EXTRA_FRACTION = 0.5
#: ``"auto"`` recomputes nothing when all K steps' activations together need at most this
AUTO_FLOOR_BYTES = 64 << 20
#: an absolute budget for ``"auto"``'s kept activations in place of the relative rule (None: off)
AUTO_BUDGET_BYTES: int | None = None

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


def auto_plan(num_steps: int, step_bytes: int, weight_bytes: int, *,
              free_bytes: int | None = None, budget_bytes: int | None = None,
              fraction: float | None = None, floor_bytes: int | None = None,
              blocks: bool = True) -> tuple[str, int]:
    """``"auto"``'s decision, ``(mode, m)``: recompute the first ``m`` of ``num_steps`` steps.

    ``step_bytes``: what one step saves for backward (:meth:`DDIMSampler.step_activation_bytes`);
    ``weight_bytes``: the UNet weights the steps run on; ``free_bytes``: the device's free memory
    (:func:`free_memory_bytes`; None: unknown); ``blocks``: the UNet supports ``"full"``.

    The rule (issue 24's target: peak memory at K = 10 within 1.5x of K = 1, time within 1.4x):

    1. All K steps' activations within ``floor_bytes`` (:data:`AUTO_FLOOR_BYTES`, 64 MiB):
       ``("none", 0)``: recomputing would cost time to save less than a CUDA context's size.
    2. Kept steps: one step is always held (the last, back-propagated first); beyond it, as many
       as ``fraction`` (:data:`AUTO_EXTRA_FRACTION`, 0.5) of the one-step footprint
       ``weight_bytes + step_bytes`` holds, so the kept activations add at most half what K = 1
       needs. With ``budget_bytes`` (:data:`AUTO_BUDGET_BYTES`) set, the kept steps' activations
       are bounded by it instead (the rule before 2026-12-07, for measurements).
    3. With ``free_bytes`` known, the kept activations also stay within half of it; when even
       one step does not fit half of it: ``("full", K - 1)`` (the UNet's blocks checkpointed
       too; ``"sampler"`` when the UNet cannot).
    4. The LAST steps are the ones kept: back-propagated first, their activations are freed
       before any recomputation, so the peak is ``max(kept, 1)`` steps; keeping earlier steps
       would hold them through every recomputation (``kept + 1``). Every step costs the same
       forward, so which steps are recomputed does not change the time, only how many.

    At K = 10 on the CIFAR-10 DDPM architecture (32 px, batch 1: 43 MiB a step, 143 MB of
    weights) it keeps 3 and recomputes 7 (measured: docs/how-to/memory.md); at K <= 3 nothing.

    >>> auto_plan(10, 43 << 20, 143 << 20)
    ('sampler', 7)
    >>> auto_plan(3, 43 << 20, 143 << 20)
    ('none', 0)
    """
    fraction = AUTO_EXTRA_FRACTION if fraction is None else fraction
    floor_bytes = AUTO_FLOOR_BYTES if floor_bytes is None else floor_bytes
    step = max(int(step_bytes), 1)
    if num_steps * step <= floor_bytes:
        return "none", 0
    if budget_bytes is not None:
        kept = int(budget_bytes) // step
    else:
        kept = 1 + int(fraction * (weight_bytes + step) // step)
    if free_bytes is not None:
        kept = min(kept, int(free_bytes) // 2 // step)
    if kept < 1:
        return ("full", num_steps - 1) if blocks else ("sampler", num_steps - 1)
    if kept >= num_steps:
        return "none", 0
    return "sampler", num_steps - kept


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: CUDA's ``mem_get_info``; on a CPU Linux's ``MemAvailable``
    (``/proc/meminfo``); None where neither is known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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
        probing UNet forward, :meth:`step_activation_bytes`) by :func:`auto_plan`, from that
        step's bytes, the bytes of the weights the steps run on and the device's free memory.
        Without autograd: ``("none", 0)``.
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
            weights = _weight_bytes(self.unet, params, buffers)
            free = free_memory_bytes(x_T.device)
            plan = auto_plan(k, per_step, weights, free_bytes=free,
                             budget_bytes=AUTO_BUDGET_BYTES,
                             blocks=_supports_block_checkpointing(self.unet))
            self._auto[key] = plan
            logger.info("checkpoint='auto': %d steps x %.1f MiB of activations per step at "
                        "input %s, weights %.0f MiB, free %s -> %r, %d steps recomputed", k,
                        per_step / 2**20, tuple(x_T.shape), weights / 2**20,
                        "unknown" if free is None else f"{free / 2**30:.1f} GiB", *plan)
        return self._auto[key]

    def step_activation_bytes(self, x_T: Tensor, params: Mapping[str, Tensor] | None = None,
                              buffers: Mapping[str, Tensor] | None = None, *,
                              meta: bool = True) -> int:
        """Bytes one step saves for backward at input ``x_T [B, C, H, W]`` (the first timestep).

        Runs one UNet forward under a hook that counts what autograd saves; weights, buffers
        and the input are not counted, storages shared by several saved tensors count once.
        ``meta`` (default): the forward runs on PyTorch's meta device (shapes only: no memory,
        no compute; a real probe costs one step's activations, and on a CPU glibc does not
        always hand them back: +50 MB of peak RSS at 32 px, measured). It counts what the
        meta kernels save: 1.01x what a CPU forward saves on the digits and CIFAR-10 DDPM
        UNets (measured; other devices' kernels may save a little more or less). Where the
        UNet cannot run on the meta device, or with ``meta=False``: one real forward (it holds
        one step's activations until it returns).
        """
        if meta:
            try:
                return self._saved_bytes(*self._on_meta(x_T, params, buffers))
            except (NotImplementedError, RuntimeError) as err:
                logger.debug("meta-device probe failed (%s): probing with a real forward", err)
        return self._saved_bytes(x_T.detach(), params, buffers)

    def _on_meta(self, x_T: Tensor, params: Mapping[str, Tensor] | None,
                 buffers: Mapping[str, Tensor] | None
                 ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """``x_T``, the weights (module's, overridden by ``params``/``buffers``) as meta tensors."""
        def meta(v: Tensor) -> Tensor:
            return torch.empty_like(v, device="meta").requires_grad_(v.requires_grad)
        weights = {**dict(self.unet.named_parameters()), **dict(params or {})}
        state = {**dict(self.unet.named_buffers()), **dict(buffers or {})}
        return (torch.empty_like(x_T, device="meta"), {k: meta(v) for k, v in weights.items()},
                {k: meta(v) for k, v in state.items()})

    def _saved_bytes(self, x: Tensor, params: Mapping[str, Tensor] | None,
                     buffers: Mapping[str, Tensor] | None) -> int:
        """Bytes autograd saves in one step from ``x`` (see :meth:`step_activation_bytes`)."""
        known = {v.untyped_storage()._cdata for v in  # noqa: SLF001  (storage identity)
                 [*self.unet.parameters(), *self.unet.buffers(),
                  *(params or {}).values(), *(buffers or {}).values()]}
        kept: list[Tensor] = []
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            storage = t.untyped_storage()
            if storage._cdata not in known:  # noqa: SLF001
                known.add(storage._cdata)  # noqa: SLF001
                total += storage.nbytes()
            kept.append(t)  # alive while counting: a freed storage's address can be reused
            return t

        x = x.requires_grad_(True)
        known.add(x.untyped_storage()._cdata)  # noqa: SLF001
        sampler = self
        if x.device.type == "meta":
            sampler = DDIMSampler(unet=self.unet, alphas_cumprod=self.alphas_cumprod.to("meta"),
                                  timesteps=self.timesteps,
                                  final_alpha_cumprod=self.final_alpha_cumprod,
                                  clip_sample=self.clip_sample, clip_range=self.clip_range,
                                  prediction_type=self.prediction_type)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _same):
            sampler.step(x, int(self.timesteps[0]), params, buffers)
        return total

    def images(self, x_T: Tensor, **kwargs: Any) -> Tensor:
        """:meth:`sample` mapped to pixels ``[B, C, H, W]`` in [0, 1] (``(x + 1) / 2``, clamped)."""
        return ((self.sample(x_T, **kwargs) + 1) / 2).clamp(0, 1)


def _weight_bytes(unet: nn.Module, params: Mapping[str, Tensor] | None,
                  buffers: Mapping[str, Tensor] | None) -> int:
    """Bytes of the distinct storages of the UNet's weights and the functional ones given."""
    storages = {int(v.untyped_storage().data_ptr()): v.untyped_storage().nbytes() for v in
                [*unet.parameters(), *unet.buffers(), *(params or {}).values(),
                 *(buffers or {}).values()]}
    return sum(storages.values())


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
