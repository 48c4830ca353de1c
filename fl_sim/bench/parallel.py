"""Attack cells as Ray tasks (``fl-sim bench --workers N`` or ``--ray-address``).

The simulations run first (each one is a Ray session of its own, one after the other); then
every pending cell of the grid is submitted as one Ray task (``num_cpus=1``, one torch
thread) that replays its attack on the recorded run, and rows are written to
``results.jsonl`` as tasks finish. Attacks are seeded by (run seed, attack, round, client),
not by the process that runs them, so the table is the one the sequential path writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fl_sim.bench.grid import Cell
from fl_sim.federation.lifecycle import ray_session

logger = logging.getLogger(__name__)

Done = Callable[[Cell, Path, "dict[str, Any] | None", "str | None", float], None]


def _cell_task(attack: Callable[[Path, Cell], dict[str, Any]], sim_dir: str, cell: Cell
               ) -> tuple[dict[str, Any] | None, str | None, float]:
    """Run one cell in a Ray worker: (result, error text, seconds)."""
    import torch  # lazy: keeps torch out of this module's import
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        return attack(Path(sim_dir), cell), None, time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 -- reported in the cell's row
        return None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0


def run_cells_on_ray(items: Sequence[tuple[Path, Cell]],
                     attack: Callable[[Path, Cell], dict[str, Any]], done: Done, *,
                     workers: int = 2, ray_address: str | None = None) -> None:
    """Run every ``(sim_dir, cell)`` as a Ray task, calling ``done(cell, sim_dir, result,
    error, seconds)`` in completion order. Joins ``ray_address`` when given (and leaves the
    cluster running), else starts a local Ray with ``workers`` CPUs and stops it after."""
    if not items:
        return
    import ray  # lazy: keeps ray out of this module's import

    init: dict[str, Any] = {"ignore_reinit_error": True}
    if ray_address:
        init["address"] = ray_address
    else:
        init["num_cpus"] = max(1, int(workers))
    with ray_session(init):
        try:
            task = ray.remote(num_cpus=1)(_cell_task)
            attack_ref = ray.put(attack)
            pending = {task.remote(attack_ref, str(d), c): (d, c) for d, c in items}
            logger.info("%d attack cells submitted as Ray tasks", len(pending))
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                d, c = pending.pop(ready[0])
                result, error, seconds = ray.get(ready[0])
                done(c, d, result, error, seconds)
        finally:
            for ref in list(locals().get("pending", {})):
                ray.cancel(ref, force=True)
            ray.shutdown()
