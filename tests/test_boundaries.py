"""Layer boundaries: attack/defense plug-ins and fl-sim's plain-data modules never load flwr
or ray (checked in a fresh interpreter, since the test process may have imported them).

Importing them all in ONE interpreter and finding neither flwr nor ray proves it for each
module on its own, too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

PLAIN_MODULES = ["attacks", "defenses", "fl_sim", "fl_sim.records", "fl_sim.metrics",
                 "fl_sim.config", "fl_sim.registry", "fl_sim.stores", "fl_sim.views",
                 "fl_sim.run_dir", "fl_sim.audits", "fl_sim.audit_report", "fl_sim.cases"]


def test_plain_modules_and_attack_registry_do_not_load_flwr_or_ray() -> None:
    code = ("import importlib, json, sys\n"
            f"for m in {PLAIN_MODULES!r}: importlib.import_module(m)\n"
            "from fl_sim.registry import ATTACKS, DEFENSES\n"
            "ATTACKS.names(); DEFENSES.names()\n"
            "import fl_sim; fl_sim.load_run\n"
            "print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('flwr', 'ray'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_federation_engine_does_load_flwr() -> None:
    """The check above is not vacuous: the engine itself imports flwr."""
    code = ("import json, sys; import fl_sim.federation.server_app; "
            "print(json.dumps('flwr' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) is True


def test_benchmarks_take_cases_from_the_library_not_from_tests() -> None:
    """Issue 18 item 2: a benchmark's cases come from :mod:`fl_sim.cases` (read through the
    views), never from the tests' helpers, and no benchmark edits ``sys.path`` (which is how
    one would reach them). Reading ``tests/data`` files by path is fine."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    pattern = re.compile(r"sys\.path|attack_cases|diffusion_cases|from test_|import test_")
    files = sorted(bench.glob("*.py"))
    assert files
    bad = [f.name for f in files if pattern.search(f.read_text())]
    assert bad == [], f"benchmarks that import tests/ or edit sys.path: {bad}"
