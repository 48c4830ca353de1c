"""Threat-model views over a recorded run: what the server, or one curious peer, saw.

A view turns stored observations into immutable
:class:`~fl_sim.records.ObservationRecord`\\ s and grants exactly the knowledge asked for
(recorded in ``record.knowledge["granted"]``):

* :class:`ServerView` — the honest-but-curious server: every per-client update as received
  (``server_in``), plus what left aggregation (``aggregate``). Grants come from the ground
  truth of the SAME client-round: ``"labels"`` (the distinct labels the client trained on, in
  first-seen order — for FedSGD the batch's labels) and any private randomness of the task by
  name (``"eps"``, ``"t"`` for diffusion; concatenated over local steps along dim 0).
* :class:`PeerView` — one client ``k`` listed in ``federation.peer_clients``. It is built from
  ``run_dir/peer/c{k}`` ONLY (the globals ``k`` received and its own updates) plus the public
  config; it holds no reference to the observation or truth stores, so it cannot reach any
  other client's update or data. Ground-truth grants are refused.

:class:`View` names each threat model once (``server``, ``peer``, ``aggregate`` — the config
strings and on-disk names): who looks, which tap's records it reads, the public config it may
use, the aggregate's training parameters, and its fallback when a defense hides per-client
updates (SecAgg+: ``server`` -> ``aggregate``). The attack runner, pre-flight, config checks
and inference scorer ask it instead of comparing view strings.

Peer derivation (:func:`others_mean_delta`, :func:`others_mean_gradient`): from consecutive
globals ``g_r``, ``g_{r+1}`` and its own update, the peer computes the weighted mean update of
the OTHER clients aggregated in round ``r``. It assumes what the server publishes with the
next global (fl-sim's server sends it in the train config): the total ``num-examples`` ``N``
and the number of clients ``M`` aggregated in round ``r``; for FedSGD also the server learning
rate ``η`` (public config). With ``n_k`` the peer's own weight:

* FedAvg / FedProx (weighted mean of deltas): ``others = (N·(g_{r+1} − g_r) − n_k·δ_k) /
  (N − n_k)``;
* FedSGD: ``mean = (g_r − g_{r+1}) / η``, ``others = (N·mean − n_k·∇_k) / (N − n_k)``;
* any other strategy (not a weighted mean): ``g_{r+1} − g_r`` as is (own share included),
  ``knowledge["derivation"] = "global_difference"``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from fl_sim.capabilities import strategy_capabilities
from fl_sim.config import server_lr
from fl_sim.errors import PluginError, RunDirError, ThreatModelError
from fl_sim.records import LocalOptimizer, ModelSpec, ObservationRecord, frozen_tensors
from fl_sim.stores import ObservationStore, PeerStore, TruthStore
from fl_sim.view_types import TAP_VIEWS, VIEWS, View, view_of

__all__ = ["TAP_VIEWS", "VIEWS", "PeerView", "ServerView", "View", "aggregate_training",
           "aggregate_training_row", "others_mean_delta", "others_mean_gradient", "view_of"]


def aggregate_training(cfg: Any) -> dict[str, Any]:
    """The public training config behind an aggregate record: FedAvg's delta is the mean of
    ``local_steps`` steps of lr ``federation.lr`` with the clients' optimiser; a strategy
    whose clients send one batch's gradient (FedSGD) takes one plain SGD step of the server
    lr. What the server tap records with the aggregate; :meth:`ServerView.aggregate` falls
    back to it for aggregates recorded without it."""
    fed = cfg.federation
    if strategy_capabilities(cfg.strategy.name).sends_gradient:
        return {"lr": float(server_lr(cfg)), "local_steps": 1, "batch_size": fed.batch_size,
                "optimizer": LocalOptimizer("sgd")}
    return {"lr": float(fed.lr), "local_steps": int(fed.local_steps or 0),
            "batch_size": fed.batch_size, "optimizer": fed.local_optimizer()}


# -- peer maths -------------------------------------------------------------------------------
def others_mean_delta(global_r: Mapping[str, Tensor], global_next: Mapping[str, Tensor],
                      own_delta: Mapping[str, Tensor], *, total_examples: float,
                      own_examples: float) -> dict[str, Tensor]:
    """Weighted mean delta of the other clients under FedAvg (see module doc).

    >>> g0, g1 = {"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}
    >>> others_mean_delta(g0, g1, {"w": torch.tensor([1.0])}, total_examples=4,
    ...                   own_examples=2)["w"].tolist()
    [3.0]

    Raises ``ValueError`` if no other examples were aggregated.
    """
    rest = float(total_examples) - float(own_examples)
    if rest <= 0:
        raise ValueError(f"no other clients' examples in the aggregate (N={total_examples}, "
                         f"own={own_examples})")
    out = {}
    for k, d in own_delta.items():
        diff = global_next[k].double() - global_r[k].double()
        out[k] = ((total_examples * diff - own_examples * d.double()) / rest).to(d.dtype)
    return out


def others_mean_gradient(global_r: Mapping[str, Tensor], global_next: Mapping[str, Tensor],
                         own_gradient: Mapping[str, Tensor], *, server_lr: float,
                         total_examples: float, own_examples: float) -> dict[str, Tensor]:
    """Weighted mean gradient of the other clients under FedSGD (see module doc).

    >>> g0, g1 = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.0])}
    >>> others_mean_gradient(g0, g1, {"w": torch.tensor([1.0])}, server_lr=0.5,
    ...                      total_examples=2, own_examples=1)["w"].tolist()
    [3.0]
    """
    mean = {k: (global_r[k].double() - global_next[k].double()) / server_lr
            for k in own_gradient}
    return others_mean_delta({k: torch.zeros_like(v) for k, v in mean.items()}, mean,
                             own_gradient, total_examples=total_examples,
                             own_examples=own_examples)


# -- records ----------------------------------------------------------------------------------
def _record(**kw: Any) -> ObservationRecord:
    kw["global_params"] = frozen_tensors(kw["global_params"])
    kw["update"] = frozen_tensors(kw["update"])
    if kw.get("own_update") is not None:
        kw["own_update"] = frozen_tensors(kw["own_update"])
    kw["knowledge"] = MappingProxyType(dict(kw.get("knowledge", {})))
    return ObservationRecord(**kw)


def _optimizer(e: Mapping[str, Any], fallback: LocalOptimizer | None) -> LocalOptimizer:
    """The entry's local optimiser; an entry written before records carried one falls back
    to the run's config (what its clients built), else to plain SGD."""
    if "optimizer" in e:
        try:
            return LocalOptimizer.from_json(e["optimizer"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RunDirError(f"invalid optimizer {e['optimizer']!r} in the index row of round "
                              f"{e.get('round')} ({type(exc).__name__}: {exc})") from None
    return fallback if fallback is not None else LocalOptimizer()


def _grant_from_truth(truth: Any, grant: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in grant:
        if key == "labels":
            out["labels"] = truth.labels.clone()
            continue
        parts = [s.aux[key] for s in truth.steps if key in s.aux]
        if not parts:
            known = sorted({"labels", *(k for s in truth.steps for k in s.aux)})
            raise ThreatModelError(f"cannot grant {key!r}: the ground truth of round "
                                   f"{truth.server_round}, client {truth.client_id} has no "
                                   f"such knowledge; grantable: {known}")
        out[key] = torch.cat([p if p.dim() else p[None] for p in parts]).clone()
    return out


def _recorded_training(e: Mapping[str, Any]) -> tuple[float, int, int, LocalOptimizer]:
    """``(lr, local_steps, batch_size, optimizer)`` the tap recorded with an aggregate."""
    t = e["training"]
    try:
        return (float(t["lr"]), int(t["local_steps"]), int(t["batch_size"]),
                LocalOptimizer.from_json(t["optimizer"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise RunDirError(f"invalid training {t!r} in the aggregate row of round "
                          f"{e.get('round')} ({type(exc).__name__}: {exc})") from None


class ServerView:
    """The honest-but-curious server's view (see module doc)."""

    role = "server"

    def __init__(self, run_id: str, spec: ModelSpec, store: ObservationStore,
                 truth: TruthStore, *, grant: Sequence[str] = (),
                 optimizer: LocalOptimizer | None = None) -> None:
        self.run_id, self.spec, self.grant = run_id, spec, tuple(grant)
        #: the config's local optimiser, for entries recorded before they carried one
        self.optimizer = optimizer
        self._store, self._truth = store, truth

    def clients(self, server_round: int) -> list[int]:
        """Clients whose update the server accepted in ``server_round``."""
        return sorted(int(e["client"]) for e in self._store.entries("server_in")
                      if int(e["round"]) == server_round)

    def rounds(self) -> list[int]:
        return sorted({int(e["round"]) for e in self._store.entries("server_in")})

    def record(self, server_round: int, client: int) -> ObservationRecord:
        """Client ``client``'s update of ``server_round`` as the server received it."""
        for e in self._store.entries("server_in"):
            if int(e["round"]) == server_round and int(e["client"]) == client:
                return self._build(e)
        raise RunDirError(f"no server_in record for round {server_round}, client {client}; "
                          f"recorded clients: {self.clients(server_round)}")

    def records(self, *, rounds: Sequence[int] | None = None,
                clients: Sequence[int] | None = None) -> Iterator[ObservationRecord]:
        """Every matching record, one at a time (tensors are loaded lazily per record)."""
        for e in self._store.entries("server_in"):
            if (rounds is None or int(e["round"]) in rounds) and (
                    clients is None or int(e["client"]) in clients):
                yield self._build(e)

    def aggregate(self, server_round: int, *, lr: float = 0.0, local_steps: int = 0,
                  batch_size: int = 0, optimizer: LocalOptimizer | None = None
                  ) -> ObservationRecord:
        """What left aggregation in ``server_round`` (``new global − global``).

        ``lr``/``local_steps``/``batch_size``/``optimizer``: the public training config every
        client used, as the server tap recorded it with the aggregate (``training`` in its
        index row); for an aggregate recorded without it, what the caller passes
        (:func:`aggregate_training` of the run's config), so an attack can read the aggregate
        as the mean of the clients' updates. A grant (e.g. labels) is the union of the ground
        truths of every aggregated client, in client order."""
        for e in self._store.entries("aggregate"):
            if int(e["round"]) == server_round:
                if isinstance(e.get("training"), Mapping):
                    lr, local_steps, batch_size, optimizer = _recorded_training(e)
                knowledge: dict[str, Any] = {"granted": self.grant}
                if self.grant:
                    parts = [_grant_from_truth(self._truth.read(self.run_id, server_round,
                                                                int(c)), self.grant)
                             for c in e.get("clients", ())]
                    knowledge.update({k: torch.cat([p[k] for p in parts]) for k in self.grant})
                return _record(
                    run_id=self.run_id, server_round=server_round, client_id=None,
                    tap="aggregate", spec=self.spec,
                    global_params=self._store.load(e["global"]),
                    update=self._store.load(e["file"]), update_kind="delta",
                    num_examples=int(e["num_examples"]), local_steps=local_steps, lr=lr,
                    batch_size=batch_size, knowledge=knowledge,
                    optimizer=optimizer or self.optimizer or LocalOptimizer(),
                    defenses=tuple(e.get("defenses", ())),
                    num_clients_aggregated=int(e["num_clients_aggregated"]))
        raise RunDirError(f"no aggregate record for round {server_round}")

    def aggregate_of(self, server_round: int, cfg: Any) -> ObservationRecord:
        """:meth:`aggregate` with the training parameters of config ``cfg`` for an aggregate
        recorded without them (:func:`aggregate_training`)."""
        return self.aggregate(server_round, **aggregate_training(cfg))

    def aggregate_clients(self, server_round: int) -> list[int]:
        """The clients whose updates are in ``server_round``'s aggregate."""
        return sorted(int(c) for e in self._store.entries("aggregate")
                      if int(e["round"]) == server_round for c in e.get("clients", ()))

    def _build(self, e: Mapping[str, Any]) -> ObservationRecord:
        knowledge: dict[str, Any] = {"granted": self.grant}
        if self.grant:
            truth = self._truth.read(self.run_id, int(e["round"]), int(e["client"]))
            knowledge.update(_grant_from_truth(truth, self.grant))
        return _record(run_id=self.run_id, server_round=int(e["round"]),
                       client_id=int(e["client"]), tap="server_in", spec=self.spec,
                       global_params=self._store.load(e["global"]),
                       update=self._store.load(e["file"]), update_kind=e["update_kind"],
                       num_examples=int(e["num_examples"]), local_steps=int(e["local_steps"]),
                       lr=float(e["lr"]), batch_size=int(e["batch_size"]),
                       defenses=tuple(e.get("defenses", ())), knowledge=knowledge,
                       optimizer=_optimizer(e, self.optimizer))


def _declares_mean_step(strategy: str) -> bool:
    """Whether ``strategy`` declares ``global_is_mean_step``; a strategy plug-in that is not
    installed where an old run is replayed counts as no mean (the plain global difference)."""
    try:
        return strategy_capabilities(strategy).global_is_mean_step
    except PluginError:
        return False


class PeerView:
    """Client ``client``'s view as a curious peer, built from ``run_dir/peer/c{client}`` only.

    ``strategy`` and ``server_lr`` come from the public config (FedSGD's η). Raises
    :class:`~fl_sim.errors.ThreatModelError` for a ground-truth grant or for another client.
    """

    role = "peer"

    def __init__(self, run_id: str, spec: ModelSpec, store: PeerStore, *, strategy: str,
                 server_lr: float | None, grant: Sequence[str] = (),
                 optimizer: LocalOptimizer | None = None) -> None:
        if grant:
            raise ThreatModelError(f"a peer view cannot be granted {tuple(grant)}: that is "
                                   "other clients' ground truth")
        self.run_id, self.spec, self.client = run_id, spec, store.client_id
        self.strategy, self.server_lr, self.grant = strategy, server_lr, ()
        #: the strategy declares its global moves by the weighted mean of the updates
        #: (fl_sim.capabilities): the peer can subtract its own share
        self.mean_step = _declares_mean_step(strategy)
        self.optimizer = optimizer  # the config's, for entries recorded without one
        self._store = store

    def _check_client(self, client: int | None) -> None:
        if client is not None and int(client) != self.client:
            raise ThreatModelError(f"peer view of client {self.client} cannot read client "
                                   f"{client}'s observations")

    def rounds(self) -> list[int]:
        """Rounds with the own update of round r and the global of round r + 1."""
        ups = {int(e["round"]) for e in self._store.entries("update")}
        globs = {int(e["round"]) for e in self._store.entries("global")}
        return sorted(r for r in ups if r in globs and r + 1 in globs)

    def records(self, *, rounds: Sequence[int] | None = None, client: int | None = None
                ) -> Iterator[ObservationRecord]:
        self._check_client(client)
        for r in self.rounds():
            if rounds is None or r in rounds:
                yield self.record(r)

    def record(self, server_round: int, client: int | None = None) -> ObservationRecord:
        """The other clients' aggregate update of ``server_round`` (see module doc)."""
        self._check_client(client)
        entries = {(e["kind"], int(e["round"])): e for e in self._store.entries()}
        own_e = entries.get(("update", server_round))
        g_e, next_e = entries.get(("global", server_round)), \
            entries.get(("global", server_round + 1))
        if own_e is None or g_e is None or next_e is None:
            raise RunDirError(f"peer {self.client} has no own update of round {server_round} "
                              "and globals of rounds r and r + 1 (not sampled?)")
        if int(next_e.get("aggregated_round", -1)) != server_round:
            raise RunDirError(f"peer {self.client}: the global of round {server_round + 1} "
                              f"does not follow an aggregation of round {server_round}")
        g, g_next = self._store.load(g_e["file"]), self._store.load(next_e["file"])
        own = self._store.load(own_e["file"])
        total = float(next_e.get("aggregated_num_examples", 0))
        num_agg = int(next_e.get("aggregated_num_clients", 0))
        n_k = float(own_e["num_examples"])
        knowledge: dict[str, Any] = {"granted": (), "aggregated_num_examples": total,
                                     "aggregated_num_clients": num_agg,
                                     "others_num_examples": total - n_k}
        kind = own_e["update_kind"]
        # the others' update is derived (mean minus own) for FedSGD and mean-of-deltas
        # strategies; otherwise the peer sees the plain global difference
        derived = kind == "gradient" or self.mean_step
        others = num_agg - 1 if derived else num_agg
        if others < 1 or total - n_k <= 0:  # checked before the maths divides by it
            raise RunDirError(f"round {server_round}: no other client was aggregated")
        if kind == "gradient":
            if self.server_lr is None:
                raise RunDirError("FedSGD peer view needs the server learning rate")
            update = others_mean_gradient(g, g_next, own, server_lr=self.server_lr,
                                          total_examples=total, own_examples=n_k)
            knowledge.update(server_lr=self.server_lr, derivation="weighted_mean_minus_own")
        elif self.mean_step:
            update = others_mean_delta(g, g_next, own, total_examples=total, own_examples=n_k)
            knowledge["derivation"] = "weighted_mean_minus_own"
        else:
            update = {k: g_next[k] - g[k] for k in g}
            knowledge["derivation"] = "global_difference"
        seen = total - n_k if derived else total
        return _record(run_id=self.run_id, server_round=server_round, client_id=self.client,
                       tap="peer_view", spec=self.spec, global_params=g, update=update,
                       update_kind="gradient" if kind == "gradient" else "delta",
                       num_examples=int(seen), local_steps=int(own_e["local_steps"]),
                       lr=float(own_e["lr"]), batch_size=int(own_e["batch_size"]),
                       knowledge=knowledge, own_update=own, num_clients_aggregated=others,
                       optimizer=_optimizer(own_e, self.optimizer),
                       defenses=tuple(own_e.get("defenses", ())))


def aggregate_training_row(cfg: Any) -> dict[str, Any]:
    """:func:`aggregate_training` as JSON, the ``training`` the server tap writes into each
    aggregate's index row (read back by :meth:`ServerView.aggregate`)."""
    t = aggregate_training(cfg)
    return {"lr": t["lr"], "local_steps": t["local_steps"], "batch_size": t["batch_size"],
            "optimizer": t["optimizer"].to_json()}
