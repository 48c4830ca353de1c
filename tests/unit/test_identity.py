"""The identity metric (fl_sim/identity.py): training, saving, scores, CLI, runner hook.

Runs on scikit-learn's bundled digits (labels stand in for identities): seeded, no files
outside tmp_path. A few seconds in all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl_sim.errors import ConfigError, DataError, MissingResourceError
from fl_sim.identity import identity_scores, load_identity, score_identity, train_identity


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fl_sim.registry import DATA_SOURCES

    s = DATA_SOURCES.get("digits")(image_size=16)
    return (torch.as_tensor(s.train.images).float()[:400], torch.as_tensor(s.train.labels)[:400],
            torch.as_tensor(s.test.images).float(), torch.as_tensor(s.test.labels))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    x, y, _, _ = digits
    torch.set_num_threads(1)
    return train_identity(x, y, tmp_path_factory.mktemp("identity"), epochs=8, seed=0)


def test_scores_recognise_unseen_images_of_the_right_identity(model_dir, digits) -> None:
    _, _, xt, yt = digits
    model = load_identity(model_dir)
    correct, own_above = 0, 0
    for c in range(10):
        s = identity_scores(model, xt[yt == c][:5], c)
        correct += int(s["identity_correct"])
        own_above += int(s["sim_own"] > s["sim_others"])
        assert s["identity_correct"] == float(s["identity_top1"] == c)
        assert -1 <= s["sim_others"] <= 1 and -1 <= s["sim_own"] <= 1
    assert correct >= 8 and own_above == 10
    # a wrong claimed identity: not correct, and its own-similarity drops below the true one's
    wrong = identity_scores(model, xt[yt == 3][:5], 8)
    right = identity_scores(model, xt[yt == 3][:5], 3)
    assert wrong["identity_correct"] == 0.0 and wrong["sim_own"] < right["sim_own"]


def test_saved_model_round_trips_and_resizes(model_dir, digits) -> None:
    _, _, xt, yt = digits
    a = identity_scores(load_identity(model_dir), xt[:1], int(yt[0]))
    b = identity_scores(load_identity(model_dir), xt[:1], int(yt[0]))
    assert a == b
    big = torch.nn.functional.interpolate(xt[:1], size=(32, 32), mode="nearest")
    assert identity_scores(load_identity(model_dir), big, int(yt[0]))["identity_top1"] == \
        a["identity_top1"]


def test_score_identity_only_for_one_identity(model_dir, digits) -> None:
    _, _, xt, yt = digits
    assert score_identity(model_dir, xt[:1], torch.tensor([0, 1])) == {}
    assert set(score_identity(model_dir, xt[:1], torch.tensor([2, 2, 2]))) >= {
        "identity_top1", "identity_correct", "sim_own", "sim_others"}


def test_bad_inputs(tmp_path, model_dir, digits) -> None:
    x, y, _, _ = digits
    with pytest.raises(MissingResourceError):
        load_identity(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        load_identity(tmp_path / "empty")
    with pytest.raises(DataError):
        train_identity(x, y[:3], tmp_path / "m")
    with pytest.raises(ConfigError):
        identity_scores(load_identity(model_dir), x[:1].expand(1, 3, 16, 16), 0)
    with pytest.raises(ConfigError):
        identity_scores(load_identity(model_dir), x[:1], 99)


def test_cli_train_identity_and_metrics_option(tmp_path) -> None:
    from fl_sim.cli import main
    from fl_sim.config import MetricsConfig

    cfg = tmp_path / "ident.toml"
    cfg.write_text('[data]\nname = "digits"\nimage_size = 8\n[identity]\nepochs = 2\n')
    assert main(["train-identity", str(cfg), "--out", str(tmp_path / "m")]) == 0
    model = load_identity(tmp_path / "m")
    assert model.metadata["split"] == "test" and model.image_size == 8
    assert MetricsConfig(identity_model=str(tmp_path / "m")).identity_model
    cfg.write_text('[data]\nname = "digits"\n[identity]\nepoch = 2\n')
    assert main(["train-identity", str(cfg), "--out", str(tmp_path / "m2")]) == 2


def test_report_shows_identity_columns_and_plain_row(tmp_path) -> None:
    import json

    from PIL import Image

    from fl_sim.report import write_report
    from fl_sim.run_dir.images import save_grid

    imgs = torch.rand(3, 1, 16, 16)
    g2 = save_grid(tmp_path / "attacks" / "two.png", imgs, imgs)
    g3 = save_grid(tmp_path / "attacks" / "three.png", imgs, imgs, plain=imgs * 0.5)
    h2, h3 = Image.open(g2).size[1], Image.open(g3).size[1]
    assert h3 > h2 and (h3 - 2) * 2 == (h2 - 2) * 3  # a third row of the same cell height
    (tmp_path / "config.json").write_text("{}")
    row = {"key": "k1", "attack": "user_level_diffusion", "view": "server", "round": 1,
           "client": 0, "grid": "attacks/three.png", "grid_plain": "before_images",
           "metrics": {"psnr": 12.0, "identity_top1": 3.0, "identity_correct": 1.0,
                       "sim_own": 0.91, "sim_others": 0.7}}
    (tmp_path / "attacks.jsonl").write_text(json.dumps(row) + "\n")
    page = write_report(tmp_path).read_text()
    for col in ("identity_top1", "identity_correct", "sim_own", "sim_others", "0.91"):
        assert col in page
    assert "middle: plain reconstructions (before_images)" in page


def test_metrics_option_refuses_a_missing_model(tmp_path) -> None:
    import pydantic

    from fl_sim.config import MetricsConfig

    with pytest.raises(pydantic.ValidationError, match="identity_model"):
        MetricsConfig(identity_model=str(tmp_path / "none"))
