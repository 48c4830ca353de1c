"""``fl-sim bench`` end to end: one real simulation (Flower on Ray), real attack cells
replayed on its recording, a rerun that does nothing, and both report.html files (the bench's
and the simulation's) rendered by headless Chromium: every image decoded with a non-zero
natural size, the tables present, a failed cell's error text shown."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fl_sim.bench.grid import load_grid
from fl_sim.bench.runner import run_bench
from fl_sim.report import write_report

BASE = Path(__file__).resolve().parents[2] / "configs" / "default.toml"

GRID = f"""
[bench]
name = "it"
base = "{BASE}"
set = ["federation.num_rounds=2"]
[[base.defenses]]
name = "dp_sgd"
noise_multiplier = 0.0
[axes]
"attack.max_iterations" = [5, 20]
[[attacks]]
name = "inverting_gradients"
client = 1
params = {{ tv_weight = 0.0, labels = "idlg" }}
[[attacks]]
name = "idlg"
client = 1
[[attacks]]
name = "idlg"
client = 7
"""

_CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-check', JSON.stringify({images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0 || i.naturalHeight === 0)
      .length, tables: document.querySelectorAll('table').length}));
});</script>"""


def render(report: Path, tmp: Path) -> tuple[dict[str, int], np.ndarray]:
    """Open ``report`` in headless Chromium: the DOM check's numbers and a screenshot."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing (.ci/run installs Debian's package)"
    page = tmp / f"check-{report.parent.name}.html"
    page.write_text(report.read_text().replace("</body>", _CHECK + "</body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
             f"--user-data-dir={tmp / 'chromium'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    m = re.search(r'data-check="([^"]*)"', dom)
    assert m, "the page's load handler did not run"
    shot = tmp / f"{report.parent.name}.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2000",
                    report.as_uri()], capture_output=True, timeout=120)
    return json.loads(html.unescape(m.group(1))), np.asarray(Image.open(shot).convert("L"))


def table(bench: Path) -> list[dict[str, str]]:
    """results.csv without its timing columns."""
    with (bench / "results.csv").open() as f:
        return [{k: v for k, v in r.items() if not k.endswith("seconds")}
                for r in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.ray
def test_bench_end_to_end_resume_and_reports_in_chromium(tmp_path: Path) -> None:
    g = tmp_path / "grid.toml"
    g.write_text(GRID)
    plan = load_grid(g)
    assert (len(plan.simulations), len(plan.cells)) == (1, 4)
    bench = tmp_path / "bench"
    s = run_bench(plan, bench, workers=2)  # the cells as Ray tasks
    assert (s.sims_run, s.cells_run, s.cells_failed) == (1, 4, 1)
    rows = table(bench)
    ig = [r for r in rows if r["attack"] == "inverting_gradients"]
    assert [r["attack.max_iterations"] for r in ig] == ["5", "20"]
    assert all(float(r["psnr"]) > 5 and r["grid"] for r in ig)
    # the same seeded start in both cells (the random-start floor), same truth: same score
    assert ig[0]["start_psnr"] == ig[1]["start_psnr"] and float(ig[0]["start_psnr"]) > 0
    assert not rows[2]["start_psnr"]  # iDLG has no random start
    assert float(rows[2]["label_accuracy"]) == 1.0  # iDLG on one image: the label exactly
    assert all(r["epsilon"] == "inf" and 0 <= float(r["utility"]) <= 1 for r in rows)
    assert "client 7" in rows[3]["error"] and rows[3]["psnr"] == "failed"  # never blank
    again = run_bench(plan, bench)  # the rerun redoes nothing
    assert (again.cells_run, again.cells_skipped, again.sims_run) == (0, 4, 0)
    # the same cells one by one on a copy of the recording (its attack results removed):
    # the same table as the Ray tasks wrote
    seq = tmp_path / "sequential"
    shutil.copytree(bench / "sims", seq / "sims")
    sim_copy = seq / "sims" / plan.simulations[0].dirname
    (sim_copy / "attacks.jsonl").unlink()
    shutil.rmtree(sim_copy / "attacks")
    s = run_bench(plan, seq)
    assert (s.sims_reused, s.cells_run) == (1, 4)
    assert table(seq) == rows

    checks = {}
    sim_report = write_report(bench / "sims" / plan.simulations[0].dirname)
    for report in (bench / "report.html", sim_report):
        check, shot = render(report, tmp_path)
        checks[report.parent.name] = check
        assert check["broken"] == 0 and check["tables"] >= 2
        assert shot.std() > 10  # the screenshot shows a page, not a blank canvas
    # bench: the plot + two IG grids (iDLG recovers labels only); the failed cell's text
    assert checks["bench"]["images"] == 3
    assert "This cell failed" in (bench / "report.html").read_text()
    assert checks[plan.simulations[0].dirname]["images"] >= 3  # curves + the IG grids
