"""Membership-inference results reach every output: the CLI table (AUC, TPR@1%), report.html
(the figures and a log-scale ROC curve) and the bench tables and plot against ε."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl_sim.attack_runner import replay
from fl_sim.bench.inference import plot_membership_epsilon
from fl_sim.bench.outputs import FIXED, METRICS
from fl_sim.cases import DIGITS, CaseClient, build_case, digits_spec, digits_splits
from fl_sim.cli_output import print_results
from fl_sim.report import write_report
from fl_sim.roc_svg import roc_svg
from fl_sim.tasks import build_task


def _row(tmp_path: Path) -> tuple[Path, dict]:
    test = digits_splits().test
    x, y = torch.as_tensor(test.images[:8]).float(), torch.as_tensor(test.labels[:8]).long()
    spec = digits_spec("lenet")
    run_dir = build_case(tmp_path / "case", spec=spec,
                         global_state=build_task(spec, seed=0).model.state_dict(),
                         clients=[CaseClient(x[:4], y[:4], torch.arange(4)),
                                  CaseClient(x[4:], y[4:], torch.arange(4, 8))],
                         data=DIGITS, num_rounds=1)
    return run_dir, replay(run_dir, "mia_gradient", client=0,
                           params={"num_nonmembers": 100})[0]


def test_cli_table_and_report_show_the_roc(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, row = _row(tmp_path)
    m = row["metrics"]
    print_results([row])
    out = capsys.readouterr().out
    assert "AUC" in out and "TPR@1%" in out and f"{m['auc']:.3f}" in out
    page = write_report(run_dir).read_text()
    assert "<svg" in page and "mia_gradient ROC" in page and "FPR (log)" in page
    assert "tpr_at_fpr_1pct" in page and "balanced_accuracy" in page


def test_roc_svg_is_log_scale_with_the_chance_line() -> None:
    svg = roc_svg([0.0, 0.001, 0.01, 1.0], [0.0, 0.2, 0.5, 1.0], title="t")
    assert svg.startswith("<svg") and svg.count("<polyline") == 2
    assert ">0.001<" in svg and ">1<" in svg  # decade ticks down to the smallest FPR step


def test_bench_columns_and_membership_plot_against_epsilon(tmp_path: Path) -> None:
    assert {"auc", "tpr_at_fpr_1pct"} <= set(METRICS) <= set(FIXED)
    rows = [{"attack": "mia_gradient", "view": "server", "defenses": ["dp_sgd(σ=1)"],
             "epsilon": eps, "auc": auc, "tpr_at_fpr_1pct": tpr}
            for eps, auc, tpr in ((2.0, 0.55, 0.02), (20.0, 0.7, 0.05), ("inf", 0.87, 0.2))]
    path = plot_membership_epsilon(rows, tmp_path / "m.png")
    assert path is not None and path.stat().st_size > 1000
    assert plot_membership_epsilon([{**rows[0], "auc": None}], tmp_path / "n.png") is None
