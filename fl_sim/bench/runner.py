"""Execute a bench plan: simulations once each, then every attack cell on its recording.

``BENCH_DIR/results.jsonl`` is the record of what is done: a cell whose key has a row there
is never run again (after a crash or a kill, the same command finishes the grid). A
simulation lives in ``BENCH_DIR/sims/sim-<hash>``: a complete one is reused, one with
checkpointed rounds is resumed (``run_experiment(resume=True)``, bit-identical), one killed
before its first checkpoint is deleted and restarted. Cells run one by one in plan order;
the seeded attacks make the same grid give the same table.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_sim.bench.grid import Cell, Plan, Simulation
from fl_sim.bench.outputs import cell_row, sim_facts, write_outputs
from fl_sim.bench.parallel import run_cells_on_ray
from fl_sim.config import ExperimentConfig
from fl_sim.errors import FlSimError, RunDirError
from fl_sim.federation.resume import plan_resume
from fl_sim.federation.simulation import run_experiment
from fl_sim.output_dirs import check_output_dir
from fl_sim.registry import ATTACKS
from fl_sim.stores import append_jsonl, read_jsonl

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
SIMS = "sims.jsonl"
#: rough CPU figures for ``--dry-run`` when no cell of the grid has run yet (2 shared cores,
#: the demo's MLP on digits): Ray + actor start-up per simulation, one round, one attack
#: iteration
EST_SIM_START_S, EST_ROUND_S, EST_ITER_S = 30.0, 1.0, 0.02

Simulate = Callable[..., Path]
Attack = Callable[[Path, Cell], dict[str, Any]]


@dataclass
class Summary:
    """What one ``run_bench`` call did (``cells_run`` counts attacks actually executed)."""

    cells_total: int = 0
    cells_run: int = 0
    cells_skipped: int = 0
    cells_failed: int = 0
    sims_run: int = 0
    sims_reused: int = 0
    seconds: float = 0.0
    sim_seconds: dict[str, float] = field(default_factory=dict)


def sim_config(sim: Simulation, bench_dir: Path, ray_address: str | None = None
               ) -> ExperimentConfig:
    """The simulation's config with its run name / output dir inside the bench directory."""
    cfg = sim.config
    run = cfg.run.model_copy(update={"name": sim.dirname,
                                     "output_dir": str(Path(bench_dir) / "sims")})
    fed = cfg.federation.model_copy(update={"ray_address": ray_address}) if ray_address \
        else cfg.federation
    return cfg.model_copy(update={"run": run, "federation": fed})


def _default_simulate(cfg: ExperimentConfig, *, run_dir: Path, resume: bool) -> Path:
    return run_experiment(cfg, run_dir=run_dir, resume=resume)


def _default_attack(sim_dir: Path, cell: Cell) -> dict[str, Any]:
    from fl_sim import attack_runner  # lazy: keeps scipy out of this module's import
    res = attack_runner.replay(sim_dir, cell.attack, params=dict(cell.params), view=cell.view,
                               client=cell.client, rounds=[cell.round])
    if not res:
        raise FlSimError(f"{cell.attack}: the attack returned no result")
    return res[-1]


def ensure_simulation(sim: Simulation, bench_dir: Path, simulate: Simulate | None = None,
                      ray_address: str | None = None) -> tuple[Path, bool, float]:
    """Run (or reuse / resume) ``sim``; returns (run dir, reused, seconds spent now)."""
    simulate = simulate or _default_simulate
    cfg = sim_config(sim, bench_dir, ray_address)
    d = Path(bench_dir) / "sims" / sim.dirname
    resume = False
    if (d / "config.json").is_file():
        try:
            plan = plan_resume(cfg, d)
        except RunDirError as exc:
            logger.warning("%s: %s; restarting the simulation", d, exc)
            plan = None
        if plan is not None and plan.nothing_to_do:
            return d, True, 0.0
        resume = plan is not None and plan.done > 0
    if not resume and d.exists():
        shutil.rmtree(d)  # killed before its first checkpoint: nothing worth keeping
    logger.info("simulation %s (%s)%s", sim.dirname, _fmt_axes(sim.axes),
                " resumed" if resume else "")
    t0 = time.perf_counter()
    simulate(cfg, run_dir=d, resume=resume)
    return d, False, time.perf_counter() - t0


def check_bench_dir(bench_dir: Path) -> None:
    """RunDirError (one line) unless ``bench_dir`` is new, empty or an earlier bench's
    directory (resumed): a file, or a directory holding other things, is left alone."""
    check_output_dir(Path(bench_dir), what="bench",
                     markers=("grid.toml", RESULTS, SIMS, "sims"))


def done_keys(bench_dir: Path) -> set[str]:
    return {r["key"] for r in read_jsonl(Path(bench_dir) / RESULTS)
            if isinstance(r, dict) and isinstance(r.get("key"), str)}


def free_cpus() -> int:
    """CPUs this process may use (its affinity) minus those already busy (the 1-minute load
    average, rounded down), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0])
    except OSError:  # no load average on this platform
        busy = 0
    return max(1, cpus - busy)


def auto_workers(plan: Plan, bench_dir: Path) -> int:
    """``fl-sim bench --workers auto`` (the default): the pending cells run as Ray tasks on
    a local Ray with one worker per free CPU when at least two cells are pending and two
    CPUs are free, one by one otherwise (Ray's start-up is not worth it for one cell, and
    a busy machine gains nothing from more processes)."""
    done = done_keys(bench_dir)
    pending = sum(c.key not in done for c in plan.cells)
    workers = min(free_cpus(), pending)
    return workers if workers >= 2 else 1


def run_bench(plan: Plan, bench_dir: Path, *, simulate: Simulate | None = None,
              attack: Attack | None = None, ray_address: str | None = None,
              workers: int = 1, progress: Callable[[dict[str, Any]], None] | None = None,
              after_simulation: Callable[[], None] | None = None) -> Summary:
    """Run every cell of ``plan`` not yet in ``bench_dir/results.jsonl``, then write the
    outputs (:func:`fl_sim.bench.outputs.write_outputs`). Cells run one by one after their
    simulation, or as Ray tasks (:mod:`fl_sim.bench.parallel`) after all simulations when
    ``workers > 1`` or ``ray_address`` is given. ``simulate`` / ``attack`` replace the real
    simulation and attack (tests); ``after_simulation()`` is called after each simulation
    (the CLI re-installs its signal handlers there: Flower and Ray replace them)."""
    attack = attack or _default_attack
    parallel = workers > 1 or bool(ray_address)
    bench_dir = Path(bench_dir)
    check_bench_dir(bench_dir)
    bench_dir.mkdir(parents=True, exist_ok=True)
    if plan.source.is_file():
        shutil.copyfile(plan.source, bench_dir / "grid.toml")
    t_start = time.perf_counter()
    done = done_keys(bench_dir)
    s = Summary(cells_total=len(plan.cells))
    s.cells_skipped = sum(c.key in done for c in plan.cells)
    facts: dict[str, dict[str, Any]] = {}
    state = {"finished": s.cells_skipped}

    def record(c: Cell, sim_dir: Path | None, result: dict[str, Any] | None,
               error: str | None, seconds: float) -> None:
        row = cell_row(c, result, facts.get(c.sim.key, {}), error=error, sim_dir=sim_dir,
                       bench_dir=bench_dir, cell_seconds=seconds)
        append_jsonl(bench_dir / RESULTS, json.loads(json.dumps(row, default=str)))
        s.cells_run += sim_dir is not None
        s.cells_failed += error is not None
        state["finished"] += 1
        if progress is not None:
            progress({"cell": state["finished"], "total": len(plan.cells), "attack": c.attack,
                      **({"psnr": row["psnr"]} if row.get("psnr") is not None else {}),
                      **({"error": "yes"} if error else {})})

    queued: list[tuple[Path, Cell]] = []
    for sim in plan.simulations:
        todo = [c for c in plan.cells if c.sim.key == sim.key and c.key not in done]
        if not todo:
            continue
        sim_dir = _simulation_for(sim, bench_dir, simulate, ray_address, s, record, todo)
        if after_simulation is not None:
            after_simulation()
        if sim_dir is None:
            continue
        facts[sim.key] = sim_facts(sim_dir)
        if parallel:
            queued += [(sim_dir, c) for c in todo]
            continue
        for c in todo:
            result, error, seconds = _run_cell(attack, sim_dir, c)
            record(c, sim_dir, result, error, seconds)
    if queued:
        run_cells_on_ray(queued, attack, lambda c, d, r, e, t: record(c, d, r, e, t),
                         workers=workers, ray_address=ray_address)
    if s.cells_run or not (bench_dir / "report.html").is_file():  # a no-op rerun writes nothing
        write_outputs(plan, bench_dir)
    s.seconds = round(time.perf_counter() - t_start, 3)
    return s


def _simulation_for(sim: Simulation, bench_dir: Path, simulate: Simulate | None,
                    ray_address: str | None, s: Summary, record: Callable[..., None],
                    todo: list[Cell]) -> Path | None:
    """:func:`ensure_simulation`, counted in ``s``; a federation that cannot run fails its
    cells (each row says why) and returns None."""
    try:
        sim_dir, reused, secs = ensure_simulation(sim, bench_dir, simulate, ray_address)
    except FlSimError as exc:
        logger.error("simulation %s failed: %s", sim.dirname, exc)
        for c in todo:
            record(c, None, None, f"simulation failed: {type(exc).__name__}: {exc}", 0.0)
        return None
    if reused:
        s.sims_reused += 1
    else:
        s.sims_run += 1
        s.sim_seconds[sim.key] = round(secs, 3)
        append_jsonl(bench_dir / SIMS, {"sim": sim.key, "seconds": round(secs, 3),
                                       "axes": dict(sim.axes)})
    return sim_dir


def _run_cell(attack: Attack, sim_dir: Path, c: Cell
              ) -> tuple[dict[str, Any] | None, str | None, float]:
    t0 = time.perf_counter()
    try:
        return attack(sim_dir, c), None, time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 -- a failing cell must not stop the grid
        if not isinstance(exc, FlSimError):
            logger.exception("cell %s (%s) crashed", c.key, c.attack)
        return None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0


def estimate(plan: Plan, bench_dir: Path | None = None) -> dict[str, Any]:
    """The ``--dry-run`` numbers: simulations, cells, what is done already, rough seconds
    (measured per-iteration / per-simulation figures of this bench directory if any)."""
    done = done_keys(bench_dir) if bench_dir is not None else set()
    rows = [r for r in read_jsonl(Path(bench_dir) / RESULTS)] if bench_dir else []
    iters = sum(int(r.get("iterations") or 0) for r in rows)
    secs = sum(float(r.get("attack_seconds") or 0) for r in rows)
    per_iter = secs / iters if iters and secs else EST_ITER_S
    sim_rows = list(read_jsonl(Path(bench_dir) / SIMS)) if bench_dir else []
    sims_done = {r.get("sim") for r in sim_rows}
    if bench_dir is not None:
        sims_done |= {s.key for s in plan.simulations
                      if (Path(bench_dir) / "sims" / s.dirname / "run.json").is_file()}
    pending = [c for c in plan.cells if c.key not in done]
    sim_est = sum(EST_SIM_START_S + EST_ROUND_S * s.config.federation.num_rounds
                  for s in plan.simulations if s.key not in sims_done)
    att_iters = sum(_budget(c) for c in pending)
    return {"simulations": len(plan.simulations),
            "simulations_to_run": sum(s.key not in sims_done for s in plan.simulations),
            "cells": len(plan.cells), "cells_done": len(plan.cells) - len(pending),
            "attack_iterations": att_iters,
            "estimated_seconds": round(sim_est + att_iters * per_iter, 1)}


def _budget(cell: Cell) -> int:
    """Attack iterations of a cell for ``--dry-run``: its params over the attack's defaults
    (``max_iterations`` / ``iterations`` / ``steps``, or GIDM's two phases), x restarts."""

    try:
        defaults = {k: v.default for k, v in
                    inspect.signature(ATTACKS.get(cell.attack).__init__).parameters.items()}
    except Exception:  # noqa: BLE001 -- an unknown attack fails in its cell, not here
        defaults = {}
    p = {**defaults, **cell.params}
    restarts = p.get("restarts") if isinstance(p.get("restarts"), int) else 1
    for k in ("max_iterations", "iterations", "steps"):
        if isinstance(p.get(k), int):
            return int(p[k]) * restarts
    phases = [p.get(k) for k in ("phase1_iterations", "phase2_iterations")]
    return sum(v for v in phases if isinstance(v, int)) * restarts


def _fmt_axes(axes: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in axes.items()) or "base"
