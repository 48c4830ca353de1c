"""Reliability bars of issues 12 and 13, run as a user runs fl-sim: the CLI in a subprocess.

* SIGINT (to the process group, as Ctrl-C sends it) and SIGTERM at a seeded random round:
  exit 130 / 143 within 10 s with the resume hint, no process of the run left alive;
* SIGKILL of the main process in a round, at 10 and 100 clients, FedAvg and FedSGD: no Ray
  helper outlives it for long;
* every chain of interruptions ends, after ``--resume``, with final weights and metrics
  bit-identical to an uninterrupted run (run concurrently as the reference);
* a finished run resumed with fewer rounds is refused in one line, with the same count is a
  no-op, and with more rounds is extended (issue 13's probe);
* 30 % injected client failures at 100 clients: the run completes and every round of
  metrics.jsonl names the failed clients (and why, in one line each).

Tiny MLP on 8×8 digits, one Ray actor (``num_cpus = 2``), a few rounds: each test is a few
Ray start-ups, the dominant cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fl_sim.config import ExperimentConfig, from_dict
from fl_sim.federation.client_app import should_fail
from fl_sim.federation.processes import PROC
from fl_sim.stores import read_jsonl, read_tensors

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EXIT_WITHIN_S = 10.0


def make_cfg(*, num_clients: int, num_rounds: int, strategy: str, seed: int = 0,
             **federation: Any) -> ExperimentConfig:
    fed = {"num_clients": num_clients, "num_rounds": num_rounds, "local_steps": 1,
           "batch_size": 2, "lr": 0.1, "client_resources": {"num_cpus": 2}, **federation}
    return from_dict({"run": {"name": "life", "seed": seed},
                      "data": {"name": "digits", "image_size": 8,
                               "max_train": 4 * num_clients, "max_test": 60},
                      "model": {"name": "mlp", "hidden": [8]},
                      "federation": fed, "strategy": {"name": strategy}})


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0", "FLWR_HOME": str(tmp_path / "flwr_home"),
            "PYTHONHASHSEED": "0"}


def start_cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``fl-sim run ARGS`` in its own session (its process group = its pid)."""
    return subprocess.Popen([sys.executable, "-m", "fl_sim.cli", "run", "--no-progress",
                             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fl_sim.cli", "run", "--no-progress", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def start_reference(env: dict[str, str], cfg: ExperimentConfig, tmp: Path
                    ) -> tuple[subprocess.Popen[str], Path]:
    """The uninterrupted run, started at once so that it runs beside the chain."""
    cfg_file, out = tmp / "ref.json", tmp / "ref"
    cfg_file.write_text(json.dumps(cfg.to_json_dict()))
    return start_cli(env, str(cfg_file), "--run-dir", str(out)), out


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def checkpointed(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def wait_for_round(proc: subprocess.Popen[str], run_dir: Path, r: int,
                   timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while checkpointed(run_dir) < r:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before round {r} was "
                                 f"checkpointed: {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"round {r} never checkpointed"
        time.sleep(0.02)


def run_processes(pid: int) -> list[str]:
    """Live (non-zombie) processes of the run started as ``pid``: its process group (the
    driver, Ray's gcs / raylet / agents / workers) and its watchdog (own session)."""
    out = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if state != "Z" and (int(pgrp) == pid or f"fl_sim.federation.watchdog {pid} " in cmd):
            out.append(f"{entry.name} {cmd[:80]}")
    return out


def assert_nothing_left(pid: int, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while (left := run_processes(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes of the run still alive {within_s} s after it ended: {left}"


def interrupt(proc: subprocess.Popen[str], sig: int, *, group: bool = False
              ) -> tuple[float, int, str]:
    """Send ``sig``; returns (seconds until the process ended, exit status, stderr)."""
    assert proc.poll() is None, "the run ended before it could be interrupted"
    t0 = time.monotonic()
    (os.killpg if group else os.kill)(proc.pid, sig)
    try:
        rc, _, err = finish(proc, timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{signal.Signals(sig).name}: still running after 60 s") from None
    return time.monotonic() - t0, rc, err


def signal_at_random_round(proc: subprocess.Popen[str], run_dir: Path, rng: random.Random,
                           first: int, last: int) -> None:
    """Wait until a seeded random round in first..last is checkpointed, plus up to 0.3 s
    (the signal lands anywhere in the next round)."""
    wait_for_round(proc, run_dir, rng.randint(first, last))
    time.sleep(rng.uniform(0.0, 0.3))


def snapshot(run_dir: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns,
                                          hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def assert_same_as_reference(run_dir: Path, ref: Path, num_rounds: int) -> None:
    got, want = read_tensors(run_dir / "final_model.safetensors")[0], \
        read_tensors(ref / "final_model.safetensors")[0]
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "final weights differ"
    strip = [{k: v for k, v in r.items() if not k.endswith("seconds")}  # wall-clock times
             for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert strip == [{k: v for k, v in r.items() if not k.endswith("seconds")}
                     for r in read_jsonl(ref / "metrics.jsonl")], "metrics differ"
    assert [r["round"] for r in strip] == list(range(1, num_rounds + 1))
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    assert json.loads((run_dir / "config.json").read_text())["federation"]["num_rounds"] \
        == num_rounds
    assert not list(run_dir.rglob(".tmp-*")), "partial files left behind"
    keys = [(e["tap"], e["round"], e["client"])
            for e in read_jsonl(run_dir / "observations" / "index.jsonl")]
    assert len(keys) == len(set(keys))
    rounds = run_cfg(run_dir).federation.record_rounds
    assert {k[1] for k in keys} == set(rounds or range(1, num_rounds + 1))


def run_cfg(run_dir: Path) -> ExperimentConfig:
    return from_dict(json.loads((run_dir / "config.json").read_text()))


def test_sigint_to_the_group_sigkill_and_round_count_changes_fedavg_10(
        env: dict[str, str], tmp_path: Path) -> None:
    """Finished 3-round run: fewer rounds refused, same count a no-op (nothing on disk
    changes), more rounds extend it; the extension gets Ctrl-C (SIGINT to the group), its
    resume a SIGKILL of the main process, the last resume ends as the uninterrupted run."""
    rng = random.Random(13)
    cfg = make_cfg(num_clients=10, num_rounds=8, strategy="fedavg", peer_clients=[0])
    ref_proc, ref = start_reference(env, cfg, tmp_path)
    run_dir = tmp_path / "run"
    first = cfg.model_copy(update={"federation": cfg.federation.model_copy(
        update={"num_rounds": 3})})
    (tmp_path / "cfg.json").write_text(json.dumps(first.to_json_dict()))
    done = run_cli(env, str(tmp_path / "cfg.json"), "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr

    before = snapshot(run_dir)
    shrink = run_cli(env, "--resume", str(run_dir), "--set", "federation.num_rounds=2")
    assert shrink.returncode == 2 and "Traceback" not in shrink.stderr
    assert shrink.stderr.count("\n") == 1 and "below the 3 rounds already done" in shrink.stderr
    same = run_cli(env, "--resume", str(run_dir))
    assert same.returncode == 0 and "nothing to do" in same.stdout, same.stderr
    assert snapshot(run_dir) == before, "a refused or no-op resume changed the run directory"

    proc = start_cli(env, "--resume", str(run_dir), "--set", "federation.num_rounds=8")
    signal_at_random_round(proc, run_dir, rng, 4, 5)
    seconds, rc, err = interrupt(proc, signal.SIGINT, group=True)
    assert rc == 130 and seconds <= EXIT_WITHIN_S, (rc, seconds, err[-2000:])
    assert f"fl-sim run --resume {run_dir}" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert_nothing_left(proc.pid)

    proc = start_cli(env, "--resume", str(run_dir))
    wait_for_round(proc, run_dir, checkpointed(run_dir) + 1)
    proc.kill()  # SIGKILL, main process only
    proc.wait(30)
    assert_nothing_left(proc.pid)
    assert checkpointed(run_dir) < 8

    last = run_cli(env, "--resume", str(run_dir))
    assert last.returncode == 0, last.stderr
    assert finish(ref_proc)[0] == 0
    assert_same_as_reference(run_dir, ref, 8)
    peer = [e["round"] for e in read_jsonl(run_dir / "peer" / "c0" / "index.jsonl")
            if e["kind"] == "global"]
    assert sorted(set(peer)) == list(range(1, 10))  # every received global, final included


def test_sigterm_then_sigkill_then_resume_is_bit_identical_fedsgd_10(
        env: dict[str, str], tmp_path: Path) -> None:
    rng = random.Random(12)
    cfg = make_cfg(num_clients=10, num_rounds=6, strategy="fedsgd")
    ref_proc, ref = start_reference(env, cfg, tmp_path)
    run_dir = tmp_path / "run"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_json_dict()))
    proc = start_cli(env, str(tmp_path / "cfg.json"), "--run-dir", str(run_dir))
    signal_at_random_round(proc, run_dir, rng, 1, 3)
    seconds, rc, err = interrupt(proc, signal.SIGTERM)
    assert rc == 143 and seconds <= EXIT_WITHIN_S, (rc, seconds, err[-2000:])
    assert "SIGTERM received" not in err and "Traceback" not in err  # no C++ stack dump
    assert f"fl-sim run --resume {run_dir}" in err.strip().splitlines()[-1]
    assert_nothing_left(proc.pid)

    proc = start_cli(env, "--resume", str(run_dir))
    wait_for_round(proc, run_dir, checkpointed(run_dir) + 1)
    proc.kill()
    proc.wait(30)
    assert_nothing_left(proc.pid)

    last = run_cli(env, "--resume", str(run_dir))
    assert last.returncode == 0, last.stderr
    assert finish(ref_proc)[0] == 0
    assert_same_as_reference(run_dir, ref, 6)


#: FedAvg also records only rounds 2-3 and the even clients (retention, issue 13.8)
RETENTION = {"record_rounds": [2, 3], "record_clients": list(range(0, 100, 2))}


@pytest.mark.parametrize(("strategy", "retention"), [("fedavg", RETENTION), ("fedsgd", {})])
def test_100_clients_30_percent_failures_sigkill_resume_bit_identical(
        strategy: str, retention: dict[str, Any], env: dict[str, str], tmp_path: Path) -> None:
    cfg = make_cfg(num_clients=100, num_rounds=4, strategy=strategy, fraction_train=0.2,
                   client_failure_rate=0.3, **retention)
    ref_proc, ref = start_reference(env, cfg, tmp_path)
    run_dir = tmp_path / "run"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_json_dict()))
    proc = start_cli(env, str(tmp_path / "cfg.json"), "--run-dir", str(run_dir))
    wait_for_round(proc, run_dir, 2)
    proc.kill()
    proc.wait(30)
    assert_nothing_left(proc.pid)
    assert checkpointed(run_dir) < 4

    last = run_cli(env, "--resume", str(run_dir))
    assert last.returncode == 0, last.stderr
    rc, ref_out, ref_err = finish(ref_proc)
    assert rc == 0, ref_err
    assert_same_as_reference(run_dir, ref, 4)

    if retention:  # only what was asked for is on disk; training did not change
        recorded = {(e["round"], e["client"]) for e in read_jsonl(
            run_dir / "observations" / "index.jsonl") if e["tap"] == "server_in"}
        truth = {(e["round"], e["client"]) for e in read_jsonl(run_dir / "truth" /
                                                                "index.jsonl")}
        assert recorded and recorded == truth
        assert {r for r, _ in recorded} == {2, 3} and all(c % 2 == 0 for _, c in recorded)
        assert sorted(p.name for p in (run_dir / "observations" / "globals").iterdir()) == [
            "r0002.safetensors", "r0003.safetensors"]
    rows = read_jsonl(ref / "metrics.jsonl")
    failed = 0
    for row in rows:
        r, sampled = row["round"], row["clients_sampled"]
        expected = [c for c in sampled if should_fail(cfg, r, c)]
        assert len(sampled) == 20 and expected  # a failure in every round (seeded)
        assert row["clients_failed"] == expected and row["aggregated"] is True
        assert sorted(map(int, row["client_errors"])) == expected
        assert all(e.startswith("InjectedClientFailure") for e in row["client_errors"].values())
        failed += len(expected)
    assert 0.15 <= failed / (20 * len(rows)) <= 0.45
    # quiet: one warning line per failed client, no traceback
    out = ref_out + ref_err
    assert "Traceback" not in out and out.count("InjectedClientFailure") == failed
