"""Run lifecycle without Ray: resume plans, partial files, failure replies, interrupts, the
watchdog that outlives a SIGKILLed driver (with Ray: tests/integration/test_interrupts_resume.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fl_sim.config import from_dict
from fl_sim.errors import RunDirError, RunFailedError
from fl_sim.federation import lifecycle
from fl_sim.federation.failures import (
    check_something_aggregated,
    failure_reply,
    failures_as_replies,
    log_failures,
    summary,
)
from fl_sim.federation.processes import _alive, _stat
from fl_sim.federation.resume import plan_resume, remove_partial_files, write_json_atomic

ROOT = Path(__file__).resolve().parents[2]


def _cfg(rounds: int):  # noqa: ANN202
    return from_dict({"federation": {"num_rounds": rounds}})


def _run_dir(tmp_path: Path, *, saved: int, done: int | None, status: str) -> Path:
    d = tmp_path / "run"
    write_json_atomic(d / "config.json", _cfg(saved).to_json_dict())
    write_json_atomic(d / "run.json", {"status": status})
    if done is not None:
        write_json_atomic(d / "checkpoint" / "state.json", {"round": done})
    return d


# -- resume plans (issue 13.1) ----------------------------------------------------------------
def test_a_round_count_below_what_is_done_is_refused_in_one_line(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, saved=6, done=6, status="complete")
    with pytest.raises(RunDirError) as err:
        plan_resume(_cfg(2), d)
    msg = str(err.value)
    assert "\n" not in msg and "num_rounds = 2" in msg and "6 rounds already done" in msg
    # an interrupted run: what counts is what is DONE (checkpointed), not what was planned
    d2 = _run_dir(tmp_path / "b", saved=6, done=3, status="running")
    with pytest.raises(RunDirError):
        plan_resume(_cfg(2), d2)
    assert plan_resume(_cfg(4), d2).num_rounds == 4  # ends earlier; nothing done is lost


def test_plans_no_op_extend_continue(tmp_path: Path) -> None:
    done = _run_dir(tmp_path, saved=6, done=6, status="complete")
    assert plan_resume(_cfg(6), done).nothing_to_do
    extend = plan_resume(_cfg(8), done)
    assert not extend.nothing_to_do and (extend.done, extend.num_rounds) == (6, 8)
    cut = _run_dir(tmp_path / "b", saved=6, done=6, status="running")  # killed while finishing
    assert not plan_resume(_cfg(6), cut).nothing_to_do
    fresh = _run_dir(tmp_path / "c", saved=6, done=None, status="running")
    assert plan_resume(_cfg(6), fresh).done == 0


def test_resume_of_a_non_run_or_corrupt_checkpoint_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="no config.json"):
        plan_resume(_cfg(3), tmp_path)
    d = _run_dir(tmp_path, saved=3, done=None, status="running")
    (d / "checkpoint").mkdir()
    (d / "checkpoint" / "state.json").write_text("{not json")
    with pytest.raises(RunDirError, match="corrupt checkpoint"):
        plan_resume(_cfg(3), d)


def test_partial_files_are_removed_everywhere_and_only_them(tmp_path: Path) -> None:
    keep = [tmp_path / "metrics.jsonl", tmp_path / "truth" / "r0001" / "c0000.safetensors"]
    gone = [tmp_path / ".tmp-metrics.jsonl", tmp_path / "checkpoint" / ".tmp-state.json",
            tmp_path / "truth" / "r0001" / ".tmp-abc.safetensors",
            tmp_path / "peer" / "c0" / "globals" / ".tmp-x.safetensors"]
    for p in keep + gone:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert sorted(remove_partial_files(tmp_path)) == sorted(gone)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)


def test_json_is_written_atomically(tmp_path: Path) -> None:
    p = tmp_path / "run.json"
    write_json_atomic(p, {"status": "running"})
    write_json_atomic(p, {"status": "complete"})
    assert json.loads(p.read_text()) == {"status": "complete"}
    assert [x.name for x in tmp_path.iterdir()] == ["run.json"]


# -- failures (issue 13.7) --------------------------------------------------------------------
@pytest.fixture
def task_identity():  # noqa: ANN201
    """Flower's Message() needs the process' task identity (set by its runtimes)."""
    from flwr.supercore.task_identity import TaskIdentity
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_a_raising_client_function_becomes_an_error_reply(task_identity: None) -> None:
    from flwr.app import ConfigRecord, Message, RecordDict

    @failures_as_replies
    def train(msg: Message, context: object) -> Message:
        raise ZeroDivisionError("boom\nsecond line")

    msg = Message(RecordDict({"c": ConfigRecord({"a": 1})}), dst_node_id=1,
                  message_type="train")
    reply = train(msg, None)
    assert reply.has_error() and reply.error.code == 2
    reason = str(reply.error.reason)
    assert reason.splitlines()[0] == "ZeroDivisionError: boom second line"
    assert "Traceback (most recent call last)" in reason  # kept for --debug
    assert summary(reason) == "ZeroDivisionError: boom second line"
    assert failure_reply(msg, ValueError("x")).has_error()


def test_one_warning_line_per_failed_client_tracebacks_only_at_debug(
        caplog: pytest.LogCaptureFixture) -> None:
    reasons = {3: "InjectedClientFailure: injected\nTraceback ...\n  line\n",
               1: "ValueError: bad\nTraceback ..."}
    with caplog.at_level(logging.WARNING, logger="fl_sim"):
        out = log_failures(2, reasons)
    assert out == {"1": "ValueError: bad", "3": "InjectedClientFailure: injected"}
    assert [r.getMessage() for r in caplog.records] == [
        "round 2: client 1 failed: ValueError: bad",
        "round 2: client 3 failed: InjectedClientFailure: injected"]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="fl_sim"):
        log_failures(2, reasons)
    assert any("Traceback" in r.getMessage() for r in caplog.records)


def test_a_run_that_aggregated_nothing_is_a_one_line_failure(tmp_path: Path) -> None:
    rows = [{"round": 1, "aggregated": False, "client_errors": {"0": "ValueError: no data"}},
            {"round": 2, "aggregated": False, "client_errors": {}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RunFailedError) as err:
        check_something_aggregated(tmp_path, 2)
    assert "\n" not in str(err.value) and "round 1, client 0: ValueError: no data" in \
        str(err.value)
    rows[1]["aggregated"] = True
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    check_something_aggregated(tmp_path, 2)  # one aggregated round is enough


def test_cli_exit_status_1_for_a_failed_run_2_for_bad_input(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from fl_sim import cli

    def failed(args: object) -> int:
        raise RunFailedError("no client update was aggregated in any of the 2 round(s)")

    monkeypatch.setitem(cli.COMMANDS, "list", failed)
    assert cli.main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no client update was aggregated" in err


# -- interrupts and the watchdog (issue 13.2) ---------------------------------------------------
def test_interrupt_raises_once_with_128_plus_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    saved = {s: signal.getsignal(s) for s in lifecycle.SIGNALS}
    try:
        lifecycle.exit_on_interrupt(hard_exit_s=None)
        with pytest.raises(lifecycle.RunInterrupted) as err:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert err.value.exit_code == 143 and "SIGTERM" in str(err.value)
        # Flower's "actor died" tracebacks while Ray stops are the interrupt, not a fault
        assert logging.getLogger("flwr").disabled and logging.getLogger("ray").disabled
        os.kill(os.getpid(), signal.SIGINT)  # a second signal during clean-up: ignored
        time.sleep(0.1)
        assert lifecycle.RunInterrupted(signal.SIGINT).exit_code == 130
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        lifecycle._state.update(installed=False, interrupted=None, hard_exit_s=None)
        for name in ("flwr", "ray"):
            logging.getLogger(name).disabled = False


_DRIVER = """
import subprocess, sys, time
sys.stdin.readline()  # started once the watchdog watches
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


def test_watchdog_kills_what_a_sigkilled_driver_started(tmp_path: Path) -> None:
    """The driver's child is re-parented when the driver dies (as Ray's agents are); the
    watchdog remembered it and kills it. A process that existed before the watch is spared."""
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER], stdout=subprocess.PIPE,
                              stdin=subprocess.PIPE, text=True)
    watchdog, child, child_start = None, 0, None
    try:
        start = _stat(driver.pid)[1]  # type: ignore[index]
        watchdog = subprocess.Popen([sys.executable, "-m", "fl_sim.federation.watchdog",
                                     str(driver.pid), str(start)], cwd=ROOT,
                                    start_new_session=True)
        time.sleep(2.0)  # the watchdog is up
        driver.stdin.write("go\n")  # type: ignore[union-attr]
        driver.stdin.flush()  # type: ignore[union-attr]
        child = int(driver.stdout.readline())  # type: ignore[union-attr]
        child_start = _stat(child)[1]  # type: ignore[index]
        time.sleep(1.0)
        driver.kill()
        driver.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child, child_start) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child, child_start), "the driver's child outlived it"
        assert watchdog.wait(10) == 0
    finally:
        driver.kill()
        if watchdog is not None and watchdog.poll() is None:
            watchdog.kill()
        if child_start is not None and _alive(child, child_start):
            os.kill(child, signal.SIGKILL)  # the grandchild, if the test failed


def test_peer_global_of_the_last_finished_round_is_kept_not_rewritten(tmp_path: Path) -> None:
    """Resume after round 2: the peer's global of round 3 (what round 2 produced) survives
    the truncation, and the re-run round 3 does not rewrite it or add an index line."""
    import torch

    from fl_sim.stores import PeerStore, read_jsonl, truncate_run
    peer = PeerStore(tmp_path, 0)
    meta = {"aggregated_round": 2, "aggregated_num_examples": 8, "aggregated_num_clients": 2}
    for r in (1, 2, 3):
        peer.write_global(r, {"w": torch.full((2,), float(r))}, meta)
    peer.write_update(3, {"w": torch.ones(2)}, {})
    truncate_run(tmp_path, 2)
    f = peer.root / "globals" / "r0003.safetensors"
    mtime = f.stat().st_mtime_ns
    peer.write_global(3, {"w": torch.full((2,), 3.0)}, meta)  # the re-run round 3
    assert f.stat().st_mtime_ns == mtime
    rows = read_jsonl(peer.root / "index.jsonl")
    assert [(x["kind"], x["round"]) for x in rows] == [("global", 1), ("global", 2),
                                                       ("global", 3)]


class _SilentGrid:
    """A grid whose clients never answer (after Ray is gone), or answer at once."""

    pull_interval = 0.05

    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies

    def push_messages(self, messages: Any) -> list[str]:
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, ids: Any) -> list[Any]:
        out, self.replies = self.replies, []
        return out

    def get_node_ids(self) -> list[int]:
        return [7]


def test_a_stopped_run_ends_the_servers_wait_at_once() -> None:
    import threading
    import types

    stop = threading.Event()
    grid = lifecycle.StoppableGrid(_SilentGrid([]), stop)
    assert grid.get_node_ids() == [7]  # everything else delegates
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(lifecycle.RunStopped):
        grid.send_and_receive(["m0", "m1"], timeout=3600)
    assert time.monotonic() - t0 < 2
    reply = types.SimpleNamespace(metadata=types.SimpleNamespace(reply_to_message_id="0"))
    ok = lifecycle.StoppableGrid(_SilentGrid([reply]), threading.Event())
    assert ok.send_and_receive(["m0"], timeout=5) == [reply]
    assert lifecycle.StoppableGrid(_SilentGrid([]), threading.Event()).send_and_receive(
        ["m0"], timeout=0.2) == []  # the timeout still applies
