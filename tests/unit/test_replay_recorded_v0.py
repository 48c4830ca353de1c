"""A run directory recorded by the previous version replays to identical attack results
(issue 19, "How it is checked").

``tests/data/recorded_run_v0`` was written by fl-sim at commit 61aa009 (before the issue-19
redesign; see its README.md for the commands): a 2-client, 1-round FedSGD federation on
12x12 digits with a 32-unit MLP, plus the two offline attacks it then gave (its
``attacks.jsonl``): iDLG and Inverting Gradients (60 iterations, cosine, no TV, iDLG labels)
on client 1's round-1 gradient from the server view. Today's code replays the same two
attacks on a copy and must give the same rows: every field the old row has (all metrics,
the start images, the restart objectives, the resolved parameters, the threat class) equal,
floats to 1e-9 relative, and the same reconstruction grid PNG byte for byte. Only the wall
time (``seconds``) may differ. The recorded PSNR is 39.56 dB; if today's code gave, say,
39.5 dB the comparison fails.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from fl_sim import api

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "recorded_run_v0"
# The two replays, exactly as README.md of the fixture records them (CLI --set values).
REPLAYS = [("idlg", {}),
           ("inverting_gradients", {"max_iterations": 60, "tv_weight": 0.0,
                                    "schedule": "cosine", "labels": "idlg"})]
VOLATILE = {"seconds"}  # wall time: the only field allowed to differ


def _diff(old: Any, new: Any, where: str = "") -> list[str]:
    """The paths at which ``new`` differs from ``old`` (keys only in ``new`` are allowed:
    a field added later is not a changed result)."""
    if isinstance(old, dict):
        if not isinstance(new, dict):
            return [where]
        return [d for k in old if k not in VOLATILE
                for d in (_diff(old[k], new[k], f"{where}.{k}") if k in new
                          else [f"{where}.{k} (missing)"])]
    if isinstance(old, list):
        if not isinstance(new, list) or len(old) != len(new):
            return [where]
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True))
                for d in _diff(a, b, f"{where}[{i}]")]
    if isinstance(old, float) and isinstance(new, (int, float)) and not isinstance(new, bool):
        return [] if math.isclose(old, new, rel_tol=1e-9, abs_tol=1e-12) else [
            f"{where}: {old!r} -> {new!r}"]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


@pytest.mark.slow  # ~6 s on the loaded 2-core CPU (two replays, 60 IG iterations)
def test_recorded_v0_run_replays_to_identical_attack_results(tmp_path: Path) -> None:
    old_rows = [json.loads(line) for line in
                (FIXTURE / "attacks.jsonl").read_text().splitlines() if line.strip()]
    assert [r["attack"] for r in old_rows] == [name for name, _ in REPLAYS]
    assert old_rows[1]["metrics"]["psnr"] > 39.0  # the fixture holds a real reconstruction
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    (run / "attacks.jsonl").unlink()
    shutil.rmtree(run / "attacks")
    new_rows = [row for name, params in REPLAYS
                for row in api.replay(run, name, client=1, rounds=[1], write_report=False,
                                      params=params)]
    assert len(new_rows) == len(old_rows)
    for old, new in zip(old_rows, new_rows, strict=True):
        assert _diff(old, new) == [], old["attack"]
    grid = old_rows[1]["grid"]
    assert new_rows[1]["grid"] == grid
    assert (hashlib.sha256((run / grid).read_bytes()).hexdigest()
            == hashlib.sha256((FIXTURE / grid).read_bytes()).hexdigest())
