"""``--ray-address`` against a real two-node Ray cluster on loopback, started by the test.

``ray start --head`` (1 CPU) and a second node ``ray start --address`` (1 CPU) run as
``--block`` processes in their own sessions, with a private temp dir and unique ports; with
``client_resources.num_cpus = 1`` each node hosts one client actor, so clients train on both
nodes. The test checks that the federation completes through the CLI (``fl-sim run
--ray-address``), that both nodes ran clients, that the ground truth written by the clients
is in the run directory, and that the run directory check (``shared_dir``) refuses a node
that does not see the run directory. Teardown stops both nodes (SIGTERM to each ``ray start
--block``, which stops its node's processes), then kills whatever is left of the two process
groups it created, by id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "RAY_USAGE_STATS_ENABLED": "0"}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_args(temp_dir: Path) -> tuple[list[str], int]:
    p = _free_ports(7)
    return ["--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1",
            "--temp-dir", str(temp_dir), "--disable-usage-stats",
            "--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
            "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
            "--metrics-export-port", str(p[4]), "--runtime-env-agent-port", str(p[5]),
            "--object-store-memory", str(100 * 2**20)], p[6]


def _group_pids(pgids: list[int]) -> list[int]:
    """Live processes whose process group is one of ``pgids`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) in pgids:
                out.append(int(d.name))
    return out


def _wait_for_nodes(address: str, n: int, env: dict[str, str], timeout_s: float = 120) -> None:
    code = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        out = subprocess.run([sys.executable, "-c", code, address], env=env, text=True,
                             capture_output=True, timeout=120)
        if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout) >= n:
            return
        time.sleep(1)
    raise AssertionError(f"the Ray cluster at {address} did not reach {n} nodes")


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """A two-node Ray cluster on loopback; yields its address and environment."""
    tmp = Path(tempfile.mkdtemp(prefix="flr", dir="/tmp"))   # short: Ray's socket paths
    env = {**os.environ, **ENV, "FLWR_HOME": str(tmp / "flwr")}
    head_args, gcs_port = _node_args(tmp / "ray")
    worker_args, _ = _node_args(tmp / "ray")
    client_port = _free_ports(1)[0]
    address = f"127.0.0.1:{gcs_port}"
    procs: list[subprocess.Popen[bytes]] = []
    logs = [open(tmp / "head.log", "wb"), open(tmp / "worker.log", "wb")]
    try:
        procs.append(subprocess.Popen(
            [str(RAY), "start", "--head", "--port", str(gcs_port), "--include-dashboard",
             "false", "--ray-client-server-port", str(client_port), "--block", *head_args],
            env=env, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True))
        _wait_for_nodes(address, 1, env)
        procs.append(subprocess.Popen(
            [str(RAY), "start", "--address", address, "--block", *worker_args],
            env=env, stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True))
        _wait_for_nodes(address, 2, env)
        yield {"address": address, "tmp": str(tmp), **env}
    finally:
        pgids = [p.pid for p in procs]      # each started its own session = process group
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        deadline = time.monotonic() + 20
        while _group_pids(pgids) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _group_pids(pgids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for fh in logs:
            fh.close()
        left = _group_pids(pgids)
        if not left:
            shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes of the test cluster outlived it: {left} (logs: {tmp})"


def _config(tmp: Path) -> Path:
    path = tmp / "two_nodes.toml"
    path.write_text(
        '[run]\nname = "two-nodes"\nseed = 0\n'
        '[data]\nname = "digits"\nimage_size = 16\nmax_train = 160\nmax_test = 40\n'
        '[model]\nname = "mlp"\nhidden = [16]\n'
        '[federation]\nnum_clients = 4\nnum_rounds = 2\nlocal_steps = 1\nbatch_size = 4\n'
        'peer_clients = [1]\n[federation.client_resources]\nnum_cpus = 1\n'
        '[strategy]\nname = "fedavg"\n')
    return path


def test_federation_runs_on_two_ray_nodes(cluster: dict[str, str]) -> None:
    tmp = Path(cluster["tmp"])
    env = {k: v for k, v in cluster.items() if k not in {"address", "tmp"}}
    run_dir = tmp / "run"
    out = subprocess.run([str(Path(sys.executable).parent / "fl-sim"), "run",
                          str(_config(tmp)), "--ray-address", cluster["address"],
                          "--run-dir", str(run_dir), "--no-progress"],
                         env=env, text=True, capture_output=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_sampled"] == [0, 1, 2, 3] and not r["clients_failed"] for r in rows)
    # clients wrote their ground truth and the peer its records into the shared run dir
    truth = sorted((run_dir / "truth").glob("r*/c*.safetensors"))
    assert len(truth) == 8
    assert len(list((run_dir / "peer" / "c1" / "updates").glob("r*.safetensors"))) == 2
    assert json.loads((run_dir / "config.json").read_text())["federation"][
        "ray_address"] == cluster["address"]
    # both nodes hosted client actors
    # (the GCS actor table: the state API would need the dashboard)
    code = ("import ray,sys,json; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "from ray._private.state import actors; "
            "print(json.dumps(sorted({a['Address']['NodeID'] for a in actors().values() "
            "if 'ClientAppActor' in a['ActorClassName']})))")
    nodes = subprocess.run([sys.executable, "-c", code, cluster["address"]], env=env,
                           text=True, capture_output=True, timeout=120)
    assert nodes.returncode == 0, nodes.stderr[-2000:]
    assert len(json.loads(nodes.stdout.strip().splitlines()[-1])) == 2


def test_impossible_resources_on_the_cluster_fail_before_any_work(cluster) -> None:
    tmp = Path(cluster["tmp"])
    env = {k: v for k, v in cluster.items() if k not in {"address", "tmp"}}
    out = subprocess.run([str(Path(sys.executable).parent / "fl-sim"), "run",
                          str(_config(tmp)), "--ray-address", cluster["address"],
                          "--set", "federation.client_resources.num_cpus=2",
                          "--run-dir", str(tmp / "refused"), "--no-progress"],
                         env=env, text=True, capture_output=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"fl-sim: error: federation.client_resources (num_cpus = 2, num_gpus = 0) cannot be "
        f"satisfied: the Ray cluster at {cluster['address']} has 1 CPU / 0 GPU, 1 CPU / 0 GPU "
        "per node; lower them"]
    assert not (tmp / "refused").exists()
