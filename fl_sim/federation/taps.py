"""The server tap: the OUTERMOST strategy wrapper, recording what the server sees.

:class:`TapStrategy` wraps any Flower strategy (including Flower's DP wrappers, which must sit
INSIDE it so that their accountant sees the stock aggregation) and

* samples clients deterministically per ``(seed, round)`` (never Flower's global ``random``)
  and hands the wrapped strategy a :class:`SampledGrid` listing only those nodes;
* in ``configure_train`` snapshots the global model and stores it once per round;
* in ``aggregate_train`` records each reply as received (after any client-side defense):
  error replies count as failed, non-finite updates are REJECTED before the wrapped strategy
  sees them, the rest are stored (``server_in``) in client order and delegated; then stores
  what left aggregation (``aggregate``);
* publishes the accepted total ``num-examples`` of a round in the next round's config (what
  FedAvg's weighted mean needs to be undone by a curious peer).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from fl_sim.federation import protocol as P
from fl_sim.federation.retention import Retention
from fl_sim.seeding import numpy_rng
from fl_sim.stores import ObservationStore

logger = logging.getLogger(__name__)


def sample_clients(seed: int, server_round: int, clients: Sequence[int], fraction: float,
                   purpose: str = "train") -> list[int]:
    """``max(1, int(len(clients)·fraction))`` clients, sorted, from
    ``numpy_rng(seed, "round", r, "sample", purpose)``.

    >>> sample_clients(0, 1, [0, 1, 2, 3], 1.0)
    [0, 1, 2, 3]
    >>> sample_clients(0, 1, [0, 1, 2, 3], 0.5) == sample_clients(0, 1, [0, 1, 2, 3], 0.5)
    True
    """
    pool = sorted(int(c) for c in clients)
    k = max(1, int(len(pool) * fraction + 1e-9))
    if k >= len(pool):
        return pool
    rng = numpy_rng(seed, "round", server_round, "sample", purpose)
    return sorted(int(c) for c in rng.choice(pool, size=k, replace=False))


class SampledGrid:
    """A Grid whose ``get_node_ids`` lists only the sampled nodes; all else delegates."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@dataclass
class RoundLog:
    """Who was sampled / failed / rejected in one round, and the aggregation totals."""

    sampled: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    #: client -> the reason of its error reply (summary line, then traceback)
    errors: dict[int, str] = field(default_factory=dict)
    rejected: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    num_examples: int = 0
    train_loss: float | None = None
    aggregated: bool = False
    #: seconds the tap itself spent this round (global snapshot + store, reply checks and
    #: records, the aggregate's cast + record), by ``time.perf_counter``; excludes the
    #: wrapped strategy and the clients
    tap_seconds: float = 0.0


def arrays_to_tensors(arrays: ArrayRecord) -> dict[str, Tensor]:
    """Copies of an ArrayRecord's arrays as CPU tensors (the record is not modified)."""
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in arrays.items()}


def tensors_to_arrays(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v.detach().cpu().numpy(), order="C"))
                        for k, v in tensors.items()})


def _decode(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record, deserialised once (each ``Array.numpy()`` call decodes)."""
    return {k: a.numpy() for k, a in arrays.items()}


def _finite(arrays: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(x).all()) for x in arrays.values()
               if np.issubdtype(x.dtype, np.inexact))


class RecordWriter:
    """One background thread that writes records in submission order (the index keeps a
    deterministic order). :meth:`flush` waits for everything submitted and re-raises the
    first write error."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []

    def submit(self, fn: Any, *args: Any) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fl-sim-tap")
        self._pending.append(self._pool.submit(fn, *args))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()


class TapStrategy(Strategy):
    """Outermost wrapper: deterministic sampling, recording, NaN rejection (see module doc).

    ``node_to_client`` maps Flower node ids to partition ids (discovered by the server app);
    ``store`` is None when taps are disabled (sampling and rejection still apply);
    ``retention`` limits what is stored (:mod:`fl_sim.federation.retention`).
    """

    def __init__(self, inner: Strategy, *, seed: int, node_to_client: Mapping[int, int],
                 fraction_train: float, fraction_evaluate: float,
                 store: ObservationStore | None,
                 retention: Retention | None = None,
                 defenses: Sequence[Mapping[str, Any]] = (),
                 aggregate_training: Mapping[str, Any] | None = None) -> None:
        self.inner = inner
        #: the defenses in force (``describe()`` dicts), written into every record
        self.defenses = [dict(d) for d in defenses]
        #: the public training parameters behind the aggregate (lr, local_steps, batch_size,
        #: optimizer; :func:`fl_sim.views.aggregate_training_row`), written with each
        #: aggregate so its view reads them as recorded
        self.aggregate_training = dict(aggregate_training) if aggregate_training else None
        self.seed = int(seed)
        self.node_to_client = {int(n): int(c) for n, c in node_to_client.items()}
        self.client_to_node = {c: n for n, c in self.node_to_client.items()}
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.store = store
        self.retention = retention or Retention()
        self.published: dict[str, int] = {}
        #: audits' canary replies ``(round, global, accepted replies, inner) -> [Message]``
        #: (:mod:`fl_sim.federation.canaries`): handed to the wrapped strategy after the
        #: real replies, never recorded, so no view holds a canary
        self.extra_replies: list[Any] = []
        self.log = RoundLog()
        self._global: dict[str, Tensor] = {}
        #: writes the round's records off the server's main thread (see :meth:`flush`)
        self._writer = RecordWriter()

    # -- helpers ---------------------------------------------------------------------------
    def _sampled_grid(self, grid: Grid, server_round: int, fraction: float, purpose: str
                      ) -> tuple[SampledGrid, list[int]]:
        clients = sample_clients(self.seed, server_round, list(self.client_to_node), fraction,
                                 purpose)
        return SampledGrid(grid, [self.client_to_node[c] for c in clients]), clients

    def client_of(self, msg: Message) -> int:
        return self.node_to_client[int(msg.metadata.src_node_id)]

    # -- Strategy hooks ----------------------------------------------------------------------
    def summary(self) -> None:
        logger.info("TapStrategy (fraction_train=%s, fraction_evaluate=%s) around %s",
                    self.fraction_train, self.fraction_evaluate, type(self.inner).__name__)
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Snapshot + store the global, publish last round's totals, sample, delegate."""
        t0 = time.perf_counter()
        self._global = arrays_to_tensors(arrays)
        if self.store is not None and self.retention.round(server_round):
            self.store.write_global(server_round, self._global)
        spent = time.perf_counter() - t0
        for k, v in self.published.items():
            config[k] = v
        sampled_grid, clients = self._sampled_grid(grid, server_round, self.fraction_train,
                                                   "train")
        self.log = RoundLog(sampled=clients, tap_seconds=spent)
        return self.inner.configure_train(server_round, arrays, config, sampled_grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record each reply, reject non-finite ones, delegate the rest in client order.

        Each reply's arrays are decoded once (Flower deserialises on every ``numpy()``); the
        records are written by the tap's writer thread (:meth:`flush` waits for them)."""
        t0 = time.perf_counter()
        errors, accepted, decoded = [], [], {}
        for msg in replies:
            cid = self.client_of(msg)
            if msg.has_error():
                self.log.failed.append(cid)
                self.log.errors[cid] = str(msg.error.reason or "")
                errors.append(msg)
                continue
            arrays = _decode(next(iter(msg.content.array_records.values())))
            if not _finite(arrays):
                logger.warning("round %d: rejected non-finite update of client %d",
                               server_round, cid)
                self.log.rejected.append(cid)
                continue
            accepted.append((cid, msg))
            decoded[cid] = arrays
        accepted.sort(key=lambda item: item[0])
        for cid, msg in accepted:
            self._record_reply(server_round, cid, msg, decoded[cid])
        self.log.tap_seconds += time.perf_counter() - t0
        self.log.failed.sort()
        self.log.rejected.sort()
        self.log.accepted = [cid for cid, _ in accepted]
        self.log.num_examples = int(sum(_num_examples(m) for _, m in accepted))
        self.log.train_loss = _weighted_loss([m for _, m in accepted])
        real = [m for _, m in accepted]
        canaries = [c for hook in self.extra_replies
                    for c in hook(server_round, self._global, real, self.inner)]
        new, metrics = self.inner.aggregate_train(server_round, real + canaries + errors)
        return self._aggregated(server_round, new), metrics

    def _aggregated(self, server_round: int, new: ArrayRecord | None) -> ArrayRecord | None:
        """Cast the new global like the old one, record the ``aggregate`` (``new − global``
        of the clients in ``log.accepted``), publish the round's totals."""
        if new is not None:
            t0 = time.perf_counter()
            new = self._cast_like_global(new)
            self.log.aggregated = True
            if self.store is not None and self.retention.round(server_round):
                self._writer.submit(self._write_delta, "aggregate", server_round, None,
                                    _decode(new), {
                    "update_kind": "delta", "num_examples": self.log.num_examples,
                    "num_clients_aggregated": len(self.log.accepted),
                    "clients": self.log.accepted, "defenses": self.defenses,
                    **({"training": self.aggregate_training}
                       if self.aggregate_training else {})})
            self.log.tap_seconds += time.perf_counter() - t0
        # Published with the next global (an empty round publishes zeros, never stale totals).
        done = new is not None
        self.published = {P.AGG_ROUND_KEY: server_round,
                          P.AGG_NUM_EXAMPLES_KEY: self.log.num_examples if done else 0,
                          P.AGG_NUM_CLIENTS_KEY: len(self.log.accepted) if done else 0}
        return new

    def aggregate_mean(self, server_round: int, reply: Message | None,
                       clients: Sequence[int]) -> ArrayRecord | None:
        """SecAgg+ (:mod:`fl_sim.federation.secagg`): ``reply`` carries the unmasked mean of
        ``clients``' updates; the wrapped strategy aggregates it alone, and only the
        ``aggregate`` is recorded (there is no per-client update to record)."""
        self.log.accepted = sorted(int(c) for c in clients)
        if reply is None:
            return self._aggregated(server_round, None)
        self.log.num_examples = int(_num_examples(reply))
        self.log.train_loss = _weighted_loss([reply])
        new, _ = self.inner.aggregate_train(server_round, [reply])
        return self._aggregated(server_round, new)

    def global_tensors(self) -> dict[str, Tensor]:
        """The global of the current round (snapshot of ``configure_train``)."""
        return self._global

    def flush(self) -> None:
        """Wait until this round's records are written (before the round's checkpoint: a
        checkpoint never names a round whose records are still in flight); the wait counts
        as the taps' own time. Re-raises a write error."""
        t0 = time.perf_counter()
        self._writer.flush()
        self.log.tap_seconds += time.perf_counter() - t0

    def _record_reply(self, server_round: int, cid: int, msg: Message,
                      arrays: Mapping[str, np.ndarray]) -> None:
        if self.store is None or not self.retention.client_round(server_round, cid):
            return
        meta = _meta(msg)
        kind = "gradient" if meta.get(P.UPDATE_KIND_KEY) == P.GRADIENT else "delta"
        self._writer.submit(self._write_delta if kind == "delta" else self._write_as_is,
                            "server_in", server_round, cid, arrays, {
            "update_kind": kind, "num_examples": int(_num_examples(msg)),
            "local_steps": int(meta.get("local-steps", 1)), "lr": float(meta.get("lr", 0.0)),
            "batch_size": int(meta.get("batch-size", 0)), "defenses": self.defenses,
            **({"optimizer": json.loads(str(meta["optimizer"]))} if "optimizer" in meta
               else {})})

    def _write_delta(self, tap: str, server_round: int, cid: int | None,
                     arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """(writer thread) ``arrays − global`` as the record of ``tap``."""
        delta = {k: torch.from_numpy(a) - self._global[k] for k, a in arrays.items()}
        self.store.write_update(tap, server_round, cid, delta, meta)  # type: ignore[union-attr]

    def _write_as_is(self, tap: str, server_round: int, cid: int | None,
                     arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """(writer thread) ``arrays`` (a gradient) as the record of ``tap``."""
        update = {k: torch.from_numpy(a) for k, a in arrays.items()}
        self.store.write_update(tap, server_round, cid, update, meta)  # type: ignore[union-attr]

    def _cast_like_global(self, arrays: ArrayRecord) -> ArrayRecord:
        """Flower averages integer buffers (e.g. ``num_batches_tracked``) as floats; cast
        every array back to the global's dtype (rounding integers) so the model's state
        keeps its types across rounds."""
        out = {}
        for k, a in arrays.items():
            x = a.numpy()
            ref = self._global.get(k)
            if ref is not None and x.dtype != ref.numpy().dtype:
                target = ref.numpy().dtype
                x = np.rint(x).astype(target) if np.issubdtype(target, np.integer) \
                    else x.astype(target)
                out[k] = Array(np.asarray(x, order="C"))
            else:
                out[k] = a
        return ArrayRecord(out)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation on a deterministic sample (none if fraction_evaluate is 0)."""
        if self.fraction_evaluate <= 0:
            return []
        sampled_grid, _ = self._sampled_grid(grid, server_round, self.fraction_evaluate,
                                             "evaluate")
        return self.inner.configure_evaluate(server_round, arrays, config, sampled_grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Delegate in client order (float sums are order-dependent)."""
        ordered = sorted(replies, key=lambda m: (m.has_error(), self.client_of(m)))
        if not ordered:
            return None
        return self.inner.aggregate_evaluate(server_round, ordered)


def _meta(msg: Message) -> dict[str, Any]:
    rec = msg.content.config_records.get(P.META)
    return dict(rec) if rec is not None else {}


def _num_examples(msg: Message) -> float:
    metrics = next(iter(msg.content.metric_records.values()))
    return float(metrics[P.NUM_EXAMPLES])  # type: ignore[arg-type]


def _weighted_loss(msgs: Sequence[Message]) -> float | None:
    total, acc = 0.0, 0.0
    for m in msgs:
        metrics = next(iter(m.content.metric_records.values()))
        if "train-loss" in metrics:
            w = float(metrics[P.NUM_EXAMPLES])  # type: ignore[arg-type]
            acc += w * float(metrics["train-loss"])  # type: ignore[arg-type]
            total += w
    return acc / total if total > 0 and math.isfinite(acc) else None
