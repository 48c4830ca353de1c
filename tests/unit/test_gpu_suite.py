"""benchmarks/gpu_suite.py --cpu-small (issue 24 item 5): the smoke test CI runs.

The whole suite shrunk to CPU size, in a subprocess (one torch thread), writes its JSON and
Markdown with every case. The cost ratios it reports are checked against what the code does,
not against a device: a GIDM phase-1 iteration runs the K-step sampler forward, its backward and
the gradient matching, so it costs MORE than one plain training step of the same UNet (measured
3.3-3.6 with K = 2 at 32 and 64 px, CPU time, 2026-12-07, two runs); an Inverting-Gradients
iteration more than one (measured 2.3-3.3 at batch 1 / 8); a FedAvg round about its clients'
steps (measured 0.9-1.2). Bounds: 1.5 (GIDM), 1.0 (IG), 0.5 (rounds). The run takes ~40 s of
CPU (one thread).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = ("diffusion_round", "gidm_32", "gidm_256", "ig_b1", "ig_b8", "fedavg_100")


@pytest.mark.slow
def test_cpu_small_suite_writes_every_case(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--cpu-small",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["case"]: r for r in data["rows"]}
    assert tuple(rows) == CASES
    assert data["meta"]["cpu_small"] is True
    for r in rows.values():
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0, r
    # lower bounds that follow from the work each iteration does (margins: measured above)
    assert rows["gidm_32"]["ratio"] > 1.5 and rows["gidm_256"]["ratio"] > 1.5
    assert rows["ig_b1"]["ratio"] > 1.0 and rows["ig_b8"]["ratio"] > 1.0
    # a round is its clients' local steps plus a mean: not far below their sum
    assert rows["diffusion_round"]["ratio"] > 0.5 and rows["fedavg_100"]["ratio"] > 0.5
    table = out.with_suffix(".md").read_text()
    assert all(f"| {c} |" in table for c in CASES)
