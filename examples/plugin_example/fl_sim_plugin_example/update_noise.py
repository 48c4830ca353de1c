"""Gaussian noise on the client's update, as an fl-sim defense plug-in.

The noise step of the Gaussian mechanism (Dwork & Roth 2014, sec. 3.5.3) without the clipping
that would bound the sensitivity, so it gives NO formal (epsilon, delta) guarantee: a minimal
example of a defense, not a DP one (see the built-in ``local_dp`` for that).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from defenses.base import UpdateContext, UpdateDefense
from fl_sim.registry import DEFENSES


@DEFENSES.register("update_noise")
@dataclass(frozen=True)
class UpdateNoise(UpdateDefense):
    """Add N(0, sigma^2) to every entry of the update before it leaves the client."""

    #: standard deviation of the noise, in the update's units
    sigma: Annotated[float, Field(ge=0.0)] = 0.01

    def apply(self, update: Mapping[str, Tensor], ctx: UpdateContext) -> dict[str, Tensor]:
        """The noisy update (same keys, shapes, dtypes); the noise comes from
        ``ctx.generator`` (seeded per run, round, client and defense)."""
        return {k: v + self.sigma * torch.randn(v.shape, generator=ctx.generator,
                                                dtype=v.dtype).to(v.device)
                for k, v in update.items()}
