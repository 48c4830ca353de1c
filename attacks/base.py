"""The attack contract: an observation record in, a reconstruction out.

An attack is a small class registered in ``fl_sim.registry.ATTACKS`` whose ``__init__`` takes
its hyper-parameters (validated from the signature; keyword-only, with defaults) and whose
``reconstruct`` takes ONE :class:`~fl_sim.records.ObservationRecord`. It never sees ground
truth: metrics are computed by fl_sim afterwards from the separate truth store.

Each attack declares the view it needs (``view``: "server" or "peer") and, through
``required_knowledge()``, what it assumes beyond the transmitted data (e.g. ``"labels"``);
the framework grants exactly that into ``record.knowledge`` and records it in the result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from fl_sim.errors import ThreatModelError
from fl_sim.records import ObservationRecord


@dataclass(frozen=True)
class Reconstruction:
    """What an attack produced.

    ``images``: [B, C, H, W] float32 in [0, 1] on CPU (may be empty for label-only attacks);
    ``labels``: [B] int64 or None; ``matching_loss``: the attack objective at the returned
    candidate; ``iterations``: optimisation steps spent (per restart); ``assumed``: what the
    attack assumed known and where it came from (e.g. ``{"labels": "idlg"}``).
    """

    images: Tensor
    labels: Tensor | None
    matching_loss: float = float("nan")
    iterations: int = 0
    assumed: Mapping[str, Any] = field(default_factory=dict)
    extras: Mapping[str, Any] = field(default_factory=dict)


class Attack(ABC):
    """Base of every attack plug-in: threat-model checks only, no algorithm."""

    #: the view this attack needs: "server" (per-client updates) or "peer" (global models)
    view: ClassVar[str] = "server"

    def required_knowledge(self) -> tuple[str, ...]:
        """Knowledge beyond the transmitted data this configuration needs granted."""
        return ()

    def __call__(self, record: ObservationRecord, *,
                 generator: torch.Generator | None = None) -> Reconstruction:
        if record.role != self.view:
            raise ThreatModelError(f"{type(self).__name__} needs a '{self.view}' view, "
                                   f"got a '{record.role}' record")
        missing = [k for k in self.required_knowledge() if k not in record.knowledge]
        if missing:
            raise ThreatModelError(f"{type(self).__name__} needs knowledge {missing} that "
                                   "the threat model did not grant")
        return self.reconstruct(record, generator=generator or torch.Generator())

    @abstractmethod
    def reconstruct(self, record: ObservationRecord, *,
                    generator: torch.Generator) -> Reconstruction:
        """Run the attack on one record."""
