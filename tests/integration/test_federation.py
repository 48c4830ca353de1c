"""The federation engine end to end on Flower's Ray backend (tiny MLP on 16×16 digits).

Ray runs are expensive here, so a few module-scoped runs serve many assertions:

* ``fedavg_run``: FedAvg, 3 clients, 4 rounds, full participation, client 0 a curious peer,
  the ``noop`` attack through a stand-in attack runner (the online hook);
* ``fedsgd_runs``: two identical FedSGD runs (4 clients, 75 % sampled per round, injected
  client failures, one client poisoned with NaN via the ``FL_SIM_POISON_CLIENTS`` knob);
* the resume test kills a run with SIGKILL after round 2 is checkpointed and resumes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from attacks.components.gradients import parameter_gradients, split_state
from fl_sim.config import ExperimentConfig, from_dict
from fl_sim.errors import ThreatModelError
from fl_sim.federation.resources import prepare_resources
from fl_sim.run_dir import Run, load_run
from fl_sim.stores import ObservationStore, TruthStore, read_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "RAY_USAGE_STATS_ENABLED": "0"}


def make_cfg(*, strategy: dict[str, Any], seed: int = 0, attacks: list[Any] | None = None,
             **federation: Any) -> ExperimentConfig:
    fed = {"num_clients": 3, "num_rounds": 4, "local_steps": 2, "batch_size": 4, "lr": 0.1,
           "peer_clients": [0], "client_resources": {"num_cpus": 1}, **federation}
    return from_dict({"run": {"name": "t", "seed": seed},
                      "data": {"name": "digits", "image_size": 16, "max_train": 240,
                               "max_test": 60},
                      "model": {"name": "mlp", "hidden": [16]},
                      "federation": fed, "strategy": strategy, "attacks": attacks or []})


def fedavg_cfg(*, attacks: list[Any] | None = None) -> ExperimentConfig:
    return make_cfg(strategy={"name": "fedavg"}, attacks=attacks)


@pytest.fixture(scope="module")
def flwr_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    env = {**ENV, "FLWR_HOME": str(tmp_path_factory.mktemp("flwr_home"))}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield env


def _noop_runner(calls: list[tuple[Any, ...]]) -> types.ModuleType:
    """A stand-in ``fl_sim.attack_runner``: runs ``noop`` on every record of the round."""
    from attacks.noop import Noop
    mod = types.ModuleType("fl_sim.attack_runner")

    def run_round_attacks(run_dir: Path, cfg: ExperimentConfig, server_round: int) -> None:
        view = load_run(run_dir).view("server")
        out = [Noop()(rec).extras for rec in view.records(rounds=[server_round])]
        calls.append(("round", server_round, out))

    def run_final_attacks(run_dir: Path, cfg: ExperimentConfig) -> None:
        view = load_run(run_dir).view("peer", client=0)
        calls.append(("final", None, [Noop(view="peer")(rec).extras for rec in view.records()]))

    mod.run_round_attacks = run_round_attacks  # type: ignore[attr-defined]
    mod.run_final_attacks = run_final_attacks  # type: ignore[attr-defined]
    return mod


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory: pytest.TempPathFactory, flwr_env: dict[str, str]
               ) -> dict[str, Any]:
    from fl_sim.federation.simulation import run_experiment
    calls: list[tuple[Any, ...]] = []
    events: list[dict[str, Any]] = []
    cfg = fedavg_cfg(attacks=[{"name": "noop"}])
    from fl_sim.federation import hooks
    runner = _noop_runner(calls)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "fl_sim.attack_runner", runner)
        # the AttackHook bound the runner's functions when hooks.py was first imported (maybe
        # by an earlier test in this worker): patch them where the hook looks them up
        mp.setattr(hooks, "run_round_attacks", runner.run_round_attacks)
        mp.setattr(hooks, "run_final_attacks", runner.run_final_attacks)
        t0 = time.perf_counter()
        out = run_experiment(cfg, run_dir=tmp_path_factory.mktemp("fedavg") / "run",
                             progress=events.append)
        seconds = time.perf_counter() - t0
    return {"run": load_run(out), "cfg": cfg, "calls": calls, "events": events,
            "seconds": seconds}


def _globals(run: Run) -> dict[int, dict[str, torch.Tensor]]:
    store = ObservationStore(run.path)
    out = {int(e["round"]): store.load(e["file"]) for e in store.entries("global")}
    out[run.config.federation.num_rounds + 1] = run.final_model()
    return out


def test_server_tap_records_reproduce_the_aggregate(fedavg_run: dict[str, Any]) -> None:
    run: Run = fedavg_run["run"]
    globals_ = _globals(run)
    view = run.view("server")
    for r in range(1, 5):
        recs = list(view.records(rounds=[r]))
        assert [x.client_id for x in recs] == [0, 1, 2]
        assert all(x.update_kind == "delta" and x.local_steps == 2 for x in recs)
        total = sum(x.num_examples for x in recs)
        for k, g in globals_[r].items():
            assert torch.equal(recs[0].global_params[k], g)
            mean = sum(x.num_examples * x.update[k] for x in recs) / total
            torch.testing.assert_close(g + mean, globals_[r + 1][k], atol=1e-6, rtol=0)
        agg = view.aggregate(r)
        assert agg.num_clients_aggregated == 3 and agg.num_examples == total


def test_peer_tap_difference_of_globals_is_the_others_aggregate(
        fedavg_run: dict[str, Any]) -> None:
    run: Run = fedavg_run["run"]
    server, peer = run.view("server"), run.view("peer", client=0)
    assert peer.rounds() == [1, 2, 3, 4]  # round 4 uses the final model sent to peers
    for rec in peer.records():
        r = rec.server_round
        others = [x for x in server.records(rounds=[r]) if x.client_id != 0]
        n = sum(x.num_examples for x in others)
        assert rec.num_clients_aggregated == 2 and rec.num_examples == n
        assert rec.knowledge["others_num_examples"] == n
        own = server.record(r, 0).update
        for k in rec.update:
            ref = sum(x.num_examples * x.update[k] for x in others) / n
            torch.testing.assert_close(rec.update[k], ref, atol=1e-6, rtol=0)
            assert torch.equal(rec.own_update[k], own[k])  # type: ignore[index]


def test_peer_view_cannot_reach_other_clients(fedavg_run: dict[str, Any]) -> None:
    run: Run = fedavg_run["run"]
    peer = run.view("peer", client=0)
    assert not any(isinstance(v, ObservationStore | TruthStore | Run)
                   for v in vars(peer).values())
    assert peer._store.root == run.path / "peer" / "c0"
    server = run.view("server")
    for rec in peer.records():
        for other in server.records(rounds=[rec.server_round]):
            assert not all(torch.equal(rec.update[k], other.update[k]) for k in rec.update)
    with pytest.raises(ThreatModelError):
        peer.record(1, client=1)
    with pytest.raises(ThreatModelError):
        run.view("peer", client=1)  # not a recorded peer
    with pytest.raises(ThreatModelError):
        run.view("peer", client=0, grant=("labels",))


def test_online_hook_outputs_and_ground_truth(fedavg_run: dict[str, Any]) -> None:
    run: Run = fedavg_run["run"]
    calls = fedavg_run["calls"]
    assert [c[:2] for c in calls] == [("round", 1), ("round", 2), ("round", 3), ("round", 4),
                                      ("final", None)]
    assert all(len(c[2]) == 3 and all(x["update_norm"] > 0 for x in c[2]) for c in calls[:4])
    assert len(calls[4][2]) == 4
    rows = run.metrics()
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["clients_sampled"] == [0, 1, 2] and row["clients_failed"] == []
        assert row["clients_rejected"] == [] and row["seconds"] > 0
        assert 0 <= row["eval_accuracy"] <= 1 and row["train_loss"] > 0
    assert [e["round"] for e in fedavg_run["events"]] == [1, 2, 3, 4]
    assert (run.path / "metrics.png").stat().st_size > 0
    # config.json is the resolved config: the client resources actually reserved
    resolved, _ = prepare_resources(fedavg_run["cfg"])
    assert json.loads((run.path / "config.json").read_text()) == resolved.to_json_dict()
    truth = run.truth(2, 1)
    assert len(truth.steps) == 2 and all(len(s.labels) == 4 for s in truth.steps)
    rec = run.view("server", grant=("labels",)).record(2, 1)
    assert torch.equal(rec.knowledge["labels"], truth.labels)
    assert rec.knowledge["granted"] == ("labels",) and rec.defenses == ()


# -- FedSGD with failures and a poisoned client ---------------------------------------------
def _fedsgd_setup() -> tuple[ExperimentConfig, int]:
    """A seed whose run has failures, and a client that is sampled and poisoned."""
    from fl_sim.federation.client_app import should_fail
    from fl_sim.federation.taps import sample_clients
    for seed in range(50):
        cfg = make_cfg(strategy={"name": "fedsgd", "server_lr": 0.1}, seed=seed,
                       num_clients=4, num_rounds=3, fraction_train=0.75, batch_size=2,
                       client_failure_rate=0.25, fraction_evaluate=0.5)
        live = {r: [c for c in sample_clients(seed, r, range(4), 0.75)
                    if not should_fail(cfg, r, c)] for r in (1, 2, 3)}
        failures = sum(3 - len(v) for v in live.values())
        peer_ok = any(0 in live[r] and 0 in live[r + 1] for r in (1, 2))
        poisoned = [c for c in (1, 2, 3) if sum(c in v for v in live.values()) >= 2]
        if failures >= 1 and peer_ok and poisoned and all(len(v) >= 2 for v in live.values()):
            return cfg, poisoned[0]
    raise AssertionError("no suitable seed")


@pytest.fixture(scope="module")
def fedsgd_runs(tmp_path_factory: pytest.TempPathFactory, flwr_env: dict[str, str]
                ) -> dict[str, Any]:
    from fl_sim.federation.simulation import run_experiment
    cfg, poisoned = _fedsgd_setup()
    runs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FL_SIM_POISON_CLIENTS", str(poisoned))
        for name in ("a", "b"):
            runs.append(load_run(run_experiment(
                cfg, run_dir=tmp_path_factory.mktemp(f"fedsgd_{name}") / "run")))
    return {"runs": runs, "cfg": cfg, "poisoned": poisoned}


def test_fedsgd_record_is_the_gradient_of_the_recorded_batch(
        fedsgd_runs: dict[str, Any]) -> None:
    from fl_sim.tasks.base import Batch
    run: Run = fedsgd_runs["runs"][0]
    task = run.spec.build_task()
    names = [n for n, _ in task.model.named_parameters()]
    recs = list(run.view("server").records())
    assert recs and all(r.update_kind == "gradient" for r in recs)
    for rec in recs:
        assert sorted(rec.update) == sorted(names) and rec.num_examples == 2
        truth = run.truth(rec.server_round, rec.client_id)  # type: ignore[arg-type]
        (step,) = truth.steps
        params, buffers = split_state(task, rec.global_params)
        grads = parameter_gradients(task, params, buffers, Batch(step.images, step.labels),
                                    step.aux)
        for k, g in grads.items():
            torch.testing.assert_close(rec.update[k], g, atol=1e-6, rtol=1e-5)


def test_failure_injection_is_recorded_and_rounds_complete(fedsgd_runs: dict[str, Any]) -> None:
    from fl_sim.federation.client_app import should_fail
    run: Run = fedsgd_runs["runs"][0]
    cfg = fedsgd_runs["cfg"]
    rows = run.metrics()
    assert len(rows) == 3 and sum(len(r["clients_failed"]) for r in rows) >= 1
    for row in rows:
        r = row["round"]
        assert len(row["clients_sampled"]) == 3
        assert row["clients_failed"] == [c for c in row["clients_sampled"]
                                         if should_fail(cfg, r, c)]
        assert row["aggregated"] is True
        assert 0 <= row["fed_eval_accuracy"] <= 1  # federated evaluation on 2 clients
        recorded = run.view("server").clients(r)
        assert not set(recorded) & set(row["clients_failed"])
        truth = {c for rr, c in TruthStore(run.path).keys() if rr == r}
        assert not truth & set(row["clients_failed"])


def test_non_finite_updates_are_rejected_before_aggregation(fedsgd_runs: dict[str, Any]
                                                            ) -> None:
    run: Run = fedsgd_runs["runs"][0]
    bad = fedsgd_runs["poisoned"]
    hits = 0
    for row in run.metrics():
        live = [c for c in row["clients_sampled"] if c not in row["clients_failed"]]
        assert row["clients_rejected"] == ([bad] if bad in live else [])
        hits += bad in live
        assert bad not in run.view("server").clients(row["round"])
    assert hits >= 2
    assert all(bool(torch.isfinite(t).all()) for t in run.final_model().values())


def test_fedsgd_peer_view_is_the_others_mean_gradient(fedsgd_runs: dict[str, Any]) -> None:
    run: Run = fedsgd_runs["runs"][0]
    server, peer = run.view("server"), run.view("peer", client=0)
    recs = list(peer.records())
    assert recs
    for rec in recs:
        others = [x for x in server.records(rounds=[rec.server_round]) if x.client_id != 0]
        n = sum(x.num_examples for x in others)
        assert rec.update_kind == "gradient" and rec.knowledge["server_lr"] == 0.1
        assert rec.num_clients_aggregated == len(others)
        for k in rec.update:
            ref = sum(x.num_examples * x.update[k] for x in others) / n
            torch.testing.assert_close(rec.update[k], ref, atol=1e-5, rtol=1e-4)


def test_same_seed_same_final_model_and_metrics(fedsgd_runs: dict[str, Any]) -> None:
    a, b = fedsgd_runs["runs"]
    fa, fb = a.final_model(), b.final_model()
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    timing = {"seconds", "taps_seconds"}  # wall-clock fields; everything else is seeded
    strip = [{k: v for k, v in r.items() if k not in timing} for r in a.metrics()]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in b.metrics()]


# -- resume after SIGKILL ---------------------------------------------------------------------
_CHILD = """
import json, sys
from fl_sim.config import from_dict
from fl_sim.federation.simulation import run_experiment
run_experiment(from_dict(json.load(open(sys.argv[1]))), run_dir=sys.argv[2])
"""


def _checkpointed_round(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_resume_after_sigkill_matches_the_uninterrupted_run(
        fedavg_run: dict[str, Any], flwr_env: dict[str, str], tmp_path: Path) -> None:
    from fl_sim.federation.simulation import run_experiment
    cfg = fedavg_cfg()  # same training as fedavg_run (whose attacks change nothing)
    cfg_file, run_dir = tmp_path / "cfg.json", tmp_path / "run"
    cfg_file.write_text(json.dumps(cfg.to_json_dict()))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(cfg_file), str(run_dir)],
                             cwd=ROOT, env={**os.environ, **flwr_env},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _checkpointed_round(run_dir) < 2:
            assert child.poll() is None, "the run ended before round 2 was checkpointed"
            assert time.monotonic() < deadline, "round 2 never checkpointed"
            time.sleep(0.02)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        child.wait(30)
    killed_at = _checkpointed_round(run_dir)
    assert 2 <= killed_at < 4
    assert json.loads((run_dir / "run.json").read_text())["status"] != "complete"

    run = load_run(run_experiment(cfg, run_dir=run_dir, resume=True))

    ref: Run = fedavg_run["run"]
    got_final, ref_final = run.final_model(), ref.final_model()
    assert all(torch.equal(got_final[k], ref_final[k]) for k in ref_final)  # bitwise on CPU
    got_g, ref_g = _globals(run), _globals(ref)
    assert all(torch.equal(got_g[r][k], ref_g[r][k]) for r in ref_g for k in ref_g[r])
    # no duplicates: one line per round in metrics, one record per (tap, round, client)
    assert [r["round"] for r in read_jsonl(run.path / "metrics.jsonl")] == [1, 2, 3, 4]
    lines = read_jsonl(run.path / "observations" / "index.jsonl")
    keys = [(e["tap"], e["round"], e["client"]) for e in lines]
    assert len(keys) == len(set(keys)) == 4 * (1 + 3 + 1)
    assert len(list((run.path / "observations" / "server_in").rglob("*.safetensors"))) == 12
    assert TruthStore(run.path).keys() == [(r, c) for r in range(1, 5) for c in range(3)]
    peer_rounds = [e["round"] for e in read_jsonl(run.path / "peer" / "c0" / "index.jsonl")
                   if e["kind"] == "global"]
    assert peer_rounds == [1, 2, 3, 4, 5]


# -- the same apps serve the diffusion task ---------------------------------------------------
def test_diffusion_fedsgd_records_eps_t_and_the_exact_gradient(
        flwr_env: dict[str, str], tmp_path: Path) -> None:
    from fl_sim.federation.simulation import run_experiment
    from fl_sim.tasks.base import Batch
    cfg = from_dict({"run": {"seed": 0}, "data": {"name": "digits", "image_size": 16,
                                                  "max_train": 40, "max_test": 16},
                     "model": {"name": "unet"}, "task": {"name": "diffusion"},
                     "federation": {"num_clients": 2, "num_rounds": 1, "batch_size": 2,
                                    "peer_clients": [0], "client_resources": {"num_cpus": 1}},
                     "strategy": {"name": "fedsgd"}})
    run = load_run(run_experiment(cfg, run_dir=tmp_path / "run"))
    assert set(run.metrics()[0]) >= {"eval_loss", "train_loss"}
    rec = run.view("server", grant=("eps", "t")).record(1, 1)
    (step,) = run.truth(1, 1).steps
    assert torch.equal(rec.knowledge["eps"], step.aux["eps"])
    assert torch.equal(rec.knowledge["t"], step.aux["t"])
    task = run.spec.build_task()
    task.model.train()
    params, buffers = split_state(task, rec.global_params)
    grads = parameter_gradients(task, params, buffers, Batch(step.images, step.labels), step.aux)
    assert grads.keys() == rec.update.keys()
    for k, g in grads.items():
        torch.testing.assert_close(rec.update[k], g, atol=1e-5, rtol=1e-4)
    assert run.view("peer", client=0).record(1).knowledge["server_lr"] == cfg.federation.lr


def test_a_crashing_attack_plug_in_is_recorded_not_fatal(
        fedsgd_runs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in an attack (a plain exception, not an FlSimError) must not fail the run: the
    online/final hooks log it and write an error line; later attacks still run."""
    import shutil

    from fl_sim.attack_runner import run_round_attacks
    from fl_sim.config import AttackConfig
    from fl_sim.registry import ATTACKS, Entry
    from fl_sim.run_dir.files import RESULTS_FILE

    class Crash:
        """Always raises (test double for a buggy third-party plug-in)."""

        def required_knowledge(self) -> tuple[str, ...]:
            return ()

        def __call__(self, record: Any, *, generator: Any, device: Any = None) -> Any:
            raise ZeroDivisionError("plug-in bug")

    ATTACKS.names()  # load the built-ins before patching the table
    monkeypatch.setitem(ATTACKS._entries, "crash", Entry("crash", Crash, "test"))
    run_dir = tmp_path / "run"
    shutil.copytree(fedsgd_runs["runs"][0].path, run_dir)
    cfg = fedsgd_runs["cfg"].model_copy(update={"attacks": (
        AttackConfig(name="crash", client=0), AttackConfig(name="noop", client=0))})
    run_round_attacks(run_dir, cfg, 1)
    rows = {r["attack"]: r for r in read_jsonl(run_dir / RESULTS_FILE)}
    assert rows["crash"]["error"] == "ZeroDivisionError: plug-in bug"
    assert "error" not in rows["noop"]
