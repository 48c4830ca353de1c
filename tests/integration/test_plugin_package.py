"""An outside plug-in package, installed as a user installs it, through the whole workflow.

``examples/plugin_example`` (an analytic first-layer attack ``fc_analytic``, Phong et al.
2018, and a noise defense ``update_noise``) is copied to a temporary directory and installed
with ``pip install --no-deps --no-build-isolation -t TMP``: fl-sim finds it only through the
entry points of its dist-info. ``plugin_driver.py`` then runs, on PYTHONPATH=TMP (so Ray's
client actors find it too): a 2-round federation with the defense on every client and the
attack online, the attack replayed offline on round 2, a 2-cell grid over the defense's
``sigma``, and a defense defined in the driver script only, which must be refused before
its run directory exists.

Measured (seed 0, 2 shared cores, 2026-12-07): fc_analytic on one digit (batch 1, FedSGD,
MLP 256->32): 160.6 dB undefended (exact up to float rounding), 51.1 dB at sigma = 0.001,
29.7 dB at 0.01, 14.6 dB at 0.1 (online, client 1, round 1; the replay on client 0, round 2:
13.6 dB).
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
SIGMA = 0.1

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
                          f"0.0,{SIGMA}"], env=_env(tmp_path, installed), cwd=tmp_path,
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

    # grid: 2 cells, the defense's sigma as the axis
    by_sigma = {float(r["defenses.0.params.sigma"]): r for r in report["grid"]}
    assert sorted(by_sigma) == [0.0, SIGMA] and all(not r["error"] for r in by_sigma.values())
    undefended, defended = float(by_sigma[0.0]["psnr"]), float(by_sigma[SIGMA]["psnr"])
    # undefended, the image is read off the update exactly (measured 160.6 dB)
    assert undefended > 100.0, by_sigma
    # the noise takes what the attacker gets down to 14.6 dB (measured): below 20 dB
    assert defended < 20.0, by_sigma
    assert online["metrics"]["psnr"] < 20.0, online["metrics"]  # same sigma, same client

    # a defense registered in the driver only: one line, before anything is written
    refused = report["refused"]
    assert refused is not None and "\n" not in refused
    assert "defense 'notebook_zero' is registered only in this process (__main__)" in refused
    assert '[project.entry-points."fl_sim.defenses"] notebook_zero' in refused
    assert report["refused_dir_exists"] is False
