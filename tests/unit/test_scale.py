"""What the 1,000-client benchmark (benchmarks/scale.py) showed, fixed and pinned down.

* view lookups re-read the whole JSONL index each time (now parsed once per index version);
* clients outnumbering the test images got an empty evaluation share and failed (train too,
  which builds the same client data);
* Flower's dispatch thread asked every node for a message every 0.1 s (now only the nodes
  with a pending message).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from queue import Queue
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fl_sim import index_cache, stores
from fl_sim.data.partition import evaluation_share
from fl_sim.records import ModelSpec
from fl_sim.stores import ObservationStore, TruthStore, truncate_run
from fl_sim.views import ServerView


def _spec() -> ModelSpec:
    return ModelSpec(model="mlp", model_params={}, task="classifier", task_params={},
                     in_channels=1, num_classes=2, image_size=2, mean=(0.5,), std=(0.5,))


def _store(tmp_path: Path, rounds: int, clients: int) -> ObservationStore:
    obs = ObservationStore(tmp_path)
    for r in range(1, rounds + 1):
        obs.write_global(r, {"w": torch.zeros(2)})
        for c in range(clients):
            obs.write_update("server_in", r, c, {"w": torch.full((2,), float(c))}, {
                "update_kind": "delta", "num_examples": 1, "local_steps": 1, "lr": 0.1,
                "batch_size": 1, "defenses": []})
    return obs


def test_view_lookups_parse_the_index_once_per_version(tmp_path, monkeypatch) -> None:
    index_cache.clear()
    obs = _store(tmp_path, rounds=2, clients=30)
    reads: list[Path] = []
    real = stores.read_jsonl
    monkeypatch.setattr(stores, "read_jsonl", lambda p: reads.append(p) or real(p))
    view = ServerView("run", _spec(), obs, TruthStore(tmp_path))
    got = [view.record(2, c).update["w"][0].item() for c in range(30)]
    assert got == [float(c) for c in range(30)]
    assert view.clients(1) == list(range(30)) and view.rounds() == [1, 2]
    assert len(reads) == 1                      # 32 lookups, one parse
    obs.write_update("server_in", 3, 7, {"w": torch.ones(2)}, {
        "update_kind": "delta", "num_examples": 1, "local_steps": 1, "lr": 0.1,
        "batch_size": 1, "defenses": []})
    assert view.clients(3) == [7] and len(reads) == 2   # an append is seen at once
    truncate_run(tmp_path, 1)                            # a resume rewrites the index
    reads.clear()
    assert view.rounds() == [1] and len(reads) == 1


def test_every_client_gets_evaluation_data_when_clients_outnumber_test_images() -> None:
    shares = [evaluation_share(60, 1000, c, cap=512) for c in range(1000)]
    assert all(len(s) == 1 for s in shares)
    assert {int(s[0]) for s in shares} == set(range(60))      # spread over the whole split
    few = [evaluation_share(100, 3, c, cap=512) for c in range(3)]
    assert sorted(np.concatenate(few).tolist()) == list(range(100))  # disjoint, complete
    assert len(evaluation_share(10_000, 2, 0, cap=512)) == 512
    assert len(evaluation_share(0, 5, 3, cap=512)) == 0


class _FakeState:
    """Flower's in-memory LinkState as far as the dispatch loop uses it."""

    def __init__(self, dsts: list[int]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {
            f"m{i}": SimpleNamespace(metadata=SimpleNamespace(dst_node_id=d, delivered_at=""))
            for i, d in enumerate(dsts)}
        self.asked: list[int] = []

    def get_message_ins(self, *, node_id: int, limit: int) -> list[SimpleNamespace]:
        self.asked.append(node_id)
        out = [m for m in self.message_ins_store.values()
               if m.metadata.dst_node_id == node_id and m.metadata.delivered_at == ""][:limit]
        for m in out:
            m.metadata.delivered_at = "now"
        return out


def test_dispatch_asks_only_nodes_with_pending_messages() -> None:
    from fl_sim.federation.flower_compat import add_messages_to_queue
    nodes = {n: i for i, n in enumerate(range(100, 1100))}   # 1,000 nodes
    state = _FakeState([905, 101, 333])
    queue: Queue = Queue()
    stop = threading.Event()
    th = threading.Thread(target=add_messages_to_queue,
                          args=(state, queue, nodes, stop))
    th.start()
    deadline = time.monotonic() + 5
    while queue.qsize() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    th.join(timeout=5)
    got = [queue.get().metadata.dst_node_id for _ in range(queue.qsize())]
    assert got == [101, 333, 905]                  # Flower's node order
    assert state.asked == [101, 333, 905]          # not 1,000 calls per sweep


def test_the_dispatch_patch_replaces_flowers_loop() -> None:
    from fl_sim.federation import flower_compat
    assert flower_compat.install_dispatch_patch() and flower_compat.install_dispatch_patch()
    from flwr.server.superlink.fleet.vce import vce_api
    assert vce_api.add_messages_to_queue is flower_compat.add_messages_to_queue


class _CheckedState(_FakeState):
    """The in-memory LinkState's expiry check as well: ``expired`` messages are dropped."""

    def __init__(self, dsts: list[int], expired: set[str]) -> None:
        super().__init__(dsts)
        self.expired, self.checked = expired, 0

    def _check_stored_messages(self, ids: set[str]) -> None:
        self.checked += len(ids)
        for i in ids & self.expired:
            del self.message_ins_store[i]

    def get_message_ins(self, *, node_id: int, limit: int) -> list[SimpleNamespace]:
        raise AssertionError("the linear dispatch must not scan the store per node")


def test_dispatch_is_one_pass_at_10000_nodes() -> None:
    """Node discovery of 10,000 nodes: every message is handed out once, in Flower's node
    order, one per node per sweep, expired ones dropped by Flower's own check, without one
    store scan per node (that made a 10,000-node start quadratic)."""
    from fl_sim.federation.flower_compat import add_messages_to_queue
    nodes = {n: i for i, n in enumerate(range(50_000, 40_000, -1))}   # 10,000, descending
    dsts = list(range(40_001, 50_001)) + [45_000]                     # node 45,000 twice
    state = _CheckedState(dsts, expired={"m7"})                        # m7: node 40,008
    queue: Queue = Queue()
    stop = threading.Event()
    th = threading.Thread(target=add_messages_to_queue, args=(state, queue, nodes, stop))
    th.start()
    deadline = time.monotonic() + 10
    while queue.qsize() < 10_000 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    th.join(timeout=5)
    got = [queue.get().metadata.dst_node_id for _ in range(queue.qsize())]
    assert len(got) == 10_000 and 40_008 not in got and got.count(45_000) == 2
    first_sweep = got[:9_999]
    assert first_sweep == sorted(first_sweep, reverse=True)           # the node order
    assert got[9_999] == 45_000                                       # its 2nd, next sweep
    assert state.checked == 10_000 + 1                                # each message once


def test_reply_polling_backs_off_only_with_thousands_pending() -> None:
    """A round's 100 replies are polled every 0.1 s as before; node discovery's 10,000
    pending ids every 1 s (each pull re-checks every pending id while holding the GIL)."""
    from fl_sim.federation.lifecycle import poll_wait
    assert poll_wait(0.1, 100) == poll_wait(0.1, 1_000) == 0.1
    assert poll_wait(0.1, 10_000) == pytest.approx(1.0) and poll_wait(0.1, 10**6) == 1.0
