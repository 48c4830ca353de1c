"""Plain, immutable data types handed to attacks and metrics (no flwr, no ray).

An :class:`ObservationRecord` is what one party saw at one tap in one round: detached CPU
copies, read-only mappings. A :class:`GroundTruthRecord` is what a client really trained on;
only metrics read it, never an attack. :class:`ModelSpec` (defined in
:mod:`fl_sim.tasks.spec`, beside its builder) says how to rebuild the model and task that
produced a record (public knowledge in FL: the server ships the architecture).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

from fl_sim.errors import ThreatModelError
from fl_sim.tasks.spec import ModelSpec

Tap = Literal["server_in", "aggregate", "peer_view"]
UpdateKind = Literal["gradient", "delta"]


def frozen_tensors(tensors: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Detached CPU copies in a read-only mapping (key order kept)."""
    return MappingProxyType({k: v.detach().to("cpu").clone() for k, v in tensors.items()})


@dataclass(frozen=True)
class LocalOptimizer:
    """The optimiser a client trained with, as the client built it (fresh every round).

    ``name``: ``"sgd"`` (``torch.optim.SGD``: ``momentum``, ``weight_decay``; no dampening,
    no Nesterov) or ``"adam"`` (``torch.optim.Adam``: ``betas``, ``eps``, ``weight_decay``
    added to the gradient, no AMSGrad). The learning rate is the record's ``lr``. The
    defaults are torch's, i.e. what a client built from ``optimizer = "sgd"`` / ``"adam"``
    alone used. Raises ``ValueError`` for an unknown name or a parameter the optimiser does
    not have (momentum for Adam).
    """

    name: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adam"):
            raise ValueError(f"unknown local optimizer {self.name!r}; known: adam, sgd")
        if self.name == "adam" and self.momentum:
            raise ValueError(f"adam has no momentum (got {self.momentum}); use betas")
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))

    @property
    def plain_sgd(self) -> bool:
        """SGD without momentum or weight decay: the delta is ``-lr`` x the sum of the
        steps' gradients."""
        return self.name == "sgd" and self.momentum == 0 and self.weight_decay == 0

    def to_json(self) -> dict[str, Any]:
        """The fields that matter for ``name`` (SGD: momentum, weight decay; Adam: betas,
        eps, weight decay)."""
        if self.name == "sgd":
            return {"name": "sgd", "momentum": self.momentum, "weight_decay": self.weight_decay}
        return {"name": "adam", "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LocalOptimizer:
        kw: dict[str, Any] = {"name": str(d["name"])}
        for key in ("momentum", "weight_decay", "eps"):
            if key in d:
                kw[key] = float(d[key])
        if "betas" in d:
            kw["betas"] = tuple(float(b) for b in d["betas"])
        return cls(**kw)


@dataclass(frozen=True)
class ObservationRecord:
    """What one party observed at one tap in one round (see DESIGN.md).

    ``global_params`` is the model state (parameters AND buffers, ``state_dict`` names) the
    update was computed from. ``update`` is, per parameter name, either the gradient of one
    local batch (``update_kind="gradient"``, FedSGD) or ``new - global`` after local training
    (``"delta"``). For a peer view, ``update`` is the aggregate of the OTHER clients' updates
    derived from consecutive globals, and ``own_update`` is the peer's own contribution.
    ``knowledge`` holds what the threat model grants beyond the transmitted data (e.g.
    ``labels``, diffusion ``eps``/``t``); ``defenses`` the defenses in force
    in the run (``{"name": ..., **params}`` each, see :mod:`defenses.base`).
    ``optimizer``: the client's local optimiser (with ``lr``, ``local_steps`` and
    ``batch_size`` what an attack that unrolls local training models; plain SGD when built
    by hand; a view reads it from the record's entry, or from the run's config for a run
    recorded before the field existed).
    """

    run_id: str
    server_round: int
    client_id: int | None
    tap: Tap
    spec: ModelSpec
    global_params: Mapping[str, Tensor]
    update: Mapping[str, Tensor]
    update_kind: UpdateKind
    num_examples: int
    local_steps: int
    lr: float
    batch_size: int
    defenses: tuple[Mapping[str, Any], ...] = ()
    knowledge: Mapping[str, Any] = field(default_factory=dict)
    own_update: Mapping[str, Tensor] | None = None
    num_clients_aggregated: int = 1
    optimizer: LocalOptimizer = field(default_factory=LocalOptimizer)

    def __post_init__(self) -> None:
        """A peer record carries no ground truth: a peer is granted nothing (threat model;
        :class:`~fl_sim.views.PeerView` refuses every grant), and a record built by hand
        for a benchmark or a test cannot slip one in either. Raises
        :class:`~fl_sim.errors.ThreatModelError`."""
        if self.tap == "peer_view":
            held = sorted(k for k in self.knowledge if k in GROUND_TRUTH_KNOWLEDGE)
            if held or tuple(self.knowledge.get("granted") or ()):
                raise ThreatModelError(
                    f"a peer record cannot carry ground truth (knowledge {held or ''}"
                    f"{'' if held else 'granted ' + str(self.knowledge.get('granted'))}): a "
                    "peer is granted nothing; let the attack recover labels itself")

    @property
    def role(self) -> str:
        return "peer" if self.tap == "peer_view" else "server"


#: knowledge keys that are some client's ground truth (what a view can grant from the truth
#: store: the labels and a task's private randomness, diffusion ``eps`` / ``t``)
GROUND_TRUTH_KNOWLEDGE = frozenset({"labels", "eps", "t"})


@dataclass(frozen=True)
class TruthStep:
    """One local step's private batch: images [B,C,H,W] float in [0,1], labels [B], the
    dataset indices, and the private randomness (``aux``: diffusion ``eps``, ``t``)."""

    step: int
    images: Tensor
    labels: Tensor
    indices: Tensor
    aux: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class GroundTruthRecord:
    """Everything a client trained on in one round. Read by metrics only."""

    run_id: str
    server_round: int
    client_id: int
    steps: tuple[TruthStep, ...]

    @property
    def images(self) -> Tensor:
        """All distinct training images of the round, in first-seen order."""
        return _unique_by_index(self.steps, "images")

    @property
    def labels(self) -> Tensor:
        return _unique_by_index(self.steps, "labels")


def _unique_by_index(steps: tuple[TruthStep, ...], attr: str) -> Tensor:
    seen: dict[int, Tensor] = {}
    for s in steps:
        for i, idx in enumerate(s.indices.tolist()):
            seen.setdefault(int(idx), getattr(s, attr)[i])
    return torch.stack(list(seen.values())) if seen else torch.empty(0)
