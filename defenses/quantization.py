"""Update quantisation: k-bit unbiased stochastic quantisation, or signSGD.

``mode = "stochastic"`` — QSGD-style (Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD:
Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017): per
tensor, ``2**bits`` levels spaced uniformly over ``[−s, s]`` with ``s = max|x|`` (both ends
are levels, so the extreme coordinate is exact), and each coordinate rounded to one of its
two neighbouring levels at random with the probability that makes it UNBIASED
(``E[q(x)] = x``; the error is at most one level step ``Δ = 2s / (2**bits − 1)``, its
variance ``(x − lo)(hi − x) ≤ Δ²/4``). Randomness comes from the defense's seeded generator.
Deviation from QSGD: QSGD scales by the tensor's L2 norm and quantises ``|x|`` with a sign
bit; the max-abs scale used here keeps every level inside the tensor's range and makes the
``2**bits`` levels one ``bits``-bit code. With an even number of levels 0 is not a level:
zeros become ``±Δ/2`` at random (still unbiased).

``mode = "sign"`` — signSGD (Bernstein, Wang, Azizzadenesheli, Anandkumar, "signSGD:
Compressed Optimisation for Non-Convex Problems", ICML 2018): each coordinate is sent as its
sign, scaled per tensor by the mean absolute value, ``q(x) = (||x||_1 / d) · sign(x)`` (the
scaled sign of Karimireddy et al., "Error Feedback Fixes SignSGD...", ICML 2019). Why the
scale: plain ±1 would turn a FedAvg delta of size ~lr·|g| into ±1 per weight and destroy the
model unless every server learning rate is re-tuned; with the per-tensor ℓ1 mean the update
keeps its size per layer and the configured lr / server_lr stay meaningful. The scale is one
float per tensor, as in scaled-sign compressors. ``bits`` is ignored in sign mode.

The quantisation grid (``s`` and ``Δ``) and the sign are visible in the update itself: an
adaptive attacker knows them for free (:mod:`attacks.adaptive`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from defenses.base import UpdateContext, UpdateDefense
from fl_sim.registry import DEFENSES


def stochastic_quantize(x: Tensor, bits: int, generator: torch.Generator) -> Tensor:
    """Unbiased stochastic rounding of ``x`` (any shape) to ``2**bits`` levels on
    ``[−max|x|, max|x|]``; same shape and dtype. Raises ``ValueError`` for ``bits < 1``.

    >>> q = stochastic_quantize(torch.tensor([-1.0, 0.25, 1.0]), 1, torch.Generator())
    >>> set(q.tolist()) <= {-1.0, 1.0}
    True
    """
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    s = x.abs().max() if x.numel() else x.new_zeros(())
    if x.numel() == 0 or float(s) == 0.0:
        return x.clone()
    steps = 2 ** bits - 1
    delta = 2 * s / steps
    u = ((x.double() + s.double()) / delta.double()).clamp(0, steps)
    lo = u.floor()
    up = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device) < (u - lo)
    level = (lo + up.to(lo.dtype)).clamp(0, steps)
    return (level * delta.double() - s.double()).to(x.dtype)


def scaled_sign(x: Tensor) -> Tensor:
    """``mean|x| · sign(x)`` (signSGD with a per-tensor ℓ1 scale); same shape and dtype.

    >>> scaled_sign(torch.tensor([2.0, -1.0, 0.0])).tolist()
    [1.0, -1.0, 0.0]
    """
    if x.numel() == 0:
        return x.clone()
    return x.abs().mean() * torch.sign(x)


@DEFENSES.register("quantization")
@dataclass(frozen=True)
class Quantization(UpdateDefense):
    """Quantisation of the update: k-bit stochastic (QSGD-style) or scaled sign (signSGD)."""


    #: "stochastic": 2**bits unbiased levels per tensor; "sign": mean|x| · sign(x)
    mode: Literal["stochastic", "sign"] = "stochastic"
    #: bits per coordinate of the stochastic mode (2**bits levels), 1..16
    bits: Annotated[int, Field(ge=1, le=16)] = 4

    def apply(self, update: Mapping[str, Tensor], ctx: UpdateContext) -> dict[str, Tensor]:
        if self.mode == "sign":
            return {k: scaled_sign(v) for k, v in update.items()}
        return {k: stochastic_quantize(v, self.bits, ctx.generator) for k, v in update.items()}
