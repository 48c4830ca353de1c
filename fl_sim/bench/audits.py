"""Bench outputs of audits: measured ε against claimed ε over a grid's simulations.

Every simulation of a grid whose config has ``[[audits]]`` writes ``audits.jsonl``
(:mod:`fl_sim.federation.canaries`); this module gathers those rows with the simulation's
axis values into ``audits.csv`` and draws ``audit_epsilon.png``: measured ε (y) against the
accountant's claimed ε (x), log axes, the line y = x (an estimate above it is the estimate's
sampling error or a bug; a lower bound above it is a bug), runs without a DP claim drawn
apart at the right edge ("no DP").
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_sim.registry import DEFENSES
from fl_sim.run_dir.files import load_audits

AUDIT_CSV, AUDIT_PLOT = "audits.csv", "audit_epsilon.png"
COLUMNS = ("audit", "view", "unit", "measured_epsilon", "measured_kind", "claimed_epsilon",
           "claimed_by", "claimed_neighbouring", "delta", "num_canaries", "dp_units")


def dp_units(cfg: Any) -> list[str]:
    """The privacy units the config's defenses claim an ε for (``privacy_unit`` of each DP
    defense: ``"example"``, ``"client"``); empty for a run without DP."""
    units = []
    for d in cfg.defenses:
        unit = getattr(DEFENSES.get(d.name), "privacy_unit", None)
        if unit is not None:
            units.append(str(unit))
    return units


def audit_rows(plan: Any, bench_dir: Path) -> list[dict[str, Any]]:
    """One row per audit of every finished simulation of ``plan``, with its axis values and
    ``dp_units`` (the units its DP defenses claim an ε for, ``;``-joined; empty: no DP)."""
    out = []
    for sim in plan.simulations:
        units = ";".join(dp_units(sim.config))
        for r in load_audits(Path(bench_dir) / "sims" / sim.dirname):
            out.append({**{k: v for k, v in sim.axes.items()}, "dp_units": units,
                        "audit": r.get("name"), "view": r.get("view"),
                        "unit": r.get("unit"),
                        "measured_epsilon": ("inf" if r.get("epsilon_infinite")
                                             else r.get("epsilon")),
                        "measured_kind": r.get("kind"),
                        "claimed_epsilon": r.get("claimed_epsilon"),
                        "claimed_by": r.get("claimed_by"),
                        "claimed_neighbouring": r.get("claimed_neighbouring"),
                        "delta": r.get("delta"), "num_canaries": r.get("num_canaries")})
    return out


def write_audit_outputs(plan: Any, bench_dir: Path) -> dict[str, Path]:
    """``audits.csv`` and ``audit_epsilon.png`` (``{}`` when no simulation audited)."""
    rows = audit_rows(plan, bench_dir)
    if not rows:
        return {}
    cols = [*plan.axis_names, *COLUMNS]
    out = {"audits_csv": Path(bench_dir) / AUDIT_CSV}
    with out["audits_csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot = plot_measured_vs_claimed(rows, plan.axis_names, Path(bench_dir) / AUDIT_PLOT)
    if plot is not None:
        out["audit_plot"] = plot
    return out


def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def plotted_rows(rows: Sequence[Mapping[str, Any]]
                 ) -> list[tuple[Mapping[str, Any], float]]:
    """``(row, measured ε)`` of the rows :func:`plot_measured_vs_claimed` draws: a finite
    measured ε ≥ 0 (an infinite estimate stays in audits.csv: no log axis holds it), and a
    claim beside it or no DP in the run (``dp_units`` empty)."""
    pts = [(r, _num(r.get("measured_epsilon"))) for r in rows
           if _num(r.get("claimed_epsilon")) is not None or not r.get("dp_units")]
    return [(r, m) for r, m in pts if m is not None and 0 <= m < float("inf")]


def plot_measured_vs_claimed(rows: Sequence[Mapping[str, Any]], axes: Sequence[str],
                             out: Path) -> Path | None:
    """Measured ε against claimed ε on log axes with y = x; a legend per defense / audit
    (no annotations that could collide); runs without DP at "no DP" on the right. A row
    without a claim from a run WITH DP (its defense claims another unit: canary_clients
    under dp_sgd) is left out: it has no claimed ε to stand beside. A measured 0 (a lower
    bound that rejects nothing) cannot sit on a log axis: it is drawn on a dotted line at the
    bottom, tick "0"."""
    pts = plotted_rows(rows)
    if not any(m > 0 or (_num(r.get("claimed_epsilon")) or 0) > 0 for r, m in pts):
        return None
    import matplotlib  # lazy: matplotlib is heavy; only the audit plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib (as above)

    claimed = [c for r, _ in pts if (c := _num(r.get("claimed_epsilon"))) and c > 0]
    measured = [m for _, m in pts if m > 0]
    lo = min([*claimed, *measured]) / 2
    hi = max([*claimed, *measured]) * 2
    no_dp_x = hi * 2
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    groups: dict[str, list[tuple[float, float]]] = {}
    for r, m in pts:
        c = _num(r.get("claimed_epsilon"))
        label = f"{r.get('claimed_by') or 'no DP'} · {r.get('audit')} ({r.get('view')})"
        groups.setdefault(label, []).append((c if c and c > 0 else no_dp_x, m or lo))
    for label, xy in sorted(groups.items()):
        xy.sort()
        ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", linestyle="-",
                label=label)
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", label="y = x")
    if any(m == 0 for _, m in pts):
        ax.axhline(lo, color="grey", linestyle=":", linewidth=0.8,
                   label="measured 0 (drawn on this line)")
    ax.axvline(hi, color="lightgrey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, no_dp_x * 1.5)
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    ax.set_xticks([*ticks, no_dp_x], [*(f"{t:g}" for t in ticks), "no DP"])
    if any(m == 0 for _, m in pts):
        ax.set_ylim(lo / 1.5, None)
        yt = [t for t in ax.get_yticks() if lo < t <= ax.get_ylim()[1]]
        ax.set_yticks([lo, *yt], ["0", *(f"{t:g}" for t in yt)])
    ax.set_xlabel("claimed ε (accountant)")
    ax.set_ylabel("measured ε (audit)")
    ax.set_title("measured vs claimed ε")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
