"""Local DP on the update: clip the whole update, add Gaussian noise, before it leaves.

The Gaussian mechanism (Dwork & Roth, "The Algorithmic Foundations of Differential Privacy",
2014, App. A) applied client-side to the update, as in Flower's ``LocalDpMod`` (itself after
Sun et al., "LDP-Fed", 2020): the update u (parameters' delta ``new − global`` or, for FedSGD,
the gradient) is scaled to L2 norm at most C (``clipping_norm``, norm over all parameters
together) and N(0, (σC)²·I) (σ = ``noise_multiplier``) is added to every coordinate:

    ũ = u · min(1, C / ||u||) + N(0, σ²C²)

Why not Flower's ``LocalDpMod`` itself: the mod computes ``reply − global`` and clips that,
which is meaningless when the reply is a FedSGD gradient (the "delta" would be gradient minus
weights). fl-sim applies the same maths to the update it knows the kind of (delta or
gradient), through :func:`fl_sim.defended.defend_reply`, so FedSGD and FedAvg get the same
mechanism. Deviation from ``LocalDpMod``: Flower's mod takes ``sensitivity`` and ``epsilon``
and derives the std from the classic bound; here σ is the parameter and ε is derived.

**Unit of privacy and neighbouring relation: one client, replace-one.** Local DP protects
a client's whole data against everyone who sees the update (the server included), and a
client always sends an update, so "add or remove" a client does not describe what a curious
server compares: two neighbouring inputs are ANY two datasets of that client (its data
replaced, user-level local DP). Their clipped updates can differ by up to 2C (C one way, C
the other), so the sensitivity is 2C and the std σC buys the Gaussian mechanism of
noise multiplier σ / 2 (:func:`defenses.accounting.effective_noise_multiplier`). Earlier
fl-sim versions accounted this with sensitivity C, which understated ε (σ = 1, δ = 1e-5,
one release: 4.73 instead of 10.73).

ε per round: one release of that mechanism, accounted by Opacus' RDP (or PRV) accountant
on σ / 2 with sample_rate = 1 and steps = 1 (:func:`defenses.accounting.gaussian_epsilon`
with ``relation = "replace-one"``); over the k rounds a client took part in it is the same
accountant with steps = k. (The classic bound ε = sqrt(2 ln(1.25/δ))·Δ/(σC) holds only for
ε < 1; the accountant's is valid for every σ and is tighter.) Results write
``dp_unit = "client"`` and ``dp_neighbouring = "replace-one"`` beside ε (:attr:`LocalDP.
privacy_unit`, :attr:`LocalDP.neighbouring`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from defenses.accounting import CLIENT, DEFAULT_DELTA, REPLACE_ONE, gaussian_epsilon
from defenses.base import UpdateContext, UpdateDefense
from fl_sim.registry import DEFENSES


def clip_update(update: Mapping[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """``update`` scaled to L2 norm (over all tensors) at most ``max_norm``.

    >>> clip_update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1.0)["b"].item()
    0.800000011920929
    """
    norm = update_norm(update)
    scale = min(1.0, max_norm / (norm + 1e-12))
    return {k: v * scale for k, v in update.items()}


def update_norm(update: Mapping[str, Tensor]) -> float:
    """L2 norm of all tensors of ``update`` together (float64 sum of squares)."""
    return float(sum(float(v.double().pow(2).sum()) for v in update.values())) ** 0.5


@DEFENSES.register("local_dp")
@dataclass(frozen=True)
class LocalDP(UpdateDefense):
    """Local DP (Gaussian mechanism on the clipped update, as Flower's LocalDpMod)."""

    reports_epsilon: ClassVar[bool] = True
    #: unit of privacy and neighbouring relation (module doc): sensitivity 2C
    privacy_unit: ClassVar[str] = CLIENT
    neighbouring: ClassVar[str] = REPLACE_ONE

    #: C: L2 bound of the whole update
    clipping_norm: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0
    #: σ: noise std relative to C (0: clipping only, ε = inf)
    noise_multiplier: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1.0
    #: δ at which ε is reported
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] = DEFAULT_DELTA
    #: Opacus accountant: "rdp" or "prv"
    accountant: Literal["rdp", "prv"] = "rdp"

    def apply(self, update: Mapping[str, Tensor], ctx: UpdateContext) -> dict[str, Tensor]:
        clipped = clip_update(update, self.clipping_norm)
        if self.noise_multiplier == 0:
            return clipped
        std = self.noise_multiplier * self.clipping_norm
        out = {}
        for k, v in clipped.items():  # noise drawn on the CPU: the same on every device
            noise = torch.randn(tuple(v.shape), generator=ctx.generator, dtype=torch.float32)
            out[k] = v + (std * noise).to(device=v.device, dtype=v.dtype)
        return out

    def round_epsilon(self, rounds: int = 1) -> float:
        """ε at ``delta`` of ``rounds`` releases (one per round the client took part in),
        client-level replace-one: the accountant runs on σ / 2 (sensitivity 2C)."""
        return gaussian_epsilon(self.noise_multiplier, self.delta, self.accountant, rounds,
                                relation=self.neighbouring)
