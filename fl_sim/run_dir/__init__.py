"""A recorded run directory, read back: config, metrics, threat-model views, ground truth.

Usage (a recorded run is needed, so this is not a doctest)::

    run = load_run("runs/default-...")
    rec = run.view("server", grant=("labels",)).record(1, 2)
    peer = run.view("peer", client=0).record(1)
    truth = run.truth(1, 2)          # metrics only, never an attack

The files of a run directory have one owner each below this package:
:mod:`fl_sim.run_dir.files` (``config.json``, ``run.json``, ``metrics.jsonl``,
``attacks.jsonl``, ``audits.jsonl``) and :mod:`fl_sim.run_dir.images` (attack grids, per-round
sample grids); report, bench, samples and the CLI only consume them. Importing this package
does not import flwr or ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from fl_sim.capabilities import strategy_capabilities
from fl_sim.config import ExperimentConfig, from_dict, server_lr
from fl_sim.errors import ConfigError, RunDirError, ThreatModelError
from fl_sim.frames import to_dataframe
from fl_sim.records import GroundTruthRecord, ModelSpec
from fl_sim.run_dir.files import (
    AUDITS_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    load_audits,
    load_results,
    read_json_object,
    read_metrics,
    require_run_dir,
)
from fl_sim.stores import ObservationStore, PeerStore, TruthStore, read_tensors
from fl_sim.views import VIEWS, PeerView, ServerView

__all__ = ["AUDITS_FILE", "METRICS_FILE", "RESULTS_FILE", "Run", "load_audits", "load_results",
           "load_run", "read_json_object", "read_metrics", "require_run_dir"]


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
        parties = {v.party: v for v in VIEWS.values()}  # who looks: server, peer
        if role not in parties:
            raise ValueError(f"unknown view role {role!r}; known: {', '.join(parties)}")
        if parties[role].server_side:
            return ServerView(self.run_id, self.spec, ObservationStore(self.path),
                              TruthStore(self.path), grant=tuple(grant),
                              optimizer=self.config.federation.local_optimizer())
        peers = tuple(self.config.federation.peer_clients)
        if client is None or int(client) not in peers:
            raise ThreatModelError(f"client {client} was not a recorded peer; "
                                   f"federation.peer_clients = {list(peers)}")
        strategy = self.config.strategy
        # FedSGD's server lr is public config: a strategy whose clients send gradients
        eta = server_lr(self.config) if strategy_capabilities(strategy.name).sends_gradient \
            else None
        return PeerView(self.run_id, self.spec, PeerStore(self.path, int(client)),
                        strategy=strategy.name, server_lr=eta, grant=tuple(grant),
                        optimizer=self.config.federation.local_optimizer())

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


def load_run(path: str | Path) -> Run:
    """Open a run directory written by :func:`fl_sim.federation.simulation.run_experiment`."""
    return Run(Path(path))
