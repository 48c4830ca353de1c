"""The attack contract: an observation record in, a reconstruction out.

An attack is a small class registered in ``fl_sim.registry.ATTACKS`` whose ``__init__`` takes
its hyper-parameters (validated from the signature; keyword-only, with defaults) and whose
``reconstruct`` takes ONE :class:`~fl_sim.records.ObservationRecord`. It never sees ground
truth: metrics are computed by fl_sim afterwards from the separate truth store.

Each attack declares the view it needs (``view``: "server" or "peer") and, through
``required_knowledge()``, what it assumes beyond the transmitted data (e.g. ``"labels"``);
the framework grants exactly that into ``record.knowledge`` and records it in the result.

Devices: ``attack(record, device="cuda")`` runs the attack on that device (``"cpu"``, the
tested default; ``"cuda"``/``"cuda:N"``; ``"auto"`` = CUDA when available). The attack reads
``self.device`` while ``reconstruct`` runs and puts its task and tensors there; random draws
still come from the CPU ``generator`` (the same numbers on every device). The returned
:class:`Reconstruction` is always on CPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from fl_sim.errors import ConfigError, ThreatModelError
from fl_sim.records import ObservationRecord


@dataclass(frozen=True, init=False)
class Reconstruction:
    """What an attack produced.

    ``images``: [B, C, H, W] float32 in [0, 1] on CPU (may be empty for label-only attacks);
    ``labels``: [B] int64 or None; ``matching_loss``: the attack objective at the returned
    candidate; ``iterations``: optimisation steps spent (per restart); ``knowledge``: what
    the attack assumed known beyond the record and where it came from (e.g.
    ``{"labels": "idlg"}``), written with what the threat model granted as the result's
    ``knowledge`` (one name in code and files). ``assumed=`` is accepted as its former name.
    ``scores``: ``[N]`` float64, an inference attack's score per candidate (higher = more
    likely a member; :mod:`attacks.components.inference`), None for a reconstruction.
    """

    images: Tensor
    labels: Tensor | None
    matching_loss: float = float("nan")
    iterations: int = 0
    knowledge: Mapping[str, Any] = field(default_factory=dict)
    extras: Mapping[str, Any] = field(default_factory=dict)
    scores: Tensor | None = None

    def __init__(self, images: Tensor, labels: Tensor | None,
                 matching_loss: float = float("nan"), iterations: int = 0,
                 knowledge: Mapping[str, Any] | None = None,
                 extras: Mapping[str, Any] | None = None, *,
                 assumed: Mapping[str, Any] | None = None,
                 scores: Tensor | None = None) -> None:
        set_ = object.__setattr__  # frozen
        set_(self, "images", images)
        set_(self, "labels", labels)
        set_(self, "matching_loss", matching_loss)
        set_(self, "iterations", iterations)
        set_(self, "knowledge", {**dict(assumed or {}), **dict(knowledge or {})})
        set_(self, "extras", dict(extras or {}))
        set_(self, "scores", scores)

    @property
    def assumed(self) -> Mapping[str, Any]:
        """Former name of :attr:`knowledge` (plug-ins written before 2026-12-07)."""
        return self.knowledge

    def cpu(self) -> Reconstruction:
        """The same reconstruction with every tensor (also in ``extras``) on CPU."""
        def move(v: Any) -> Any:
            return v.detach().cpu() if isinstance(v, Tensor) else v
        return Reconstruction(move(self.images), move(self.labels), self.matching_loss,
                              self.iterations, dict(self.knowledge),
                              {k: move(v) for k, v in self.extras.items()},
                              scores=move(self.scores))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``/``"cuda:N"`` or ``"auto"`` (CUDA if available, else CPU).

    Raises :class:`~fl_sim.errors.ConfigError` (one line) for CUDA on a machine without it or
    for an unknown device name.
    """
    name = "cpu" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; allowed: cpu, cuda, cuda:N, auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this "
                          "machine; use device = \"cpu\" or \"auto\"")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}; allowed: cpu, cuda, cuda:N, auto")
    return dev


class Attack(ABC):
    """Base of every attack plug-in: threat-model checks only, no algorithm."""

    #: the view this attack needs: "server" (per-client updates) or "peer" (global models)
    view: ClassVar[str] = "server"
    #: does the attack's maths assume ONE client's update (e.g. label recovery from a single
    #: client's last-layer gradient)? Such an attack cannot run on an aggregate (SecAgg+).
    needs_client_update: ClassVar[bool] = False
    #: the tasks ("classifier", "diffusion") whose updates this attack inverts (None: any);
    #: the pre-flight refuses a run that attacks another task's updates
    tasks: ClassVar[tuple[str, ...] | None] = None
    #: where ``reconstruct`` computes (set by ``__call__``; CPU when called directly)
    device: torch.device = torch.device("cpu")

    @classmethod
    def max_images_per_update(cls, params: Mapping[str, Any]) -> tuple[int, str] | None:
        """``(most, why)``: the most images one attacked update may hold for the validated
        keyword ``params`` and the reason in words, or None for no limit (the default).

        Declared by attacks whose maths is exact only for small batches (iDLG's label rule
        reads ONE image's label off the last layer's gradient). The pre-flight
        (:func:`fl_sim.preflight.check_attack_fit`) compares it with the images each
        recorded update will hold, which the config fixes before the run."""
        return None

    def required_knowledge(self) -> tuple[str, ...]:
        """Knowledge beyond the transmitted data this configuration needs granted."""
        return ()

    def check_record(self, record: ObservationRecord) -> None:
        """The threat model's gate: ``record`` comes from this attack's view and carries every
        piece of knowledge it needs. Raises :class:`~fl_sim.errors.ThreatModelError`."""
        if record.role != self.view:
            raise ThreatModelError(f"{type(self).__name__} needs a '{self.view}' view, "
                                   f"got a '{record.role}' record")
        missing = [k for k in self.required_knowledge() if k not in record.knowledge]
        if missing:
            raise ThreatModelError(f"{type(self).__name__} needs knowledge {missing} that "
                                   "the threat model did not grant")

    def __call__(self, record: ObservationRecord, *, generator: torch.Generator | None = None,
                 device: str | torch.device | None = None) -> Reconstruction:
        self.check_record(record)
        self.device = resolve_device(device)
        return self.reconstruct(record, generator=generator or torch.Generator()).cpu()

    @abstractmethod
    def reconstruct(self, record: ObservationRecord, *,
                    generator: torch.Generator) -> Reconstruction:
        """Run the attack on one record."""
