"""Outputs of ``fl-sim bench`` in the bench directory, written from ``results.jsonl`` only.

``results.csv`` (one row per cell, plan order), ``results.md`` (the same as a markdown
table), ``privacy_utility.png`` (attack metrics and utility in separate panels against ε,
or the swept values; :mod:`fl_sim.bench.privacy_plot`), ``grids/``
(each cell's original-over-reconstruction grid, copied from its simulation) and a
self-contained ``report.html`` (every image a data URI).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from defenses.base import format_defense
from fl_sim.bench.audits import write_audit_outputs
from fl_sim.bench.grid import Cell, Plan
from fl_sim.bench.html import write_html
from fl_sim.bench.inference import plot_membership_epsilon
from fl_sim.bench.labels import EXACT, INF
from fl_sim.bench.privacy_plot import plot_privacy_utility as _plot_privacy_utility
from fl_sim.run_dir.files import read_metrics
from fl_sim.stores import read_jsonl
from fl_sim.threat_class import class_of_row

#: reconstruction metrics, then membership inference's (ROC AUC, TPR at 1 % FPR; issue 22)
METRICS = ("psnr", "ssim", "label_accuracy", "auc", "tpr_at_fpr_1pct")
#: the attack's random start scored like its result (IG, DLG): the floor that a defense
#: pushes the attack towards; blank for attacks without a random start (iDLG, GIDM+ ...)
START = ("start_psnr", "start_ssim")
FIXED = ("attack", "view", "threat_class", "round", "client",
         "params", "defenses", *METRICS, *START, "utility",
         "utility_metric", "epsilon", "epsilon_unit", "attack_seconds", "cell_seconds",
         "iterations", "prior_overlap", "grid", "error", "sim", "key")


def sim_facts(sim_dir: Path) -> dict[str, Any]:
    """Utility and ε of a finished simulation: the last ``metrics.jsonl`` row's
    ``eval_accuracy`` (classifier) or ``eval_loss`` (diffusion: held-out diffusion loss), and
    every key ending in ``epsilon`` (``dp_epsilon``, ``central_dp_epsilon``; null = ∞), with
    ``epsilon_unit``: what each ε bounds, ``"unit/relation"`` from the row's ``dp_unit`` /
    ``dp_neighbouring`` (:mod:`defenses.accounting`), ``"; "``-joined, ``"?"`` where a run
    from before those fields has none."""
    rows = read_metrics(Path(sim_dir))
    out: dict[str, Any] = {"utility": None, "utility_metric": None, "epsilon": None,
                           "epsilons": {}, "epsilon_unit": None}
    for key in ("eval_accuracy", "eval_loss"):
        vals = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        if vals:
            out["utility"], out["utility_metric"] = float(vals[-1]), key
            break
    if rows:
        last = rows[-1]
        eps = {k: last[k] for k in sorted(last) if k.endswith("epsilon")}
        out["epsilons"] = {k: (INF if v is None else float(v)) for k, v in eps.items()}
        if out["epsilons"]:  # two client-side/central guarantees: basic composition
            vals = list(out["epsilons"].values())
            out["epsilon"] = INF if INF in vals else sum(vals)
            out["epsilon_unit"] = "; ".join(
                f"{last.get(k[:-len('epsilon')] + 'unit', '?')}/"
                f"{last.get(k[:-len('epsilon')] + 'neighbouring', '?')}" for k in eps)
    return out


def cell_row(cell: Cell, result: Mapping[str, Any] | None, facts: Mapping[str, Any], *,
             error: str | None = None, sim_dir: Path | None = None,
             bench_dir: Path | None = None, cell_seconds: float = 0.0) -> dict[str, Any]:
    """One ``results.jsonl`` row: the cell, its attack metrics, the simulation's utility/ε."""
    result = dict(result or {})
    m = result.get("metrics") or {}
    error = error or result.get("error")
    grid = None
    if result.get("grid") and sim_dir is not None and bench_dir is not None:
        src = Path(sim_dir) / str(result["grid"])
        if src.is_file():
            dst = Path(bench_dir) / "grids" / f"{cell.key}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            grid = str(dst.relative_to(bench_dir))
    return {
        "key": cell.key, "sim": cell.sim.key, "axes": dict(cell.axes), "attack": cell.attack,
        "view": result.get("view", cell.view),
        # the SoK attacker class (fl_sim.threat_class); the vantage point is the view
        "threat_class": class_of_row(result)["class"] if result and not error else None,
        "round": cell.round,
        # the attack's resolved parameters (defaults included) as its result recorded them
        "client": result.get("client", cell.client),
        "params": dict(result.get("params") or cell.params),
        "defenses": [format_defense(d) for d in result.get("defenses", [])] or
        [format_defense({"name": d.name, **d.params}) for d in cell.sim.config.defenses],
        **{k: _num(m.get(k)) for k in (*METRICS, *START)},
        # +inf metrics (a perfect PSNR): null in strict JSON, "exact" in the tables
        "exact": sorted(set(m.get("exact") or ()) | {k for k in (*METRICS, *START)
                                                     if m.get(k) == float("inf")}),
        "utility": facts.get("utility"), "utility_metric": facts.get("utility_metric"),
        "epsilon": facts.get("epsilon"), "epsilons": dict(facts.get("epsilons") or {}),
        "epsilon_unit": facts.get("epsilon_unit"),
        "attack_seconds": result.get("seconds"), "cell_seconds": round(cell_seconds, 3),
        "iterations": result.get("iterations"), "grid": grid, "error": error,
        # a prior-based attack: how many attacked images its prior was trained on (measured)
        "prior_overlap": overlap_text(result.get("prior_overlap")),
    }


def overlap_text(overlap: Mapping[str, Any] | None) -> str | None:
    """``"0/16"``, ``"WARNING 3/16 (19%)"``, ``"unknown"`` or None (no prior)."""
    if not overlap:
        return None
    if overlap.get("count") is None:
        return "unknown"
    text = f"{overlap['count']}/{overlap['victims']}"
    return f"WARNING {text} ({overlap['fraction']:.0%})" if overlap["count"] else text


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def load_rows(plan: Plan, bench_dir: Path) -> list[dict[str, Any]]:
    """The results of the plan's cells in plan order (the last row written for a key)."""
    by_key = {r["key"]: r for r in read_jsonl(Path(bench_dir) / "results.jsonl")
              if isinstance(r, dict) and "key" in r}
    return [by_key[c.key] for c in plan.cells if c.key in by_key]


def flat(row: Mapping[str, Any], axes: Sequence[str]) -> dict[str, Any]:
    """A results row as one flat ``results.csv`` record (axis values first)."""
    out: dict[str, Any] = {a: _cell(row.get("axes", {}).get(a)) for a in axes}
    for k in FIXED:
        v = row.get(k)
        if k in (*METRICS, *START) and v in (None, float("inf")) and k in (row.get("exact")
                                                                          or ()):
            v = EXACT  # a perfect reconstruction, not a missing value
        elif k in (*METRICS, *START) and v is None and row.get("error"):
            v = "failed"
        if k == "params":
            v = json.dumps(v, sort_keys=True)
        elif k == "defenses":
            v = "; ".join(v or []) or "none"
        out[k] = _cell(v)
    return out


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.6g}"
    if isinstance(v, list | dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def write_outputs(plan: Plan, bench_dir: Path) -> dict[str, Path]:
    """Write results.csv, results.md, privacy_utility.png (matplotlib) and report.html."""
    bench_dir = Path(bench_dir)
    rows = load_rows(plan, bench_dir)
    axes = plan.axis_names
    records = [flat(r, axes) for r in rows]
    cols = [*axes, *FIXED]
    out = {"csv": bench_dir / "results.csv", "md": bench_dir / "results.md"}
    with out["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(records)
    md_cols = [*axes, "attack", "view", "threat_class", "round",
               "defenses", "psnr", "start_psnr", "ssim",
               "label_accuracy", "utility", "epsilon", "epsilon_unit", "attack_seconds",
               "error"]
    if any(r.get("auc") is not None for r in rows):  # membership inference in the grid
        at = md_cols.index("label_accuracy") + 1
        md_cols[at:at] = ["auc", "tpr_at_fpr_1pct"]
    if any(r.get("prior_overlap") for r in rows):  # prior-based attacks in the grid
        md_cols.insert(md_cols.index("label_accuracy") + 1, "prior_overlap")
    out["md"].write_text(markdown_table(records, md_cols))
    plot = plot_privacy_utility(rows, axes, bench_dir / "privacy_utility.png")
    if plot is not None:
        out["plot"] = plot
    out.update(write_audit_outputs(plan, bench_dir))  # audits.csv, audit_epsilon.png
    # AUC, TPR@1% FPR against ε
    if (mia := plot_membership_epsilon(rows, bench_dir / "membership_epsilon.png")):
        out["membership_plot"] = mia
    out["html"] = write_html(plan, bench_dir, rows, records, md_cols, plot)
    return out


def markdown_table(records: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
    def esc(s: Any) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(r.get(c, "")) for c in cols) + " |" for r in records]
    return "\n".join(lines) + "\n"


def plot_privacy_utility(rows: Sequence[Mapping[str, Any]], axes: Sequence[str],
                         path: Path) -> Path | None:
    """``privacy_utility.png``: attack metrics and utility in separate panels against ε (log;
    no DP apart) or, without ε, the swept values (:mod:`fl_sim.bench.privacy_plot`)."""
    return _plot_privacy_utility(rows, axes, path)
