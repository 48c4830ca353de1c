"""user_level_diffusion (attacks/user_level_diffusion.py) on Olivetti faces, 16x16 grey.

The quality test trains, in one module fixture, a small prior on users 10-39 (never
attacked: ``fl-sim train-prior``'s function, ``filter.groups``) and the identity classifier on
every user's held-out images, then attacks the FedSGD updates (an untrained MLP, 40 classes,
batch 7) of the users in :data:`ATTACKED`, fixed by a rule that does not look at the outcome:
the FIRST THREE users by index. It asserts what holds there with a stated margin (measured
values: tests/QUALITY_MARGINS.md): the label is recovered, every reconstruction is nearer its
own user's images than the others' by at least :data:`MIN_SIM_GAP`, and the own identity ranks
within the top :data:`MAX_IDENTITY_RANK` of 40.

Not asserted, recorded as measured: top-1 identity accuracy on these users is 0 / 3 at this
budget (2026-12-07: nearest gallery identities 7, 26, 25; own rank 3, 3, 3). Users (0, 7, 9)
were asserted here before, 7 and 9 chosen because they were the benchmark's only top-1 hits:
that made the top-1 bar (one hit of three) hold by selection, so it was dropped with them.
The >= 10-user figures (top-1 0.20 at 150 iterations and an 800-step prior):
``benchmarks/user_level.py`` (benchmarks/RESULTS.md). Olivetti is read from
``../shared/data`` (fails under CI=true when missing).
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

#: the first three users by index (the prior is trained on users 10-39)
ATTACKED = (0, 1, 2)
BATCH = 7
#: sim_own - sim_others, every attacked user: measured min 0.156 (users 0-2: 0.193, 0.156,
#: 0.244 on 2026-12-07), asserted >= 0.08 (margin 0.076, about half the measured gap)
MIN_SIM_GAP = 0.08
#: rank of the own identity among 40 (1 = top-1): measured worst 3, asserted <= 6
MAX_IDENTITY_RANK = 6


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
        assert r["sim_own"] - r["sim_others"] >= MIN_SIM_GAP, r
        assert r["identity_rank"] <= MAX_IDENTITY_RANK, r  # of 40: within the top 15 %
