"""An outside plug-in package, installed as a user installs it, through the whole workflow.

``examples/plugin_example`` (an analytic first-layer attack ``fc_analytic``, Phong et al.
2018, and a noise defense ``update_noise``) is copied to a temporary directory and installed
with ``pip install --no-deps --no-build-isolation -t TMP``: fl-sim finds it only through the
entry points of its dist-info. ``plugin_driver.py`` then runs, on PYTHONPATH=TMP (so Ray's
client actors find it too): a 2-round federation with the defense on every client and the
attack online, the attack replayed offline on round 2, a 2-cell grid (the defense at
``sigma = 0``, the attack on two clients and rounds), and a defense defined in the driver
script only, which must be refused before its run directory exists.

Measured (seed 0, 2 shared cores, 2026-12-07): fc_analytic on one digit (batch 1, FedSGD,
MLP 256->32): undefended 160.6 dB (client 1, round 1) and 158.8 dB (client 0, round 2), exact
up to float rounding; client 1, round 1 at sigma = 0.001 / 0.01 / 0.1: 51.1 / 29.7 / 14.6 dB;
the replay on client 0, round 2 at sigma = 0.1: 13.6 dB. Wall time: ~5 min for the three
simulations on a loaded machine (load average 13-20).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIGMA = 0.1  # the defended federation's noise

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The example package built and installed into a private target directory."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = shutil.copytree(ROOT / "examples" / "plugin_example", tmp / "src")  # build there
    target = tmp / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--no-build-isolation", "--no-index", "-t", str(target), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    eps = next(target.glob("fl_sim_plugin_example-*.dist-info")) / "entry_points.txt"
    assert "fc_analytic = fl_sim_plugin_example.fc_analytic:FCAnalytic" in eps.read_text()
    return target


def _env(tmp: Path, site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "FLWR_HOME": str(tmp / "flwr"),
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def test_list_shows_the_installed_plugins_parameters(installed: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "fl_sim.cli", "list", "defenses",
                          "update_noise"], env=_env(tmp_path, installed), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("│ sigma "))
    assert "float" in row and "0.01" in row and "standard deviation of the noise" in row


def test_plugin_package_through_federation_replay_and_grid(installed: Path,
                                                           tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "integration" /
                                              "plugin_driver.py"), str(tmp_path),
                          str(SIGMA)], env=_env(tmp_path, installed), cwd=tmp_path,
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])

    # federation: the defense ran on the clients, the attack online on what the server got
    (online,) = report["online"]
    assert online["attack"] == "fc_analytic" and online["round"] == 1
    assert online["defenses"] == [{"name": "update_noise", "sigma": SIGMA}]
    assert online["params"] == {"min_bias_update": 1e-10}  # the default, resolved
    assert online["knowledge"] == {"num_images": 1, "first_layer": "fully_connected"}
    # replay of the plug-in attack on round 2 of the same recording
    (replayed,) = report["replay"]
    assert replayed["round"] == 2 and replayed["client"] == 0 and "error" not in replayed

    # grid: 2 cells on one undefended simulation (update_noise at sigma = 0)
    cells = {(int(r["client"]), int(r["round"])): r for r in report["grid"]}
    assert sorted(cells) == [(0, 2), (1, 1)] and not any(r["error"] for r in cells.values())
    assert all(r["defenses"] == "update_noise(sigma=0.0)" for r in cells.values())
    assert all(json.loads(r["params"]) == {"min_bias_update": 1e-10} for r in cells.values())
    # undefended, the image is read off the update exactly (measured 160.6 and
    # 158.8 dB) ...
    assert all(float(r["psnr"]) > 100.0 for r in cells.values()), cells
    # ... and the noise takes the same client's same image down to 14.6 dB (measured):
    # below 20 dB, where an exact copy was
    assert online["client"] == 1 and online["metrics"]["psnr"] < 20.0, online["metrics"]
    assert replayed["metrics"]["psnr"] < 20.0, replayed["metrics"]  # measured 13.6 dB

    # a defense registered in the driver only: one line, before anything is written
    refused = report["refused"]
    assert refused is not None and "\n" not in refused
    assert "defense 'notebook_zero' is registered only in this process (__main__)" in refused
    assert '[project.entry-points."fl_sim.defenses"] notebook_zero' in refused
    assert report["refused_dir_exists"] is False
