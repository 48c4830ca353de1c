"""What ``fl-sim bench`` costs on top of its work: 24 attack cells over 2 simulations.

Issue 11's target: total wall time <= 1.2 x (sum of the cells' own attack seconds + the two
simulations' seconds). The grid: the demo's MLP/digits FedSGD federation (2 rounds) with
DP-SGD at sigma 0 and 1 (2 simulations) x Inverting Gradients and iDLG-labelled Inverting
Gradients with TV at 6 iteration budgets (12 cells per simulation). Everything else (reading
the recording, building the view, scoring, grids, rows, CSV, plot, report) is orchestration.

    .venv/bin/python benchmarks/bench_overhead.py [--out benchmarks/out/bench_overhead]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from fl_sim.bench.grid import load_grid  # noqa: E402
from fl_sim.bench.runner import RESULTS, run_bench  # noqa: E402
from fl_sim.stores import read_jsonl  # noqa: E402

GRID = f"""
[bench]
name = "overhead"
base = "{ROOT / 'configs' / 'default.toml'}"
set = ["federation.num_rounds=2"]
[[base.defenses]]
name = "dp_sgd"
[axes]
"defenses.0.params.noise_multiplier" = [0.0, 1.0]
"attack.max_iterations" = [50, 100, 150, 200, 250, 300]
[[attacks]]
name = "inverting_gradients"
client = 1
params = {{ tv_weight = 0.0, labels = "idlg", schedule = "cosine" }}
[[attacks]]
name = "inverting_gradients"
client = 1
params = {{ tv_weight = 0.01, labels = "idlg" }}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "bench_overhead")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    grid = args.out / "grid.src.toml"
    grid.write_text(GRID)
    plan = load_grid(grid)
    t0 = time.perf_counter()
    s = run_bench(plan, args.out / "bench", workers=args.workers)
    wall = time.perf_counter() - t0
    rows = read_jsonl(args.out / "bench" / RESULTS)
    attack_s = sum(float(r.get("attack_seconds") or 0) for r in rows)
    cell_s = sum(float(r.get("cell_seconds") or 0) for r in rows)
    sims_s = sum(s.sim_seconds.values())
    out = {"simulations": len(plan.simulations), "cells": len(plan.cells),
           "failed": s.cells_failed, "wall_s": round(wall, 2), "sims_s": round(sims_s, 2),
           "attack_s": round(attack_s, 2), "cell_s": round(cell_s, 2),
           "ratio": round(wall / (attack_s + sims_s), 3), "workers": args.workers}
    print("| simulations | cells | wall s | simulations s | attacks' own s | cells s | "
          "ratio (target <= 1.2) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {out['simulations']} | {out['cells']} | {out['wall_s']} | {out['sims_s']} | "
          f"{out['attack_s']} | {out['cell_s']} | {out['ratio']} |")
    (args.out / "bench_overhead.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
