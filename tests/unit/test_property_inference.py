"""Passive property inference from the peer view (Melis et al. 2019): "the other client's
batch contains class 0".

Case rule (fixed before any outcome was seen): 12 one-round FedSGD cases of two clients on
TEST digits (:func:`fl_sim.cases.build_case`, no Ray), a seeded untrained LeNet (seed 0). The
peer (client 0) holds test digits 0-7 in every case; the target (client 1) holds 8 test
digits drawn with ``torch.Generator().manual_seed(case)`` from indices 100-359: for an even
case 1-3 of them of class 0 and the rest of other classes, for an odd case none of class 0.
The attacker sees only the derived update of the others; its auxiliary data is the held-out
pool of the run (no client's data). Each case gives one score; the figure is the ROC AUC over
the 12 cases (12 auxiliary batches per side). Measured 2026-12-07, 2-core machine, one torch thread.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attacks.property_inference import PropertyInference
from fl_sim.attack_runner import replay
from fl_sim.cases import DIGITS, CaseClient, build_case, digits_spec, digits_splits
from fl_sim.errors import ConfigError, ThreatModelError
from fl_sim.inference import property_roc
from fl_sim.run_dir import load_run
from fl_sim.tasks import build_task

CASES, K = 12, 0
#: ROC AUC over the 12 cases, peer view: measured 1.0 (balanced accuracy 1.0; scores 0.39-0.99
#: with the property, 0.02-0.07 without)
MIN_PROPERTY_AUC = 0.8


def _target(case: int) -> torch.Tensor:
    test = digits_splits().test
    labels = torch.as_tensor(test.labels[100:360])
    g = torch.Generator().manual_seed(case)
    with_k = 100 + torch.nonzero(labels == K).flatten()
    without_k = 100 + torch.nonzero(labels != K).flatten()
    n_k = 1 + int(torch.randint(0, 3, (1,), generator=g)) if case % 2 == 0 else 0
    pick = torch.cat([with_k[torch.randperm(len(with_k), generator=g)[:n_k]],
                      without_k[torch.randperm(len(without_k), generator=g)[:8 - n_k]]])
    return pick


def _case(path: Path, case: int) -> Path:
    test = digits_splits().test
    x, y = torch.as_tensor(test.images).float(), torch.as_tensor(test.labels).long()
    spec = digits_spec("lenet")
    peer, target = torch.arange(8), _target(case)
    return build_case(path, spec=spec, global_state=build_task(spec, seed=0).model.state_dict(),
                      clients=[CaseClient(x[peer], y[peer], peer),
                               CaseClient(x[target], y[target], target)],
                      data=DIGITS, num_rounds=1, peer_clients=(0,))


@pytest.mark.slow
def test_peer_infers_class_presence_in_the_others_batch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    rows = [replay(_case(tmp_path / f"c{i}", i), "property_inference",
                   params={"property_class": K, "num_batches": 12})[0] for i in range(CASES)]
    assert [r["metrics"]["property"] for r in rows] == [i % 2 == 0 for i in range(CASES)]
    assert all(r["view"] == "peer" for r in rows)
    m = property_roc(rows)
    assert m["auc"] >= MIN_PROPERTY_AUC, m["auc"]


def test_peer_property_attack_is_refused_ground_truth_and_other_views(tmp_path: Path) -> None:
    run = load_run(_case(tmp_path / "c", 0))
    with pytest.raises(ThreatModelError):
        run.view("peer", client=0, grant=("labels",))
    with pytest.raises(ThreatModelError):
        run.view("peer", client=0).record(1, client=1)
    attack = PropertyInference(property_class=K)
    with pytest.raises(ThreatModelError, match="needs a 'peer' view"):
        attack.infer(run.view("server").record(1, 1), None)


@pytest.mark.parametrize("params", [{"property_class": -1}, {"view": "aggregate"},
                                    {"num_batches": 1}])
def test_bad_parameters_are_one_line_config_errors(params: dict) -> None:
    with pytest.raises(ConfigError) as exc:
        PropertyInference(**params)
    assert "\n" not in str(exc.value)


def test_undefined_property_is_refused_in_one_line(tmp_path: Path) -> None:
    run_dir = _case(tmp_path / "c", 1)
    with pytest.raises(ConfigError, match="no such class") as exc:
        replay(run_dir, "property_inference", params={"property_class": 12})
    assert "\n" not in str(exc.value)
