"""Nothing silent in results (issue 18, item 7a/b): a view fallback and an exact PSNR are shown.

(a) Under ``secagg_plus`` a server-view attack runs on the aggregate: the runner logs a
WARNING, the result carries ``view_fallback`` ("server→aggregate (secagg_plus)"), and the CLI
table and report.html show it. (b) A perfect reconstruction's PSNR is +inf, written as null
in strict JSON; the result lists it in ``metrics["exact"]`` and every table shows
"exact (∞)" — never blank, and never what a failed attack (``error``) or an attack without
images (PSNR NaN, also null) shows. The PSNR here is computed by fl-sim's own metric on real
tensors (an image against itself), then passed through the strict-JSON writer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from fl_sim.attack_runner import exact_metrics, resolve_view, view_fallback_text
from fl_sim.config import from_dict
from fl_sim.metrics import score_reconstruction
from fl_sim.report import EXACT_TEXT, _attack_section, _privacy_utility, metric_value
from fl_sim.stores import dumps_strict


def _strict(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as ``attacks.jsonl`` holds it (strict JSON: +inf and NaN become null)."""
    return json.loads(dumps_strict(row))


def _exact_result() -> dict[str, Any]:
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    m = score_reconstruction(x.clone(), x)  # a perfect reconstruction
    assert m["psnr"] == float("inf")
    m["exact"] = exact_metrics(m)
    return _strict({"attack": "dlg", "view": "server", "round": 1, "client": 0,
                    "metrics": m, "seconds": 1.0})


def _no_image_result() -> dict[str, Any]:
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    m = score_reconstruction(x[:0], x, torch.tensor([], dtype=torch.long),
                             torch.tensor([3, 4]))  # label-only: PSNR NaN
    assert m.get("exact") is None and exact_metrics(m) == []
    return _strict({"attack": "idlg", "view": "server", "round": 1, "client": 0,
                    "metrics": m, "seconds": 0.1})


FAILED = {"attack": "dlg", "view": "server", "round": 1, "client": 0,
          "error": "ValueError: boom"}


def test_exact_psnr_is_named_and_not_confused_with_failed_or_missing() -> None:
    exact, none = _exact_result(), _no_image_result()
    assert exact["metrics"]["psnr"] is None and exact["metrics"]["exact"] == ["psnr"]
    assert none["metrics"]["psnr"] is None  # the same null in JSON ...
    # ... shown three different ways
    assert metric_value(exact, "psnr") == EXACT_TEXT
    assert metric_value(FAILED, "psnr") == "failed"
    assert metric_value(none, "psnr") is None
    # a row written before metrics["exact"] existed: mse == 0 still says exact
    old = {"metrics": {k: v for k, v in exact["metrics"].items() if k != "exact"}}
    assert metric_value(old, "psnr") == EXACT_TEXT


def test_report_and_cli_show_exact_failed_and_the_view_fallback(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from fl_sim.cli_output import print_results
    exact, none = _exact_result(), _no_image_result()
    fell = {**none, "view": "aggregate", "fallback_from": "server",
            "view_fallback": "server→aggregate (secagg_plus)"}
    table = _privacy_utility([exact, FAILED, fell], [])
    assert table.count(EXACT_TEXT) == 1 and "failed" in table
    assert "aggregate (fallback: server→aggregate (secagg_plus))" in table
    section = _attack_section(tmp_path, exact)
    assert EXACT_TEXT in section
    assert "View fallback: server→aggregate (secagg_plus)" in _attack_section(tmp_path, fell)
    print_results([exact, FAILED, fell])
    out = capsys.readouterr().out
    assert "exact (∞)" in out and "failed" in out
    assert "server→aggregate" in out.replace("\n", "").replace("│", "").replace(" ", "")


def test_bench_tables_show_exact() -> None:
    from fl_sim.bench.outputs import EXACT, flat
    exact = _exact_result()
    row = {"key": "k", "attack": "dlg", "psnr": None, "ssim": 1.0, "exact": ["psnr"],
           "axes": {}}
    assert flat(row, [])["psnr"] == EXACT == "exact (∞)"
    assert flat({**row, "exact": [], "error": "ValueError: boom"}, [])["psnr"] == "failed"
    assert flat({**row, "exact": []}, [])["psnr"] == ""  # no value at all
    assert exact["metrics"]["exact"] == ["psnr"]


def test_secagg_fallback_is_a_warning_with_a_named_field(
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = from_dict({"defenses": [{"name": "secagg_plus"}]})
    with caplog.at_level(logging.INFO, logger="fl_sim.attack_runner"):
        view, asked = resolve_view(cfg, "inverting_gradients", "server")
    assert (view, asked) == ("aggregate", "server")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "aggregate" in warned[0].getMessage()
    assert view_fallback_text(asked, view, cfg) == "server→aggregate (secagg_plus)"
    # without SecAgg+ nothing falls back and nothing is logged
    caplog.clear()
    assert resolve_view(from_dict({}), "inverting_gradients", "server") == ("server", None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

