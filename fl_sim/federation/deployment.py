"""Run fl-sim's Flower apps on the Flower Deployment Engine, on loopback (``deploy-local``).

What :func:`deploy_local` does, in Flower 1.41 terms:

1. stages a Flower App in a temporary directory: a generated ``pyproject.toml`` whose
   ``[tool.flwr.app.config]`` holds ``config`` (the resolved experiment config, JSON) and
   ``run-dir``, plus copies of the ``fl_sim``/``strategies``/``attacks``/``defenses`` packages
   (so it works from an editable checkout and from a wheel alike, and never touches the
   repository: ``flwr`` rewrites a ``pyproject.toml`` that still has ``[tool.flwr.federations]``);
2. starts ``flower-superlink --insecure --host 127.0.0.1 --port P`` (1.41 serves its Fleet,
   Control and Runtime APIs on that ONE port) with its ``--database`` in the staging directory and
   runtime dependency installation disabled;
3. starts N ``flower-supernode --insecure --superlink 127.0.0.1:P --port Q_i
   --node-config "partition-id=i num-partitions=N"`` (each needs its own Runtime API port);
   with ``isolation="process"`` all of them run with ``--isolation process`` beside one
   ``flower-superexec --runtime-api-address`` each, the topology of docker/compose.yaml;
4. writes a SuperLink connection ``[superlink.<name>]`` into a private ``$FLWR_HOME/config.toml``,
   waits until all N SuperNodes are online, and runs ``flwr run <app> <name> --stream``;
5. checks the run's final status, and in ``finally`` stops every process it started (the
   whole tree, SIGTERM then SIGKILL). Logs of every process end up in ``run_dir/deploy_logs/``.

Each message starts a fresh ``flwr-clientapp`` process (it re-imports torch), so a round takes
tens of seconds even for a tiny model: this engine is for checking that the apps deploy, not
for speed (use ``fl-sim run`` for experiments).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fl_sim import __version__, config
from fl_sim.config import ExperimentConfig
from fl_sim.errors import FlSimError, RunDirError
from fl_sim.federation import processes
from fl_sim.federation.processes import ManagedProcess

logger = logging.getLogger(__name__)

#: Packages copied into the staged Flower App (its FAB): everything the apps may import.
APP_PACKAGES = ("fl_sim", "strategies", "attacks", "defenses")
#: Run-config keys the ServerApp reads (``[tool.flwr.app.config]``).
RUN_CONFIG_CONFIG = "config"
RUN_CONFIG_RUN_DIR = "run-dir"
CONNECTION = "fl-sim-loopback"
LOG_DIR = "deploy_logs"
DEFAULT_TIMEOUT_S = 900.0
STARTUP_TIMEOUT_S = 60.0
#: ``subprocess``: the SuperLink/SuperNodes start their own SuperExec (simplest);
#: ``process``: separate SuperExec processes, the topology of docker/compose.yaml.
ISOLATIONS = ("subprocess", "process")
_RUN_ID = re.compile(r"Successfully started run (\d+)")


class DeploymentError(FlSimError, RuntimeError):
    """A Flower process failed to start, the run failed, or it ran past its time limit."""


@dataclass(frozen=True)
class Executables:
    """Absolute paths of the Flower commands (taken beside the running interpreter)."""

    superlink: str
    supernode: str
    superexec: str
    flwr: str

    @classmethod
    def find(cls) -> Executables:
        bindir = Path(sys.executable).parent
        found = {}
        for attr, name in (("superlink", "flower-superlink"), ("supernode", "flower-supernode"),
                           ("superexec", "flower-superexec"), ("flwr", "flwr")):
            path = bindir / name
            found[attr] = str(path) if path.is_file() else shutil.which(name)
            if not found[attr]:
                raise DeploymentError(f"'{name}' not found beside {sys.executable} nor on PATH "
                                      "(install flwr>=1.41 in this environment)")
        return cls(**found)


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process: private FLWR_HOME, no telemetry, no installs.

    The interpreter's ``bin`` directory goes first on PATH: the SuperLink and SuperNode start
    ``flower-superexec`` by name.
    """
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": os.pathsep.join([bindir, env.get("PATH", "")]),
        "PYTHONUNBUFFERED": "1",
    })
    return env


# -- staging -------------------------------------------------------------------------------
def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def app_pyproject(run_config: Mapping[str, str]) -> str:
    """The ``pyproject.toml`` of the staged Flower App (no dependencies: nothing is installed)."""
    cfg_lines = "\n".join(f"{k} = {_toml_str(v)}" for k, v in run_config.items())
    return f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fl-sim"
version = "{__version__}"
description = "fl-sim Flower apps, staged by fl_sim.federation.deployment"
license = {{ text = "Apache-2.0" }}
dependencies = []

[tool.flwr.app]
publisher = "fl-sim"

[tool.flwr.app.components]
serverapp = "fl_sim.federation.server_app:app"
clientapp = "fl_sim.federation.client_app:app"

[tool.flwr.app.config]
{cfg_lines}
"""


def stage_app(dest: Path, run_config: Mapping[str, str]) -> Path:
    """Write a self-contained Flower App into ``dest`` (see module doc) and return it."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in APP_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            if name == "fl_sim":
                raise DeploymentError("cannot locate the fl_sim package to stage the app")
            continue
        src = Path(next(iter(spec.submodule_search_locations)))
        shutil.copytree(src, dest / name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    (dest / "pyproject.toml").write_text(app_pyproject(run_config))
    return dest


def write_connection(flwr_home: Path, name: str, address: str) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one insecure SuperLink connection as default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
                    f'address = "{address}"\ninsecure = true\n')
    return path


# -- the deployment ------------------------------------------------------------------------
def with_num_clients(cfg: ExperimentConfig, num_clients: int) -> ExperimentConfig:
    """``cfg`` with ``federation.num_clients`` replaced (a new object; ``cfg`` is frozen)."""
    if num_clients == cfg.federation.num_clients:
        return cfg
    return config.from_dict(config.apply_overrides(
        cfg.to_json_dict(), [f"federation.num_clients={int(num_clients)}"]))


class LoopbackFederation:
    """A SuperLink and N SuperNodes on 127.0.0.1, their logs in ``log_dir``.

    Use as a context manager: leaving it stops every process it started.
    """

    def __init__(self, *, num_supernodes: int, state_dir: Path, log_dir: Path,
                 flwr_home: Path, isolation: str = "subprocess",
                 exe: Executables | None = None) -> None:
        if num_supernodes < 1:
            raise DeploymentError(f"num_supernodes must be >= 1, got {num_supernodes}")
        if isolation not in ISOLATIONS:
            raise DeploymentError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        self.num_supernodes, self.isolation = num_supernodes, isolation
        self.state_dir, self.log_dir, self.flwr_home = state_dir, log_dir, flwr_home
        self.exe = exe or Executables.find()
        self.port = processes.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: list[ManagedProcess] = []

    def _env(self, who: str) -> dict[str, str]:
        # One FLWR_HOME per process: each installs the FAB under its own apps/ directory.
        return flower_env(self.flwr_home / who)

    def start(self, *, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        iso = ["--isolation", self.isolation]
        link = self._start("superlink", [
            self.exe.superlink, "--insecure", *iso, "--host", "127.0.0.1",
            "--port", str(self.port), "--database", str(self.state_dir / "superlink.db"),
            "--disable-runtime-dependency-installation"])
        if not processes.wait_http_ok(f"http://{self.address}/health", timeout_s=timeout_s,
                                      process=link):
            raise DeploymentError(f"SuperLink did not become ready on {self.address} within "
                                  f"{timeout_s:.0f} s; see {link.log_path}")
        self._start_superexec("superexec-serverapp", self.address)
        n = self.num_supernodes
        for i in range(n):
            port = processes.free_port()
            self._start(f"supernode-{i}", [
                self.exe.supernode, "--insecure", "--superlink", self.address, *iso,
                "--host", "127.0.0.1", "--port", str(port), "--max-retries", "30",
                "--node-config", f"partition-id={i} num-partitions={n}"])
            self._start_superexec(f"superexec-clientapp-{i}", f"127.0.0.1:{port}")
        write_connection(self.flwr_home / "cli", CONNECTION, self.address)
        self.wait_for_nodes(timeout_s=timeout_s)

    def _start(self, name: str, argv: list[str]) -> ManagedProcess:
        proc = processes.start(name, argv, log_path=self.log_dir / f"{name}.log",
                               env=self._env(name), cwd=self.state_dir)
        self.processes.append(proc)
        return proc

    def _start_superexec(self, name: str, runtime_address: str) -> None:
        """``process`` isolation only: the SuperExec that runs the apps of one Runtime API.

        This is the topology of docker/compose.yaml (one SuperExec container per SuperLink /
        SuperNode); under ``subprocess`` isolation the SuperLink/SuperNode start their own.
        """
        if self.isolation == "process":
            self._start(name, [self.exe.superexec, "--insecure",
                               "--runtime-api-address", runtime_address])

    def flwr(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run one ``flwr`` CLI command against this federation (captured, bounded)."""
        return subprocess.run([self.exe.flwr, *args], env=self._env("cli"), text=True,
                              capture_output=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, cwd=self.state_dir)

    def online_nodes(self) -> int:
        out = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            nodes = json.loads(out.stdout).get("nodes", [])
        except (json.JSONDecodeError, AttributeError):
            return 0
        return sum(1 for node in nodes if str(node.get("status", "")).lower() == "online")

    def wait_for_nodes(self, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        online = 0
        while time.monotonic() < deadline:
            dead = [p.name for p in self.processes if not p.running()]
            if dead:
                raise DeploymentError(f"{', '.join(dead)} exited during start-up; see "
                                      f"{self.log_dir}")
            online = self.online_nodes()
            if online >= self.num_supernodes:
                return
            time.sleep(1.0)
        raise DeploymentError(f"only {online}/{self.num_supernodes} SuperNodes came online "
                              f"within {timeout_s:.0f} s; see {self.log_dir}")

    def run_app(self, app_dir: Path, *, timeout_s: float,
                run_config: Sequence[str] = ()) -> int:
        """``flwr run APP <connection> --stream``; returns the run id once the run finished."""
        argv = [self.exe.flwr, "run", str(app_dir), CONNECTION, "--stream"]
        for item in run_config:
            argv += ["--run-config", item]
        log_path = self.log_dir / "flwr-run.log"
        proc = processes.start("flwr-run", argv, log_path=log_path, env=self._env("cli"),
                               cwd=app_dir)
        try:
            proc.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"the run did not finish within {timeout_s:.0f} s; see "
                                  f"{self.log_dir}") from None
        finally:
            proc.stop(grace_s=5.0)
        text = log_path.read_text(errors="replace")
        match = _RUN_ID.search(text)
        if proc.popen.returncode != 0 or match is None:
            raise DeploymentError(f"`flwr run` failed (exit {proc.popen.returncode}); see "
                                  f"{log_path}")
        return int(match.group(1))

    def run_status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it (e.g. ``finished:completed``)."""
        out = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(out.stdout).get("runs", [])
        except (json.JSONDecodeError, AttributeError):
            return "unknown"
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def stop(self) -> None:
        processes.stop_all(self.processes)
        self.processes.clear()

    def __enter__(self) -> LoopbackFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def deploy_local(cfg: ExperimentConfig, *, run_dir: Path | str | None = None,
                 num_supernodes: int | None = None, isolation: str = "subprocess",
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> Path:
    """Run ``cfg`` on a SuperLink + N SuperNodes on loopback; returns the run directory.

    ``num_supernodes`` defaults to ``federation.num_clients`` (and replaces it when given).
    ``isolation="process"`` runs the apps in separate ``flower-superexec`` processes, as
    docker/compose.yaml does with containers.
    Raises :class:`DeploymentError` when a process does not start, the run fails or it takes
    longer than ``timeout_s`` seconds; every process is stopped in any case.
    """
    # lazy: keeps flwr, scipy, torch out of this module's import
    from fl_sim.federation import server_app  # imports flwr and torch

    n = int(num_supernodes or cfg.federation.num_clients)
    cfg = with_num_clients(cfg, n)
    out = Path(run_dir) if run_dir is not None else server_app.default_run_dir(cfg)
    out = out.expanduser().resolve()
    if (out / server_app.RUN_FILE).exists():
        raise RunDirError(f"{out} already holds a run; choose another run directory")
    from fl_sim.preflight import check_before_start  # lazy: keeps torch out of this module's import
    check_before_start(cfg, run_dir=out, resume=False)  # bad data / run dir: before any process
    # lazy: tests (test_fuzz_cli) patch fl_sim.plugin_reach.check_plugins_reach_workers
    from fl_sim.plugin_reach import check_plugins_reach_workers
    check_plugins_reach_workers(cfg, engine="deployment")  # SuperNodes load installed ones only
    log_dir = out / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fl-sim-deploy-") as tmp:
        work = Path(tmp)
        resolved = config.save_resolved(cfg, work)  # config.json, outside the run dir
        app_dir = stage_app(work / "app", {RUN_CONFIG_CONFIG: str(resolved),
                                           RUN_CONFIG_RUN_DIR: str(out)})
        t0 = time.perf_counter()
        with LoopbackFederation(num_supernodes=n, state_dir=work / "state", log_dir=log_dir,
                                flwr_home=work / "flwr_home", isolation=isolation) as fed:
            logger.info("SuperLink on %s with %d SuperNodes up after %.1f s; running %s",
                        fed.address, n, time.perf_counter() - t0, cfg.run.name)
            run_id = fed.run_app(app_dir, timeout_s=timeout_s)
            status = fed.run_status(run_id)
        logger.info("run %d: %s after %.1f s", run_id, status, time.perf_counter() - t0)
    info_path = out / server_app.RUN_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if "completed" not in status or info.get("status") != "complete":
        raise DeploymentError(f"run {run_id} ended as '{status}' (run.json status "
                              f"{info.get('status')!r}); see {log_dir}")
    return out
