"""``fl-sim bench``: grid expansion, dry-run numbers, resume after a kill, results.csv.

The simulation and the attack are replaced by fakes that write what the real ones write
(config.json, run.json, checkpoint, metrics.jsonl; a result row with a grid PNG), so these
tests run in seconds; tests/integration/test_bench_end_to_end.py runs the real thing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fl_sim.bench.grid import expand, load_grid
from fl_sim.bench.runner import run_bench
from fl_sim.cli import main
from fl_sim.errors import ConfigError
from fl_sim.run_dir.images import save_grid

BASE = str(Path(__file__).resolve().parents[2] / "configs" / "default.toml")


def grid(axes: dict[str, Any], attacks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"bench": {"name": "t", "base": BASE, "set": ["federation.num_rounds=2"]},
            "base": {"defenses": [{"name": "dp_sgd"}]}, "axes": axes,
            "attacks": attacks or [{"name": "inverting_gradients", "client": 1},
                                   {"name": "idlg", "client": 1}]}


def test_axes_product_and_attack_only_axes_share_a_simulation() -> None:
    plan = expand(grid({"defenses.0.params.noise_multiplier": [0.0, 0.1, 1.0],
                        "federation.batch_size": [1, 2],
                        "attack.max_iterations": [5, 10]}))
    assert len(plan.simulations) == 6  # 3 sigma x 2 batch sizes
    # IG gets both max_iterations values, iDLG (no such parameter) one cell: 6 x (2 + 1)
    assert len(plan.cells) == 18
    ig = [c for c in plan.cells if c.attack == "inverting_gradients"]
    assert {c.params["max_iterations"] for c in ig} == {5, 10}
    for sim in plan.simulations:  # the attack-only axis never adds a simulation
        assert len({c.params["max_iterations"] for c in ig if c.sim is sim}) == 2
    sigmas = sorted(s.config.defenses[0].params["noise_multiplier"] for s in plan.simulations)
    assert sigmas == [0.0, 0.0, 0.1, 0.1, 1.0, 1.0]  # the "params" path element is dropped
    assert {s.config.federation.batch_size for s in plan.simulations} == {1, 2}
    assert all(s.config.attacks == () for s in plan.simulations)  # cells replay, sims record
    assert len({c.key for c in plan.cells}) == len(plan.cells)
    # deterministic: the same grid, the same keys in the same order
    again = expand(grid({"defenses.0.params.noise_multiplier": [0.0, 0.1, 1.0],
                         "federation.batch_size": [1, 2], "attack.max_iterations": [5, 10]}))
    assert [c.key for c in again.cells] == [c.key for c in plan.cells]


def test_axis_values_giving_the_same_federation_share_one_simulation() -> None:
    # noise_multiplier 1.0 is dp_sgd's default: "1.0" and the base are the same federation
    plan = expand(grid({"run.seed": [0, 0], "federation.lr": [0.03, 0.03]}))
    assert len(plan.simulations) == 1
    assert len(plan.cells) == 2


def test_bad_grids_are_one_line_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an index"):
        expand(grid({"defenses.3.noise_multiplier": [0.1]}))
    with pytest.raises(ConfigError, match="noise_multiplier"):
        expand(grid({"defenses.0.noise_multiplier": [-1.0]}))
    with pytest.raises(ConfigError, match="unknown attack"):
        expand(grid({}, [{"name": "no_such_attack"}]))
    with pytest.raises(ConfigError, match="non-empty list"):
        expand(grid({"federation.lr": 0.1}))
    bad = tmp_path / "g.toml"
    bad.write_text("[bench]\nnaem = 1\n")
    assert main(["bench", str(bad), "--dry-run"]) == 2


def _write_grid(tmp_path: Path, sigmas: list[float]) -> Path:
    g = tmp_path / "grid.toml"
    g.write_text(f"""
[bench]
name = "t"
base = "{BASE}"
set = ["federation.num_rounds=2"]
[[base.defenses]]
name = "dp_sgd"
[axes]
"defenses.0.params.noise_multiplier" = {json.dumps(sigmas)}
"attack.max_iterations" = [5, 10]
[[attacks]]
name = "inverting_gradients"
client = 1
""")
    return g


def test_dry_run_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = _write_grid(tmp_path, [0.0, 0.1])
    assert main(["bench", str(g), "--dry-run", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "2 simulation(s) (2 to run), 4 attack cell(s) (0 done)" in out
    assert "30 attack iterations" in out  # 2 sims x (5 + 10)
    assert len([ln for ln in out.splitlines() if ln.startswith("  sim-")]) == 4
    assert not (tmp_path / "b").exists()  # a dry run writes nothing


class Fakes:
    """A simulation and an attack that write what the real ones write, counting calls."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.sims: list[Path] = []
        self.attacks: list[str] = []
        self.kill_at = kill_at

    def simulate(self, cfg: Any, *, run_dir: Path, resume: bool) -> Path:
        self.sims.append(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_json_dict()))
        (run_dir / "checkpoint").mkdir(exist_ok=True)
        n = cfg.federation.num_rounds
        (run_dir / "checkpoint" / "state.json").write_text(json.dumps({"round": n}))
        sigma = cfg.defenses[0].params["noise_multiplier"]
        rows = [{"round": r, "eval_accuracy": 0.5 - sigma / 4,
                 "dp_epsilon": None if sigma == 0 else 10 / sigma} for r in range(1, n + 1)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run_dir / "run.json").write_text(json.dumps({"status": "complete"}))
        return run_dir

    def attack(self, sim_dir: Path, cell: Any) -> dict[str, Any]:
        if self.kill_at is not None and len(self.attacks) == self.kill_at:
            raise KeyboardInterrupt  # the kill, mid-grid
        self.attacks.append(cell.key)
        g = torch.Generator().manual_seed(len(cell.key))
        save_grid(sim_dir / "attacks" / f"{cell.key}.png", torch.rand(1, 1, 8, 8, generator=g),
                  torch.rand(1, 1, 8, 8, generator=g))
        sigma = float(cell.axes["defenses.0.params.noise_multiplier"])
        return {"view": "server", "client": 1, "seconds": 0.01, "iterations": 5,
                "metrics": {"psnr": 30.0 - 10 * sigma, "ssim": 0.9, "label_accuracy": 1.0,
                            "start_psnr": 9.5, "start_ssim": 0.05},
                "grid": f"attacks/{cell.key}.png",
                "defenses": [{"name": "dp_sgd", "noise_multiplier": sigma}]}


def test_workers_auto_uses_ray_only_with_two_free_cpus_and_two_pending_cells(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from fl_sim.bench import runner
    plan = load_grid(_write_grid(tmp_path, [0.0, 0.1, 1.0]))  # 6 cells
    bench = tmp_path / "bench"

    def machine(cpus: int, load: float) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))

    machine(8, 0.2)
    assert runner.auto_workers(plan, bench) == 6  # one per pending cell, not per CPU
    machine(8, 5.6)
    assert runner.auto_workers(plan, bench) == 3  # 5 of the 8 CPUs are busy
    machine(2, 1.2)
    assert runner.auto_workers(plan, bench) == 1  # one free CPU: one by one, no Ray
    machine(2, 0.0)
    fakes = Fakes(kill_at=5)
    with pytest.raises(KeyboardInterrupt):  # 5 of 6 cells done
        run_bench(plan, bench, simulate=fakes.simulate, attack=fakes.attack)
    assert runner.auto_workers(plan, bench) == 1  # one cell pending: Ray is not worth it


def test_resume_after_a_kill_does_not_redo_finished_cells(tmp_path: Path) -> None:
    plan = load_grid(_write_grid(tmp_path, [0.0, 0.1, 1.0]))
    bench = tmp_path / "bench"
    first = Fakes(kill_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_bench(plan, bench, simulate=first.simulate, attack=first.attack)
    assert len(first.attacks) == 3 and len(first.sims) == 2
    second = Fakes()
    s = run_bench(plan, bench, simulate=second.simulate, attack=second.attack)
    assert (s.cells_total, s.cells_skipped, s.cells_run) == (6, 3, 3)
    assert set(second.attacks).isdisjoint(first.attacks)
    assert len(second.sims) == 1 and (s.sims_reused, s.sims_run) == (1, 1)
    third = Fakes()
    s = run_bench(plan, bench, simulate=third.simulate, attack=third.attack)
    assert (s.cells_run, s.cells_skipped, third.sims, third.attacks) == (0, 6, [], [])


def test_unfinished_simulation_is_restarted(tmp_path: Path) -> None:
    plan = load_grid(_write_grid(tmp_path, [0.1]))
    d = tmp_path / "bench" / "sims" / plan.simulations[0].dirname
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(plan.simulations[0].config.to_json_dict()))
    (d / "stale.txt").write_text("killed before its first checkpoint")
    fakes = Fakes()
    run_bench(plan, tmp_path / "bench", simulate=fakes.simulate, attack=fakes.attack)
    assert fakes.sims == [d] and not (d / "stale.txt").exists()


def test_results_csv_columns_and_same_table_twice(tmp_path: Path) -> None:
    g = _write_grid(tmp_path, [0.0, 1.0])
    tables = []
    for name in ("a", "b"):
        fakes = Fakes()
        run_bench(load_grid(g), tmp_path / name, simulate=fakes.simulate, attack=fakes.attack)
        with (tmp_path / name / "results.csv").open() as f:
            rows = list(csv.DictReader(f))
        tables.append([{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows])
    rows = tables[0]
    assert tables[0] == tables[1]
    assert list(rows[0])[:2] == ["defenses.0.params.noise_multiplier", "attack.max_iterations"]
    for col in ("attack", "view", "round", "psnr", "start_psnr", "ssim", "label_accuracy",
                "start_ssim", "utility",
                "utility_metric", "epsilon", "defenses", "grid", "error"):
        assert col in rows[0]
    assert len(rows) == 4
    assert [r["epsilon"] for r in rows] == ["inf", "inf", "10", "10"]  # sigma 0: no noise
    assert [r["utility"] for r in rows] == ["0.5", "0.5", "0.25", "0.25"]
    assert rows[0]["utility_metric"] == "eval_accuracy" and rows[2]["psnr"] == "20"
    assert rows[2]["start_psnr"] == "9.5"  # the random-start floor beside the attack's PSNR
    assert rows[0]["defenses"] == "dp_sgd(noise_multiplier=0.0)"
    md = (tmp_path / "a" / "results.md").read_text().splitlines()
    assert len(md) == 2 + 4 and md[0].startswith("| defenses.0.params.noise_multiplier |")
    report = (tmp_path / "a" / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 1 + 4  # the plot and the four grids
    assert (tmp_path / "a" / "privacy_utility.png").stat().st_size > 1000


def test_a_failed_cell_shows_its_error_in_the_report(tmp_path: Path) -> None:
    plan = load_grid(_write_grid(tmp_path, [0.1]))
    fakes = Fakes()

    def attack(sim_dir: Path, cell: Any) -> dict[str, Any]:
        if cell.params["max_iterations"] == 10:
            raise ConfigError("the recorded round holds no update for client 1")
        return fakes.attack(sim_dir, cell)
    s = run_bench(plan, tmp_path / "b", simulate=fakes.simulate, attack=attack)
    assert (s.cells_run, s.cells_failed) == (2, 1)
    report = (tmp_path / "b" / "report.html").read_text()
    assert "This cell failed" in report and "holds no update for client 1" in report


@pytest.mark.parametrize(("name", "sims", "cells"), [
    ("dp_sweep", 8, 16), ("pruning_sweep", 4, 8), ("quantization_sweep", 5, 10),
    ("batch_size_sweep", 4, 12), ("secagg_sweep", 2, 4), ("ldp_gidm_sweep", 4, 4)])
def test_shipped_grids_expand_as_their_comments_say(name: str, sims: int, cells: int) -> None:
    plan = load_grid(Path(BASE).parent / "bench" / f"{name}.toml")
    assert (len(plan.simulations), len(plan.cells)) == (sims, cells)
