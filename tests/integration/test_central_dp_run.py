"""Central DP on Flower's Ray backend: the server's view is unaffected, a curious peer's drops.

Two FedSGD federations of the same seed (MLP on 32×32 digits, 3 clients, batch 1, client 0 a
curious peer, one round), without and with ``central_dp`` (server-side fixed clipping,
C = 1, σ = 0.5: noise std σC/m ≈ 0.17 per coordinate of the new global). The same Inverting
Gradients attack runs on the server view (client 1's update) and on the peer view (the other
two clients' mean gradient derived from the two globals client 0 received).

Under central DP FedSGD clients reply one-step weights (strategies/fedsgd.py): the server
record is a delta with lr = η, from which the gradient is recovered as −delta/η — asserted
equal to the undefended run's gradient record. Measured (seed 0, 100 iterations, 2 shared
cores, 2026-12-03): server view 61.43 dB undefended and 61.43 dB with central DP; peer view
51.30 dB undefended, 6.68 dB with central DP; ε = 10.73 at δ = 1e-5 after the round. The
module takes ~140 s (two Ray federations) on the loaded machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from federation_env import flower_env

from fl_sim.config import from_dict
from fl_sim.run_dir import load_run
from fl_sim.stores import read_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ETA = 0.03
ATTACK = {"max_iterations": 100, "tv_weight": 0.0, "schedule": "cosine", "rounds": [1]}
DP = {"name": "central_dp", "clipping": "server_fixed", "noise_multiplier": 0.5,
      "clipping_norm": 1.0}


def _config(name: str, defenses: list[dict[str, Any]]) -> Any:
    return from_dict({
        "run": {"name": name, "seed": 0},
        "data": {"name": "digits", "image_size": 32, "max_test": 60},
        "model": {"name": "mlp", "hidden": [256]},
        "federation": {"num_clients": 3, "num_rounds": 1, "local_steps": 1, "batch_size": 1,
                       "lr": ETA, "peer_clients": [0], "fraction_evaluate": 0.0,
                       "client_resources": {"num_cpus": 1}},
        "strategy": {"name": "fedsgd", "server_lr": ETA},
        "defenses": defenses,
        "attacks": [{"name": "inverting_gradients", "view": "server", "client": 1,
                     "labels": "granted", **ATTACK},
                    {"name": "peer_inversion", "view": "peer", "client": 0,
                     "labels": "batch", **ATTACK}]})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fl_sim.federation.simulation import run_experiment
    out = {}
    with flower_env(tmp_path_factory.mktemp("flwr_home")):
        for name, defenses in (("plain", []), ("central", [DP])):
            cfg = _config(name, defenses)
            out[name] = run_experiment(cfg, run_dir=tmp_path_factory.mktemp(name) / "r")
    return out


def _psnr(run_dir: Path) -> dict[str, float]:
    rows = read_jsonl(run_dir / "attacks.jsonl")
    assert all("error" not in r or not r["error"] for r in rows), rows
    return {r["view"]: float(r["metrics"]["psnr"]) for r in rows}


def test_server_view_unaffected_peer_view_drops(runs: dict[str, Any]) -> None:
    plain, central = _psnr(runs["plain"]), _psnr(runs["central"])
    assert plain["server"] >= 30 and plain["peer"] >= 30, plain
    assert abs(central["server"] - plain["server"]) <= 0.5, (plain, central)
    assert central["peer"] <= plain["peer"] - 20, (plain, central)
    rows = read_jsonl(runs["central"] / "attacks.jsonl")
    assert all(r["defenses"][0]["name"] == "central_dp" for r in rows)


def test_fedsgd_delta_record_gives_back_the_true_gradient(runs: dict[str, Any]) -> None:
    plain = load_run(runs["plain"]).view("server").record(1, 1)
    central = load_run(runs["central"]).view("server").record(1, 1)
    assert plain.update_kind == "gradient"
    assert (central.update_kind, central.lr, central.local_steps) == ("delta", ETA, 1)
    for k, g in plain.update.items():
        recovered = -central.update[k] / central.lr
        torch.testing.assert_close(recovered, g, rtol=1e-3, atol=1e-5)
    assert any(float(g.abs().max()) > 0 for g in plain.update.values())


def test_metrics_carry_the_central_epsilon(runs: dict[str, Any]) -> None:
    from defenses.central_dp import CentralDP
    (row,) = read_jsonl(runs["central"] / "metrics.jsonl")
    sigma = DP["noise_multiplier"]
    expected = CentralDP(noise_multiplier=sigma).round_epsilon(_config("x", [DP]), 1)
    assert row["central_dp_epsilon"] == pytest.approx(expected)
    assert row["central_dp_noise_std"] == pytest.approx(sigma * 1.0 / 3)
    assert "central_dp_epsilon" not in read_jsonl(runs["plain"] / "metrics.jsonl")[0]
