"""The ``fl-sim`` argument parser: every sub-command, its options and help texts.

:mod:`fl_sim.cli` runs the commands; this module only describes them (split from it along
that seam). Importing it imports neither torch nor flwr, so ``fl-sim --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fl_sim import __version__
from fl_sim.view_types import VIEWS

__all__ = ["EPILOG", "build_parser", "workers_arg"]

EPILOG = """\
examples:
  fl-sim run configs/default.toml
  fl-sim run configs/default.toml --set federation.num_rounds=5 --set run.seed=3
  fl-sim run --resume runs/default-20261123-160000
  fl-sim attack runs/default-20261123-160000 --attack inverting_gradients --set max_iterations=300
  fl-sim list
  fl-sim train-prior configs/prior_digits.toml --out priors/digits
  fl-sim bench configs/bench/dp_sweep.toml --dry-run
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``fl-sim`` and all its sub-commands."""
    p = argparse.ArgumentParser(
        prog="fl-sim", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Simulate federated learning on Flower and measure what leaks to a "
                    "curious server or peer.")
    p.add_argument("--version", action="version", version=f"fl-sim {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show full tracebacks and debug logs instead of one-line errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run", help="run an experiment from a TOML config (federation, taps, attacks, report)",
        description="Run the experiment CONFIG: Flower simulation on the Ray backend, taps "
                    "recording what each party sees, configured attacks, report.html.")
    run.add_argument("config", nargs="?", help="experiment config (TOML); see configs/")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY.PATH=VALUE",
                     help="override one config value, e.g. federation.num_rounds=5 or "
                          "attacks.0.max_iterations=50 (value parsed as TOML); repeatable")
    run.add_argument("--run-dir", type=Path, default=None,
                     help="where to write outputs (default: run.output_dir/run.name-TIMESTAMP)")
    run.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                     help="continue an interrupted run from its last completed round")
    run.add_argument("--ray-address", default=None,
                     help="join an existing Ray cluster instead of starting a local one")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    lst = sub.add_parser("list", help="list every registered plug-in of every kind",
                         description="Show every registered plug-in (data sources, "
                                     "partitioners, models, tasks, strategies, attacks, "
                                     "defenses) with a one-line description.")
    lst.add_argument("kind", nargs="?", help="only this kind (e.g. attack, model), with each "
                                             "plug-in's parameters and defaults")
    lst.add_argument("name", nargs="?", help="only this plug-in: its parameters with types, "
                                             "defaults and one-line help")

    att = sub.add_parser(
        "attack", help="replay an attack offline on a recorded run",
        description="Run attack NAME on the observations recorded in RUN_DIR (record once, "
                    "attack many times); results are appended to RUN_DIR/attacks.jsonl and "
                    "report.html is rewritten.")
    att.add_argument("run_dir", type=Path, help="a run directory written by `fl-sim run`")
    att.add_argument("--attack", required=True, help="attack name (see `fl-sim list attack`)")
    att.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="PARAM=VALUE", help="attack parameter, e.g. max_iterations=300")
    att.add_argument("--view", choices=tuple(VIEWS), default=None,
                     help="the attacker's role (default: the attack's own); aggregate = the "
                          "round's aggregate (what a SecAgg+ server has)")
    att.add_argument("--client", type=int, default=None,
                     help="target client (server view) or the peer itself (peer view)")
    att.add_argument("--round", dest="rounds", type=int, action="append", default=None,
                     help="round to attack (repeatable; default: the first round)")
    att.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                     help="where the attack computes (default: the run's run.device; auto = "
                          "CUDA when available)")

    rep = sub.add_parser("report", help="(re)write RUN_DIR/report.html from recorded results")
    rep.add_argument("run_dir", type=Path)

    val = sub.add_parser("validate", help="validate a config and print it fully resolved")
    val.add_argument("config")
    val.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY.PATH=VALUE")

    dep = sub.add_parser(
        "deploy-local",
        help="run the same apps on flower-superlink + N flower-supernode on loopback",
        description="Start a SuperLink and N SuperNodes on 127.0.0.1, run CONFIG on them "
                    "with `flwr run`, and stop them again (Flower Deployment Engine).")
    dep.add_argument("config")
    dep.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY.PATH=VALUE")
    dep.add_argument("--run-dir", type=Path, default=None)

    tp = sub.add_parser(
        "train-prior", help="train a diffusion prior (DDPM) centrally on public data",
        description="Train the UNet of CONFIG (see configs/prior_*.toml) on a data source, "
                    "optionally filtered to some classes or identities, and save it in "
                    "diffusers' format. Running again with the same --out continues from the "
                    "last checkpoint. The last line printed is the prior's path.")
    tp.add_argument("config", help="prior config (TOML): [data] [filter] [model] [task] "
                                   "[training]")
    tp.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY.PATH=VALUE", help="e.g. training.steps=500; repeatable")
    tp.add_argument("--out", type=Path, default=None,
                    help="output directory = the prior (default: priors/<config name>)")
    tp.add_argument("--no-progress", action="store_true", help="no progress bar")

    ti = sub.add_parser(
        "train-identity", help="train the face-identity classifier of the identity metric",
        description="Train a small identity CNN on the held-out split of CONFIG's [data] "
                    "(identities = the source's groups, else its labels) and save it to OUT; "
                    "name OUT as [metrics] identity_model in a run config.")
    ti.add_argument("config", help="TOML with [data] and optional [identity] (split, epochs, "
                                   "lr, batch_size, seed)")
    ti.add_argument("--out", type=Path, required=True, help="output directory (the model)")

    bn = sub.add_parser(
        "bench", help="defense x attack grid: simulations once, attacks replayed, report",
        description="Expand GRID (see configs/bench/) into simulations (one per distinct "
                    "federation) and attack cells replayed on their recordings; resumable "
                    "(BENCH_DIR/results.jsonl records what is done); writes results.csv, "
                    "results.md, privacy_utility.png and report.html.")
    bn.add_argument("grid", help="grid file (TOML)")
    bn.add_argument("--out", type=Path, default=None,
                    help="bench directory (default: bench/<grid name>); rerun to resume")
    bn.add_argument("--dry-run", action="store_true",
                    help="print the plan (simulations, attack cells, rough cost) and exit")
    bn.add_argument("--ray-address", default=None,
                    help="run the simulations and the attack cells (as Ray tasks) on an "
                         "existing Ray cluster")
    bn.add_argument("--workers", type=workers_arg, default="auto",
                    help="attack cells as Ray tasks on a local Ray with this many CPUs; 1: "
                         "one by one, no Ray for the cells (default auto: one per free CPU "
                         "when two or more are free and two or more cells are pending)")
    bn.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def workers_arg(text: str) -> int | str:
    """``--workers``: ``auto`` or a positive integer (else a one-line usage error)."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {text!r}")
    return int(text)
