"""``fl-sim run`` with ``dp_sgd`` (defaults only) and with ``local_dp`` on the Ray backend.

Two tiny federations (MLP on 8×8 digits, 2 clients, 2 rounds): the records name the defense
with its resolved parameters, every ``metrics.jsonl`` row carries the round's ε and the
cumulative ε — equal to Opacus' accountant for the run's (σ, q, steps, δ) — and report.html
shows them. (A negative σ at the CLI: tests/unit/test_dp.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from federation_env import flower_env
from opacus.accountants import RDPAccountant

from fl_sim import cli
from fl_sim.run_dir import load_run
from fl_sim.stores import read_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BASE = """
[run]
name = "dp"
seed = 0
[data]
name = "digits"
image_size = 8
max_train = 80
max_test = 40
[model]
name = "mlp"
hidden = [16]
[federation]
num_clients = 2
num_rounds = 2
batch_size = 4
lr = 0.1
fraction_evaluate = 0.0
client_resources = {num_cpus = 1}
"""
DP_SGD = BASE + """local_steps = 3
[strategy]
name = "fedavg"
[[defenses]]
name = "dp_sgd"
"""
LOCAL_DP = BASE + """local_steps = 1
[strategy]
name = "fedsgd"
server_lr = 0.1
[[defenses]]
name = "local_dp"
clipping_norm = 0.5
noise_multiplier = 2.0
"""


def _opacus_eps(sigma: float, q: float, steps: int, delta: float = 1e-5) -> float:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


def _run(tmp: Path, text: str, name: str) -> Any:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(text)
    threads = torch.get_num_threads()
    try:
        code = cli.main(["run", str(cfg), "--run-dir", str(tmp / name), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return load_run(tmp / name)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with flower_env(tmp_path_factory.mktemp("flwr_home"), threads=None):
        yield tmp_path_factory.mktemp("dp_runs")


def test_dp_sgd_run_reports_epsilon(runs_dir: Path) -> None:
    run = _run(runs_dir, DP_SGD, "dp_sgd")
    expected = {"name": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0,
                "delta": 1e-5, "accountant": "rdp"}
    recs = list(run.view("server").records(rounds=[1, 2]))
    assert len(recs) == 4 and all(list(r.defenses) == [expected] for r in recs)
    rows = read_jsonl(Path(run.path) / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    q = 4 / 40  # batch 4 of a 40-image partition (80 images, 2 iid clients)
    for r, row in enumerate(rows, start=1):
        assert row["dp_epsilon_round"] == pytest.approx(_opacus_eps(1.0, q, 3), rel=1e-9)
        assert row["dp_epsilon"] == pytest.approx(_opacus_eps(1.0, q, 3 * r), rel=1e-9)
    html = (Path(run.path) / "report.html").read_text()
    assert "ε" in html and f"{rows[-1]['dp_epsilon']:.2f}" in html
    assert "add or remove one example (sensitivity C)" in html  # what the ε bounds


def test_local_dp_run_reports_epsilon(runs_dir: Path) -> None:
    run = _run(runs_dir, LOCAL_DP, "local_dp")
    recs = list(run.view("server").records(rounds=[1]))
    assert [r.update_kind for r in recs] == ["gradient", "gradient"]
    assert recs[0].defenses[0] == {"name": "local_dp", "clipping_norm": 0.5,
                                   "noise_multiplier": 2.0, "delta": 1e-5,
                                   "accountant": "rdp"}
    # what left the client is clipped + noised: its norm is the noise's, not the gradient's
    norm = float(torch.cat([v.reshape(-1) for v in recs[0].update.values()]).norm())
    n = sum(v.numel() for v in recs[0].update.values())
    assert norm == pytest.approx(2.0 * 0.5 * n ** 0.5, rel=0.05)
    rows = read_jsonl(Path(run.path) / "metrics.jsonl")
    for r, row in enumerate(rows, start=1):  # replace-one, sensitivity 2C: σ/2 = 1.0
        assert row["dp_epsilon_round"] == pytest.approx(_opacus_eps(1.0, 1.0, 1))
        assert row["dp_epsilon"] == pytest.approx(_opacus_eps(1.0, 1.0, r))
        assert (row["dp_unit"], row["dp_neighbouring"]) == ("client", "replace-one")

