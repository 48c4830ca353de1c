"""The Flower Deployment Engine on loopback: ``deploy_local`` and its process handling.

The slow test starts a real ``flower-superlink`` and two ``flower-supernode`` processes on
127.0.0.1, runs one round of a tiny FedAvg experiment through ``flwr run`` and checks what the
server tap recorded. The fast tests cover staging and process-tree cleanup without Flower.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import tomllib

from fl_sim import config
from fl_sim.federation import deployment, processes

TINY = {
    "run": {"name": "deploy", "seed": 0},
    "data": {"name": "digits", "image_size": 16, "max_train": 200, "max_test": 40},
    "model": {"name": "mlp", "hidden": [32]},
    "federation": {"num_clients": 2, "num_rounds": 1, "local_steps": 1, "batch_size": 8,
                   "lr": 0.1},
    "strategy": {"name": "fedavg"},
}


def _flower_descendants() -> list[str]:
    """Command lines of Flower processes still running below this test process."""
    out = []
    for pid, _ in processes.descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and ("flower-" in cmd or "flwr" in cmd):
            out.append(cmd)
    return out


# -- fast: no Flower processes --------------------------------------------------------------
def test_stage_app_is_a_flower_app_with_the_run_settings(tmp_path: Path) -> None:
    app = deployment.stage_app(tmp_path / "app", {"config": "/x/config.json",
                                                  "run-dir": "/x/run"})
    meta = tomllib.loads((app / "pyproject.toml").read_text())
    flwr = meta["tool"]["flwr"]
    assert flwr["app"]["components"] == {"serverapp": "fl_sim.federation.server_app:app",
                                         "clientapp": "fl_sim.federation.client_app:app"}
    assert flwr["app"]["config"] == {"config": "/x/config.json", "run-dir": "/x/run"}
    assert "federations" not in flwr  # nothing for `flwr` to migrate (and rewrite)
    assert meta["project"]["dependencies"] == []  # nothing to install at run time
    assert (app / "fl_sim" / "federation" / "server_app.py").is_file()
    assert not list(app.rglob("__pycache__"))


def test_write_connection_names_an_insecure_default(tmp_path: Path) -> None:
    path = deployment.write_connection(tmp_path, "loop", "127.0.0.1:1234")
    conf = tomllib.loads(path.read_text())
    assert conf["superlink"]["default"] == "loop"
    assert conf["superlink"]["loop"] == {"address": "127.0.0.1:1234", "insecure": True}


def test_with_num_clients_returns_a_new_config() -> None:
    cfg = config.from_dict(TINY)
    assert deployment.with_num_clients(cfg, 2) is cfg
    five = deployment.with_num_clients(cfg, 5)
    assert five.federation.num_clients == 5 and cfg.federation.num_clients == 2


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_stop_kills_detached_grandchildren(tmp_path: Path) -> None:
    # A parent that starts a child in a NEW session (as flower-superlink starts
    # flower-superexec) and ignores nothing: stop() must take both down.
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', "
              "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "time.sleep(600)'], start_new_session=True)\n"
              "time.sleep(600)\n")
    proc = processes.start("parent", [sys.executable, "-c", script],
                           log_path=tmp_path / "p.log", env=dict(os.environ))
    deadline = time.monotonic() + 10
    while not processes.descendants(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = processes.descendants(proc.pid)
    assert len(tree) == 1
    t0 = time.monotonic()
    rc = proc.stop(grace_s=1.0)
    assert rc == -signal.SIGTERM
    assert time.monotonic() - t0 < 8
    assert not any(processes._alive(p, t) for p, t in tree)


def test_missing_executable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(deployment.DeploymentError, match="flower-superlink"):
        deployment.Executables.find()


# -- slow: real SuperLink + SuperNodes on loopback ------------------------------------------
@pytest.mark.deployment
@pytest.mark.slow
def test_deploy_local_one_round_two_supernodes(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))
    cfg = config.from_dict({**TINY, "run": {**TINY["run"], "output_dir": str(tmp_path)}})
    t0 = time.perf_counter()
    out = deployment.deploy_local(cfg, run_dir=tmp_path / "run", num_supernodes=2,
                                  timeout_s=240)
    seconds = time.perf_counter() - t0
    assert out == (tmp_path / "run").resolve()

    from fl_sim.run_dir import load_run
    run = load_run(out)
    assert run.complete
    assert [m["round"] for m in run.metrics()] == [1]
    server = run.view("server")
    assert server.clients(1) == [0, 1]  # the tap recorded both SuperNodes' updates
    rec = server.record(1, 1)
    assert rec.client_id == 1 and rec.server_round == 1
    assert sorted(run.clients_in_round(1)) == [0, 1]

    logs = {p.name for p in (out / deployment.LOG_DIR).iterdir()}
    assert logs == {"superlink.log", "supernode-0.log", "supernode-1.log", "flwr-run.log"}
    assert "Successfully started run" in (out / deployment.LOG_DIR / "flwr-run.log").read_text()
    assert _flower_descendants() == []  # every process (and helper) was stopped
    assert seconds < 150, f"deploy_local took {seconds:.0f} s"


@pytest.mark.deployment
def test_superlink_that_cannot_start_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fed = deployment.LoopbackFederation(num_supernodes=1, state_dir=tmp_path / "s",
                                            log_dir=tmp_path / "logs",
                                            flwr_home=tmp_path / "h")
        fed.port = busy.getsockname()[1]  # taken: the SuperLink cannot bind it and exits
        fed.address = f"127.0.0.1:{fed.port}"
        with pytest.raises(deployment.DeploymentError, match="SuperLink did not become ready"):
            with fed:
                pass
    assert fed.processes == []
    assert (tmp_path / "logs" / "superlink.log").is_file()
    assert _flower_descendants() == []


@pytest.mark.deployment
@pytest.mark.slow
def test_deploy_local_process_isolation_is_the_compose_topology(tmp_path: Path) -> None:
    # docker/compose.yaml's command lines on loopback: SuperLink and SuperNodes with
    # `--isolation process` and one separate `flower-superexec --runtime-api-address` each.
    cfg = config.from_dict({**TINY, "run": {**TINY["run"], "output_dir": str(tmp_path)}})
    out = deployment.deploy_local(cfg, run_dir=tmp_path / "run", isolation="process",
                                  timeout_s=240)
    from fl_sim.run_dir import load_run
    assert load_run(out).view("server").clients(1) == [0, 1]
    logs = {p.name for p in (out / deployment.LOG_DIR).iterdir()}
    assert {"superexec-serverapp.log", "superexec-clientapp-0.log",
            "superexec-clientapp-1.log"} <= logs
    assert _flower_descendants() == []
