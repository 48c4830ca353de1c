"""``flwr run . local-simulation``: the repository is a valid Flower App (Flower 1.41 CLI).

The app is copied to a temporary directory first: on a fresh ``$FLWR_HOME`` ``flwr`` migrates
``[tool.flwr.federations]`` out of ``pyproject.toml`` by REWRITING that file, which must never
happen to the checkout. ``flwr run`` starts a detached local SuperLink (simulation runtime) and
leaves it running; the test gives it private ports and stops it (and its process tree, the
SuperExec included) by pid. Run-time dependency installation stays disabled
(``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``): the venv already holds every dependency,
and the managed runtime's ``uv sync`` would resolve and install them all again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_sim.federation import processes

ROOT = Path(__file__).resolve().parents[2]
APP_PARTS = ("pyproject.toml", ".gitignore", "fl_sim", "strategies", "attacks", "defenses",
             "configs")
NUM_CLIENTS = 3
NUM_ROUNDS = 2

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = """
[run]
name = "flwr-run"
seed = 0
output_dir = "{output_dir}"

[data]
name = "digits"
image_size = 16
max_train = 300
max_test = 60

[model]
name = "mlp"
hidden = [32]

[federation]
num_clients = {num_clients}
num_rounds = {num_rounds}
local_steps = 1
batch_size = 8
lr = 0.1

[strategy]
name = "fedavg"
"""


def _copy_app(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for part in APP_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy2(src, dest / part)
    return dest


@pytest.fixture
def local_superlink_ports():
    """Private ports for the managed local SuperLink; stops it (by pid) afterwards."""
    http_port, control_port = processes.free_port(), processes.free_port()
    yield http_port, control_port
    superlinks = processes.find_pids("flower-superlink", f"--port {http_port}")
    # its SuperExec (and any app process) runs as the SuperLink's child: stopped with it
    children = [c for pid, _ in superlinks for c in processes.descendants(pid)]
    cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid, _ in children
                if Path(f"/proc/{pid}/cmdline").exists()]
    assert any(b"superexec" in c for c in cmdlines), cmdlines  # what the README says lingers
    for pid, start_time in superlinks:
        processes.terminate_tree(pid, start_time, grace_s=10.0)
    assert not processes.find_pids("flower-superlink", f"--port {http_port}")
    assert not [c for c in children if processes._alive(*c)], children


def test_flwr_run_local_simulation(tmp_path: Path, local_superlink_ports) -> None:
    http_port, control_port = local_superlink_ports
    app = _copy_app(tmp_path / "app")
    pyproject_before = (ROOT / "pyproject.toml").read_text()
    cfg_path = tmp_path / "tiny.toml"
    output_dir = tmp_path / "runs"
    cfg_path.write_text(TINY.format(output_dir=output_dir, num_clients=NUM_CLIENTS,
                                    num_rounds=NUM_ROUNDS))
    home = tmp_path / "flwr_home"
    home.mkdir()
    # A 1.41 connection with the magic local address: `flwr` starts the SuperLink itself.
    (home / "config.toml").write_text('[superlink]\ndefault = "local-simulation"\n\n'
                                      '[superlink.local-simulation]\naddress = ":local:"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    argv = [str(Path(sys.executable).parent / "flwr"), "run", ".", "local-simulation",
            "--stream", "--federation-config",
            f"num-supernodes={NUM_CLIENTS} client-resources-num-cpus=1",
            "--run-config", f'config="{cfg_path}"']
    t0 = time.perf_counter()
    out = subprocess.run(argv, cwd=app, env=env, capture_output=True, text=True, timeout=420,
                         stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "Successfully started run" in log
    assert f"Received {NUM_CLIENTS} results and 0 failures" in log, log[-4000:]

    # The checkout is untouched (flwr migrated the COPY's pyproject.toml).
    assert (ROOT / "pyproject.toml").read_text() == pyproject_before

    from fl_sim.run_dir import load_run
    run_dirs = sorted(output_dir.glob("flwr-run-*"))
    assert len(run_dirs) == 1, run_dirs
    run = load_run(run_dirs[0])
    assert run.complete
    assert [m["round"] for m in run.metrics()] == list(range(1, NUM_ROUNDS + 1))
    server = run.view("server")
    assert server.rounds() == list(range(1, NUM_ROUNDS + 1))
    for r in range(1, NUM_ROUNDS + 1):
        assert server.clients(r) == list(range(NUM_CLIENTS)), f"round {r}"
    # the ServerApp writes report.html itself (no fl-sim CLI around it under `flwr run`)
    html = (run_dirs[0] / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 1  # the training curves, self-contained
    assert f"{run_dirs[0].name}" in html
    assert seconds < 300, f"flwr run took {seconds:.0f} s"
