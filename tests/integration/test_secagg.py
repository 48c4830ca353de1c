"""SecAgg+ through Flower on the Ray backend: the server gets the plaintext mean, nothing more.

Two FedAvg federations of the same seed (MLP on 32×32 digits, 4 clients, 2 local steps of
batch 4, client 0 a curious peer, 2 rounds), without and with ``secagg_plus`` (defaults:
everyone holds shares, threshold half). Every client's batches derive from the seed, so both
runs train on the same images from the same globals; the aggregate under SecAgg+ must equal
the plaintext aggregate within the protocol's quantisation error
(``defenses.secagg_plus.error_bound``), and no per-client update may be stored by the server.
The peer's OWN update (``peer/c0``) is its own data and stays; the ground truth (``truth/``)
is the scoring oracle, never a server view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from federation_env import flower_env

from defenses.secagg_plus import error_bound
from fl_sim.config import from_dict
from fl_sim.stores import ObservationStore, read_jsonl, read_tensors

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NUM_CLIENTS, STEPS, BATCH = 4, 2, 4


def _config(name: str, defenses: list[dict[str, Any]]) -> Any:
    return from_dict({
        "run": {"name": name, "seed": 0},
        "data": {"name": "digits", "image_size": 32, "max_test": 60},
        "model": {"name": "mlp", "hidden": [64]},
        "federation": {"num_clients": NUM_CLIENTS, "num_rounds": 2, "local_steps": STEPS,
                       "batch_size": BATCH, "lr": 0.05, "peer_clients": [0],
                       "fraction_evaluate": 0.0, "client_resources": {"num_cpus": 1}},
        "strategy": {"name": "fedavg"},
        "defenses": defenses})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fl_sim.federation.simulation import run_experiment
    out = {}
    with flower_env(tmp_path_factory.mktemp("flwr_home"), threads=None):
        for name, defenses in (("plain", []), ("secagg", [{"name": "secagg_plus"}])):
            run_dir = tmp_path_factory.mktemp(name) / "r"
            run_experiment(_config(name, defenses), run_dir=run_dir)
            out[name] = run_dir
    return out


def _aggregate(run_dir: Path, r: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    store = ObservationStore(run_dir)
    (row,) = [e for e in store.entries("aggregate") if e["round"] == r]
    return store.load(row["file"]), row


def test_aggregate_equals_plaintext_fedavg(runs: dict[str, Path]) -> None:
    """Round 1 (same global): the unmasked mean equals FedAvg's within the quantisation
    bound; round 2 starts from globals that differ by that error, so only closeness."""
    plain, sec = _aggregate(runs["plain"], 1), _aggregate(runs["secagg"], 1)
    # equal weights (4 clients × 8 examples) over max_weight 8: total weight 4
    bound = error_bound(NUM_CLIENTS, NUM_CLIENTS * 1.0)
    worst = max(float((plain[0][k].double() - sec[0][k].double()).abs().max())
                for k in plain[0])
    scale = max(float(v.abs().max()) for v in plain[0].values())
    assert worst <= bound, (worst, bound)
    assert scale > 100 * bound  # the comparison is not trivially between zeros
    assert sec[1]["num_clients_aggregated"] == NUM_CLIENTS
    assert sec[1]["clients"] == list(range(NUM_CLIENTS))
    assert sec[1]["num_examples"] == plain[1]["num_examples"] == NUM_CLIENTS * STEPS * BATCH
    assert [d["name"] for d in sec[1]["defenses"]] == ["secagg_plus"]
    p2, s2 = _aggregate(runs["plain"], 2)[0], _aggregate(runs["secagg"], 2)[0]
    assert max(float((p2[k] - s2[k]).abs().max()) for k in p2) < 1e-3


def test_metrics_row_stays_meaningful(runs: dict[str, Path]) -> None:
    plain = read_jsonl(runs["plain"] / "metrics.jsonl")
    sec = read_jsonl(runs["secagg"] / "metrics.jsonl")
    for p, s in zip(plain, sec, strict=True):
        assert s["clients_sampled"] == p["clients_sampled"] == list(range(NUM_CLIENTS))
        assert s["aggregated"] and s["num_examples"] == p["num_examples"]
        assert s["clients_failed"] == []
        assert s["train_loss"] == pytest.approx(p["train_loss"], rel=1e-3)


def test_no_per_client_update_stored(runs: dict[str, Path]) -> None:
    """Walk the run directory: no ``server_in`` anywhere, no index row naming a client's
    update; the peer's own update and everyone's ground truth remain."""
    sec, plain = runs["secagg"], runs["plain"]
    assert list((plain / "observations").rglob("server_in/*/*.safetensors"))  # plaintext has
    files = [p.relative_to(sec) for p in sec.rglob("*") if p.is_file()]
    assert not [f for f in files if "server_in" in f.parts], files
    rows = read_jsonl(sec / "observations" / "index.jsonl")
    assert {r["tap"] for r in rows} == {"global", "aggregate"}
    for f in files:
        if f.parts[0] in ("observations",) and f.suffix == ".safetensors":
            _, meta = read_tensors(sec / f)
            assert meta.get("client") in (None, "None", ""), (f, meta)
    peer = [f for f in files if f.parts[0] == "peer"]
    assert peer and all(f.parts[1] == "c0" or f.parts[1] == "c0000" for f in peer), peer
    truth = {f.parts[1] for f in files if f.parts[0] == "truth"}
    assert len(truth) >= 1
    assert any(f.parts[0] == "truth" for f in files)


def test_server_attack_falls_back_to_the_aggregate(runs: dict[str, Path]) -> None:
    """A server-view attack under SecAgg+ runs on the aggregate, says so, and is scored
    against the union of every aggregated client's images; iDLG (one client's label trick)
    is refused in one line. The same Inverting Gradients (labels granted, 60 iterations) on one
    client's plaintext update scores ≥ 5 dB higher than on the aggregate of 4 clients."""
    from fl_sim.attack_runner import run_attack
    from fl_sim.errors import ConfigError
    from fl_sim.run_dir import load_run
    params = {"max_iterations": 60, "labels": "granted", "tv_weight": 0.0}
    out = {}
    for name, client in (("secagg", None), ("plain", 1)):
        run = load_run(runs[name])
        (res,) = run_attack(runs[name], run.config, "inverting_gradients", params,
                            view="server", client=client, server_round=1, key=name, run=run)
        out[name] = res
    sec, plain = out["secagg"], out["plain"]
    assert sec["view"] == "aggregate" and sec["fallback_from"] == "server"
    assert sec["view_fallback"] == "server→aggregate (secagg_plus)"  # visible, not an INFO line
    assert "view_fallback" not in out["plain"]
    assert sec["client"] is None and sec["num_images"] == NUM_CLIENTS * STEPS * BATCH
    assert plain["view"] == "server" and plain["num_images"] == STEPS * BATCH
    # measured (seed 0, 60 iterations, 2026-12-03): aggregate 9.03 dB, one client 15.33 dB
    assert sec["metrics"]["psnr"] <= plain["metrics"]["psnr"] - 5.0, (sec, plain)
    run = load_run(runs["secagg"])
    with pytest.raises(ConfigError, match="idlg needs one client's update"):
        run_attack(runs["secagg"], run.config, "idlg", {}, view="server", client=None,
                   server_round=1, key="x", run=run)


def test_curious_peer_still_derives_the_others_mean(runs: dict[str, Path]) -> None:
    """SecAgg+ hides updates from the server, not from a peer: client 0 derives the other
    three clients' mean update from its two globals as in the plaintext run."""
    from fl_sim.run_dir import load_run
    plain = load_run(runs["plain"]).view("peer", client=0).record(1)
    sec = load_run(runs["secagg"]).view("peer", client=0).record(1)
    assert sec.knowledge["aggregated_num_clients"] == NUM_CLIENTS
    worst = max(float((plain.update[k] - sec.update[k]).abs().max()) for k in plain.update)
    # N/(N − n_k) = 4/3 times the aggregate's quantisation error
    assert worst <= 4 / 3 * error_bound(NUM_CLIENTS, NUM_CLIENTS * 1.0) + 1e-6, worst
