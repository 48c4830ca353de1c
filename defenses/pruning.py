"""Gradient / update pruning: send only the largest-magnitude coordinates.

Zhu, Liu, Han, "Deep Leakage from Gradients" (NeurIPS 2019), Sec. 6 ("gradient pruning" as a
defense: DLG fails once more than ~20 % of the gradient's smallest entries are zeroed); the
compression view is Lin et al., "Deep Gradient Compression" (ICLR 2018).

``ratio`` is the fraction of coordinates set to zero. ``scope = "layer"`` keeps the top
``1 − ratio`` of each tensor by magnitude (DLG's per-layer pruning); ``"global"`` ranks all
coordinates of the update together. Which coordinates survive is visible in the update
itself (the zeros), so an adaptive attacker knows the mask for free.
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


def prune_top_k(update: Mapping[str, Tensor], ratio: float, *, scope: str = "layer"
                ) -> dict[str, Tensor]:
    """Zero the ``ratio`` fraction of smallest-magnitude coordinates (ties: lower index kept).

    >>> out = prune_top_k({"w": torch.tensor([0.1, -3.0, 2.0, 0.5])}, 0.5)
    >>> out["w"].tolist()
    [0.0, -3.0, 2.0, 0.0]
    """
    if scope == "layer":
        return {k: _keep_largest(v, ratio) for k, v in update.items()}
    flat = torch.cat([v.reshape(-1) for v in update.values()]) if update else torch.zeros(0)
    kept = _keep_largest(flat, ratio)
    out, pos = {}, 0
    for k, v in update.items():
        out[k] = kept[pos:pos + v.numel()].reshape(v.shape)
        pos += v.numel()
    return out


def _keep_largest(v: Tensor, ratio: float) -> Tensor:
    keep = v.numel() - int(round(ratio * v.numel()))
    if keep >= v.numel():
        return v.clone()
    flat = v.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(flat.abs(), keep, sorted=False).indices] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).reshape(v.shape)


@DEFENSES.register("pruning")
@dataclass(frozen=True)
class Pruning(UpdateDefense):
    """Pruning (DLG, Zhu et al. 2019): zero the smallest ``ratio`` of the update's entries."""


    #: fraction of coordinates zeroed, in [0, 1)
    ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    #: "layer": top-k per tensor; "global": top-k over the whole update
    scope: Literal["layer", "global"] = "layer"

    def apply(self, update: Mapping[str, Tensor], ctx: UpdateContext) -> dict[str, Tensor]:
        return prune_top_k(update, self.ratio, scope=self.scope)
