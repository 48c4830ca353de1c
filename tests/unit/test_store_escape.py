"""Stores cannot be escaped: traversal, planted links and forged index rows are refused.

Views are the threat model: a curious peer controls its own directory ``peer/c{k}`` (it wrote
the files and the index), so every path a store reads must stay inside that store and every
index row must name the one file the store itself would have written for that row.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import torch

from fl_sim.errors import RunDirError
from fl_sim.records import ModelSpec, TruthStep
from fl_sim.stores import (
    INDEX,
    ObservationStore,
    PeerStore,
    TruthStore,
    append_jsonl,
    read_jsonl,
    resolve_inside,
)
from fl_sim.views import PeerView, ServerView

SPEC = ModelSpec(model="mlp", model_params={"hidden": (4,)}, task="classifier",
                 task_params={}, in_channels=1, num_classes=3, image_size=2, mean=(0.5,),
                 std=(0.5,))
META = {"update_kind": "delta", "num_examples": 2, "local_steps": 1, "lr": 0.1,
        "batch_size": 2, "defenses": []}


def _w(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 2), float(v))}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Round 1 of a 3-client FedAvg run recorded by hand; clients 0 and 1 are peers."""
    obs, truth = ObservationStore(tmp_path), TruthStore(tmp_path)
    obs.write_global(1, _w(0))
    for c in range(3):
        obs.write_update("server_in", 1, c, _w(c + 1), META)
        truth.write(1, c, [TruthStep(0, torch.full((2, 1, 2, 2), c / 4), torch.tensor([c, 2]),
                                     torch.tensor([2 * c, 2 * c + 1]))])
    for peer in (0, 1):
        store = PeerStore(tmp_path, peer)
        store.write_global(1, _w(0), {})
        store.write_update(1, _w(peer + 1), META)
        store.write_global(2, _w(2), {"aggregated_round": 1, "aggregated_num_examples": 6,
                                      "aggregated_num_clients": 3})
    return tmp_path


def _peer_view(run: Path, client: int = 0) -> PeerView:
    return PeerView("run", SPEC, PeerStore(run, client), strategy="fedavg", server_lr=None)


def _server_view(run: Path) -> ServerView:
    return ServerView("run", SPEC, ObservationStore(run), TruthStore(run))


def _forge(index: Path, **changes: object) -> None:
    """Append a copy of the index's first ``update``/``server_in`` row with ``changes``."""
    rows = read_jsonl(index)
    base = next(r for r in rows if r.get("kind") == "update" or r.get("tap") == "server_in")
    append_jsonl(index, {**base, **changes})


def test_untouched_stores_read_as_before(run: Path) -> None:
    rec = _peer_view(run).record(1)
    # others' mean: (6 * 2 - 2 * 1) / 4 = 2.5
    assert torch.allclose(rec.update["w"], torch.full((2, 2), 2.5))
    assert _server_view(run).record(1, 2).update["w"][0, 0] == 3.0


@pytest.mark.parametrize("file", [
    "../../truth/r0001/c0001.safetensors",          # another client's private images
    "../c1/updates/r0001.safetensors",              # another peer's own update
    "updates/../../c1/updates/r0001.safetensors",
    "/etc/passwd",
    "updates/r0002.safetensors",                    # a file of another round
    "updates\\r0001.safetensors",
])
def test_peer_index_row_naming_another_file_is_refused(run: Path, file: str) -> None:
    _forge(run / "peer" / "c0" / INDEX, file=file)
    with pytest.raises(RunDirError, match="refusing"):
        _peer_view(run).record(1)


def test_peer_row_claiming_another_client_is_refused(run: Path) -> None:
    _forge(run / "peer" / "c0" / INDEX, client=1)
    with pytest.raises(RunDirError, match="client 0's records only"):
        _peer_view(run).record(1)


@pytest.mark.parametrize("changes", [{"round": "1"}, {"round": True}, {"round": -1},
                                     {"round": 1.0}, {"kind": "truth"},
                                     {"num_examples": "many"}, {"lr": None},
                                     {"update_kind": "weights"}])
def test_peer_rows_of_wrong_types_are_refused(run: Path, changes: dict[str, object]) -> None:
    _forge(run / "peer" / "c0" / INDEX, **changes)
    with pytest.raises(RunDirError, match="index row"):
        _peer_view(run).record(1)


def test_a_non_object_index_line_is_refused(run: Path) -> None:
    with (run / "peer" / "c0" / INDEX).open("a") as fh:
        fh.write("[1, 2]\n")
    with pytest.raises(RunDirError, match="invalid index row"):
        _peer_view(run).record(1)


def test_link_planted_in_the_peer_directory_is_refused(run: Path) -> None:
    own = run / "peer" / "c0" / "updates" / "r0001.safetensors"
    own.unlink()
    os.symlink(run / "truth" / "r0001" / "c0001.safetensors", own)
    with pytest.raises(RunDirError, match="leads outside the store"):
        _peer_view(run).record(1)


@pytest.mark.parametrize("victim", ["observations/server_in/r0001/c0001.safetensors",
                                    "truth/r0001/c0001.safetensors"])
def test_hard_link_planted_in_the_peer_directory_is_refused(run: Path, victim: str) -> None:
    # a hard link resolves inside the store (no symbolic link to follow) yet its bytes are
    # another client's record: served as the peer's own update before the link-count check
    own = run / "peer" / "c0" / "updates" / "r0001.safetensors"
    own.unlink()
    os.link(run / victim, own)
    with pytest.raises(RunDirError, match="2 hard links"):
        _peer_view(run).record(1)
    with pytest.raises(RunDirError, match="hard links"):  # the victim's record is refused too
        if victim.startswith("truth"):
            TruthStore(run).read("run", 1, 1)
        else:
            _server_view(run).record(1, 1)


def test_peer_directory_that_is_a_link_is_refused(run: Path) -> None:
    # client 1's directory presented as client 0's: every file name is canonical, but the
    # store directory itself points elsewhere
    (run / "peer" / "c0").rename(run / "peer" / "c0-real")
    os.symlink(run / "peer" / "c1", run / "peer" / "c0")
    with pytest.raises(RunDirError, match="symbolic link"):
        _peer_view(run).record(1)


@pytest.mark.parametrize("changes", [
    {"global": "../truth/r0001/c0001.safetensors"},
    {"file": "../truth/r0001/c0002.safetensors"},
    {"file": "server_in/r0001/c0002.safetensors"},  # client 0's row serving client 2's file
    {"client": -1}, {"client": "0"}, {"tap": "../truth"},
])
def test_observation_rows_are_validated(run: Path, changes: dict[str, object]) -> None:
    _forge(run / "observations" / INDEX, **changes)
    with pytest.raises(RunDirError):
        _server_view(run).record(1, 0)


def test_truth_file_replaced_by_a_link_is_refused(run: Path, tmp_path_factory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "x.safetensors"
    target = run / "truth" / "r0001" / "c0000.safetensors"
    target.rename(elsewhere)
    os.symlink(elsewhere, target)
    with pytest.raises(RunDirError, match="leads outside the store"):
        TruthStore(run).read("run", 1, 0)


@pytest.mark.parametrize("rel", ["", "..", "../x", "a/../../x", "/abs", None, 3])
def test_resolve_inside_refuses_anything_but_a_plain_relative_path(tmp_path: Path,
                                                                    rel: object) -> None:
    with pytest.raises(RunDirError):
        resolve_inside(tmp_path / "store", rel)
    assert resolve_inside(tmp_path / "store", "a/b.safetensors") == \
        tmp_path / "store" / "a" / "b.safetensors"


def test_jsonl_is_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"round": 1, "train_loss": float("nan"),
                        "m": {"psnr": float("inf"), "xs": [1.0, float("-inf")]}})

    def no_constants(token: str) -> object:
        raise AssertionError(f"non-standard JSON token {token}")

    row = json.loads(path.read_text(), parse_constant=no_constants)
    assert row == {"round": 1, "train_loss": None, "m": {"psnr": None, "xs": [1.0, None]}}
    assert read_jsonl(path) == [row]


def test_truth_keys_ignore_files_the_store_did_not_name(run: Path) -> None:
    for stray in ("c-001.safetensors", "cabc.safetensors", "c.safetensors"):
        (run / "truth" / "r0001" / stray).write_bytes(b"x")
    assert TruthStore(run).keys() == [(1, 0), (1, 1), (1, 2)]


def test_report_embeds_only_images_inside_the_run_dir(run: Path, tmp_path_factory) -> None:
    from fl_sim import config
    from fl_sim.report import write_report
    secret = tmp_path_factory.mktemp("outside") / "secret.png"
    secret.write_bytes(b"PRIVATE-BYTES")
    config.save_resolved(config.from_dict({}), run)
    rel = os.path.relpath(secret, run)
    append_jsonl(run / "attacks.jsonl", {"key": "k", "attack": "x", "view": "server",
                                          "round": 1, "client": 0, "metrics": {},
                                          "grid": rel, "extras": {"e": {"png": str(secret)}}})
    html = write_report(run).read_text()
    assert html.count("refused image path") == 2
    assert base64.b64encode(b"PRIVATE-BYTES").decode() not in html


def test_report_ignores_result_rows_of_the_wrong_shape(run: Path) -> None:
    from fl_sim import config
    from fl_sim.report import write_report
    from fl_sim.run_dir.files import load_results
    config.save_resolved(config.from_dict({}), run)
    (run / "attacks.jsonl").write_text("[1, 2]\n")
    for bad in ({"key": "a", "metrics": "high"}, {"key": "b", "defenses": "dp"},
                {"key": "c", "extras": [1]}):
        append_jsonl(run / "attacks.jsonl", bad)
    append_jsonl(run / "attacks.jsonl", {"key": "ok", "attack": "noop", "metrics": {}})
    assert [r["key"] for r in load_results(run)] == ["ok"]
    assert "noop" in write_report(run).read_text()
