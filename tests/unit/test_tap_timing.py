"""The taps time their own work (``RoundLog.tap_seconds`` → ``metrics.jsonl`` taps_seconds).

What benchmarks/federation.py divides by the round time: it must count the recording and
nothing the wrapped strategy or the clients do.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fl_sim.federation.taps import TapStrategy
from fl_sim.registry import STRATEGIES
from fl_sim.stores import ObservationStore

NODES = [100, 101, 102]


pytestmark = pytest.mark.usefixtures("flower_task_identity")


class _Grid:
    def get_node_ids(self) -> list[int]:
        return list(NODES)


def _arrays(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((4, 3), value, np.float32))})


def _reply(node: int) -> Message:
    ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                  message_type=MessageType.TRAIN)
    return Message(RecordDict({
        "arrays": _arrays(float(node)),
        "metrics": MetricRecord({"num-examples": 2, "train-loss": 1.0}),
        "meta": ConfigRecord({"partition-id": node - 100, "local-steps": 1,
                              "batch-size": 2, "lr": 0.1})}), reply_to=ins)


def _slow(fn, seconds: float):  # type: ignore[no-untyped-def]
    def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(seconds)
        return fn(*args, **kwargs)
    return wrapped


def test_tap_seconds_count_the_recording_and_not_the_strategy(tmp_path, monkeypatch) -> None:
    store = ObservationStore(tmp_path)
    inner = STRATEGIES.create("fedavg")
    monkeypatch.setattr(inner, "aggregate_train", _slow(inner.aggregate_train, 0.5))
    monkeypatch.setattr(store, "write_update", _slow(store.write_update, 0.02))
    monkeypatch.setattr(store, "write_global", _slow(store.write_global, 0.02))
    tap = TapStrategy(inner, seed=0, node_to_client={n: n - 100 for n in NODES},
                      fraction_train=1.0, fraction_evaluate=0.0, store=store)
    list(tap.configure_train(1, _arrays(0.0), ConfigRecord(), _Grid()))
    assert 0.02 <= tap.log.tap_seconds < 0.5
    new, _ = tap.aggregate_train(1, [_reply(n) for n in NODES])
    assert new is not None and tap.log.aggregated
    # the 3 server_in + 1 aggregate records are written by the tap's writer thread while the
    # wrapped strategy aggregates: its 0.5 s is not the tap's, and flush() finds them done
    assert tap.log.tap_seconds < 0.5
    tap.flush()
    assert tap.log.tap_seconds < 0.5
    assert len(store.entries("server_in")) == 3 and len(store.entries("aggregate")) == 1


def test_waiting_for_the_writer_counts_as_tap_time(tmp_path, monkeypatch) -> None:
    """Writes that did not overlap with other work are waited for in flush(): taps time."""
    store = ObservationStore(tmp_path)
    monkeypatch.setattr(store, "write_update", _slow(store.write_update, 0.05))
    tap = TapStrategy(STRATEGIES.create("fedavg"), seed=0,
                      node_to_client={n: n - 100 for n in NODES}, fraction_train=1.0,
                      fraction_evaluate=0.0, store=store)
    list(tap.configure_train(1, _arrays(0.0), ConfigRecord(), _Grid()))
    tap.aggregate_train(1, [_reply(n) for n in NODES])
    tap.flush()
    # 3 server_in + 1 aggregate records at >= 50 ms each, most of it waited for in flush
    assert 0.15 <= tap.log.tap_seconds < 1.0
    assert [e["client"] for e in store.entries("server_in")] == [0, 1, 2]
    untapped = TapStrategy(STRATEGIES.create("fedavg"), seed=0,
                           node_to_client={n: n - 100 for n in NODES}, fraction_train=1.0,
                           fraction_evaluate=0.0, store=None)
    list(untapped.configure_train(1, _arrays(0.0), ConfigRecord(), _Grid()))
    untapped.aggregate_train(1, [_reply(n) for n in NODES])
    assert untapped.log.tap_seconds < 5 * 0.02      # no store: checks only
