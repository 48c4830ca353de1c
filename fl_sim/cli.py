"""The ``fl-sim`` command line.

Every user error (a bad config, a missing file, an unknown plug-in) ends with ONE line on
stderr and exit status 2; an unexpected error (a bug) with one ``internal error`` line and
exit status 1; ``--debug`` shows the traceback instead. The library never
prints: this module owns the terminal (logging handler, rich progress bar, tables). The
parser (sub-commands, options, help) is :mod:`fl_sim.cli_parser`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomllib

from fl_sim import api, config
from fl_sim.bench.grid import check_cells, load_grid
from fl_sim.cli_output import Progress as _Progress
from fl_sim.cli_output import print_results as _print_results
from fl_sim.cli_output import print_summary as _print_summary
from fl_sim.cli_parser import build_parser
from fl_sim.config import _SKIP_POSITIONAL
from fl_sim.errors import ConfigError, FlSimError, RunFailedError
from fl_sim.federation import lifecycle
from fl_sim.federation.deployment import deploy_local
from fl_sim.federation.simulation import check_resume
from fl_sim.registry import ALL_REGISTRIES, describe_params, entry_point_group

logger = logging.getLogger("fl_sim")


class _ThirdPartyFilter(logging.Filter):
    """Keep Flower's and Ray's chatter out of the terminal unless it is a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(("flwr", "ray"))


def _configure_logging(debug: bool) -> None:
    from rich.logging import RichHandler  # lazy: keeps rich out of this module's import
    handler = RichHandler(show_path=debug, show_time=False, markup=False)
    if not debug:
        handler.addFilter(_ThirdPartyFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("fl_sim").setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("flwr", "ray", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.ERROR)


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console  # lazy: keeps rich out of this module's import
    from rich.table import Table  # lazy: keeps rich out of this module's import


    kinds = list(ALL_REGISTRIES)
    if args.kind:
        # singular ("strategy", "data_source") or plural as in the entry-point groups
        # ("strategies", "data_sources")
        names = {k.replace(" ", "_"): k for k in kinds}
        names.update({entry_point_group(k).removeprefix("fl_sim."): k for k in kinds})
        wanted = names.get(args.kind.replace(" ", "_"))
        if wanted is None:
            raise FlSimError(f"unknown plug-in kind '{args.kind}'; known: {', '.join(kinds)}")
        kinds = [wanted]
    console = Console(width=160)
    if args.name:
        registry = ALL_REGISTRIES[kinds[0]]
        obj = registry.get(args.name)
        entry = next(e for e in registry.entries() if e.name == args.name)
        console.print(f"{kinds[0]} {args.name}: {entry.description}", markup=False,
                      highlight=False)
        params = Table(show_header=True, header_style="bold")
        for col in ("parameter", "type", "default", "help"):
            params.add_column(col, overflow="fold")
        for p in describe_params(obj, skip=_positional(kinds[0])):
            params.add_row(p.name, p.type, "(required)" if p.required else repr(p.default),
                           p.help)
        console.print(params)
        return 0
    table = Table(show_header=True, header_style="bold")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("description")
    if args.kind:
        table.add_column("parameters (defaults)", overflow="fold")
    for kind in kinds:
        entries = list(ALL_REGISTRIES[kind].entries())
        if not entries:
            table.add_row(kind, "-", "(none registered yet)")
        for e in entries:
            row = [kind, e.name, e.description]
            if args.kind:
                row.append(", ".join(p.name if p.required else f"{p.name}={p.default!r}"
                                     for p in describe_params(e.obj, skip=_positional(kind))))
            table.add_row(*row)
    console.print(table)
    return 0


def _positional(kind: str) -> int:
    """Leading run-time arguments a plug-in of ``kind`` receives (not config parameters)."""
    return _SKIP_POSITIONAL.get("partition" if kind == "partitioner" else kind, 0)


def cmd_validate(args: argparse.Namespace) -> int:

    cfg = api.load_config(args.config, args.overrides)
    sys.stdout.write(json.dumps(cfg.to_json_dict(), indent=2, sort_keys=True) + "\n")
    # stdout stays the resolved config (pipe it into a file and run that); the plug-ins'
    # parameters as they will run, defaults included, go beside it on stderr
    sys.stderr.write("resolved plug-in parameters (defaults included):\n")
    for p in api.resolved_plugins(cfg):
        params = " ".join(f"{k}={v!r}" for k, v in p["params"].items()) or "(none)"
        sys.stderr.write(f"  {p['where']}: {p['name']}  {params}\n")
        if p.get("note"):
            sys.stderr.write(f"    ({p['note']})\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:

    if args.resume is not None:
        resolved = Path(args.resume) / "config.json"
        if not resolved.is_file():
            raise FlSimError(f"--resume {args.resume}: not a run directory (no config.json)")
        cfg = api.load_config(resolved, args.overrides)
        run_dir: Path | None = Path(args.resume)
    elif args.config is None:
        raise FlSimError("run: give a CONFIG file or --resume RUN_DIR")
    else:
        cfg = api.load_config(args.config, args.overrides)
        run_dir = args.run_dir

    _quiet_flower(args.debug)
    if run_dir is not None and args.resume is not None:
        plan = check_resume(cfg, run_dir)
        if plan.nothing_to_do:  # touches nothing on disk, not even report.html
            sys.stdout.write(f"{run_dir} is complete ({plan.done} rounds); nothing to do "
                             "(raise federation.num_rounds with --set to extend it)\n")
            return 0
    lifecycle.exit_on_interrupt(hard_exit_s=HARD_EXIT_S)
    try:
        with _Progress(enabled=not args.no_progress,
                       total=cfg.federation.num_rounds) as progress:
            out = api.run(cfg, run_dir=run_dir, resume=args.resume is not None,
                          ray_address=args.ray_address, progress=progress.update).path
    except lifecycle.RunInterrupted as exc:
        _interrupted(exc)
    _print_summary(out)
    return 0


#: Seconds an interrupted run may spend stopping Ray before the process ends regardless.
HARD_EXIT_S = 8.0


def _interrupted(exc: Any) -> None:
    """SIGINT / SIGTERM during ``run``: Ray is stopped; print the resume hint and leave with
    128 + signal (130 / 143) at once (Flower's ServerApp thread would keep the process)."""
    out = exc.run_dir
    if out is not None and (Path(out) / "config.json").is_file():
        hint = f"resume with `fl-sim run --resume {out}`"
    else:
        hint = "nothing was recorded yet"
    sys.stderr.write(f"fl-sim: {exc}; {hint}\n")
    lifecycle.hard_exit(exc.exit_code)


def _quiet_flower(debug: bool) -> None:
    """Flower's console handler follows ``--debug`` (fl_sim.federation.flower_compat)."""
    # lazy: keeps flwr, torch out of this module's import
    from fl_sim.federation.flower_compat import quiet_console
    quiet_console(debug)


def cmd_attack(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    for text in args.overrides:
        path, value = config.parse_override(text)
        params[".".join(path)] = value
    out = Path(args.run_dir)
    results = api.replay(out, args.attack, params=params, view=args.view, client=args.client,
                         rounds=args.rounds, device=args.device, write_report=False)
    _print_results(results)
    sys.stdout.write(f"{api.report(out)}\n")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    sys.stdout.write(f"{api.report(Path(args.run_dir))}\n")
    return 0


def cmd_train_prior(args: argparse.Namespace) -> int:
    # lazy: keeps torch out of this module's import
    from fl_sim.train_prior import prior_config, train_prior
    cfg = prior_config(args.config, args.overrides)
    out = args.out if args.out is not None else Path("priors") / Path(args.config).stem
    with _Progress(enabled=not args.no_progress, total=cfg.training.steps, label="steps",
                   key="step") as progress:
        def report(event: dict[str, Any]) -> None:
            if progress.enabled or "eval_loss" in event:  # without a bar: checkpoints only
                progress.update(event)
        path = train_prior(cfg, out, progress=report)
    sys.stdout.write(f"samples: {path / 'samples.png'}\n{path}\n")
    return 0


def cmd_train_identity(args: argparse.Namespace) -> int:


    # lazy: keeps torch out of this module's import
    from fl_sim.identity import train_identity_from_config
    try:
        cfg = tomllib.loads(Path(args.config).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{args.config}: cannot read the config: {exc}") from None
    sys.stdout.write(f"{train_identity_from_config(cfg, args.out)}\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:

    # lazy: keeps torch out of this module's import
    from fl_sim.bench.runner import auto_workers, check_bench_dir, estimate
    plan = load_grid(args.grid)
    out = args.out if args.out is not None else Path("bench") / plan.name
    check_bench_dir(out)
    check_cells(plan)  # an attack that cannot work on its simulation: before any work
    est = estimate(plan, out)
    workers = auto_workers(plan, out) if args.workers == "auto" else args.workers
    how = (f"on the Ray cluster at {args.ray_address}" if args.ray_address else
           f"as Ray tasks on {workers} local workers" if workers > 1 else "one by one")
    sys.stdout.write(
        f"plan {plan.name}: {est['simulations']} simulation(s) ({est['simulations_to_run']} "
        f"to run), {est['cells']} attack cell(s) ({est['cells_done']} done), "
        f"{est['attack_iterations']} attack iterations to go, ~{est['estimated_seconds']:.0f} s "
        f"(rough); bench directory {out}; cells run {how}\n")
    if args.dry_run:
        for c in plan.cells:
            axes = ", ".join(f"{k}={v}" for k, v in c.axes.items()) or "base"
            sys.stdout.write(f"  sim-{c.sim.key}  {c.attack} r{c.round}  {axes}\n")
        return 0
    _quiet_flower(args.debug)
    lifecycle.exit_on_interrupt(hard_exit_s=HARD_EXIT_S)
    try:
        with _Progress(enabled=not args.no_progress, total=len(plan.cells), label="cells",
                       key="cell") as progress:
            result = api.bench(args.grid, out=out, ray_address=args.ray_address,
                               workers=workers, progress=progress.update,
                               after_simulation=lambda: lifecycle.exit_on_interrupt(
                                   hard_exit_s=HARD_EXIT_S))
    except lifecycle.RunInterrupted as exc:  # Ray stopped; finished cells are recorded
        sys.stderr.write(f"fl-sim: {exc}; finished cells are in {out / 'results.jsonl'}: run "
                         "the same `fl-sim bench` command again to finish the grid\n")
        lifecycle.hard_exit(exc.exit_code)
    summary = result.summary
    sys.stdout.write(f"cells run {summary.cells_run}, skipped (done before) "
                     f"{summary.cells_skipped}, failed {summary.cells_failed}; simulations run "
                     f"{summary.sims_run}, reused {summary.sims_reused}; {summary.seconds:.1f} s"
                     f"\n{out / 'results.csv'}\n{(out / 'report.html').resolve()}\n")
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, args.overrides)
    _quiet_flower(args.debug)
    out = deploy_local(cfg, run_dir=args.run_dir)
    _print_summary(out)
    return 0


COMMANDS = {"run": cmd_run, "list": cmd_list, "attack": cmd_attack, "report": cmd_report,
            "validate": cmd_validate, "deploy-local": cmd_deploy_local,
            "train-prior": cmd_train_prior, "train-identity": cmd_train_identity,
            "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.debug)
    try:
        return COMMANDS[args.command](args)
    except FlSimError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"fl-sim: error: {exc}\n")
        return 1 if isinstance(exc, RunFailedError) else 2
    except KeyboardInterrupt:
        sys.stderr.write("fl-sim: interrupted (resume with `fl-sim run --resume RUN_DIR`)\n")
        return 130
    except Exception as exc:  # a bug, not bad input: still one line (exit 1), never a traceback
        if args.debug:
            raise
        logger.debug("unexpected error", exc_info=True)
        text = " ".join(str(exc).split())[:300]
        sys.stderr.write(f"fl-sim: internal error: {type(exc).__name__}: {text} (please report "
                         "it; `fl-sim --debug ...` shows the traceback)\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
