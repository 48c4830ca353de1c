"""Shared machinery of inference attacks (membership, property): candidates in, scores out.

An inference attack does not reconstruct: it SCORES. For membership inference the runner
(:mod:`fl_sim.inference`) draws a candidate set (members from the target's training data,
non-members held out from the same distribution, fixed by a seed and recorded in the truth
store) and hands the attack the candidates' images and labels WITHOUT their membership
(:class:`Candidates` has no such field). The attack returns one score per candidate (higher =
more likely a member) in :attr:`~attacks.base.Reconstruction.scores`; only the scorer reads the
membership and computes the ROC metrics (:func:`fl_sim.metrics.roc_metrics`).

A property-inference attack scores ROUNDS instead of candidates (see
:mod:`attacks.property_inference`); it declares ``inference = "property"``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from attacks.base import Attack, Reconstruction, resolve_device
from fl_sim.errors import ConfigError, ThreatModelError
from fl_sim.records import ObservationRecord


@dataclass(frozen=True)
class Candidates:
    """The records whose membership the attacker guesses: ``images [N, C, H, W]`` in [0, 1],
    ``labels [N]`` int64, in a seeded order that mixes members and non-members. Deliberately
    no membership field: it is ground truth, kept by the scorer."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"candidates: images [N, C, H, W] and labels [N] expected, got "
                             f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Auxiliary:
    """The attacker's auxiliary data (same distribution, disjoint from the candidates and the
    federation's clients): what shadow / reference models and property classifiers train on.
    ``images [M, C, H, W]`` in [0, 1], ``labels [M]``; ``digest``: a content hash of both, the
    key of the shadow-model cache (:mod:`attacks.components.shadow`)."""

    images: Tensor
    labels: Tensor
    digest: str


class InferenceAttack(Attack):
    """Base of membership-inference plug-ins: the threat-model checks of :class:`Attack`,
    then :meth:`score` over the candidates."""

    #: what the scores decide: "membership" (per candidate) or "property" (per round)
    inference: ClassVar[str] = "membership"
    #: does :meth:`score` need the attacker's auxiliary data (shadow / reference models)?
    needs_auxiliary: ClassVar[bool] = False
    #: the model attacked: "update" (the record's update at its global), "local" (the
    #: client's local model, global + FedAvg delta) or "final" (the final global model)
    target_model: str = "update"
    #: candidates drawn by the runner (members, non-members); set by each plug-in's __init__
    num_members: int = 16
    num_nonmembers: int = 16

    def reconstruct(self, record: ObservationRecord, *,
                    generator: torch.Generator) -> Reconstruction:
        raise ThreatModelError(f"{type(self).__name__} scores candidates: run it through "
                               "fl-sim's attack runner (it draws the candidate set)")

    def infer(self, record: ObservationRecord, candidates: Candidates | None, *,
              auxiliary: Auxiliary | None = None,
              final_model: Mapping[str, Tensor] | None = None,
              generator: torch.Generator | None = None,
              device: str | torch.device | None = None) -> Reconstruction:
        """Scores ``[N]`` of ``candidates`` against ``record`` (its view is checked as in
        :meth:`Attack.__call__`); ``final_model``: the final global state (public: every
        client receives it) for attacks with ``target_model = "final"``. Raises
        :class:`~fl_sim.errors.ThreatModelError` for the wrong view or missing knowledge,
        ``ValueError`` for scores of the wrong shape."""
        self.check_record(record)
        if self.needs_auxiliary and auxiliary is None:
            raise ThreatModelError(f"{type(self).__name__} needs the attacker's auxiliary "
                                   "data")
        self.device = resolve_device(device)
        if self.target_model == "final" and final_model is None:
            raise ThreatModelError(f"{type(self).__name__} attacks the final model: none given")
        scores, extras = self.score(record, candidates, auxiliary=auxiliary,
                                    final_model=final_model,
                                    generator=generator or torch.Generator())
        scores = torch.as_tensor(scores).detach().double().cpu().flatten()
        expected = len(candidates) if candidates is not None else 1  # property: one score
        if scores.shape != (expected,):
            raise ValueError(f"{type(self).__name__} returned {tuple(scores.shape)} scores, "
                             f"expected {expected}")
        knowledge = {"candidates": "without membership"} if candidates is not None else {}
        if auxiliary is not None:
            knowledge["auxiliary"] = f"{len(auxiliary.labels)} held-out examples"
        return Reconstruction(torch.empty(0), None, knowledge=knowledge, extras=extras,
                              scores=scores).cpu()

    @abstractmethod
    def score(self, record: ObservationRecord, candidates: Candidates, *,
              auxiliary: Auxiliary | None, generator: torch.Generator,
              final_model: Mapping[str, Tensor] | None = None
              ) -> tuple[Tensor, Mapping[str, Any]]:
        """``(scores [N], extras)``: higher = more likely a member."""


def candidate_counts(where: str, num_members: int, num_nonmembers: int) -> tuple[int, int]:
    """Validated candidate counts; :class:`~fl_sim.errors.ConfigError` (one line) for a
    count below 1 (no candidates: no ROC)."""
    for name, n in (("num_members", num_members), ("num_nonmembers", num_nonmembers)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{where}.{name}: got {n!r}; needs at least 1 candidate "
                              "(membership inference without candidates has no ROC)")
    return int(num_members), int(num_nonmembers)
