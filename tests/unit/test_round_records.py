"""The server's records of a round, without Ray: round indices and the SecAgg+ path.

The server loop's :func:`~fl_sim.federation.server_app.run_round` runs over a hand-built grid
whose clients reply with hand-built Flower Messages (``global + offset of the client``), so
every number the records must hold is known. Read back through the server's view (what an
attack gets):

* round ``r``'s records name round ``r`` and hold round ``r``'s global (never ``r − 1``'s),
  each client's update is ``reply − global of round r``, the aggregate ``new − global``;
* under SecAgg+ (:func:`~fl_sim.federation.secagg.secagg_train`, its four-stage protocol
  replaced by what it returns: the unmasked mean for every client) the server records the
  aggregate only, never a per-client update.

The slow Ray tests (tests/integration) run the same paths end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from fl_sim.config import from_dict
from fl_sim.federation import flower_compat, secagg
from fl_sim.federation.server_app import run_round
from fl_sim.federation.taps import TapStrategy
from fl_sim.records import ModelSpec
from fl_sim.registry import STRATEGIES
from fl_sim.stores import ObservationStore, TruthStore
from fl_sim.views import ServerView

pytestmark = pytest.mark.usefixtures("flower_task_identity")

NODES = (100, 101, 102)
SPEC = ModelSpec(model="mlp", model_params={}, task="classifier", task_params={},
                 in_channels=1, num_classes=3, image_size=2, mean=(0.0,), std=(1.0,))


def _offset(node: int) -> float:
    """What client ``node - 100`` adds to the global (distinct per client)."""
    return 0.25 * (node - 99)


def _global(r: int) -> ArrayRecord:
    """Round ``r``'s global: distinct per round, so a record of the wrong round shows."""
    return ArrayRecord({"w": Array(np.full((3, 2), 10.0 * r, np.float32)),
                        "b": Array(np.arange(3, dtype=np.float32) + r)})


class _Grid:
    """Three nodes; each train message is answered by ``its arrays + _offset(node)``."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages, timeout=None):  # type: ignore[no-untyped-def]
        out = []
        for m in messages:
            self.sent.append(m)
            node = int(m.metadata.dst_node_id)
            arrays = next(iter(m.content.array_records.values()))
            reply = ArrayRecord({k: Array(a.numpy() + np.float32(_offset(node)))
                                 for k, a in arrays.items()})
            out.append(Message(RecordDict({
                "arrays": reply,
                "metrics": MetricRecord({"num-examples": 2, "train-loss": 1.0}),
                "meta": ConfigRecord({"partition-id": node - 100, "local-steps": 1,
                                      "batch-size": 2, "lr": 0.1})}), reply_to=m))
        return out


def _tap(run_dir: Path) -> tuple[TapStrategy, ObservationStore]:
    store = ObservationStore(run_dir)
    tap = TapStrategy(STRATEGIES.create("fedavg"), seed=0,
                      node_to_client={n: n - 100 for n in NODES}, fraction_train=1.0,
                      fraction_evaluate=0.0, store=store)
    return tap, store


def _tensors(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in arrays.items()}


def test_round_r_records_hold_round_r_and_its_global(tmp_path: Path) -> None:
    cfg = from_dict({"federation": {"num_clients": 3, "fraction_train": 1.0,
                                    "fraction_evaluate": 0.0}})
    tap, store = _tap(tmp_path)
    view = ServerView("t", SPEC, store, TruthStore(tmp_path))
    arrays = _global(1)
    sent: dict[int, dict[str, torch.Tensor]] = {}
    for r in (1, 2, 3):
        sent[r] = _tensors(arrays)
        arrays, row = run_round(_Grid(), tap, cfg, tmp_path, r, arrays, [])
        assert row["round"] == r and row["aggregated"]
        # FedAvg of equal weights: the new global is the old one + the mean offset
        mean = sum(_offset(n) for n in NODES) / len(NODES)
        for k, v in _tensors(arrays).items():
            torch.testing.assert_close(v, sent[r][k] + mean)
    assert view.rounds() == [1, 2, 3]
    for r in (1, 2, 3):
        assert view.clients(r) == [0, 1, 2]
        for c in (0, 1, 2):
            rec = view.record(r, c)
            assert rec.server_round == r and rec.client_id == c
            for k, v in sent[r].items():  # the global the update was computed from: round r's
                assert torch.equal(rec.global_params[k], v), (r, c, k)
                torch.testing.assert_close(rec.update[k], torch.full_like(v, _offset(100 + c)))
        agg = view.aggregate(r)
        assert agg.server_round == r and view.aggregate_clients(r) == [0, 1, 2]
        for k, v in sent[r].items():
            assert torch.equal(agg.global_params[k], v)
            torch.testing.assert_close(agg.update[k], torch.full_like(v, 0.5))
    globals_ = {int(e["round"]): e for e in store.entries("global")}
    assert sorted(globals_) == [1, 2, 3]
    for r, e in globals_.items():
        assert all(torch.equal(store.load(e["file"])[k], v) for k, v in sent[r].items())


def _unmasked_mean(fitins, nodes):  # type: ignore[no-untyped-def]
    """What SecAgg+'s protocol returns: for every client the same unmasked weighted mean of
    the clients' UPDATES (``reply − global``), as Flower's legacy FitRes."""
    keys = list(next(iter(fitins.values())).config[flower_compat.KEYS_KEY])
    mean = sum(_offset(n) for n in nodes) / len(nodes)
    shapes = {"w": (3, 2), "b": (3,)}
    params = ndarrays_to_parameters([np.full(shapes[k], mean, np.float64) for k in keys])
    return [(n, FitRes(Status(Code.OK, ""), params, 2,
                       {"train-loss": 1.0, flower_compat.REPLY_KEYS: "\n".join(keys)}))
            for n in nodes]


def test_secagg_plus_round_records_the_aggregate_only(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = from_dict({"federation": {"num_clients": 3, "fraction_evaluate": 0.0},
                     "defenses": [{"name": "secagg_plus"}]})
    calls: list[int] = []

    def protocol(grid, defense, max_weight, server_round, arrays, fitins):  # noqa: ANN001,ANN202
        calls.append(server_round)
        assert sorted(fitins) == list(NODES)  # every sampled client takes part
        return _unmasked_mean(fitins, sorted(fitins))

    monkeypatch.setattr(secagg, "run_secaggplus", protocol)
    monkeypatch.setattr(secagg, "max_num_examples", lambda cfg: 2)
    tap, store = _tap(tmp_path)
    view = ServerView("t", SPEC, store, TruthStore(tmp_path))
    grid = _Grid()
    arrays, sent = _global(1), {}
    for r in (1, 2):
        sent[r] = _tensors(arrays)
        arrays, row = run_round(grid, tap, cfg, tmp_path, r, arrays, [])
        assert row["round"] == r and row["aggregated"] and row["num_examples"] == 6
    assert calls == [1, 2] and grid.sent == []  # nothing went around the protocol
    # the server never holds a per-client update under SecAgg+: no server_in record at all
    assert store.entries("server_in") == [] and view.rounds() == []
    assert {int(e["round"]) for e in store.entries("aggregate")} == {1, 2}
    for r in (1, 2):
        agg = view.aggregate(r)
        assert agg.server_round == r and view.aggregate_clients(r) == [0, 1, 2]
        for k, v in sent[r].items():
            assert torch.equal(agg.global_params[k], v)
            torch.testing.assert_close(agg.update[k], torch.full_like(v, 0.5))
