"""DP-SGD: per-example clipping and Gaussian noise in every local step.

Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016), Algorithm 1: each step
computes every example's gradient g_i, clips it to L2 norm C (``max_grad_norm``; the norm is
taken over ALL parameters together, "flat" clipping as in Opacus' default), sums, adds
N(0, σ²C²·I) (σ = ``noise_multiplier``) and divides by the batch size B:

    g̃ = (Σ_i g_i · min(1, C / ||g_i||) + N(0, σ²C²)) / B

fl-sim's local training (:func:`fl_sim.federation.local.local_train`) uses g̃ as each step's
gradient before the optimiser step; FedSGD (:func:`~fl_sim.federation.local.one_gradient`)
sends g̃ itself. Per-example gradients come from ``torch.func`` (``vmap(grad_and_value)`` over
the task's functional loss, the step's ``aux`` — diffusion's eps/t — sliced per example),
the same gradients Opacus' functorch mode computes; the noise comes from a seeded generator
(``(seed, "round", r, "client", c, "dp")``) so runs are reproducible.

Accounting (:mod:`defenses.accounting`, Opacus' RDP or PRV accountant): sample rate
q = batch_size / partition size and one accountant step per local step. fl-sim draws batches
by shuffling (fixed-size batches without replacement), not by Poisson sampling as the
accountants assume — the standard approximation (Opacus' examples make it too). Deviation from
the paper: Abadi et al. use "lots" sampled with probability q; here a lot is the batch.

**Unit of privacy and neighbouring relation: one example, add-or-remove-one.** Opacus'
convention and Abadi et al.'s: two datasets are neighbours when one has one example more
(of this client's partition). The clipped per-example gradients are summed before the noise,
so adding or removing one example moves the sum by at most C — sensitivity C, and the
accountant gets σ itself (:func:`defenses.accounting.effective_noise_multiplier` with
``"add-or-remove-one"`` is the identity); the Poisson-sampled Gaussian mechanism the
accountants analyse is defined for this relation. (Replace-one would double the sensitivity
to 2C; it is the relation that fits fixed-size batches exactly — fl-sim's shuffled batches
are accounted as Poisson batches, the approximation above.) The guarantee is per EXAMPLE: it
says nothing about a client's data as a whole beyond group privacy. Results write
``dp_unit = "example"``, ``dp_neighbouring = "add-or-remove-one"`` beside ε.

Models with BatchNorm cannot be trained with per-example DP (the batch statistics mix the
examples, so one example's influence is not its own gradient): :meth:`DPSGD.problem` rejects
them before training, as Opacus' ``ModuleValidator`` does. Use a model without BatchNorm
(``mlp``, ``lenet``; the diffusion ``unet`` uses GroupNorm, which is per-example).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from defenses.accounting import (
    ADD_OR_REMOVE_ONE,
    DEFAULT_DELTA,
    EXAMPLE,
    effective_noise_multiplier,
    epsilon,
)
from defenses.base import Defense
from fl_sim.registry import DEFENSES
from fl_sim.tasks.base import Batch, module_tensors


def per_sample_gradients(task: Any, batch: Batch, aux: Mapping[str, Tensor]
                         ) -> tuple[dict[str, Tensor], Tensor]:
    """``({name: [B, *param.shape]}, losses [B])``: each example's gradient of the task's
    loss on that example alone, at the model's current parameters and buffers.

    ``aux`` tensors have the batch as first dimension and are sliced per example.
    """
    params, buffers = module_tensors(task.model)
    params = {k: v.detach() for k, v in params.items()}
    buffers = {k: v.detach() for k, v in buffers.items()}

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor, a: dict[str, Tensor]) -> Tensor:
        return task.loss(p, buffers, Batch(x.unsqueeze(0), y.unsqueeze(0)),
                         {k: v.unsqueeze(0) for k, v in a.items()})

    fn = vmap(grad_and_value(one), in_dims=(None, 0, 0, 0), randomness="different")
    grads, losses = fn(params, batch.images, batch.labels, dict(aux))
    return {k: g.detach() for k, g in grads.items()}, losses.detach()


def clip_per_sample(grads: Mapping[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """Scale each example's gradient (first dim) to L2 norm at most ``max_norm``, the norm
    taken over all tensors of the example together. Returns tensors of the same shapes.

    >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
    >>> clip_per_sample(g, 1.0)["w"].tolist()
    [[0.6000000238418579, 0.800000011920929], [0.30000001192092896, 0.4000000059604645]]
    """
    norms = per_sample_norms(grads)
    scale = (max_norm / (norms + 1e-12)).clamp(max=1.0)
    return {k: g * scale.view(-1, *([1] * (g.dim() - 1))) for k, g in grads.items()}


def per_sample_norms(grads: Mapping[str, Tensor]) -> Tensor:
    """[B] L2 norm of each example's gradient over all tensors."""
    sq = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values())
    return torch.as_tensor(sq).sqrt()


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` contains a BatchNorm layer (cross-example statistics)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@DEFENSES.register("dp_sgd")
@dataclass(frozen=True)
class DPSGD(Defense):
    """DP-SGD (Abadi et al. 2016): clip each example's gradient, add Gaussian noise."""

    stage: ClassVar[str] = "train"
    reports_epsilon: ClassVar[bool] = True
    #: unit of privacy and neighbouring relation (module doc): sensitivity C
    privacy_unit: ClassVar[str] = EXAMPLE
    neighbouring: ClassVar[str] = ADD_OR_REMOVE_ONE

    #: σ: noise std relative to the clip bound (0: clipping only, ε = inf)
    noise_multiplier: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1.0
    #: C: per-example L2 clip bound over all parameters
    max_grad_norm: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0
    #: δ at which ε is reported
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] = DEFAULT_DELTA
    #: Opacus accountant: "rdp" (Rényi DP) or "prv" (privacy random variables, tighter)
    accountant: Literal["rdp", "prv"] = "rdp"

    def problem(self, cfg: Any) -> str | None:
        model = _probe_model(cfg)
        if model is not None and has_batchnorm(model):
            return (f"model {cfg.model.name!r} has BatchNorm, which mixes the examples of a "
                    "batch: per-example DP-SGD cannot bound one example's influence (Opacus "
                    "rejects it too); use a model without BatchNorm (mlp, lenet)")
        return None

    def private_gradient(self, task: Any, batch: Batch, aux: Mapping[str, Tensor],
                         generator: torch.Generator) -> tuple[float, dict[str, Tensor]]:
        """``(mean loss, g̃)`` for one step: g̃ per parameter name (module doc's formula),
        noise drawn on the CPU from ``generator`` (so a run is the same on every device)."""
        grads, losses = per_sample_gradients(task, batch, aux)
        clipped = clip_per_sample(grads, self.max_grad_norm)
        b = int(batch.images.shape[0])
        out = {}
        for k, g in clipped.items():
            total = g.sum(0)
            if self.noise_multiplier > 0:
                noise = torch.randn(tuple(total.shape), generator=generator,
                                    dtype=total.dtype)
                total = total + (self.noise_multiplier * self.max_grad_norm) * noise.to(
                    total.device)
            out[k] = total / b
        return float(losses.mean()), out

    def round_epsilon(self, *, batch_size: int, partition_size: int, steps: int,
                      rounds: int = 1) -> float:
        """ε at ``delta`` of ``rounds`` client-rounds of ``steps`` DP-SGD steps each, with
        q = min(batch_size, partition_size) / partition_size (module doc)."""
        q = min(batch_size, partition_size) / partition_size
        sigma = effective_noise_multiplier(self.noise_multiplier, self.neighbouring)
        return epsilon(sigma, q, steps * rounds, self.delta, self.accountant)


def _probe_model(cfg: Any) -> nn.Module | None:
    """The configured architecture built with stand-in data dims (only its layer types are
    looked at), or None where it cannot be built so (the model check reports that)."""
    from fl_sim.models import build_model
    try:
        return build_model(cfg.model.name, 3, 10, int(getattr(cfg.data, "image_size", 0) or 32),
                           seed=0, params=dict(getattr(cfg.model, "params", None) or {}))
    except Exception:  # noqa: BLE001 - the model's own check reports it with its message
        return None
