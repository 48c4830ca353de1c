"""`[model] pretrained` in an experiment: bad paths and architectures stop before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from fl_sim.config import load
from fl_sim.errors import ConfigError, MissingResourceError
from fl_sim.models import build_model
from fl_sim.priors import save_prior

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "diffusion_digits.toml"


def _prior(tmp_path: Path, size: int) -> Path:
    unet = build_model("unet", 1, 10, size, seed=4, params={"preset": "tiny"})
    return save_prior(tmp_path / f"prior{size}", unet, DDPMScheduler(), metadata={})


def _no_ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is None or not ray.is_initialized()


@pytest.mark.parametrize("case", ["missing", "mismatch"])
def test_bad_pretrained_stops_before_ray(tmp_path: Path, case: str, one_thread) -> None:
    from fl_sim.federation.simulation import run_experiment
    path = tmp_path / "missing" if case == "missing" else _prior(tmp_path, 8)
    cfg = load(CONFIG, [f'model.pretrained="{path}"'])
    err = MissingResourceError if case == "missing" else ConfigError
    match = "does not exist" if case == "missing" else r"sample_size 8 \(pretrained\) vs 16"
    with pytest.raises(err, match=match):
        run_experiment(cfg, run_dir=tmp_path / "run")
    assert _no_ray_started() and not (tmp_path / "run").exists()


def test_server_starts_from_the_pretrained_weights(tmp_path: Path, one_thread) -> None:
    from fl_sim.federation.server_app import server_task
    path = _prior(tmp_path, 16)
    task, _, _ = server_task(load(CONFIG, [f'model.pretrained="{path}"']))
    saved = build_model("unet", 1, 10, 16, seed=4, params={"preset": "tiny"}).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in task.model.state_dict().items())
    fresh, _, _ = server_task(load(CONFIG))
    assert not torch.equal(fresh.model.conv_in.weight, saved["conv_in.weight"])


@pytest.mark.slow
def test_cli_mismatch_is_one_line_exit_2(tmp_path: Path) -> None:
    path = _prior(tmp_path, 8)
    out = subprocess.run([sys.executable, "-m", "fl_sim.cli", "run", str(CONFIG), "--set",
                          f'model.pretrained="{path}"', "--run-dir", str(tmp_path / "run")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("fl-sim: error: model.pretrained:")
    assert out.stderr.count("\n") == 1, out.stderr
