"""fl-sim's Flower ServerApp (Message API): one app for every task and strategy.

The round loop mirrors Flower's ``Strategy.start`` (configure_train → send_and_receive →
aggregate_train → configure/aggregate_evaluate) but may start at any round, which a resume
needs, and runs fl-sim's per-round work through the hooks the run passes in
(:mod:`fl_sim.federation.hooks`: audits, centralised evaluation and the ``metrics.jsonl``
line, online attacks, the checkpoint, progress).

Where the settings come from: :func:`fl_sim.federation.simulation.run_experiment` builds a
:class:`ServerSetup` (config, run directory, hooks) and runs the ServerApp of
:func:`build_server_app`, which holds it (``run_simulation`` gives apps an empty run_config).
Under ``flwr run .`` and the Deployment Engine Flower loads the module-level :data:`app` by its
name, so the setup can only come from ``context.run_config``: ``config`` (a TOML path, see
``[tool.flwr.app.config]``) and optionally ``run-dir`` / ``resume``, with the default hooks.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fl_sim import __version__
from fl_sim.config import ExperimentConfig, load, server_lr
from fl_sim.defended import defenses_in_force
from fl_sim.errors import FlSimError
from fl_sim.federation import protocol as P
from fl_sim.federation.checkpoint import CheckpointStore, load_strategy_state
from fl_sim.federation.dp_epsilon import epsilon_row, reply_epsilons
from fl_sim.federation.failures import check_something_aggregated, log_failures, summary
from fl_sim.federation.hooks import Progress, RoundContext, RoundHook, call_hooks, default_hooks
from fl_sim.federation.lifecycle import StoppableGrid
from fl_sim.federation.partitions import load_splits
from fl_sim.federation.resources import server_device
from fl_sim.federation.resume import write_json_atomic
from fl_sim.federation.retention import Retention
from fl_sim.federation.secagg import secagg_defense, secagg_train
from fl_sim.federation.server_defenses import central_dp_row, wrap_server_defenses
from fl_sim.federation.shared_dir import write_probe
from fl_sim.federation.taps import TapStrategy, arrays_to_tensors, tensors_to_arrays
from fl_sim.registry import STRATEGIES
from fl_sim.report import plot_metrics, write_report
from fl_sim.run_dir.files import METRICS_FILE
from fl_sim.stores import (
    ObservationStore,
    read_jsonl,
    rewrite_jsonl,
    truncate_run,
    write_tensors,
)
from fl_sim.tasks import task_from_config
from fl_sim.views import aggregate_training_row

logger = logging.getLogger(__name__)

#: Seconds to wait for replies of one round.
ROUND_TIMEOUT_S = 3600.0
RUN_FILE = "run.json"
SPEC_FILE = "spec.json"
FINAL_MODEL = "final_model.safetensors"


@dataclass
class ServerSetup:
    """What the ServerApp runs: config, run directory, resume flag, per-round hooks."""

    cfg: ExperimentConfig
    run_dir: Path
    resume: bool = False
    #: called in order around every round (:func:`~fl_sim.federation.hooks.default_hooks`)
    hooks: list[RoundHook] = field(default_factory=list)
    error: BaseException | None = None
    #: set by the driver when it unwinds: the server stops waiting (see StoppableGrid)
    stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def of(cls, cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False,
           progress: Progress | None = None) -> ServerSetup:
        """A setup with the default hooks of ``cfg`` (``progress`` called every round)."""
        return cls(cfg, run_dir, resume=resume, hooks=default_hooks(cfg, progress))


def build_server_app(setup: ServerSetup) -> ServerApp:
    """A ServerApp that runs ``setup`` (in-process runs: it is handed to Flower as an
    object, so nothing travels through module state); the error that ends the server
    thread is kept in ``setup.error``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        _run_keeping_error(grid, setup)

    return server


def _run_keeping_error(grid: Grid, setup: ServerSetup) -> None:
    try:
        run_server(grid, setup)
    except BaseException as exc:
        setup.error = exc
        raise


#: The App component Flower loads by name (``flwr run .``, Deployment Engine).
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment of ``context.run_config`` (``flwr run``)."""
    _run_keeping_error(grid, setup_from_run_config(context.run_config))


def setup_from_run_config(run_config: Mapping[str, Any]) -> ServerSetup:
    """``flwr run``: ``config`` (TOML path, relative to cwd or the app), ``run-dir``, ``resume``."""
    if "config" not in run_config:
        raise FlSimError("run_config has no 'config' (set it in [tool.flwr.app.config])")
    path = Path(str(run_config["config"]))
    if not path.is_absolute() and not path.is_file():
        path = Path(__file__).resolve().parents[2] / path
    cfg = load(path)
    run_dir = run_config.get("run-dir") or default_run_dir(cfg)
    return ServerSetup.of(cfg, Path(str(run_dir)), resume=bool(run_config.get("resume", False)))


def default_run_dir(cfg: ExperimentConfig) -> Path:
    """``<output_dir>/<name>-<YYYYmmdd-HHMMSS>`` (a suffix is added if it exists)."""
    base = Path(cfg.run.output_dir) / f"{cfg.run.name}-{datetime.now():%Y%m%d-%H%M%S}"
    out, i = base, 1
    while out.exists():
        out, i = base.with_name(f"{base.name}-{i}"), i + 1
    return out


# -- set-up ---------------------------------------------------------------------------------
def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """The configured strategy (FedSGD's unset ``server_lr`` becomes ``federation.lr``)."""
    strategy = STRATEGIES.create(cfg.strategy.name, _where="strategy", **cfg.strategy.params)
    if getattr(strategy, "server_lr", "unset") is None:
        strategy.server_lr = server_lr(cfg)
    return strategy


def server_task(cfg: ExperimentConfig) -> tuple[Any, Any, Any]:
    """``(task, spec, splits)``: the initial model (seeded), its spec, and the dataset."""
    splits = load_splits(json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True))
    task, spec = task_from_config(cfg.model, cfg.task, splits.in_channels, splits.num_classes,
                                  splits.image_size, splits.mean, splits.std,
                                  seed=cfg.run.seed, device=server_device(cfg),
                                  pretrained=True)
    return task, spec, splits


def discover_nodes(grid: Grid, num_clients: int, *, timeout_s: float = 600.0,
                   probe: Mapping[str, Any] | None = None) -> dict[int, int]:
    """``node_id -> partition id`` by asking every node (Flower's node ids are random).

    ``probe`` (:func:`~fl_sim.federation.shared_dir.write_probe`) travels with the query:
    each node checks that it sees the run directory, else discovery fails (one line)."""
    t0 = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() - t0 > timeout_s:
            raise FlSimError(f"only {len(nodes)} of {num_clients} nodes connected after "
                             f"{timeout_s:.0f} s")
        time.sleep(0.5)
    msgs = [Message(RecordDict({P.META: ConfigRecord(dict(probe or {}))}), dst_node_id=n,
                    message_type=P.QUERY_PARTITION) for n in nodes]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=ROUND_TIMEOUT_S):
        if reply.has_error():
            raise FlSimError(f"node {reply.metadata.src_node_id} failed to report its "
                             f"partition: {summary(reply.error.reason)}")
        cid = int(reply.content.config_records[P.META][P.PARTITION_ID])  # type: ignore[arg-type]
        mapping[int(reply.metadata.src_node_id)] = cid
    if sorted(mapping.values()) != list(range(num_clients)):
        raise FlSimError(f"nodes report partitions {sorted(mapping.values())}; expected "
                         f"0..{num_clients - 1} once each")
    return mapping


def prepare_run_dir(setup: ServerSetup, spec: Any) -> None:
    run_dir = setup.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # atomic writes: a kill at any moment leaves the old or the new file, never a torn one
    write_json_atomic(run_dir / "config.json", setup.cfg.to_json_dict())
    write_json_atomic(run_dir / SPEC_FILE, spec.to_json())
    info = {"run_id": run_dir.name, "status": "running", "fl_sim_version": _version()}
    write_json_atomic(run_dir / RUN_FILE, info)


def _version() -> str:
    return __version__


# -- the loop ---------------------------------------------------------------------------------
def run_server(grid: Grid, setup: ServerSetup) -> None:
    """Run (or resume) every round of ``setup.cfg`` on ``grid``; see the module doc."""
    grid = StoppableGrid(grid, setup.stop)  # type: ignore[assignment]
    cfg, run_dir = setup.cfg, setup.run_dir
    fed = cfg.federation
    task, spec, splits = server_task(cfg)
    prepare_run_dir(setup, spec)
    node_to_client = discover_nodes(grid, fed.num_clients, probe=write_probe(run_dir))
    inner = wrap_server_defenses(build_strategy(cfg), cfg)  # central DP INSIDE the tap
    arrays = ArrayRecord({k: v.detach().cpu() for k, v in task.model.state_dict().items()})
    initial = arrays_to_tensors(arrays)  # θ_0: canary_clients' final-model cosines start here
    start, resumed = 0, {}
    if setup.resume and (ck := CheckpointStore(run_dir).load()) is not None:
        start = ck.server_round
        arrays = tensors_to_arrays(ck.global_state)
        load_strategy_state(inner, ck.strategy_tensors, ck.strategy_scalars)
        resumed = dict(ck.extra)
        logger.info("resuming %s after round %d", run_dir, start)
    # Records of a partially finished round (or of an earlier attempt) are discarded.
    truncate_run(run_dir, start)
    rows = [r for r in read_jsonl(run_dir / METRICS_FILE) if int(r["round"]) <= start]
    rewrite_jsonl(run_dir / METRICS_FILE, rows)
    tap = TapStrategy(inner, seed=cfg.run.seed, node_to_client=node_to_client,
                      fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
                      store=ObservationStore(run_dir) if fed.taps else None,
                      retention=Retention.of(fed), defenses=defenses_in_force(cfg),
                      aggregate_training=aggregate_training_row(cfg))
    tap.published = dict(resumed.get("published", {}))
    ctx = RoundContext(cfg=cfg, run_dir=run_dir, task=task, splits=splits, tap=tap,
                       strategy=inner, start_round=start, arrays=arrays, initial=initial,
                       resumed=resumed)
    call_hooks(setup.hooks, "on_run_start", ctx)
    poison = _poison_clients()
    for r in range(start + 1, fed.num_rounds + 1):
        ctx.server_round, ctx.round_started = r, time.perf_counter()
        call_hooks(setup.hooks, "on_round_start", ctx)
        ctx.arrays, ctx.row = run_round(grid, tap, cfg, run_dir, r, ctx.arrays, poison)
        call_hooks(setup.hooks, "on_round_end", ctx)
    check_something_aggregated(run_dir, fed.num_rounds)
    write_tensors(run_dir / FINAL_MODEL, ctx.global_tensors(), {"round": fed.num_rounds})
    if fed.peer_clients and fed.taps:
        broadcast_final(grid, cfg, run_dir, node_to_client, ctx.arrays, tap.published)
    call_hooks(setup.hooks, "on_run_end", ctx)
    plot_metrics(run_dir)
    info = json.loads((run_dir / RUN_FILE).read_text())
    write_json_atomic(run_dir / RUN_FILE, {**info, "status": "complete"})
    _write_report(run_dir)


def _write_report(run_dir: Path) -> None:
    """report.html at the end of every run, also under ``flwr run .`` / deployment, where
    no fl-sim CLI is there to write it; a failing report never fails the finished run."""
    try:
        logger.info("report: %s", write_report(run_dir))
    except Exception:  # noqa: BLE001 -- the run is complete; `fl-sim report` can retry
        logger.exception("writing %s/report.html failed (`fl-sim report` rewrites it)",
                         run_dir)


def run_round(grid: Grid, tap: TapStrategy, cfg: ExperimentConfig, run_dir: Path, r: int,
              arrays: ArrayRecord, poison: list[int]) -> tuple[ArrayRecord, dict[str, Any]]:
    """One training (+ federated evaluation) round; returns the new global and its metrics."""
    extra = {P.POISON_KEY: poison} if poison else {}
    if secagg_defense(cfg) is not None:  # Flower's SecAgg+: the server gets only the sum
        new, eps = secagg_train(grid, tap, cfg, run_dir, r, arrays, extra)
    else:
        messages = list(tap.configure_train(r, arrays, P.config_record(cfg, run_dir, **extra),
                                            grid))
        replies = grid.send_and_receive(messages, timeout=ROUND_TIMEOUT_S) if messages else []
        new, _ = tap.aggregate_train(r, replies)
        eps = reply_epsilons(replies, tap.client_of)
    if new is not None:
        arrays = new
    log = tap.log
    row: dict[str, Any] = {"round": r, "train_loss": log.train_loss,
                           "clients_sampled": log.sampled, "clients_failed": log.failed,
                           "clients_rejected": log.rejected, "num_examples": log.num_examples,
                           "aggregated": log.aggregated,
                           "client_errors": log_failures(r, log.errors)}
    row.update(epsilon_row(eps, cfg))  # DP clients' ε, its unit and relation
    row.update(central_dp_row(tap.inner))  # central DP's ε, clipping norm, noise std
    ev_msgs = list(tap.configure_evaluate(r, arrays, P.config_record(cfg, run_dir), grid))
    if ev_msgs:
        ev_replies = list(grid.send_and_receive(ev_msgs, timeout=ROUND_TIMEOUT_S))
        log_failures(r, {tap.client_of(m): str(m.error.reason) for m in ev_replies
                         if m.has_error()}, what="evaluate")
        ev = tap.aggregate_evaluate(r, ev_replies)
        for k, v in (ev or {}).items():
            row[f"fed_{k.replace('-', '_')}"] = float(v)  # type: ignore[arg-type]
    tap.flush()  # the round's records are on disk before anything names the round done
    row["taps_seconds"] = round(log.tap_seconds, 6)
    return arrays, row


def broadcast_final(grid: Grid, cfg: ExperimentConfig, run_dir: Path,
                    node_to_client: Mapping[int, int], arrays: ArrayRecord,
                    published: Mapping[str, Any]) -> None:
    """Send the final global model to the peer clients (their last peer-view global)."""
    final_round = cfg.federation.num_rounds + 1
    nodes = [n for n, c in node_to_client.items() if c in cfg.federation.peer_clients]
    msgs = [Message(RecordDict({P.ARRAYS: arrays, "config": P.config_record(
        cfg, run_dir, **{P.ROUND_KEY: final_round}, **published)}), dst_node_id=n,
        message_type=P.QUERY_FINAL_MODEL) for n in nodes]
    for reply in grid.send_and_receive(msgs, timeout=ROUND_TIMEOUT_S):
        if reply.has_error():
            logger.warning("peer node %s did not store the final model: %s",
                           reply.metadata.src_node_id, reply.error.reason)


def _poison_clients() -> list[int]:
    """Robustness/test knob: ``FL_SIM_POISON_CLIENTS="1,3"`` makes those clients send NaN."""
    raw = os.environ.get(P.POISON_ENV, "").strip()
    return [int(x) for x in raw.split(",") if x.strip()] if raw else []
