"""``fl_sim.cases``: a recorded run directory without Ray, read back through the views.

Fast checks of the builder's invariants (the comparison with a real Ray federation is
``tests/integration/test_cases_faithful.py``): the views read it, the peer's derived update is
the others' weighted mean of what the server received, the aggregate is the mean, the truth
holds exactly the clients' images, nothing is granted to the peer. Case: an MLP on the first
8 digits of the TEST split, 4 clients with 2 each (by index).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fl_sim.cases import CaseClient, build_case, digits_spec, digits_splits, others_truth
from fl_sim.errors import ConfigError, ThreatModelError
from fl_sim.run_dir import load_run
from fl_sim.tasks import build_task


def _clients(n: int = 4, per: int = 2) -> list[CaseClient]:
    test = digits_splits().test
    x = torch.as_tensor(test.images[:n * per]).float()
    y = torch.as_tensor(test.labels[:n * per]).long()
    idx = torch.arange(n * per)
    return [CaseClient(x[k * per:(k + 1) * per], y[k * per:(k + 1) * per],
                       idx[k * per:(k + 1) * per]) for k in range(n)]


@pytest.mark.parametrize("strategy", ["fedsgd", "fedavg"])
def test_case_reads_back_through_the_views(tmp_path: Path, strategy: str) -> None:
    spec = digits_spec("mlp")
    clients = _clients()
    glob = build_task(spec, seed=0).model.state_dict()
    run = load_run(build_case(tmp_path / "c", spec=spec, global_state=glob, clients=clients,
                              strategy=strategy, num_rounds=2, local_steps=2, batch_size=1))
    assert run.complete and run.config.strategy.name == strategy
    server = run.view("server")
    assert server.rounds() == [1, 2] and server.clients(1) == [0, 1, 2, 3]
    for r in (1, 2):
        recs = [server.record(r, c) for c in range(4)]
        # FedSGD: one gradient of the first batch; FedAvg: 2 steps of batch 1 = 2 images
        assert [x.num_examples for x in recs] == ([1] * 4 if strategy == "fedsgd" else [2] * 4)
        peer = run.view("peer", client=0).record(r)
        assert dict(peer.knowledge)["granted"] == () and peer.num_clients_aggregated == 3
        w = [float(x.num_examples) for x in recs[1:]]
        for k in peer.update:
            others = sum(wi * x.update[k].double() for wi, x in zip(w, recs[1:], strict=True))
            torch.testing.assert_close(peer.update[k].double(), others / sum(w), rtol=1e-3,
                                       atol=1e-6)
        agg = server.aggregate(r)
        if strategy == "fedavg":  # the aggregate is the weighted mean of the deltas
            for k in agg.update:
                mean = sum(x.update[k].double() for x in recs) / 4
                torch.testing.assert_close(agg.update[k].double(), mean, rtol=1e-4, atol=1e-7)
        for c in range(4):
            t = run.truth(r, c)
            assert set(t.steps[0].indices.tolist()) <= set(clients[c].indices.tolist())
    images, labels = others_truth(run, 1, 0)
    assert len(images) == len(labels) == 3 * recs[0].num_examples
    with pytest.raises(ThreatModelError):
        run.view("peer", client=0, grant=("labels",))
    assert json.loads((run.path / "run.json").read_text())["case"] is True


def test_bad_strategy_or_no_clients_is_a_config_error(tmp_path: Path) -> None:
    spec = digits_spec("mlp")
    glob = build_task(spec, seed=0).model.state_dict()
    with pytest.raises(ConfigError, match="strategy"):
        build_case(tmp_path / "a", spec=spec, global_state=glob, clients=_clients(),
                   strategy="krum")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="clients"):
        build_case(tmp_path / "b", spec=spec, global_state=glob, clients=[])
