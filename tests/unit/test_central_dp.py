"""central_dp without Ray: parameters and pre-flight, ε = Opacus', the wrapper inside the tap
(server records untouched, seeded noise of std σC/m on the aggregate, state survives a
checkpoint), FedSGD's one-step replies, the conditional client clipping mod."""

from __future__ import annotations

import math
from pathlib import Path

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

from defenses.central_dp import CentralDP
from fl_sim.config import from_dict
from fl_sim.federation.checkpoint import load_strategy_state, strategy_state
from fl_sim.federation.server_app import build_strategy
from fl_sim.federation.server_defenses import (
    CentralDPStrategy,
    central_dp_clipping_mod,
    central_dp_row,
    wrap_server_defenses,
)
from fl_sim.federation.taps import TapStrategy, arrays_to_tensors
from fl_sim.registry import DEFENSES
from fl_sim.stores import ObservationStore
from strategies.fedsgd import FedSGD, fedsgd_step, step_reply

pytestmark = pytest.mark.usefixtures("flower_task_identity")

N = 4


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return [100 + c for c in range(N)]


def _cfg(strategy: str = "fedavg", **dp: object) -> object:
    return from_dict({"model": {"name": "mlp"},
                      "federation": {"num_clients": N, "num_rounds": 2},
                      "strategy": {"name": strategy},
                      "defenses": [{"name": "central_dp", **dp}] if dp is not None else []})


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(64, 32)).astype(np.float32),
            "b": rng.normal(size=(32,)).astype(np.float32)}


def _reply(node: int, arrays: dict[str, np.ndarray], kind: str = "weights") -> Message:
    ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                  message_type=MessageType.TRAIN)
    return Message(RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": 2, "train-loss": 1.0}),
        "meta": ConfigRecord({"partition-id": node - 100, "update-kind": kind,
                              "local-steps": 1, "batch-size": 2, "lr": 0.1})}), reply_to=ins)


def _updates(scale: float = 0.01) -> list[dict[str, np.ndarray]]:
    g, rng = _global(), np.random.default_rng(1)
    return [{k: (v + scale * rng.normal(size=v.shape)).astype(np.float32)
             for k, v in g.items()} for _ in range(N)]


def _round(strategy: object, tmp: Path | None, updates: list[dict[str, np.ndarray]],
           server_round: int = 1) -> tuple[dict[str, np.ndarray], TapStrategy]:
    store = ObservationStore(tmp) if tmp is not None else None
    tap = TapStrategy(strategy, seed=3, node_to_client={100 + c: c for c in range(N)},
                      fraction_train=1.0, fraction_evaluate=0.0, store=store)
    g = _global()
    list(tap.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in g.items()}),
                             ConfigRecord(), FakeGrid()))
    new, _ = tap.aggregate_train(server_round, [_reply(100 + c, u)
                                                for c, u in enumerate(updates)])
    tap.flush()
    assert new is not None
    return {k: a.numpy() for k, a in new.items()}, tap


def test_defaults_run_alone_and_say_whom_they_protect() -> None:
    d = DEFENSES.create("central_dp", _where="defenses[0]")
    assert (d.stage, d.protects_server_view, d.clipping) == ("server", False, "server_fixed")
    cfg = _cfg()
    assert d.problem(cfg) is None and d.sampled(cfg) == N
    assert isinstance(wrap_server_defenses(build_strategy(cfg), cfg), CentralDPStrategy)


@pytest.mark.parametrize(("strategy", "params", "words"), [
    ("fedavg", {"noise_multiplier": -1.0}, "defenses[0].noise_multiplier"),
    ("fedavg", {"clipping": "sometimes"}, "defenses[0].clipping"),
    ("fedavg", {"clipping_norm": 0.0}, "defenses[0].clipping_norm"),
    ("fedadam", {}, "mean of the clients' updates"),
    ("fedavg", {"num_sampled_clients": 7}, "num_sampled_clients = 7"),
    ("fedsgd", {"clipping": "client_adaptive", "noise_multiplier": 1.0},
     "clipped_count_stddev"),
])
def test_bad_params_are_one_line_before_anything_starts(tmp_path: Path, capsys: object,
                                                         strategy: str, params: dict,
                                                         words: str) -> None:
    from fl_sim import cli
    lines = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in params.items())
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[model]\nname = "mlp"\n[strategy]\nname = "{strategy}"\n'
                   f'[[defenses]]\nname = "central_dp"\n{lines}')
    code = cli.main(["run", str(cfg), "--run-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert code == 2 and err.count("\n") == 1 and err.startswith("fl-sim: error: "), err
    assert words in err and not (tmp_path / "r").exists(), err


def test_epsilon_is_opacus_rdp_of_the_sampled_gaussian_per_round() -> None:
    from opacus.accountants import RDPAccountant
    cfg = from_dict({"model": {"name": "mlp"}, "strategy": {"name": "fedavg"},
                     "federation": {"num_clients": 10, "fraction_train": 0.3}})
    d = CentralDP(noise_multiplier=1.3)
    acc = RDPAccountant()
    for _ in range(5):
        acc.step(noise_multiplier=1.3, sample_rate=0.3)
    assert math.isclose(d.round_epsilon(cfg, 5), acc.get_epsilon(delta=1e-5), rel_tol=1e-9)
    assert d.round_epsilon(cfg, 1) < d.round_epsilon(cfg, 5)
    assert math.isinf(CentralDP(noise_multiplier=0.0).round_epsilon(cfg, 1))


def test_server_records_are_untouched_and_the_aggregate_carries_seeded_noise(
        tmp_path: Path) -> None:
    updates = _updates()
    plain, _ = _round(build_strategy(_cfg()), tmp_path / "plain", updates)
    cfg = _cfg(noise_multiplier=0.5, clipping_norm=2.0)
    state = np.random.get_state()
    noisy, tap = _round(wrap_server_defenses(build_strategy(cfg), cfg), tmp_path / "dp",
                        updates)
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # global RNG restored
    again, _ = _round(wrap_server_defenses(build_strategy(cfg), cfg), None, updates)
    # the server saw exactly what it sees without the defense (bit-identical records)
    a, b = ObservationStore(tmp_path / "plain"), ObservationStore(tmp_path / "dp")
    for ea, eb in zip(a.entries("server_in"), b.entries("server_in"), strict=True):
        ra, rb = a.load(ea["file"]), b.load(eb["file"])
        assert all(np.array_equal(ra[k].numpy(), rb[k].numpy()) for k in ra)
    # ... while the aggregate carries N(0, (σC/m)²) noise, the same for the same seed
    noise = np.concatenate([(noisy[k] - plain[k]).ravel() for k in plain])
    assert abs(noise.std() / (0.5 * 2.0 / N) - 1) < 0.05 and abs(noise.mean()) < 0.01
    assert all(np.array_equal(noisy[k], again[k]) for k in noisy)
    row = central_dp_row(tap.inner)
    assert row["central_dp_noise_std"] == pytest.approx(0.25)
    assert (row["central_dp_unit"], row["central_dp_neighbouring"]) == ("client",
                                                                        "add-or-remove-one")
    assert row["central_dp_epsilon"] == pytest.approx(CentralDP(noise_multiplier=0.5)
                                                      .round_epsilon(cfg, 1))


def test_server_clipping_bounds_each_update_and_zero_updates_pass() -> None:
    cfg = _cfg(noise_multiplier=0.0, clipping_norm=0.05)
    updates = _updates(scale=1.0)
    updates[0] = _global()  # a zero update: Flower divided by its norm
    new, _ = _round(wrap_server_defenses(build_strategy(cfg), cfg), None, updates)
    g = _global()
    mean_delta = np.sqrt(sum(float(((new[k] - g[k]) ** 2).sum()) for k in g))
    assert mean_delta <= 0.05 * (N - 1) / N + 1e-6 and mean_delta > 0.01


def test_adaptive_clipping_norm_survives_a_checkpoint() -> None:
    cfg = _cfg(clipping="server_adaptive", noise_multiplier=0.1,
               clipped_count_stddev=1.0, clipping_norm=0.01)
    s = wrap_server_defenses(build_strategy(cfg), cfg)
    _round(s, None, _updates(scale=1.0))
    # every update is far above C: C grows (Andrew et al.; Flower 1.42 shrank it)
    assert s.clipping_norm > 0.01 and s.releases == 1  # type: ignore[attr-defined]
    fresh = wrap_server_defenses(build_strategy(cfg), cfg)
    load_strategy_state(fresh, *strategy_state(s))
    assert fresh.clipping_norm == s.clipping_norm  # type: ignore[attr-defined]
    assert fresh.releases == 1  # type: ignore[attr-defined]


def test_fedsgd_under_central_dp_replies_steps_that_aggregate_to_the_fedsgd_step() -> None:
    cfg = _cfg("fedsgd", noise_multiplier=0.0, clipping_norm=100.0)
    s = wrap_server_defenses(build_strategy(cfg), cfg)
    inner = s.dp.strategy  # type: ignore[attr-defined]
    assert isinstance(inner, FedSGD) and inner.reply_steps
    g = _global()
    msgs = list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in g.items()}),
                                  ConfigRecord(), FakeGrid()))
    config = next(iter(msgs[0].content.config_records.values()))
    eta = float(config["server-lr"])
    assert config["update-kind"] == "sgd-step" and eta == inner.server_lr
    rng = np.random.default_rng(2)
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in g.items()}
             for _ in range(N)]
    import torch
    steps = [{k: v.numpy() for k, v in step_reply(
        {k: torch.from_numpy(v) for k, v in g.items()},
        {k: torch.from_numpy(v) for k, v in gr.items()}, eta).items()} for gr in grads]
    new, _ = s.aggregate_train(1, [_reply(100 + c, u) for c, u in enumerate(steps)])
    expected = fedsgd_step(g, {k: np.mean([gr[k] for gr in grads], axis=0) for k in g}, eta)
    for k in g:
        np.testing.assert_allclose(new[k].numpy(), expected[k], atol=1e-6)  # type: ignore
        # the attacker's reading of a one-step delta record: -delta / η is the gradient
        np.testing.assert_allclose(-(steps[1][k] - g[k]) / eta, grads[1][k], atol=2e-5)


def test_client_clipping_mod_acts_only_when_the_config_asks(tmp_path: Path) -> None:
    g = _global()
    far = {k: v + 1.0 for k, v in g.items()}

    def train(msg: Message, ctxt: object) -> Message:
        return _reply(100, far)

    for extra, clipped in (({}, False), ({"clipping_norm": 0.5,
                                          "central-dp-clipping": "client_fixed"}, True)):
        msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in g.items()}),
                                  "config": ConfigRecord(extra)}), dst_node_id=100,
                      message_type=MessageType.TRAIN)
        out = central_dp_clipping_mod(msg, None, train)  # type: ignore[arg-type]
        got = arrays_to_tensors(next(iter(out.content.array_records.values())))
        norm = math.sqrt(sum(float(((got[k].numpy() - g[k]) ** 2).sum()) for k in g))
        assert (norm <= 0.5 + 1e-5) if clipped else norm > 10, (extra, norm)


def test_a_resumed_run_draws_the_same_noise_and_clipping_norm() -> None:
    """Round 2 after a checkpoint/restore equals round 2 of the uninterrupted strategy."""
    cfg = _cfg(clipping="server_adaptive", noise_multiplier=0.1, clipped_count_stddev=1.0,
               clipping_norm=0.05)
    updates = _updates(scale=0.02)
    straight = wrap_server_defenses(build_strategy(cfg), cfg)
    _round(straight, None, updates, server_round=1)
    restored = wrap_server_defenses(build_strategy(cfg), cfg)
    load_strategy_state(restored, *strategy_state(straight))
    np.random.seed(12345)  # whatever the process' global RNG holds after a restart
    a, _ = _round(straight, None, updates, server_round=2)
    b, _ = _round(restored, None, updates, server_round=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert straight.clipping_norm == restored.clipping_norm  # type: ignore[attr-defined]
    assert central_dp_row(straight) == central_dp_row(restored)


def test_integer_buffers_survive_clipping_on_both_sides() -> None:
    """BatchNorm's int64 ``num_batches_tracked``: Flower's in-place scaling refused it."""
    g = {**_global(), "n": np.array(5, dtype=np.int64)}
    ups = [{**u, "n": np.array(6, dtype=np.int64)} for u in _updates(scale=1.0)]
    cfg = _cfg(noise_multiplier=0.0, clipping_norm=0.05)
    tap = TapStrategy(wrap_server_defenses(build_strategy(cfg), cfg), seed=3,
                      node_to_client={100 + c: c for c in range(N)}, fraction_train=1.0,
                      fraction_evaluate=0.0, store=None)
    list(tap.configure_train(1, ArrayRecord({k: Array(v) for k, v in g.items()}),
                             ConfigRecord(), FakeGrid()))
    new, _ = tap.aggregate_train(1, [_reply(100 + c, u) for c, u in enumerate(ups)])
    assert new is not None and new["n"].numpy().dtype == np.int64

    def train(msg: Message, ctxt: object) -> Message:
        return _reply(100, ups[0])

    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in g.items()}),
                              "config": ConfigRecord({"clipping_norm": 0.05,
                                                      "central-dp-clipping": "client_fixed"})}),
                  dst_node_id=100, message_type=MessageType.TRAIN)
    out = central_dp_clipping_mod(msg, None, train)  # type: ignore[arg-type]
    assert not out.has_error()


@pytest.mark.parametrize("clipping", ["server_adaptive", "client_adaptive"])
def test_adaptive_clipping_norm_moves_towards_the_target_quantile(clipping: str) -> None:
    """C grows while more than the target fraction is clipped, shrinks while fewer are."""
    for scale, grows in ((1.0, True), (1e-4, False)):
        cfg = _cfg(clipping=clipping, noise_multiplier=0.0, clipping_norm=0.1)
        s = wrap_server_defenses(build_strategy(cfg), cfg)
        replies = [_reply(100 + c, u) for c, u in enumerate(_updates(scale=scale))]
        for m in replies:  # what adaptiveclipping_mod adds: was the update clipped?
            next(iter(m.content.metric_records.values()))["norm_bit"] = int(grows)
        list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in _global().items()}),
                               ConfigRecord(), FakeGrid()))
        s.aggregate_train(1, replies)
        assert (s.clipping_norm > 0.1) == grows, (clipping, scale)  # type: ignore[attr-defined]
