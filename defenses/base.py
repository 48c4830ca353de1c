"""What every defense plug-in is: a frozen dataclass of its public parameters, one stage.

A defense is registered with ``@DEFENSES.register("name")`` on a ``@dataclass(frozen=True)``
subclass of :class:`Defense` whose fields are its parameters, each with a documented default
(so ``[[defenses]] name = "pruning"`` alone runs). The registry validates ``[[defenses]]``
params against the dataclass' ``__init__`` (pydantic, from the annotations), so a bad value is
one config line naming the field.

Stages (where a deployment applies it):

* ``"train"`` — changes local training itself (DP-SGD); fl_sim's local training asks the
  defense for each step's gradient.
* ``"update"`` — transforms the client's update after local training and BEFORE it leaves the
  client (local DP, pruning, quantisation, Soteria): :meth:`UpdateDefense.apply`. The server
  tap and the peer's own record see the defended update.
* ``"server"`` — changes what the server does with the updates (central DP); fl_sim wraps the
  strategy INSIDE the server tap, so the tap records what a curious server sees.
* ``"protocol"`` — changes what the server receives at all (SecAgg+).

This module is pure torch: no flwr, no ray (fl_sim.federation adapts defenses to Flower).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fl_sim.records import TruthStep

#: Stages a defense can act at (see module doc), in the order a round meets them.
STAGES = ("train", "update", "server", "protocol")


@dataclass(frozen=True)
class UpdateContext:
    """What a client-side defense may use when it transforms an update.

    ``kind``: ``"delta"`` (``new − global`` after local training) or ``"gradient"``
    (FedSGD). ``global_state``: the ``state_dict`` the client received. ``task``: the
    client's :class:`~fl_sim.tasks.base.Task` (its model holds the weights AFTER local
    training for ``"delta"``, the global ones for ``"gradient"``). ``steps``: the private
    batches of the round (images, labels, aux). ``generator``: the defense's own seeded
    randomness, derived from ``(seed, "round", r, "client", c, "defense", index)``.
    """

    kind: str
    global_state: Mapping[str, Tensor]
    task: Any
    steps: tuple[TruthStep, ...]
    lr: float
    num_examples: int
    server_round: int
    client_id: int
    generator: torch.Generator


@dataclass(frozen=True)
class Defense:
    """Base of every defense: a frozen dataclass of public parameters (see module doc)."""

    #: registry name: set by ``@DEFENSES.register("pruning")`` (declared there only)
    name: ClassVar[str] = ""
    #: one of :data:`STAGES`
    stage: ClassVar[str] = "update"
    #: does the defense change what a curious SERVER receives per client? (central DP does
    #: not: its noise is added after the server saw the updates)
    protects_server_view: ClassVar[bool] = True
    #: capabilities the core reads instead of the name (:mod:`fl_sim.capabilities`):
    #: the server receives only a sum of the updates, never one client's (SecAgg+)
    hides_per_client_updates: ClassVar[bool] = False
    #: the defense itself works on each client's update on the server (central DP)
    needs_per_client_updates: ClassVar[bool] = False
    #: the clients report this defense's ε with their reply (``round_epsilon``: a
    #: ``"train"``-stage defense takes ``batch_size, partition_size, steps, rounds`` as
    #: :class:`defenses.dp_sgd.DPSGD`; any other takes ``rounds`` as
    #: :class:`defenses.local_dp.LocalDP`)
    reports_epsilon: ClassVar[bool] = False

    def params(self) -> dict[str, Any]:
        """The resolved parameters, JSON-ready."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def describe(self) -> dict[str, Any]:
        """``{"name": ..., **params}``: what records and results carry about this defense."""
        return {"name": self.name, **self.params()}

    def problem(self, cfg: Any) -> str | None:
        """Why this defense cannot run in experiment ``cfg`` (an ``ExperimentConfig``), or
        None. Checked before any training starts (one line at the CLI)."""
        return None


@dataclass(frozen=True)
class UpdateDefense(Defense):
    """A defense applied to the client's update before it leaves the client."""

    stage: ClassVar[str] = "update"

    def apply(self, update: Mapping[str, Tensor], ctx: UpdateContext) -> dict[str, Tensor]:
        """The defended update: same keys, shapes and dtypes as ``update`` (the parameters'
        delta or gradient, floating tensors only)."""
        raise NotImplementedError


def describe_all(defenses: Any) -> list[dict[str, Any]]:
    """``describe()`` of each defense, in order."""
    return [d.describe() for d in defenses]


def format_defense(d: Mapping[str, Any]) -> str:
    """``{"name": "pruning", "ratio": 0.9}`` -> ``"pruning(ratio=0.9)"`` (for tables).

    >>> format_defense({"name": "pruning", "ratio": 0.9, "mode": "magnitude"})
    'pruning(ratio=0.9, mode=magnitude)'
    >>> format_defense("dp_sgd")
    'dp_sgd'
    """
    if isinstance(d, str):
        return d
    params = ", ".join(f"{k}={v}" for k, v in d.items() if k != "name")
    return f"{d.get('name', '?')}({params})" if params else str(d.get("name", "?"))


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v
