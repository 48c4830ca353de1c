"""Retention: which rounds and clients a run records (``federation.record_rounds`` /
``federation.record_clients``; None records all).

A run directory otherwise grows by every client's update and ground truth every round (see
docs/how-to/reliability-and-resume.md for the measured cost per round). Recording only what the
configured attacks need keeps it small:

* server taps (``observations/``): the global and the aggregate of a recorded round; the
  update of a recorded client in a recorded round;
* ground truth (``truth/``): a recorded client in a recorded round;
* a curious peer (``peer/c{k}/``, always its own client): its update of a recorded round and
  the globals of rounds ``r`` and ``r + 1`` for each recorded ``r`` (the difference of
  consecutive globals is what a peer attack on round ``r`` inverts).

Attacks configured on rounds or clients that are not recorded fail validation in one line
(:func:`fl_sim.config.retention_problem`). Sampling, training, aggregation and metrics do
not depend on retention: the same seed gives the same model with any retention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Retention:
    """What to record; ``None`` means every round / every client.

    >>> keep = Retention(rounds=frozenset({2}), clients=frozenset({0}))
    >>> keep.round(2), keep.round(3), keep.client_round(2, 0), keep.client_round(2, 1)
    (True, False, True, False)
    >>> keep.peer_global(3), keep.peer_global(4)
    (True, False)
    """

    rounds: frozenset[int] | None = None
    clients: frozenset[int] | None = None

    @classmethod
    def of(cls, federation: Any) -> Retention:
        """From a ``FederationConfig`` (``record_rounds``, ``record_clients``)."""
        rounds = getattr(federation, "record_rounds", None)
        clients = getattr(federation, "record_clients", None)
        return cls(rounds=None if rounds is None else frozenset(int(r) for r in rounds),
                   clients=None if clients is None else frozenset(int(c) for c in clients))

    def round(self, server_round: int) -> bool:
        """Server globals / aggregates and a peer's own update of this round."""
        return self.rounds is None or server_round in self.rounds

    def client_round(self, server_round: int, client_id: int) -> bool:
        """A client's update (server tap) and ground truth of this round."""
        return self.round(server_round) and (self.clients is None or client_id in self.clients)

    def peer_global(self, server_round: int) -> bool:
        """The global a peer received at the start of ``server_round`` (also the END of
        round ``server_round - 1``)."""
        return self.round(server_round) or self.round(server_round - 1)
