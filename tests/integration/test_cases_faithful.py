"""``fl_sim.cases.build_case`` writes what a real Ray federation writes (issue 18, item 2).

The quality tests and benchmarks build their attack cases without Ray; that is only honest if
a case directory holds the very records a real run would. Here a tiny federation (MLP on
16x16 digits, 3 clients, 2 rounds, client 0 a curious peer) runs on Flower's Ray backend,
then :func:`~fl_sim.cases.build_case` replays it from the same round-1 global and the same
client partitions; every server record, aggregate, peer view, ground truth and the final
model must agree, for FedSGD and for FedAvg.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from federation_env import flower_env

from fl_sim.cases import CaseClient, build_case
from fl_sim.config import from_dict
from fl_sim.run_dir import Run, load_run
from fl_sim.stores import ObservationStore, PeerStore, read_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FED = {"num_clients": 3, "num_rounds": 2, "local_steps": 2, "batch_size": 4, "lr": 0.1,
       "peer_clients": [0], "client_resources": {"num_cpus": 1}}
DATA = {"name": "digits", "image_size": 16, "max_train": 120, "max_test": 30}


def _close(a, b, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        # float sums of the same numbers in the same order: equal up to float32 rounding
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=f"{what} {k}")


def _rows(root: Path) -> list[dict]:
    return sorted((dict(r) for r in read_jsonl(root / "index.jsonl")),
                  key=lambda r: (str(r.get("tap", r.get("kind"))), r["round"],
                                 -1 if r.get("client") is None else r["client"]))


@pytest.mark.parametrize("strategy", ["fedsgd", "fedavg"])
def test_case_directory_matches_a_real_federation(tmp_path: Path, strategy: str) -> None:
    from fl_sim.federation.client_app import client_data
    from fl_sim.federation.simulation import run_experiment

    cfg = from_dict({"run": {"name": "real", "seed": 0}, "data": DATA,
                     "model": {"name": "mlp", "hidden": [16]}, "federation": FED,
                     "strategy": {"name": strategy}})
    with flower_env(tmp_path / "flwr_home"):
        real: Run = load_run(run_experiment(cfg, run_dir=tmp_path / "real"))
    parts = [client_data(cfg, c) for c in range(FED["num_clients"])]
    glob = ObservationStore(real.path).load(f"globals/r{1:04d}.safetensors")
    case = load_run(build_case(
        tmp_path / "case", spec=real.spec, global_state=glob,
        clients=[CaseClient(p.images, p.labels, p.indices) for p in parts],
        strategy=strategy, num_rounds=FED["num_rounds"], lr=FED["lr"],
        local_steps=FED["local_steps"], batch_size=FED["batch_size"],
        peer_clients=FED["peer_clients"], seed=0, data=DATA))
    rs, cs = real.view("server"), case.view("server")
    rp, cp = real.view("peer", client=0), case.view("peer", client=0)
    assert rs.rounds() == cs.rounds() == [1, 2] and rp.rounds() == cp.rounds() == [1, 2]
    for r in (1, 2):
        for c in range(FED["num_clients"]):
            a, b = rs.record(r, c), cs.record(r, c)
            assert (a.update_kind, a.num_examples, a.local_steps, a.lr, a.batch_size) == \
                (b.update_kind, b.num_examples, b.local_steps, b.lr, b.batch_size)
            _close(a.global_params, b.global_params, f"global r{r}")
            _close(a.update, b.update, f"server_in r{r} c{c}")
            ta, tb = real.truth(r, c), case.truth(r, c)
            assert torch.equal(ta.images, tb.images) and torch.equal(ta.labels, tb.labels)
            assert [s.indices.tolist() for s in ta.steps] == \
                [s.indices.tolist() for s in tb.steps]
        _close(rs.aggregate(r).update, cs.aggregate(r).update, f"aggregate r{r}")
        pa, pb = rp.record(r), cp.record(r)
        assert dict(pa.knowledge) == dict(pb.knowledge)
        assert (pa.num_examples, pa.num_clients_aggregated) == \
            (pb.num_examples, pb.num_clients_aggregated)
        _close(pa.update, pb.update, f"peer view r{r}")
    _close(real.final_model(), case.final_model(), "final model")
    # the index rows: the same keys and values (tap metadata, published totals)
    for store in (ObservationStore(real.path), PeerStore(real.path, 0)):
        other = type(store)(case.path) if isinstance(store, ObservationStore) \
            else PeerStore(case.path, 0)
        assert _rows(store.root) == _rows(other.root)
