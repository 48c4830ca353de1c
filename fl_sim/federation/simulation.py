"""Run an experiment in-process on Flower's Ray simulation backend.

:func:`run_experiment` resolves the run directory, builds the run's hooks and a ServerApp
that holds them (:func:`~fl_sim.federation.server_app.build_server_app`; ``run_simulation``
gives apps an empty run_config) and drives Flower's ``run_simulation``
(:func:`fl_sim.federation.flower_compat.run_simulation`, deprecated by Flower: see there
why it is still used) with one SuperNode per client. ``federation.ray_address``
joins an existing Ray cluster instead of starting a local one; Ray is started and stopped
by :func:`fl_sim.federation.lifecycle.ray_session` (signals, watchdog) and what a resume may
do is decided by :func:`fl_sim.federation.resume.plan_resume` before Ray starts. The library
never prints: progress goes to the ``progress`` callback, logs to ``logging``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fl_sim.config import ExperimentConfig, data_seed_from_run_seed, from_dict
from fl_sim.errors import FlSimError, RunDirError
from fl_sim.federation.lifecycle import RunInterrupted, ray_session
from fl_sim.federation.resume import plan_resume, remove_partial_files

logger = logging.getLogger(__name__)


def backend_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Flower's Ray backend config: client resources and (optionally) the cluster address.

    ``cfg`` is resolved by :func:`~fl_sim.federation.resources.prepare_resources` (an unset
    ``num_gpus`` counts as 0 here)."""
    # lazy: keeps torch out of this module's import
    from fl_sim.federation.resources import backend_resources
    # Ray forwards every actor's log lines to the driver's terminal; only with debug logging.
    init_args: dict[str, Any] = {"ignore_reinit_error": True,
                                 "log_to_driver": logging.getLogger("fl_sim").isEnabledFor(
                                     logging.DEBUG)}
    if cfg.federation.ray_address:
        init_args["address"] = cfg.federation.ray_address
    return {"client_resources": backend_resources(cfg), "init_args": init_args}


def run_experiment(cfg: ExperimentConfig, *, run_dir: str | Path | None = None,
                   resume: bool = False, progress: Any = None) -> Path:
    """Simulate ``cfg`` and return its run directory.

    ``run_dir`` defaults to ``<run.output_dir>/<run.name>-<timestamp>``. With ``resume=True``
    the run in ``run_dir`` continues after its last checkpointed round (records of a partly
    finished round are discarded); same seed, same final model as an uninterrupted run.
    ``progress(event: dict)`` is called after every round with that round's metrics.

    Raises :class:`~fl_sim.errors.RunDirError` for a resume without a run directory, or a
    fresh run into a directory that already holds a run; :class:`~fl_sim.errors.FlSimError`
    if the simulation did not complete.
    """
    # lazy: keeps flwr, scipy, torch out of this module's import
    from fl_sim.federation import server_app

    # lazy: keeps flwr, scipy, torch out of this module's import
    from fl_sim.federation.client_app import app as client_app

    # lazy: keeps flwr, torch out of this module's import
    from fl_sim.federation.flower_compat import install_dispatch_patch, run_simulation

    # lazy: keeps torch out of this module's import
    from fl_sim.federation.resources import apply_determinism, prepare_resources
    from fl_sim.preflight import check_before_start  # lazy: keeps torch out of this module's import

    # client resources the machine (or cluster) cannot satisfy: one line, before Ray starts
    cfg, _ = prepare_resources(cfg)
    apply_determinism(cfg)  # CUBLAS_WORKSPACE_CONFIG before Ray's actors inherit the env
    install_dispatch_patch()  # message dispatch costs the sampled clients, not the population
    if resume:
        if run_dir is None:
            raise RunDirError("resume: no run directory given")
        plan = check_resume(cfg, run_dir)
        if plan.nothing_to_do:
            logger.info("%s is complete (%d rounds); nothing to do", run_dir, plan.done)
            return Path(run_dir)
    out = Path(run_dir) if run_dir is not None else server_app.default_run_dir(cfg)
    # impossible run dirs, bad data, clients left without data: one line, before any
    # directory is created (or cleaned) and before Ray starts
    check_before_start(cfg, run_dir=out, resume=resume)
    # a plug-in defined in a notebook/script only: one line now, not a failure in every actor
    # lazy: tests (test_fuzz_cli) patch fl_sim.plugin_reach.check_plugins_reach_workers
    from fl_sim.plugin_reach import check_plugins_reach_workers
    check_plugins_reach_workers(cfg, engine="simulation")
    if resume:
        remove_partial_files(out)
    if not resume and (out / server_app.RUN_FILE).exists():
        raise RunDirError(f"{out} already holds a run; pass resume=True or another run_dir")
    out.mkdir(parents=True, exist_ok=True)
    setup = server_app.ServerSetup.of(cfg, out.resolve(), resume=resume, progress=progress)
    backend = backend_config(cfg)
    try:
        with ray_session(backend["init_args"]):
            run_simulation(server_app.build_server_app(setup), client_app,
                           num_supernodes=cfg.federation.num_clients, backend_config=backend)
    except BaseException as exc:
        setup.stop.set()  # the ServerApp thread stops at its next wait, writes no more rounds
        if isinstance(exc, RunInterrupted):
            exc.run_dir = out
        raise
    if setup.error is not None:
        if isinstance(setup.error, FlSimError):
            raise setup.error
        raise FlSimError(f"simulation failed: {type(setup.error).__name__}: "
                         f"{setup.error}") from setup.error
    status = json.loads((out / server_app.RUN_FILE).read_text()).get("status")
    if status != "complete":
        raise FlSimError(f"simulation of {out} did not complete (status {status!r})")
    return out


def check_resume(cfg: ExperimentConfig, run_dir: str | Path) -> Any:
    """The :class:`~fl_sim.federation.resume.ResumePlan` of resuming ``run_dir`` with ``cfg``;
    :class:`~fl_sim.errors.RunDirError` (one line) if it holds no run, ``cfg`` is another
    experiment, or ``num_rounds`` is below the rounds already done."""
    plan = plan_resume(cfg, run_dir)
    _check_same_config(cfg, Path(run_dir))
    return plan


def _check_same_config(cfg: ExperimentConfig, run_dir: Path) -> None:
    saved = json.loads((run_dir / "config.json").read_text())
    if isinstance(saved.get("data"), dict) and "seed" not in saved["data"] and \
            "seed" in data_seed_from_run_seed(saved).get("data", {}):
        saved["data"]["seed"] = 0  # written before data.seed followed run.seed: split seed 0
    try:  # keys added since the run was written take their defaults
        saved = from_dict(saved, check_plugins=False).to_json_dict()
    except FlSimError:
        pass
    now = cfg.to_json_dict()
    # more rounds, another Ray cluster or other client resources: the same experiment
    for conf in (saved, now):
        for key in ("num_rounds", "ray_address", "client_resources"):
            conf.get("federation", {}).pop(key, None)
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise RunDirError(f"resume: config differs from {run_dir / 'config.json'} in "
                          f"section(s) {diff}")
