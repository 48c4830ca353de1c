"""What a client-round trains on, and the ``num_examples`` it reports (issue 12 item 1).

``num_examples`` is the number of DISTINCT images behind the update (the record's count, what
attacks reconstruct, and FedAvg's weight): ``local_steps × batch_size`` when the client holds
that many, its whole partition for ``local_epochs``, the batch for FedSGD.
"""

from __future__ import annotations

import pytest
import torch

from fl_sim.federation.local import batch_plan, local_train, one_gradient
from fl_sim.models import build_model
from fl_sim.tasks.classifier import ClassifierTask


def _task() -> ClassifierTask:
    model = build_model("mlp", 1, 3, 4, seed=0, params={"hidden": [8]})
    return ClassifierTask(model, ((0.5,), (0.25,)))


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g),
            torch.arange(100, 100 + n))


def _train(n: int, **kw) -> object:
    x, y, idx = _data(n)
    args = {"seed": 0, "server_round": 1, "client_id": 0, "batch_size": 2,
            "local_steps": None, "local_epochs": None, "optimizer": "sgd", "lr": 0.1, **kw}
    return local_train(_task(), x, y, idx, **args)


@pytest.mark.parametrize(("n", "steps", "bs", "distinct"),
                         [(80, 3, 4, 12), (12, 3, 4, 12), (3, 2, 4, 3)])
def test_local_steps_use_distinct_images_until_the_pass_ends(n, steps, bs, distinct) -> None:
    plan = batch_plan(n, batch_size=bs, local_steps=steps, local_epochs=None,
                      generator=torch.Generator().manual_seed(0))
    assert [len(b) for b in plan] == [min(bs, n)] * steps
    assert len({int(i) for b in plan for i in b}) == distinct


def test_a_new_pass_starts_when_too_few_unused_images_remain() -> None:
    plan = batch_plan(10, batch_size=4, local_steps=5, local_epochs=None,
                      generator=torch.Generator().manual_seed(0))
    assert len({int(i) for b in plan[:2] for i in b}) == 8  # pass 1: two disjoint batches
    assert len({int(i) for b in plan[2:4] for i in b}) == 8  # pass 2 (2 images were left)


def test_first_step_is_fedsgds_batch() -> None:
    """Step 0 of a multi-step plan is the batch FedSGD draws (same derived generator)."""
    plans = [batch_plan(50, batch_size=4, local_steps=s, local_epochs=None,
                        generator=torch.Generator().manual_seed(3))[0] for s in (1, 5)]
    assert torch.equal(plans[0], plans[1])


def test_local_steps_report_steps_times_batch_not_the_partition() -> None:
    res = _train(80, local_steps=3)
    assert res.num_examples == 6  # not 80
    assert [len(s.indices) for s in res.steps] == [2, 2, 2]
    assert len({int(i) for s in res.steps for i in s.indices}) == 6


def test_fedprox_reports_the_same_count() -> None:
    assert _train(80, local_steps=3, proximal_mu=0.5).num_examples == 6


def test_local_epochs_report_the_partition() -> None:
    res = _train(7, local_epochs=2)
    assert res.num_examples == 7
    assert [len(s.indices) for s in res.steps] == [2, 2, 2, 1] * 2


def test_a_client_smaller_than_the_plan_reports_what_it_holds() -> None:
    assert _train(5, local_steps=4).num_examples == 5


def test_fedsgd_reports_its_batch() -> None:
    x, y, idx = _data(30)
    res = one_gradient(_task(), x, y, idx, seed=0, server_round=1, client_id=0, batch_size=4)
    assert res.num_examples == 4 and len(res.steps) == 1
