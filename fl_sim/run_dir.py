"""A recorded run directory, read back: config, metrics, threat-model views, ground truth.

Usage (a recorded run is needed, so this is not a doctest)::

    run = load_run("runs/default-...")
    rec = run.view("server", grant=("labels",)).record(1, 2)
    peer = run.view("peer", client=0).record(1)
    truth = run.truth(1, 2)          # metrics only, never an attack

Importing this module does not import flwr or ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from fl_sim.config import ExperimentConfig, from_dict, server_lr
from fl_sim.errors import ConfigError, RunDirError, ThreatModelError
from fl_sim.frames import to_dataframe
from fl_sim.records import GroundTruthRecord, ModelSpec
from fl_sim.report import read_metrics
from fl_sim.stores import ObservationStore, PeerStore, TruthStore, read_tensors
from fl_sim.views import PeerView, ServerView


class Run:
    """One run directory (see :func:`load_run`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        require_run_dir(self.path)
        if not (self.path / "spec.json").is_file():
            raise RunDirError(f"{self.path} is not a run directory (no spec.json)")
        try:
            self.config: ExperimentConfig = from_dict(
                read_json_object(self.path / "config.json"))
        except ConfigError as exc:
            raise RunDirError(f"{self.path / 'config.json'}: {exc}") from None
        try:
            self.spec = ModelSpec.from_json(read_json_object(self.path / "spec.json"))
        except (KeyError, TypeError, ValueError) as exc:
            raise RunDirError(f"{self.path / 'spec.json'}: corrupt ({type(exc).__name__}: "
                              f"{exc})") from None
        info = self.path / "run.json"
        self.info: dict[str, Any] = read_json_object(info) if info.is_file() else {}
        self.run_id: str = str(self.info.get("run_id", self.path.name))

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def complete(self) -> bool:
        return self.info.get("status") == "complete"

    def metrics(self) -> list[dict[str, Any]]:
        """One dict per completed round (``metrics.jsonl``), last line per round."""
        return read_metrics(self.path)

    def attacks(self) -> list[dict[str, Any]]:
        """One dict per attack result (``attacks.jsonl``, the last line per result key)."""
        from fl_sim.report import load_results
        return load_results(self.path)

    def metrics_df(self) -> Any:
        """:meth:`metrics` as a pandas DataFrame (extra ``[pandas]``; else
        :class:`~fl_sim.errors.MissingDependencyError`)."""
        return to_dataframe(self.metrics())

    def attacks_df(self) -> Any:
        """:meth:`attacks` as a pandas DataFrame (extra ``[pandas]``; else
        :class:`~fl_sim.errors.MissingDependencyError`)."""
        return to_dataframe(self.attacks())

    def view(self, role: Literal["server", "peer"], *, client: int | None = None,
             grant: tuple[str, ...] | list[str] = ()) -> ServerView | PeerView:
        """A threat-model view: ``"server"``, or ``"peer"`` of ``client``.

        Raises :class:`~fl_sim.errors.ThreatModelError` for a peer that was not recorded as
        one (not in ``federation.peer_clients``) or a peer ground-truth grant.
        """
        if role == "server":
            return ServerView(self.run_id, self.spec, ObservationStore(self.path),
                              TruthStore(self.path), grant=tuple(grant),
                              optimizer=self.config.federation.local_optimizer())
        if role == "peer":
            peers = tuple(self.config.federation.peer_clients)
            if client is None or int(client) not in peers:
                raise ThreatModelError(f"client {client} was not a recorded peer; "
                                       f"federation.peer_clients = {list(peers)}")
            strategy = self.config.strategy
            eta = server_lr(self.config) if strategy.name == "fedsgd" else None
            return PeerView(self.run_id, self.spec, PeerStore(self.path, int(client)),
                            strategy=strategy.name, server_lr=eta, grant=tuple(grant),
                            optimizer=self.config.federation.local_optimizer())
        raise ValueError(f"unknown view role {role!r}; known: server, peer")

    def clients_in_round(self, server_round: int) -> list[int]:
        """Clients whose update was aggregated in ``server_round`` (from the server tap,
        else from the recorded ground truth)."""
        clients = ServerView(self.run_id, self.spec, ObservationStore(self.path),
                             TruthStore(self.path)).clients(server_round)
        if clients:
            return clients
        return sorted(c for r, c in TruthStore(self.path).keys() if r == server_round)

    def truth(self, server_round: int, client: int) -> GroundTruthRecord:
        """What ``client`` really trained on in ``server_round`` (for metrics only)."""
        return TruthStore(self.path).read(self.run_id, server_round, client)

    def final_model(self) -> dict[str, Tensor]:
        """The final global model state (params + buffers)."""
        p = self.path / "final_model.safetensors"
        if not p.is_file():
            raise RunDirError(f"{self.path}: no final model (run not complete)")
        return read_tensors(p)[0]


def require_run_dir(path: Path) -> Path:
    """``path`` if it is a directory holding ``config.json``; else one-line RunDirError."""
    if not path.exists():
        raise RunDirError(f"{path}: no such run directory")
    if not path.is_dir():
        raise RunDirError(f"{path}: not a directory (expected a run directory)")
    if not (path / "config.json").is_file():
        raise RunDirError(f"{path} is not a run directory (no config.json)")
    return path


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`RunDirError` if it is unreadable or not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path}: corrupt ({exc})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: corrupt (a JSON {type(data).__name__}, expected an "
                          "object)")
    return data


def load_run(path: str | Path) -> Run:
    """Open a run directory written by :func:`fl_sim.federation.simulation.run_experiment`."""
    return Run(Path(path))
