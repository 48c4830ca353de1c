"""``fl-sim run`` with ``[[defenses]] name = "pruning"`` (defaults only) and Inverting
Gradients listed twice, plain and adaptive, on the Ray backend.

A tiny FedSGD federation (MLP on 16x16 digits, 2 clients, 1 round): the server's record names
the defense with its resolved parameters and holds the pruned update (90 % zeros per tensor);
attacks.jsonl has one row per variant (distinct keys), each with ``adaptive`` and what it
adapted to; the printed table and report.html mark the adaptive row.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl_sim import cli
from fl_sim.run_dir import load_run
from fl_sim.run_dir.files import load_results

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = """
[run]
name = "pruned"
seed = 0
[data]
name = "digits"
image_size = 16
max_train = 40
max_test = 20
[model]
name = "mlp"
hidden = [16]
[federation]
num_clients = 2
num_rounds = 1
local_steps = 1
batch_size = 1
lr = 0.1
fraction_evaluate = 0.0
client_resources = {num_cpus = 1}
[strategy]
name = "fedsgd"
server_lr = 0.1
[[defenses]]
name = "pruning"
[[attacks]]
name = "inverting_gradients"
client = 0
max_iterations = 20
tv_weight = 0.0
[[attacks]]
name = "inverting_gradients"
client = 0
max_iterations = 20
tv_weight = 0.0
adaptive = true
"""


def test_pruned_run_records_the_defense_and_both_attack_variants(tmp_path: Path, capsys):
    cfg = tmp_path / "pruned.toml"
    cfg.write_text(CONFIG)
    threads = torch.get_num_threads()
    try:
        code = cli.main(["run", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    out = capsys.readouterr().out
    run = load_run(tmp_path / "run")
    rec = run.view("server").record(1, 0)
    pruning = {"name": "pruning", "ratio": 0.9, "scope": "layer"}
    assert list(rec.defenses) == [pruning]
    for name, v in rec.update.items():
        assert int((v != 0).sum()) <= v.numel() - round(0.9 * v.numel()), name
    rows = [r for r in load_results(tmp_path / "run") if r["attack"] == "inverting_gradients"]
    assert len(rows) == 2 and len({r["key"] for r in rows}) == 2
    assert all("error" not in r and r["defenses"] == [pruning] for r in rows), rows
    plain, adaptive = sorted(rows, key=lambda r: r["adaptive"])
    assert (plain["adaptive"], adaptive["adaptive"]) == (False, True)
    assert plain["adapted_to"] == [] and "surviving" in adaptive["adapted_to"][0]
    assert "(adaptive)" in (tmp_path / "run" / "report.html").read_text()
    assert "(adaptive)" in out, out[-4000:]  # the printed results table
