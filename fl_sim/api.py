"""The Python API for notebooks and scripts; the ``fl-sim`` CLI is a thin layer over it.

::

    from fl_sim import api

    run = api.run("configs/default.toml", overrides=["federation.num_rounds=2"])
    run.metrics()                      # one plain dict per round (metrics.jsonl)
    run.attacks()                      # one plain dict per attack result (attacks.jsonl)
    run.metrics_df(), run.attacks_df() # the same as pandas DataFrames (extra ``[pandas]``)
    api.replay(run, "inverting_gradients", max_iterations=300, rounds=[1, 2])
    table = api.bench("configs/bench/dp_sweep.toml", out="bench/dp_sweep")
    table.records(), table.df()

A config is a TOML/JSON file, a plain dict (the TOML's structure) or an already validated
:class:`~fl_sim.config.ExperimentConfig`; ``overrides`` are the CLI's ``--set`` strings
(``"federation.num_rounds=5"``, value parsed as TOML). Everything here reuses the machinery
of the CLI: :func:`fl_sim.config.load`, :func:`fl_sim.federation.simulation.run_experiment`,
:func:`fl_sim.attack_runner.replay`, :func:`fl_sim.bench.runner.run_bench`,
:func:`fl_sim.report.write_report`. Errors are :class:`~fl_sim.errors.FlSimError`\\ s with a
one-line message. Importing this module imports neither flwr nor ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_sim.bench.grid import load_grid
from fl_sim.config import _SKIP_POSITIONAL, ExperimentConfig, apply_overrides, from_dict, load
from fl_sim.federation.simulation import run_experiment
from fl_sim.frames import to_dataframe
from fl_sim.plugin_reach import check_attack_installed
from fl_sim.registry import (
    ATTACKS,
    DATA_SOURCES,
    DEFENSES,
    MODELS,
    PARTITIONERS,
    STRATEGIES,
    TASKS,
    validate_params,
)

if TYPE_CHECKING:  # pragma: no cover
    from fl_sim.bench.grid import Plan
    from fl_sim.bench.runner import Summary
    from fl_sim.config import ExperimentConfig
    from fl_sim.run_dir import Run

__all__ = ["BenchResult", "bench", "load_config", "load_run", "replay", "report",
           "resolved_plugins", "run", "to_dataframe"]

def load_config(config: str | Path | Mapping[str, Any] | ExperimentConfig,
                overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Validate ``config`` (file, dict or ExperimentConfig) with ``overrides`` applied.

    Raises :class:`~fl_sim.errors.ConfigError` (one line naming the field) for a bad value,
    a missing file or an unknown plug-in.
    """
    overrides = list(overrides)
    if isinstance(config, ExperimentConfig):
        if not overrides:
            return config
        config = config.to_json_dict()
    if isinstance(config, Mapping):
        return from_dict(apply_overrides(config, overrides))
    return load(config, overrides)


def resolved_plugins(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Every plug-in ``cfg`` names, with ALL its parameters as validated (defaults included):
    ``[{"where": "attacks[0]", "kind": "attack", "name": ..., "params": {...}}, ...]``."""
    sections: list[tuple[str, Any, Any]] = [
        ("data", cfg.data, DATA_SOURCES), ("partition", cfg.partition, PARTITIONERS),
        ("model", cfg.model, MODELS), ("task", cfg.task, TASKS),
        ("strategy", cfg.strategy, STRATEGIES),
        *((f"attacks[{i}]", a, ATTACKS) for i, a in enumerate(cfg.attacks)),
        *((f"defenses[{i}]", d, DEFENSES) for i, d in enumerate(cfg.defenses))]
    out = [{"where": where, "kind": reg.kind, "name": sec.name,
            "params": validate_params(reg.get(sec.name), sec.params, where=where,
                                      skip=_SKIP_POSITIONAL.get(where, 0))}
           for where, sec, reg in sections]
    if cfg.model.pretrained is not None:
        _from_checkpoint(cfg, {p["where"]: p for p in out})
    return out


def _from_checkpoint(cfg: ExperimentConfig, by_where: dict[str, dict[str, Any]]) -> None:
    """Show what ``model.pretrained`` makes of the model and task (in place): the checkpoint's
    UNet config (replacing the default preset) and scheduler, as the run builds them
    (:func:`fl_sim.tasks.pretrained.checkpoint_params`), with a ``note`` saying so. A missing
    checkpoint is a note, not an error (the run's preflight stops there); a checkpoint the run
    would refuse raises the run's one-line error."""
    path = Path(cfg.model.pretrained or "")
    model, task = by_where["model"], by_where["task"]
    if not path.exists():
        if cfg.model.name == "unet" and "preset" not in cfg.model.params:
            model["params"].pop("preset", None)  # the run would read the checkpoint's config
        model["note"] = (f"architecture from model.pretrained {path}: not found, so `fl-sim "
                         "run` stops there (nothing is downloaded)")
        return
    # lazy: keeps torch out of this module's import (and the tasks <-> priors package circle)
    from fl_sim.diffusers_dirs import read_checkpoint
    from fl_sim.tasks.pretrained import WHERE, checkpoint_params
    unet = read_checkpoint(path, where=WHERE).unet_config
    data = by_where["data"]["params"]
    size = unet.get("sample_size")
    channels = data.get("channels") or unet.get("in_channels", 3)
    image_size = data.get("image_size") or (size[0] if isinstance(size, list) else size)
    model_params, task_params = checkpoint_params(
        path, cfg.model.name, cfg.task.name, cfg.model.params, cfg.task.params,
        in_channels=int(channels), image_size=int(image_size))
    model["params"] = validate_params(MODELS.get(cfg.model.name), model_params, where="model",
                                      skip=_SKIP_POSITIONAL.get("model", 0))
    task["params"] = validate_params(TASKS.get(cfg.task.name), task_params, where="task",
                                     skip=_SKIP_POSITIONAL.get("task", 0))
    if model["params"].get("config") is not None and "preset" not in cfg.model.params:
        del model["params"]["preset"]  # unused: the checkpoint's config replaces it
    model["note"] = f"architecture and noise schedule read from model.pretrained {path}"


def run(config: str | Path | Mapping[str, Any] | ExperimentConfig,
        overrides: Iterable[str] = (), *, run_dir: str | Path | None = None,
        resume: bool = False, ray_address: str | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None) -> Run:
    """Simulate ``config`` on Flower's Ray backend and return the recorded :class:`Run`.

    ``run_dir`` defaults to ``<run.output_dir>/<run.name>-<timestamp>``; ``resume=True``
    continues the run in ``run_dir`` after its last completed round; ``ray_address`` joins
    an existing Ray cluster; ``progress(event)`` is called after every round. Raises
    :class:`~fl_sim.errors.ConfigError` before anything is written for a bad config,
    :class:`~fl_sim.errors.PluginError` for a plug-in the Ray workers could not import
    (see docs/PLUGINS.md), :class:`~fl_sim.errors.FlSimError` if the run fails.
    """

    # lazy: keeps torch out of this module's import
    from fl_sim.run_dir import load_run as _load_run
    cfg = load_config(config, overrides)
    if ray_address:
        cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(
            update={"ray_address": str(ray_address)})})
    out = run_experiment(cfg, run_dir=run_dir, resume=resume, progress=progress)
    return _load_run(out)


def load_run(path: str | Path) -> Run:
    """Open a recorded run directory (:func:`fl_sim.run_dir.load_run`)."""
    # lazy: keeps torch out of this module's import
    from fl_sim.run_dir import load_run as _load_run
    return _load_run(path)


def _run_path(run: Run | str | Path) -> Path:
    return Path(getattr(run, "path", run))


def replay(run: Run | str | Path, attack: str, *, view: str | None = None,
           client: int | None = None, rounds: Sequence[int] | None = None,
           device: str | None = None, params: Mapping[str, Any] | None = None,
           write_report: bool = True, **kw_params: Any) -> list[dict[str, Any]]:
    """Run ``attack`` offline on a recorded run; its results (plain dicts, as appended to
    ``attacks.jsonl``) are returned and ``report.html`` is rewritten.

    Attack parameters come as keywords (``max_iterations=300``) or, for a parameter named
    like one of this function's own, in ``params``. ``view`` (server / peer / aggregate),
    ``client`` and ``rounds`` (default: round 1) choose what is attacked; ``device``
    (cpu / cuda / auto) overrides the run's ``run.device``. Raises
    :class:`~fl_sim.errors.ConfigError` for a bad parameter or an attack the run cannot
    serve, :class:`~fl_sim.errors.RunDirError` for a bad run directory.
    """
    from fl_sim import attack_runner  # lazy: keeps scipy, torch out of this module's import

    # lazy: keeps torch out of this module's import
    from fl_sim.report import write_report as _write_report
    path = _run_path(run)
    if device is not None:
        from attacks.base import resolve_device  # lazy: keeps torch out of this module's import
        resolve_device(device)  # a CUDA request without CUDA: one line, before any work
    results = attack_runner.replay(path, attack, params={**(params or {}), **kw_params},
                                   view=view, client=client,
                                   rounds=list(rounds) if rounds else None, device=device)
    if write_report:
        _write_report(path)
    return results


def report(run: Run | str | Path) -> Path:
    """(Re)write ``report.html`` of a run from its recorded files; its path."""
    from fl_sim.report import write_report  # lazy: keeps torch out of this module's import
    return write_report(_run_path(run))


@dataclass
class BenchResult:
    """A bench grid's outcome: the bench directory, what this call did, the results table."""

    dir: Path
    plan: Plan
    summary: Summary

    def records(self) -> list[dict[str, Any]]:
        """The results table, one flat record per cell in plan order (as ``results.csv``)."""
        # lazy: keeps torch out of this module's import
        from fl_sim.bench.outputs import flat, load_rows
        return [flat(r, self.plan.axis_names) for r in load_rows(self.plan, self.dir)]

    def rows(self) -> list[dict[str, Any]]:
        """The raw result rows of ``results.jsonl`` (nested, typed values)."""
        from fl_sim.bench.outputs import load_rows  # lazy: keeps torch out of this module's import
        return load_rows(self.plan, self.dir)

    def df(self) -> Any:
        """The raw rows as a pandas DataFrame (needs the ``[pandas]`` extra)."""
        return to_dataframe(self.rows())


def bench(grid: str | Path, *, out: str | Path | None = None, workers: int = 1,
          ray_address: str | None = None,
          progress: Callable[[dict[str, Any]], None] | None = None,
          after_simulation: Callable[[], None] | None = None) -> BenchResult:
    """Run the defense x attack grid ``grid`` (resumable) and return its results table.

    ``out`` defaults to ``bench/<grid name>``; ``workers > 1`` runs the attack cells as Ray
    tasks on a local Ray. Raises :class:`~fl_sim.errors.ConfigError` (one line) for a bad
    grid before anything runs.
    """
    from fl_sim.bench.runner import run_bench  # lazy: keeps torch out of this module's import
    plan = load_grid(grid)
    bench_dir = Path(out) if out is not None else Path("bench") / plan.name
    if workers > 1 or ray_address:  # attack cells become Ray tasks in other processes
        for attack in sorted({c.attack for c in plan.cells}):
            check_attack_installed(attack)
    summary = run_bench(plan, bench_dir, ray_address=ray_address, workers=workers,
                        progress=progress, after_simulation=after_simulation)
    return BenchResult(dir=bench_dir, plan=plan, summary=summary)


