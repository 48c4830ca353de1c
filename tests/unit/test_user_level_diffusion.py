"""user_level_diffusion (attacks/user_level_diffusion.py) on Olivetti faces, 16x16 grey.

The quality test trains, in one module fixture, a small prior on the users NOT attacked
(``fl-sim train-prior``'s function, ``filter.groups``) and the identity classifier on every
user's held-out images, then attacks two users' FedSGD updates (an untrained MLP, 40
classes, batch 7) and checks the issue's bar on what fits the CI budget: the reconstruction
is nearer the own user's images than the others' and the own identity ranks high.
The full >= 10-user figures: ``benchmarks/user_level.py`` (benchmarks/RESULTS.md).
Olivetti is read from ``../shared/data`` (fails under CI=true when missing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fl_sim.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import user_level  # noqa: E402  (benchmarks/user_level.py: the shared case builders)

ATTACKED = (0, 7, 9)
BATCH = 7


def test_bad_parameters() -> None:
    from fl_sim.registry import ATTACKS

    for bad in ({}, {"prior": ""}, {"prior": "p", "num_generated": 0},
                {"prior": "p", "representative": "best"}, {"prior": "p", "lr": 0}):
        with pytest.raises(ConfigError):
            ATTACKS.create("user_level_diffusion", **bad)


def test_label_from_bias_sign() -> None:
    from attacks.user_level_diffusion import infer_user_label

    g = {"w": torch.zeros(5, 3), "b": torch.tensor([0.1, 0.2, -0.7, 0.2, 0.2])}
    assert infer_user_label(g, 5) == 2
    with pytest.raises(ConfigError):
        infer_user_label({"w": torch.zeros(5, 3)}, 5)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory):
    if not user_level.OLIVETTI.is_file():  # never a silent skip: the bar needs real faces
        pytest.fail(f"{user_level.OLIVETTI} missing: the Olivetti quality test reads "
                    "../shared/data (400 faces, too large to vendor under tests/data)")
    torch.set_num_threads(1)
    x, y = user_level.olivetti(16)
    tmp = tmp_path_factory.mktemp("user_level")
    prior = user_level.train_other_users_prior(tmp / "prior", size=16, attacked=10, steps=300)
    ident = user_level.train_identity_heldout(tmp / "identity", x, y, batch=BATCH)
    return x, y, prior, ident


@pytest.mark.slow
def test_reconstruction_carries_the_users_identity(faces) -> None:
    x, y, prior, ident = faces
    meta = json.loads((prior / "fl_sim_prior.json").read_text())
    assert meta["filter"]["groups"] == list(range(10, 40))
    rows = user_level.attack_users(list(ATTACKED), x, y, prior=prior, identity=ident,
                                   batch=BATCH, attack_params={"iterations": 60})
    for r in rows:
        assert r["label_recovered"] == r["user"]
        assert r["sim_own"] > r["sim_others"], r
        assert r["identity_rank"] <= 4, r  # of 40: within the top 10 %
    # the bar on these users: top-1 identity accuracy >= 3x chance (1/40)
    assert sum(r["identity_correct"] for r in rows) / len(rows) >= 3 / 40, rows
