"""Config validation: every kind of bad input names what is wrong and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_sim import config
from fl_sim.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_default_config_validates() -> None:
    cfg = config.load(ROOT / "configs" / "default.toml")
    assert cfg.strategy.name == "fedsgd"
    assert cfg.data.name == "digits"
    assert [a.name for a in cfg.attacks] == ["idlg", "inverting_gradients", "peer_inversion"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[runn]\nseed = 1\n", "runn: unknown key; allowed: attacks, audits, data, defenses"),
        ("[run]\nsede = 1\n", "run.sede: unknown key; allowed: deterministic, device, name"),
        ("[run]\nseed = 'abc'\n", "run.seed: a string where a number is expected"),
        ("[run]\nseed = -1\n", "run.seed: Input should be greater than or equal to 0"),
        ("[run]\ndevice = 'tpu'\n", "run.device: Input should be 'cpu', 'cuda' or 'auto'"),
        ("[federation]\nnum_clients = 0\n", "federation.num_clients: Input should be greater"),
        ("[federation]\nclients = 3\n",
         "federation.clients: unknown key; allowed: adam_betas, adam_eps, batch_size"),
        ("[federation]\nnum_clients = 2\npeer_clients = [5]\n", "peer_clients [5] outside"),
        ("[model]\nname = 'nope'\n", "model.name: unknown model 'nope'; known: convnet, lenet"),
        ("[model]\nname = 'convnet'\nwidth = 'wide'\n",
         "model.width: a string where a number is expected"),
        ("[model]\nname = 'convnet'\ndepth = 3\n", "model.depth: unknown key; allowed: width"),
        ("[data]\nname = 'imagenet'\n", "data.name: unknown data source 'imagenet'; known:"),
        ("[[attacks]]\nname = 'dlg'\nmax_iterations = 'x'\n",
         "attacks[0].max_iterations: a string where a number is expected"),
        ("[[attacks]]\nname = 'magic'\n", "attacks[0].name: unknown attack 'magic'; known:"),
        ("[strategy]\nname = 'fedsgd'\nserver_lr = -1\n", "strategy.server_lr"),
        ("run = [\n", "not valid TOML"),
        ("[metrics]\nlpips_weights = '/nonexistent/lpips.pth'\n",
         "metrics: LPIPS needs the weights file; lpips_weights = "
         "'/nonexistent/lpips.pth' (nothing is downloaded)"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    msg = str(info.value)
    assert expected in msg
    assert "\n" not in msg


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.toml"):
        config.load(tmp_path / "nope.toml")


def test_overrides_parse_as_toml_and_do_not_mutate_input() -> None:
    raw = {"federation": {"num_rounds": 3}, "attacks": [{"name": "dlg"}]}
    out = config.apply_overrides(raw, ["federation.num_rounds=5", "run.name=x y",
                                       "attacks.0.max_iterations=7", "federation.lr=0.5"])
    assert out["federation"] == {"num_rounds": 5, "lr": 0.5}
    assert out["run"]["name"] == "x y"
    assert out["attacks"][0]["max_iterations"] == 7
    assert raw == {"federation": {"num_rounds": 3}, "attacks": [{"name": "dlg"}]}
    with pytest.raises(ConfigError, match="expected key.path=value"):
        config.apply_overrides(raw, ["federation.num_rounds"])
    with pytest.raises(ConfigError, match="'3' is not an index of a list of 1 entries"):
        config.apply_overrides(raw, ["attacks.3.max_iterations=1"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = config.load(ROOT / "configs" / "default.toml", ["run.seed=7", "model.hidden=[32, 16]"])
    path = config.save_resolved(cfg, tmp_path)
    again = config.load(path)
    assert again == cfg
    assert json.loads(path.read_text())["model"] == {"name": "mlp", "hidden": [32, 16],
                                                     "pretrained": None}


def test_resume_accepts_more_rounds_and_another_ray_cluster_only(tmp_path) -> None:
    from fl_sim.errors import RunDirError
    from fl_sim.federation.simulation import _check_same_config

    default = ROOT / "configs" / "default.toml"
    cfg = config.load(default)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json_dict()))
    same = config.load(default, ["federation.num_rounds=9",
                                 'federation.ray_address="ray://10.0.0.1:10001"'])
    _check_same_config(same, tmp_path)
    with pytest.raises(RunDirError, match="federation"):
        _check_same_config(config.load(default, ["federation.lr=0.5"]), tmp_path)
