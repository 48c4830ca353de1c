"""Membership and property inference in a real Flower/Ray federation (issue 22): the online
hook scores mia_gradient on round 1, the end-of-run hook runs LiRA on the final model (which
exists only then) and the peer's property inference; every row carries its ROC figures or
round score, candidates are in the truth store only, report.html draws the ROC.

One FedAvg federation (MLP on 16x16 digits, 3 clients of 32 examples, 2 rounds x 5 local
steps of batch 8, client 0 a curious peer). The figures are smoke-level (a few rounds): the
quality bars are in tests/unit/test_mia_*.py on recorded cases.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from federation_env import flower_env

from fl_sim.config import from_dict
from fl_sim.stores import read_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_inference_attacks_in_a_federation(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from fl_sim.federation.simulation import run_experiment
    monkeypatch.setenv("FL_SIM_CACHE_DIR", str(tmp_path / "cache"))
    cfg = from_dict({
        "run": {"name": "mia", "seed": 0},
        "data": {"name": "digits", "image_size": 16},
        "partition": {"name": "iid", "max_samples_per_client": 32},
        "model": {"name": "mlp", "hidden": [64]},
        "federation": {"num_clients": 3, "num_rounds": 2, "local_steps": 5, "batch_size": 8,
                       "lr": 0.1, "peer_clients": [0], "fraction_evaluate": 0.0,
                       "client_resources": {"num_cpus": 1}},
        "strategy": {"name": "fedavg"},
        "attacks": [{"name": "mia_gradient", "view": "server", "client": 1, "rounds": [1],
                     "num_members": 32, "num_nonmembers": 100},
                    {"name": "mia_lira", "view": "server", "client": 1, "num_shadows": 2,
                     "shadow_size": 64, "shadow_steps": 20, "num_members": 32,
                     "num_nonmembers": 100},
                    {"name": "property_inference", "view": "peer", "client": 0,
                     "property_class": 3, "num_batches": 4}]})
    with flower_env(tmp_path / "flwr_home"):
        run_dir = run_experiment(cfg, run_dir=tmp_path / "run")
    rows = {r["attack"]: r for r in read_jsonl(run_dir / "attacks.jsonl")}
    assert not any(r.get("error") for r in rows.values()), rows
    assert set(rows) == {"mia_gradient", "mia_lira", "property_inference"}
    for name in ("mia_gradient", "mia_lira"):
        m = rows[name]["metrics"]
        assert 0.0 <= m["auc"] <= 1.0 and m["num_nonmembers"] == 100, m
        assert (run_dir / rows[name]["candidates"]).is_file()
        assert rows[name]["candidates"].startswith("truth/")
    assert rows["mia_lira"]["target_model"] == "final"
    assert rows["mia_lira"]["threat_class"]["class"] == "D"
    assert isinstance(rows["property_inference"]["metrics"]["property"], bool)
    assert len(list((tmp_path / "cache" / "shadows").glob("*.safetensors"))) == 2
    assert "FPR (log)" in (run_dir / "report.html").read_text()
