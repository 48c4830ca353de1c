"""Passive white-box membership inference from one update (mia_gradient, Nasr et al. 2019).

Case rule (fixed before any outcome was seen): 8 clients holding TEST digits 0-31 of the
``digits`` source, 4 each in index order (small clients, as the issue asks); LeNet seeded 0,
untrained; one FedSGD round written by :func:`fl_sim.cases.build_case` (no Ray); every client
attacked in round 1 with 4 members (its whole batch) and 64 non-members drawn by the runner
(run seed 0). The figure is the mean ROC AUC over the 8 clients. DP-SGD: the same case with
every client's reply the DP-SGD gradient of :func:`fl_sim.federation.local.one_gradient`
(σ = 8, C = 1; build_case has no defense option, so the test binds ``dp`` into the function a
real run's client calls). Measured 2026-12-07 on the 2-core machine, one torch thread.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

import fl_sim.federation.local as local
from attacks.components.inference import Candidates
from attacks.mia_gradient import MiaGradient
from defenses.dp_sgd import DPSGD
from fl_sim.attack_runner import replay
from fl_sim.cases import DIGITS, CaseClient, build_case, digits_spec, digits_splits
from fl_sim.errors import ConfigError, ThreatModelError
from fl_sim.run_dir import load_run
from fl_sim.tasks import build_task

CLIENTS, PER_CLIENT, NON_MEMBERS = 8, 4, 64
#: undefended, server view: mean AUC over the 8 clients measured 0.867 (0.78-0.94 each)
MIN_AUC_UNDEFENDED = 0.75
#: DP-SGD σ = 8: mean AUC measured 0.528; near chance = within this of 0.5
DP_MAX_DEVIATION = 0.15
#: peer view (client 0 attacks the others' derived update, 28 members): measured 0.682
MIN_AUC_PEER = 0.58


def _case(path: Path, dp: DPSGD | None = None, monkeypatch: pytest.MonkeyPatch | None = None
          ) -> Path:
    test = digits_splits().test
    n = CLIENTS * PER_CLIENT
    x, y = torch.as_tensor(test.images[:n]).float(), torch.as_tensor(test.labels[:n]).long()
    spec = digits_spec("lenet")
    task = build_task(spec, seed=0)
    clients = [CaseClient(x[k * PER_CLIENT:(k + 1) * PER_CLIENT],
                          y[k * PER_CLIENT:(k + 1) * PER_CLIENT],
                          torch.arange(k * PER_CLIENT, (k + 1) * PER_CLIENT))
               for k in range(CLIENTS)]
    if dp is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(local, "one_gradient", functools.partial(local.one_gradient, dp=dp))
    return build_case(path, spec=spec, global_state=task.model.state_dict(), clients=clients,
                      data=DIGITS, num_rounds=1)


def _mean_auc(run_dir: Path, **params: object) -> float:
    aucs = [replay(run_dir, "mia_gradient", client=c,
                   params={"num_members": PER_CLIENT, "num_nonmembers": NON_MEMBERS,
                           **params})[0]["metrics"]["auc"] for c in range(CLIENTS)]
    return sum(aucs) / len(aucs)


@pytest.mark.slow
def test_server_view_separates_members_undefended_and_not_under_strong_dp_sgd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    auc = _mean_auc(_case(tmp_path / "plain"))
    assert auc >= MIN_AUC_UNDEFENDED, auc
    dp_auc = _mean_auc(_case(tmp_path / "dp", DPSGD(noise_multiplier=8.0, max_grad_norm=1.0),
                             monkeypatch))
    assert abs(dp_auc - 0.5) <= DP_MAX_DEVIATION, dp_auc


@pytest.mark.slow
def test_peer_view_from_derived_update(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run_dir = _case(tmp_path / "case")
    row = replay(run_dir, "mia_gradient", view="peer",
                 params={"view": "peer", "num_members": 28, "num_nonmembers": NON_MEMBERS})[0]
    assert row["view"] == "peer" and row["metrics"]["num_members"] == 28
    assert row["metrics"]["auc"] >= MIN_AUC_PEER, row["metrics"]["auc"]


def test_attacker_gets_candidates_without_membership_and_peer_views_refuse(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Threat model: the attack receives only images and labels of the candidates; the
    membership is in the truth store and reaches the scorer; a peer cannot read the target's
    update nor be granted its labels."""
    run_dir = _case(tmp_path / "case")
    seen: list[tuple[object, ...]] = []
    real = MiaGradient.score

    def spy(self, record, candidates, **kw):  # type: ignore[no-untyped-def]
        seen.append((record, candidates, kw))
        return real(self, record, candidates, **kw)

    monkeypatch.setattr(MiaGradient, "score", spy)
    row = replay(run_dir, "mia_gradient", client=1, params={"num_nonmembers": 8})[0]
    record, candidates, kw = seen[0]
    assert isinstance(candidates, Candidates)
    assert set(vars(candidates)) == {"images", "labels"}  # no membership field
    assert not any("member" in str(k) for k in record.knowledge)  # type: ignore[attr-defined]
    assert kw["auxiliary"] is None  # mia_gradient asks for no auxiliary data
    # membership lives only in the truth store's candidate file, and the ROC used it
    truth_file = run_dir / row["candidates"]
    assert truth_file.is_file() and truth_file.is_relative_to(run_dir / "truth")
    assert row["metrics"]["num_members"] == PER_CLIENT
    assert row["metrics"]["num_nonmembers"] == 8
    assert "membership" not in row and "membership" not in row["metrics"]
    assert "membership" not in json.dumps(row["extras"])
    run = load_run(run_dir)
    with pytest.raises(ThreatModelError):
        run.view("peer", client=0).record(1, client=1)  # the target's own update
    with pytest.raises(ThreatModelError):
        run.view("peer", client=0, grant=("labels",))  # the target's labels


def test_candidate_set_is_seeded_and_recorded(tmp_path: Path) -> None:
    run_dir = _case(tmp_path / "case")
    a = replay(run_dir, "mia_gradient", client=2, params={"num_nonmembers": 8})[0]
    b = replay(run_dir, "mia_gradient", client=2,
               params={"num_nonmembers": 8, "score": "grad_norm"})[0]
    from fl_sim.inference import read_membership
    from fl_sim.stores import read_tensors
    ta, _ = read_tensors(run_dir / a["candidates"])
    tb, _ = read_tensors(run_dir / b["candidates"])
    assert torch.equal(ta["images"], tb["images"])  # same seed, round, client: same set
    assert torch.equal(read_membership(run_dir, a["key"]), ta["membership"])
    members = ta["images"][ta["membership"]]
    truth = load_run(run_dir).truth(1, 2).images
    assert torch.allclose(members.sort(0).values, truth.float().sort(0).values)


@pytest.mark.parametrize("params", [{"num_members": 0}, {"num_nonmembers": 0},
                                    {"score": "loss"}, {"view": "aggregate"}])
def test_bad_parameters_are_one_line_config_errors(params: dict) -> None:
    with pytest.raises(ConfigError) as exc:
        MiaGradient(**params)
    assert "\n" not in str(exc.value)


def test_aggregate_view_scores_every_aggregated_clients_batch(tmp_path: Path) -> None:
    """Under SecAgg+ the server's record is the aggregate: its members are every aggregated
    client's batch (here 8 x 4 = 32), not one client's."""
    row = replay(_case(tmp_path / "case"), "mia_gradient", view="aggregate",
                 params={"num_members": 64, "num_nonmembers": 8})[0]
    assert row["view"] == "aggregate" and row["client"] is None
    assert row["metrics"]["num_members"] == CLIENTS * PER_CLIENT
