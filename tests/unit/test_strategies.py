"""Strategies and the server tap with mock replies (Prepare / Execute / Assert; no Ray)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from fl_sim.errors import ConfigError
from fl_sim.federation.checkpoint import load_strategy_state, strategy_state
from fl_sim.federation.taps import TapStrategy, sample_clients
from fl_sim.registry import STRATEGIES
from fl_sim.stores import ObservationStore
from strategies.fedsgd import FedSGD, fedsgd_step

EXPECTED = {"fedavg": FedAvg, "fedsgd": FedSGD, "fedprox": FedProx, "fedadam": FedAdam,
            "fedyogi": FedYogi, "fedadagrad": FedAdagrad, "fedavgm": FedAvgM,
            "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum}


pytestmark = pytest.mark.usefixtures("flower_task_identity")


class FakeGrid:
    """The part of a Grid the strategies use: node ids."""

    def __init__(self, node_ids: Sequence[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def _reply(node: int, arrays: dict[str, np.ndarray], num_examples: int, *,
           kind: str = "weights", loss: float = 1.0) -> Message:
    ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                  message_type=MessageType.TRAIN)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss}),
        "meta": ConfigRecord({"partition-id": node - 100, "update-kind": kind,
                              "local-steps": 1, "batch-size": 2, "lr": 0.1})})
    return Message(content, reply_to=ins)


def _error(node: int) -> Message:
    ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                  message_type=MessageType.TRAIN)
    return Message(Error(code=0, reason="injected"), reply_to=ins)


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(3, 2)).astype(np.float32),
            "b": rng.normal(size=(2,)).astype(np.float32)}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


# -- registry -------------------------------------------------------------------------------
def test_registry_names_and_flower_classes() -> None:
    assert set(EXPECTED) <= set(STRATEGIES.names())
    for name, cls in EXPECTED.items():
        strategy = STRATEGIES.create(name)
        assert type(strategy) is cls, name
        assert strategy.fraction_train == 1.0 and strategy.min_train_nodes == 1


def test_factory_params_are_validated_with_the_field_name() -> None:
    assert STRATEGIES.create("fedadam", eta=0.3).eta == 0.3
    assert STRATEGIES.create("fedprox", proximal_mu=0.5).proximal_mu == 0.5
    with pytest.raises(ConfigError, match=r"strategy\.beta"):
        STRATEGIES.create("fedtrimmedavg", _where="strategy", beta=0.7)
    with pytest.raises(ConfigError, match=r"strategy\.server_lr"):
        STRATEGIES.create("fedsgd", _where="strategy", server_lr=-1.0)
    with pytest.raises(ConfigError, match="unknown key"):
        STRATEGIES.create("fedavg", _where="strategy", eta=0.1)


# -- FedSGD maths -----------------------------------------------------------------------------
def test_fedsgd_step_updates_params_and_keeps_buffers() -> None:
    g = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(7, np.int64)}
    new = fedsgd_step(g, {"w": np.array([0.5, -1.0], np.float32)}, 0.2)
    np.testing.assert_allclose(new["w"], [0.9, 2.2], rtol=1e-6)
    assert new["w"].dtype == np.float32 and int(new["n"]) == 7
    with pytest.raises(ValueError, match="shape"):
        fedsgd_step(g, {"w": np.zeros(3, np.float32)}, 0.1)
    with pytest.raises(KeyError):
        fedsgd_step(g, {"v": np.zeros(2, np.float32)}, 0.1)


def test_fedsgd_aggregate_is_global_minus_lr_times_weighted_mean_gradient() -> None:
    # Prepare
    g = _global()
    rng = np.random.default_rng(1)
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in g.items()}
             for _ in range(3)]
    weights = [2, 3, 5]
    strategy = FedSGD(server_lr=0.3, min_train_nodes=1, min_available_nodes=1)
    config = ConfigRecord()
    msgs = list(strategy.configure_train(1, _record(g), config, FakeGrid([100, 101, 102])))
    # Execute
    new, metrics = strategy.aggregate_train(
        1, [_reply(100 + i, grads[i], weights[i], kind="gradient") for i in range(3)])
    # Assert
    assert len(msgs) == 3 and config["update-kind"] == "gradient"
    total = sum(weights)
    for k in g:
        mean = sum(w * gr[k] for w, gr in zip(weights, grads, strict=True)) / total
        np.testing.assert_allclose(new[k].numpy(), g[k] - 0.3 * mean, rtol=1e-5, atol=1e-6)
    assert metrics is not None and "num-examples" not in metrics


def test_fedsgd_without_server_lr_refuses_to_aggregate() -> None:
    from flwr.serverapp.exception import AggregationError
    strategy = FedSGD(min_train_nodes=1, min_available_nodes=1)
    strategy.configure_train(1, _record(_global()), ConfigRecord(), FakeGrid([100]))
    with pytest.raises(AggregationError, match="server_lr"):
        strategy.aggregate_train(1, [_reply(100, _global(1), 1, kind="gradient")])


# -- the server tap -------------------------------------------------------------------------
def _tap(inner, store=None, *, fraction=1.0, n=4) -> TapStrategy:  # type: ignore[no-untyped-def]
    return TapStrategy(inner, seed=3, node_to_client={100 + c: c for c in range(n)},
                       fraction_train=fraction, fraction_evaluate=0.0, store=store)


def test_sampling_is_deterministic_per_seed_and_round() -> None:
    a = [sample_clients(7, r, range(10), 0.3) for r in range(1, 6)]
    random.seed(123)  # Flower's global RNG must not matter
    b = [sample_clients(7, r, range(10), 0.3) for r in range(1, 6)]
    assert a == b and all(len(s) == 3 and s == sorted(s) for s in a)
    assert len({tuple(s) for s in a}) > 1
    assert a != [sample_clients(8, r, range(10), 0.3) for r in range(1, 6)]  # seed matters
    tap = _tap(STRATEGIES.create("fedavg"), fraction=0.5)
    msgs = tap.configure_train(2, _record(_global()), ConfigRecord(),
                               FakeGrid([100, 101, 102, 103]))
    sent = sorted(m.metadata.dst_node_id - 100 for m in msgs)
    assert sent == sample_clients(3, 2, range(4), 0.5) == tap.log.sampled


def test_tap_records_replies_and_rejects_non_finite_before_delegation(tmp_path) -> None:
    # Prepare
    g = _global()
    store = ObservationStore(tmp_path)
    seen: list[int] = []
    inner = STRATEGIES.create("fedavg")
    original = inner.aggregate_train

    def spy(server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        seen.extend(m.metadata.src_node_id - 100 for m in replies if not m.has_error())
        return original(server_round, replies)

    inner.aggregate_train = spy
    tap = _tap(inner, store)
    tap.configure_train(1, _record(g), ConfigRecord(), FakeGrid([100, 101, 102, 103]))
    rng = np.random.default_rng(2)
    new_w = [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}
             for _ in range(3)]
    bad = {k: v.copy() for k, v in g.items()}
    bad["w"][0, 0] = np.nan
    replies = [_reply(102, new_w[2], 30), _reply(100, new_w[0], 10), _error(101),
               _reply(103, bad, 5)]
    # Execute
    new, _ = tap.aggregate_train(1, replies)
    tap.flush()  # the records are written by the tap's writer thread
    # Assert
    assert seen == [0, 2] and tap.log.rejected == [3] and tap.log.failed == [1]
    assert tap.log.num_examples == 40
    rows = {(e["tap"], e["client"]): e for e in store.entries()}
    assert set(rows) == {("global", None), ("server_in", 0), ("server_in", 2),
                         ("aggregate", None)}
    deltas = {c: store.load(rows[("server_in", c)]["file"]) for c in (0, 2)}
    for k in g:
        np.testing.assert_allclose(deltas[0][k].numpy(), new_w[0][k] - g[k], atol=1e-6)
        mean = (10 * deltas[0][k] + 30 * deltas[2][k]) / 40
        np.testing.assert_allclose(new[k].numpy(), g[k] + mean.numpy(), atol=1e-6)
    assert tap.published["aggregated-num-examples"] == 40


def test_tap_aggregate_does_not_depend_on_reply_order() -> None:
    g = _global()
    rng = np.random.default_rng(5)
    ws = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in g.items()}
          for _ in range(4)]
    results = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        tap = _tap(STRATEGIES.create("fedavg"))
        tap.configure_train(1, _record(g), ConfigRecord(), FakeGrid([100, 101, 102, 103]))
        new, _ = tap.aggregate_train(1, [_reply(100 + i, ws[i], 3 + 7 * i) for i in order])
        results.append({k: a.numpy() for k, a in new.items()})
    for k in g:
        assert np.array_equal(results[0][k], results[1][k])


def test_tap_keeps_integer_buffer_dtypes() -> None:
    g = {"w": np.ones(2, np.float32), "num_batches_tracked": np.array(4, np.int64)}
    tap = _tap(STRATEGIES.create("fedavg"), n=2)
    tap.configure_train(1, _record(g), ConfigRecord(), FakeGrid([100, 101]))
    r = [{"w": np.zeros(2, np.float32), "num_batches_tracked": np.array(n, np.int64)}
         for n in (6, 7)]
    new, _ = tap.aggregate_train(1, [_reply(100, r[0], 1), _reply(101, r[1], 1)])
    assert new["num_batches_tracked"].numpy().dtype == np.int64
    assert int(new["num_batches_tracked"].numpy()) in (6, 7)


# -- strategy state for checkpoints ---------------------------------------------------------
@pytest.mark.parametrize("name", ["fedadam", "fedavgm", "fedyogi"])
def test_strategy_state_round_trip_continues_identically(name: str) -> None:
    g = _global()
    rng = np.random.default_rng(9)
    rounds = [[{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}
               for _ in range(2)] for _ in range(2)]

    def step(strategy, arrays, r):  # type: ignore[no-untyped-def]
        strategy.configure_train(r, arrays, ConfigRecord(), FakeGrid([100, 101]))
        new, _ = strategy.aggregate_train(
            r, [_reply(100 + i, rounds[r - 1][i], 4 + i) for i in range(2)])
        return new

    a = STRATEGIES.create(name)
    arrays = step(a, _record(g), 1)
    tensors, scalars = strategy_state(a)
    b = STRATEGIES.create(name)
    load_strategy_state(b, {k: v.clone() for k, v in tensors.items()}, scalars)
    ref = step(a, arrays, 2)
    got = step(b, _record({k: v.numpy() for k, v in arrays.items()}), 2)
    for k in g:
        assert np.array_equal(ref[k].numpy(), got[k].numpy()), k
    assert any(t.numel() for t in tensors.values())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())


def test_failure_injection_rate_and_seed() -> None:
    from pathlib import Path

    from fl_sim import config
    from fl_sim.federation.client_app import should_fail

    default = Path(__file__).resolve().parents[2] / "configs" / "default.toml"

    def pattern(seed: int, rate: float) -> list[bool]:
        cfg = config.load(default, [f"run.seed={seed}", f"federation.client_failure_rate={rate}"])
        return [should_fail(cfg, r, c) for r in range(1, 101) for c in range(20)]

    quarter = pattern(0, 0.25)
    assert abs(sum(quarter) / len(quarter) - 0.25) < 0.03  # 2000 (round, client) draws
    assert quarter != pattern(1, 0.25)  # derived from the run seed
    assert not any(pattern(0, 0.0))
