"""Plug-ins take part by what they declare, not by their name (issue 19 items 1 and 3).

A strategy or defense defined here and registered the way an entry point's module registers
it (the registry's decorator) is treated exactly like the built-in with the same
capabilities, and one without the capability is refused in one line. The views are one type:
each threat model names its tap, its party and its SecAgg+ fallback once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from defenses.base import Defense
from fl_sim.attack_runner import resolve_view, view_fallback_text
from fl_sim.capabilities import (
    StrategyCapabilities,
    strategy_capabilities,
    strategy_capabilities_of,
)
from fl_sim.config import from_dict
from fl_sim.defended import check_defenses
from fl_sim.errors import ConfigError
from fl_sim.preflight import images_per_update
from fl_sim.records import ModelSpec
from fl_sim.registry import DEFENSES, STRATEGIES
from fl_sim.stores import PeerStore
from fl_sim.views import TAP_VIEWS, VIEWS, PeerView, aggregate_training, view_of


@pytest.fixture
def plugins() -> Any:
    """Two strategies and two defenses as an outside package would register them: one
    strategy declares what FedAvg declares, one declares nothing; one defense hides the
    per-client updates (as SecAgg+), one needs them on the server (as central DP)."""

    @strategy_capabilities_of(weighted_mean_of_updates=True, global_is_mean_step=True)
    def plugin_mean() -> None:  # pragma: no cover - never built: no run starts here
        """A weighted-mean strategy from another package."""

    def plugin_robust() -> None:  # pragma: no cover
        """A strategy that declares no capability (e.g. a robust aggregator)."""

    @dataclass(frozen=True)
    class PluginMasking(Defense):
        """A secure-aggregation protocol from another package."""

        stage: ClassVar[str] = "protocol"
        hides_per_client_updates: ClassVar[bool] = True

    @dataclass(frozen=True)
    class PluginClipper(Defense):
        """A server-side defense that works on each client's update."""

        stage: ClassVar[str] = "server"
        needs_per_client_updates: ClassVar[bool] = True

    STRATEGIES.register("plugin_mean")(plugin_mean)
    STRATEGIES.register("plugin_robust")(plugin_robust)
    DEFENSES.register("plugin_masking")(PluginMasking)
    DEFENSES.register("plugin_clipper")(PluginClipper)
    yield
    for name in ("plugin_mean", "plugin_robust"):
        STRATEGIES._entries.pop(name)
    for name in ("plugin_masking", "plugin_clipper"):
        DEFENSES._entries.pop(name)


def _cfg(strategy: str = "fedavg", defenses: tuple[str, ...] = (), **fed: Any) -> Any:
    return from_dict({"model": {"name": "mlp"}, "strategy": {"name": strategy},
                      "federation": {"num_clients": 4, **fed},
                      "defenses": [{"name": d} for d in defenses]})


def _problem(cfg: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        check_defenses(cfg)
    msg = str(exc.value)
    assert "\n" not in msg, msg  # one line at the CLI
    return msg


# -- strategies ---------------------------------------------------------------------------
def test_builtins_declare_what_the_three_old_name_lists_said() -> None:
    """The capabilities reproduce the lists they replace (views.MEAN_OF_DELTAS, central_dp's
    and secagg_plus' MEAN_STRATEGIES), so built-in runs are unchanged."""
    mean = {n for n in STRATEGIES.names() if strategy_capabilities(n).weighted_mean_of_updates}
    step = {n for n in STRATEGIES.names() if strategy_capabilities(n).global_is_mean_step}
    grad = {n for n in STRATEGIES.names() if strategy_capabilities(n).sends_gradient}
    assert mean == {"fedavg", "fedprox", "fedsgd", "fedavgm", "fedadam", "fedyogi",
                    "fedadagrad"}
    assert step == {"fedavg", "fedprox", "fedsgd"} and grad == {"fedsgd"}
    with pytest.raises(ValueError, match="implies"):
        StrategyCapabilities(global_is_mean_step=True)


def test_a_plugin_weighted_mean_strategy_runs_under_central_dp_and_secagg(plugins) -> None:
    check_defenses(_cfg("plugin_mean", ("central_dp",)))
    check_defenses(_cfg("plugin_mean", ("secagg_plus",)))
    # the same configs with a strategy that declares nothing: refused, naming it
    assert "mean of the clients' updates" in _problem(_cfg("plugin_robust", ("central_dp",)))
    msg = _problem(_cfg("plugin_robust", ("secagg_plus",)))
    assert "'plugin_robust' needs the individual updates" in msg and "plugin_mean" in msg


def test_fedsgd_semantics_come_from_the_declaration(plugins) -> None:
    """One batch's gradient per client (FedSGD) vs local training, read from the strategy's
    declaration: images per update and the aggregate's training parameters follow it."""
    cfg = _cfg("fedsgd", local_steps=3, batch_size=8, lr=0.1)
    assert images_per_update(cfg, 100)[0] == 8
    assert aggregate_training(cfg)["local_steps"] == 1
    mine = _cfg("plugin_mean", local_steps=3, batch_size=8, lr=0.1)
    assert images_per_update(mine, 100)[0] == 24
    assert aggregate_training(mine)["local_steps"] == 3


def _peer_run(tmp_path: Path) -> PeerStore:
    """Peer 0 of round 1: own delta 1 over 2 examples; the global moved by 2 with 4
    examples aggregated from 2 clients -> the other client's delta is 3."""
    store = PeerStore(tmp_path, 0)
    store.write_global(1, {"w": torch.zeros(2)}, {})
    store.write_global(2, {"w": torch.full((2,), 2.0)}, {
        "aggregated_round": 1, "aggregated_num_examples": 4, "aggregated_num_clients": 2})
    store.write_update(1, {"w": torch.ones(2)}, {
        "update_kind": "delta", "num_examples": 2, "local_steps": 1, "lr": 0.1,
        "batch_size": 2})
    return store


def test_the_peer_subtracts_its_share_under_any_declared_mean_step(
        plugins, tmp_path: Path) -> None:
    spec = ModelSpec(model="mlp", model_params={}, task="classifier", task_params={},
                     in_channels=1, num_classes=2, image_size=2, mean=(0.0,), std=(1.0,))

    def derived(strategy: str) -> Any:
        return PeerView("r", spec, _peer_run(tmp_path / strategy), strategy=strategy,
                        server_lr=None).record(1)

    for strategy in ("fedavg", "plugin_mean"):  # the built-in and the plug-in alike
        rec = derived(strategy)
        assert rec.knowledge["derivation"] == "weighted_mean_minus_own"
        assert rec.update["w"].tolist() == [3.0, 3.0]
    rec = derived("plugin_robust")  # no declared mean: the plain global difference
    assert rec.knowledge["derivation"] == "global_difference"
    assert rec.update["w"].tolist() == [2.0, 2.0]


# -- defenses -----------------------------------------------------------------------------
def test_a_plugin_masking_defense_sends_server_attacks_to_the_aggregate(
        plugins, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(defenses=("plugin_masking",))
    with caplog.at_level(logging.WARNING, logger="fl_sim.attack_runner"):
        view, asked = resolve_view(cfg, "inverting_gradients", "server")
    assert (view, asked) == ("aggregate", "server")
    assert "plugin_masking" in caplog.text
    assert view_fallback_text(asked, view, cfg) == "server→aggregate (plugin_masking)"
    # an attack that needs one client's update cannot fall back: one line, naming the cause
    with pytest.raises(ConfigError, match="under plugin_masking the server has only"):
        resolve_view(cfg, "idlg", "server")
    # a defense that declares nothing changes no view
    assert resolve_view(_cfg(defenses=("plugin_clipper",)), "inverting_gradients",
                        "server") == ("server", None)
    # central DP needs per-client updates: refused beside the plug-in masking as beside
    # SecAgg+
    assert "cannot be combined with plugin_masking" in _problem(
        _cfg(defenses=("central_dp", "plugin_masking")))


def test_secagg_refuses_a_plugin_defense_that_needs_per_client_updates(plugins) -> None:
    msg = _problem(_cfg(defenses=("secagg_plus", "plugin_clipper")))
    assert "cannot be combined with plugin_clipper" in msg
    check_defenses(_cfg(defenses=("secagg_plus", "pruning")))  # declares nothing: fine


def test_client_reported_epsilon_is_declared() -> None:
    reporting = {n for n in DEFENSES.names() if DEFENSES.get(n).reports_epsilon}
    assert reporting == {"dp_sgd", "local_dp"}
    hiding = {n for n in DEFENSES.names() if DEFENSES.get(n).hides_per_client_updates}
    assert hiding == {"secagg_plus"}


# -- views --------------------------------------------------------------------------------
def test_views_keep_their_names_and_taps_on_disk() -> None:
    """Config strings, taps and on-disk names are unchanged: an old run directory replays."""
    assert list(VIEWS) == ["server", "peer", "aggregate"]
    assert {t: v.name for t, v in TAP_VIEWS.items()} == {
        "server_in": "server", "peer_view": "peer", "aggregate": "aggregate"}
    assert [v.party for v in VIEWS.values()] == ["server", "peer", "server"]
    assert VIEWS["server"].resolve(["secagg_plus"])[0] is VIEWS["aggregate"]
    assert VIEWS["peer"].resolve(["secagg_plus"]) == (VIEWS["peer"], None)
    assert VIEWS["aggregate"].holds_sum and not VIEWS["peer"].holds_sum
    with pytest.raises(ConfigError, match="known: server, peer, aggregate"):
        view_of("client")


def test_the_aggregate_carries_the_training_parameters_the_tap_recorded(
        tmp_path: Path) -> None:
    """The server tap writes the aggregate's training parameters into its row; the view
    reads them as recorded. A row written before (no ``training``) falls back to what the
    caller derives from the run's config, so an old run directory replays unchanged."""
    from fl_sim.stores import ObservationStore, TruthStore
    from fl_sim.views import ServerView, aggregate_training_row
    spec = ModelSpec(model="mlp", model_params={}, task="classifier", task_params={},
                     in_channels=1, num_classes=2, image_size=2, mean=(0.0,), std=(1.0,))
    cfg = _cfg("fedsgd", lr=0.25, batch_size=8)
    row = aggregate_training_row(cfg)
    assert row == {"lr": 0.25, "local_steps": 1, "batch_size": 8,
                   "optimizer": {"name": "sgd", "momentum": 0.0, "weight_decay": 0.0}}
    for r, meta in ((1, {"training": row}), (2, {})):
        store = ObservationStore(tmp_path)
        store.write_global(r, {"w": torch.zeros(2)})
        store.write_update("aggregate", r, None, {"w": torch.ones(2)}, {
            "update_kind": "delta", "num_examples": 4, "num_clients_aggregated": 2,
            "clients": [0, 1], **meta})
    view = ServerView("r", spec, ObservationStore(tmp_path), TruthStore(tmp_path))
    recorded = view.aggregate(1, lr=9.0, local_steps=9, batch_size=9)
    assert (recorded.lr, recorded.local_steps, recorded.batch_size) == (0.25, 1, 8)
    old = view.aggregate(2, lr=9.0, local_steps=9, batch_size=9)
    assert (old.lr, old.local_steps, old.batch_size) == (9.0, 9, 9)
