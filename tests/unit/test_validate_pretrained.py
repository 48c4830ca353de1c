"""`fl-sim validate` on a config whose model starts from a diffusers checkpoint shows what the run
builds: the checkpoint's UNet architecture and schedule, not the default ``preset='tiny'``.

The case is fixed here: configs/reproduce/gidm_cifar10.toml (no preset, ``model.pretrained``
a placeholder) with the placeholder replaced by a small pipeline directory whose architecture
differs from every preset (block_out_channels [16, 32]) and whose scheduler is v-prediction.
"""

from __future__ import annotations

from pathlib import Path

from fl_sim import api, cli
from fl_sim.config import ModelConfig, TaskConfig
from fl_sim.tasks import task_from_config
from tests.unit.test_diffusers_checkpoints import DDPM_SCHEDULER, TINY_UNET, write_pipeline

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "reproduce" / "gidm_cifar10.toml"
SMALL_UNET = {**TINY_UNET, "block_out_channels": [16, 32]}


def _checkpoint(tmp_path: Path) -> Path:
    return write_pipeline(tmp_path / "ckpt", SMALL_UNET,
                          {**DDPM_SCHEDULER, "prediction_type": "v_prediction"}, weights=False)


def test_validate_shows_the_checkpoints_architecture_that_the_run_builds(tmp_path, capsys):
    path = _checkpoint(tmp_path)
    sets = ["--set", f'model.pretrained="{path}"']
    assert cli.main(["validate", str(CONFIG), *sets]) == 0
    err = capsys.readouterr().err
    model_line = next(ln for ln in err.splitlines() if ln.startswith("  model: unet"))
    assert "preset=" not in model_line  # was preset='tiny' config=None
    assert "'block_out_channels': [16, 32]" in model_line
    assert f"read from model.pretrained {path}" in err
    task_line = next(ln for ln in err.splitlines() if ln.startswith("  task: diffusion"))
    assert "prediction_type='v_prediction'" in task_line  # the checkpoint's, not the default

    # what validate shows is what the run's task builder makes of the same sections
    cfg = api.load_config(CONFIG, [f'model.pretrained="{path}"'])
    shown = {p["where"]: p["params"] for p in api.resolved_plugins(cfg)}
    task, spec = task_from_config(ModelConfig(name="unet", pretrained=str(path)),
                                  TaskConfig(name="diffusion"), 3, 10, 32, (0.5,) * 3,
                                  (0.5,) * 3, seed=0)
    assert tuple(task.model.config.block_out_channels) == (16, 32)
    assert shown["model"]["config"] == spec.model_params["config"]
    assert shown["task"]["prediction_type"] == spec.task_params["prediction_type"]


def test_validate_of_a_missing_checkpoint_says_so_without_a_preset(capsys):
    assert cli.main(["validate", str(CONFIG)]) == 0  # the placeholder path does not exist
    err = capsys.readouterr().err
    model_line = next(ln for ln in err.splitlines() if ln.startswith("  model: unet"))
    assert "preset=" not in model_line
    assert "/PATH/TO/ddpm-cifar10-32: not found" in err
