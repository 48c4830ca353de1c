"""Streaming stores, peer-view maths and the run-directory views (no flwr, no Ray)."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from fl_sim.errors import RunDirError, ThreatModelError
from fl_sim.records import ModelSpec, TruthStep
from fl_sim.stores import (
    ObservationStore,
    PeerStore,
    TruthStore,
    append_jsonl,
    read_jsonl,
    read_tensors,
    truncate_run,
    write_tensors,
)
from fl_sim.views import PeerView, ServerView, others_mean_delta, others_mean_gradient

SPEC = ModelSpec(model="mlp", model_params={"hidden": (4,)}, task="classifier",
                 task_params={}, in_channels=1, num_classes=3, image_size=2, mean=(0.5,),
                 std=(0.5,))


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g),
            "n": torch.tensor(seed, dtype=torch.int64)}


def test_tensors_round_trip_bitwise_with_metadata(tmp_path: Path) -> None:
    t = _state(1)
    write_tensors(tmp_path / "a" / "x.safetensors", t, {"round": 3, "lst": [1, 2]})
    back, meta = read_tensors(tmp_path / "a" / "x.safetensors")
    assert meta == {"round": 3, "lst": [1, 2]}
    assert all(torch.equal(back[k], t[k]) and back[k].dtype == t[k].dtype for k in t)
    assert not list((tmp_path / "a").glob(".tmp-*"))
    with pytest.raises(RunDirError):
        read_tensors(tmp_path / "missing.safetensors")


def _append_many(path: str, worker: int) -> None:
    for i in range(200):
        append_jsonl(Path(path), {"worker": worker, "i": i, "pad": "x" * 300})


def test_concurrent_appends_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    lines = path.read_text().splitlines()
    assert len(lines) == 800 and len(read_jsonl(path)) == 800  # every line parses


def test_truth_store_uint8_when_lossless_else_float(tmp_path: Path) -> None:
    store = TruthStore(tmp_path)
    u8 = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    exact = u8.float() / 255.0
    steps = [TruthStep(0, exact, torch.tensor([1, 2]), torch.tensor([10, 11]),
                       {"eps": torch.randn(2, 1, 4, 4), "t": torch.tensor([3, 4])}),
             TruthStep(1, exact.flip(0), torch.tensor([2, 1]), torch.tensor([11, 10]),
                       {"eps": torch.randn(2, 1, 4, 4), "t": torch.tensor([5, 6])})]
    store.write(1, 0, steps)
    raw, meta = read_tensors(store.path(1, 0))
    assert meta["images"] == "uint8" and raw["s0.images"].dtype == torch.uint8
    rec = store.read("run", 1, 0)
    assert torch.equal(rec.steps[0].images, exact) and torch.equal(rec.steps[1].aux["t"],
                                                                    torch.tensor([5, 6]))
    assert rec.labels.tolist() == [1, 2] and rec.images.shape == (2, 1, 4, 4)
    lossy = exact + 1e-3
    store.write(1, 1, [TruthStep(0, lossy, torch.tensor([0, 0]), torch.tensor([0, 1]))])
    assert torch.equal(store.read("run", 1, 1).steps[0].images, lossy)
    assert store.keys() == [(1, 0), (1, 1)]
    with pytest.raises(RunDirError):
        store.read("run", 2, 0)


def test_truncate_discards_later_rounds_and_duplicates(tmp_path: Path) -> None:
    obs = ObservationStore(tmp_path)
    for r in (1, 2, 3):
        obs.write_global(r, _state(r))
        obs.write_update("server_in", r, 0, _state(10 + r), {"num_examples": 1})
    obs.write_update("server_in", 2, 0, _state(99), {"num_examples": 2})  # a re-run round
    TruthStore(tmp_path).write(3, 0, [TruthStep(0, torch.zeros(1, 1, 2, 2),
                                                torch.tensor([0]), torch.tensor([0]))])
    peer = PeerStore(tmp_path, 0)
    for r in (1, 2, 3, 4):
        peer.write_global(r, _state(r), {})
        peer.write_update(r, _state(20 + r), {})
    truncate_run(tmp_path, 2)
    rows = obs.entries("server_in")
    assert [(e["round"], e["num_examples"]) for e in rows] == [(1, 1), (2, 2)]
    assert not (tmp_path / "observations" / "server_in" / "r0003").exists()
    assert TruthStore(tmp_path).keys() == []
    # the global of round 3 is the OUTPUT of finished round 2: kept (resume never deletes it)
    assert [e["round"] for e in peer.entries("global")] == [1, 2, 3]
    assert [e["round"] for e in peer.entries("update")] == [1, 2]
    assert sorted(p.name for p in (peer.root / "globals").iterdir()) == [
        "r0001.safetensors", "r0002.safetensors", "r0003.safetensors"]
    lines = (tmp_path / "observations" / "index.jsonl").read_text().splitlines()
    keys = [(d["tap"], d["round"], d["client"]) for d in map(json.loads, lines)]
    assert len(keys) == len(set(keys))


# -- peer maths -------------------------------------------------------------------------------
def test_others_mean_delta_undoes_the_weighted_mean() -> None:
    g = _state(0)
    deltas = [{k: v.float() for k, v in _state(s).items() if k != "n"} for s in (1, 2, 3)]
    n = [2.0, 5.0, 3.0]
    new = {k: g[k] + sum(ni * d[k] for ni, d in zip(n, deltas, strict=True)) / sum(n)
           for k in deltas[0]}
    got = others_mean_delta(g, new, deltas[0], total_examples=sum(n), own_examples=n[0])
    for k in got:
        ref = (n[1] * deltas[1][k] + n[2] * deltas[2][k]) / (n[1] + n[2])
        torch.testing.assert_close(got[k], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        others_mean_delta(g, new, deltas[0], total_examples=2.0, own_examples=2.0)


def test_others_mean_gradient_undoes_the_fedsgd_step() -> None:
    g = {k: v for k, v in _state(0).items() if k != "n"}
    grads = [{k: v for k, v in _state(s).items() if k != "n"} for s in (4, 5)]
    n, lr = [1.0, 3.0], 0.05
    new = {k: g[k] - lr * (n[0] * grads[0][k] + n[1] * grads[1][k]) / 4.0 for k in g}
    got = others_mean_gradient(g, new, grads[0], server_lr=lr, total_examples=4.0,
                               own_examples=1.0)
    for k in g:
        torch.testing.assert_close(got[k], grads[1][k], atol=1e-4, rtol=1e-4)


# -- views ------------------------------------------------------------------------------------
def _fake_run(tmp_path: Path) -> None:
    """Round 1 of a 3-client FedAvg run, recorded by hand; client 0 is a peer."""
    obs, truth, peer = ObservationStore(tmp_path), TruthStore(tmp_path), PeerStore(tmp_path, 0)
    g = {k: v.float() for k, v in _state(0).items()}
    deltas = {c: {k: v.float() for k, v in _state(c + 1).items()} for c in range(3)}
    n = {0: 4, 1: 2, 2: 6}
    obs.write_global(1, g)
    new = {k: g[k] + sum(n[c] * deltas[c][k] for c in range(3)) / 12 for k in g}
    for c in range(3):
        obs.write_update("server_in", 1, c, deltas[c], {
            "update_kind": "delta", "num_examples": n[c], "local_steps": 1, "lr": 0.1,
            "batch_size": 2, "defenses": []})
        truth.write(1, c, [TruthStep(0, torch.rand(2, 1, 2, 2), torch.tensor([c, 2]),
                                     torch.tensor([2 * c, 2 * c + 1]))])
    peer.write_global(1, g, {})
    peer.write_update(1, deltas[0], {"update_kind": "delta", "num_examples": 4,
                                     "local_steps": 1, "lr": 0.1, "batch_size": 2})
    peer.write_global(2, new, {"aggregated_round": 1, "aggregated_num_examples": 12,
                               "aggregated_num_clients": 3})


def test_server_view_grants_labels_and_records_the_grant(tmp_path: Path) -> None:
    _fake_run(tmp_path)
    view = ServerView("run", SPEC, ObservationStore(tmp_path), TruthStore(tmp_path),
                      grant=("labels",))
    rec = view.record(1, 1)
    assert rec.tap == "server_in" and rec.role == "server" and rec.num_examples == 2
    assert rec.knowledge["granted"] == ("labels",)
    assert rec.knowledge["labels"].tolist() == [1, 2]
    with pytest.raises(TypeError):
        rec.update["w"] = torch.zeros(1)  # type: ignore[index]
    plain = ServerView("run", SPEC, ObservationStore(tmp_path), TruthStore(tmp_path))
    assert "labels" not in plain.record(1, 1).knowledge
    with pytest.raises(ThreatModelError, match="eps"):
        ServerView("run", SPEC, ObservationStore(tmp_path), TruthStore(tmp_path),
                   grant=("eps",)).record(1, 1)


def test_peer_view_is_isolated_and_derives_the_others_mean(tmp_path: Path) -> None:
    _fake_run(tmp_path)
    view = PeerView("run", SPEC, PeerStore(tmp_path, 0), strategy="fedavg", server_lr=None)
    rec = view.record(1)
    assert rec.tap == "peer_view" and rec.role == "peer" and rec.client_id == 0
    assert rec.num_clients_aggregated == 2 and rec.num_examples == 8
    server = ServerView("run", SPEC, ObservationStore(tmp_path), TruthStore(tmp_path))
    d1, d2 = server.record(1, 1).update, server.record(1, 2).update
    for k in rec.update:
        torch.testing.assert_close(rec.update[k], (2 * d1[k] + 6 * d2[k]) / 8, atol=1e-5,
                                   rtol=1e-5)
    # isolation: no store but its own; no other client's update; refusals
    held = [v for v in vars(view).values()]
    assert not any(isinstance(v, ObservationStore | TruthStore) for v in held)
    assert view._store.root == tmp_path / "peer" / "c0"
    for other in (1, 2):
        assert not all(torch.equal(rec.update[k], server.record(1, other).update[k])
                       for k in rec.update)
    with pytest.raises(ThreatModelError):
        view.record(1, client=1)
    with pytest.raises(ThreatModelError):
        list(view.records(client=2))
    with pytest.raises(ThreatModelError):
        PeerView("run", SPEC, PeerStore(tmp_path, 0), strategy="fedavg", server_lr=None,
                 grant=("labels",))


def test_peer_view_alone_in_the_aggregate_is_a_run_dir_error(tmp_path: Path) -> None:
    # round 2's global follows an aggregation of the peer's own update only: nothing of the
    # others to derive (formerly a bare ValueError from the maths, which failed the run)
    _fake_run(tmp_path)
    peer = PeerStore(tmp_path, 0)
    g = peer.load(peer.entries("global")[1]["file"])
    peer.write_global(2, g, {"aggregated_round": 1, "aggregated_num_examples": 4,
                             "aggregated_num_clients": 1})
    for strategy in ("fedavg", "fedadam"):
        view = PeerView("run", SPEC, peer, strategy=strategy, server_lr=None)
        with pytest.raises(RunDirError, match="no other client"):
            view.record(1)
