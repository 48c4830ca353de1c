"""The CLI, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fl_sim import config

ROOT = Path(__file__).resolve().parents[2]


def fl_sim(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fl_sim.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_help_explains_every_subcommand() -> None:
    out = fl_sim("--help")
    assert out.returncode == 0
    for cmd in ("run", "list", "attack", "report", "validate", "deploy-local", "--version"):
        assert cmd in out.stdout
    run_help = fl_sim("run", "--help").stdout
    assert "--set" in run_help and "--resume" in run_help and "federation.num_rounds" in run_help


def test_version() -> None:
    out = fl_sim("--version")
    assert out.returncode == 0 and out.stdout.startswith("fl-sim 0.")


def test_list_shows_every_kind_with_builtin_names() -> None:
    out = fl_sim("list")
    assert out.returncode == 0, out.stderr
    # the name column, cell by cell ("dlg" must not be found inside "idlg")
    cells = {line.split("│")[2].strip() for line in out.stdout.splitlines()
             if line.count("│") >= 3}
    assert {"digits", "npz", "image_folder", "mnist", "cifar10", "iid", "dirichlet",
            "pathological", "by_identity", "lenet", "convnet", "resnet18", "mlp", "unet",
            "classifier", "diffusion", "fedavg", "fedavgm", "fedsgd", "krum", "dlg", "idlg",
            "inverting_gradients", "peer_inversion", "noop"} <= cells, cells


@pytest.mark.parametrize("kind", ["strategy", "strategies", "data_source", "data_sources"])
def test_list_one_kind_singular_or_plural(kind: str) -> None:
    out = fl_sim("list", kind)
    assert out.returncode == 0, out.stderr
    wanted, other = (("fedsgd", "cifar10") if kind.startswith("strateg")
                     else ("cifar10", "fedsgd"))
    assert wanted in out.stdout and other not in out.stdout


def test_bad_input_is_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation]\nnum_clients = 'many'\n")
    out = fl_sim("run", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "federation.num_clients: a string where a number is expected" in out.stderr
    assert "Traceback" not in out.stderr

    out = fl_sim("run", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "config file not found" in out.stderr

    out = fl_sim("run", "configs/default.toml", "--set", "model.name=alexnet")
    assert out.returncode == 2 and "unknown model 'alexnet'; known:" in out.stderr

    out = fl_sim("list", "gadgets")
    assert out.returncode == 2 and "unknown plug-in kind" in out.stderr


def test_validate_prints_resolved_config() -> None:
    out = fl_sim("validate", "configs/default.toml", "--set", "run.seed=4")
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed == config.load(ROOT / "configs" / "default.toml",
                                  ["run.seed=4"]).to_json_dict()
    assert printed["run"]["seed"] == 4 and printed["federation"]["fraction_train"] == 1.0


@pytest.mark.ray
def test_missing_data_file_fails_with_one_line_not_a_flower_banner(tmp_path: Path) -> None:
    out = fl_sim("run", "configs/default.toml", "--no-progress", "--run-dir",
                 str(tmp_path / "run"), "--set", "data.name=npz", "--set",
                 f"data.path={tmp_path / 'nope.npz'}")
    assert out.returncode == 2
    assert out.stderr.strip() == f"fl-sim: error: {tmp_path / 'nope.npz'}: file not found"
    assert "DEPRECATED" not in out.stdout + out.stderr
