"""``privacy_utility.png`` of ``fl-sim bench`` (issue 21, item 5): a plot a reader can read.

A grid that sweeps a privacy parameter (its cells carry an ε: dp_sgd / local_dp / central_dp
noise levels) is drawn against ε: log x axis, the noise-free cell (ε = ∞, σ = 0) apart at the
right edge behind a dotted break with its own tick "no DP"; the attack metrics (PSNR, SSIM,
label accuracy, membership AUC ...) and the utility (accuracy or held-out diffusion loss) in
SEPARATE panels sharing x, one line per defense · attack series (the privacy parameter
removed from the series), the attack's random-start floor (``start_psnr``) as a band, exact
reconstructions (PSNR = ∞) drawn on a line above the finite values with their own legend
entry instead of being dropped. A grid without ε puts its swept federation values on a
categorical x axis (tick labels, no per-point annotations), with the same panels.
Labels never collide: what a point is comes from the legend and the tick labels only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from defenses.base import format_defense

#: attack metrics (y), in panel order (fl_sim.bench.outputs.METRICS)
METRICS = ("psnr", "ssim", "label_accuracy", "auc", "tpr_at_fpr_1pct")
#: leaves of an axis name that set the privacy level (removed from the series label: they are x)
PRIVACY_LEAVES = ("noise_multiplier", "noise_scale", "sigma", "epsilon", "target_epsilon")
#: the x tick of the noise-free cell
NO_DP = "no DP\n(ε = ∞)"
#: legend entry of exact reconstructions drawn on the "exact" line
EXACT_LABEL = "exact reconstruction (∞), drawn on the dotted line"
_UTILITY = {"eval_accuracy": "accuracy", "eval_loss": "diffusion loss (lower = better)"}


def epsilon_of(row: Mapping[str, Any]) -> float | None:
    """The cell's ε: a float, ``math.inf`` (no noise: ``"inf"`` in results rows) or None."""
    eps = row.get("epsilon")
    if eps in ("inf", float("inf")):
        return math.inf
    return float(eps) if isinstance(eps, int | float) and not isinstance(eps, bool) else None


def _value(axis: str, v: Any) -> str:
    if isinstance(v, list) and all(isinstance(d, Mapping) for d in v):
        # a whole-defenses axis: its privacy levels are x, not part of the series
        return "; ".join(format_defense({k: x for k, x in d.items() if k not in PRIVACY_LEAVES})
                         for d in v) or "no defense"
    return f"{axis.split('.')[-1]}={v}"


def _is_privacy_axis(axis: str) -> bool:
    return axis.split(".")[-1] in PRIVACY_LEAVES


def series_label(row: Mapping[str, Any], axes: Sequence[str], *, attack: bool = True,
                 drop: Sequence[str] = ()) -> str:
    """One line of the plot: defense names, the attack (view) unless ``attack`` is False, and
    every swept value not in ``drop`` (defense names and privacy levels are never listed)."""
    names = sorted({d.split("(")[0] for d in row.get("defenses") or []}) or ["none"]
    vals = [_value(a, row.get("axes", {})[a]) for a in axes
            if a in row.get("axes", {}) and a not in drop and not _is_privacy_axis(a)
            and not (a.startswith("defenses.") and a.endswith(".name"))
            and (attack or not a.startswith("attack."))]
    head = "+".join(names) + (f" · {row['attack']} ({row.get('view')})" if attack else "")
    return head + (f" [{', '.join(vals)}]" if vals else "")


def _x_positions(rows: Sequence[Mapping[str, Any]], axes: Sequence[str]
                 ) -> tuple[dict[str, float], list[float], list[str], bool]:
    """x of every cell key, the x ticks and their labels, and whether x is ε (log)."""
    eps = {r["key"]: epsilon_of(r) for r in rows}
    finite = sorted({e for e in eps.values() if e is not None and math.isfinite(e) and e > 0})
    if finite:  # a privacy sweep: ε on a log axis, no DP one decade right of the largest ε
        right = finite[-1] * 10 ** max(0.5, 0.25 * math.log10(finite[-1] / finite[0]))
        xs = {k: (right if e is None or math.isinf(e) else e) for k, e in eps.items()
              if e is None or math.isinf(e) or e > 0}
        lo, hi = math.floor(math.log10(finite[0])), math.ceil(math.log10(finite[-1]))
        ticks = [10.0 ** p for p in range(lo, hi + 1) if 10.0 ** p < right / 2]
        labels = [f"{t:g}" for t in ticks]
        if any(x == right for x in xs.values()):
            ticks, labels = [*ticks, right], [*labels, NO_DP]
        return xs, ticks, labels, True
    fed = [a for a in axes if not a.startswith("attack.")]  # categories: federation values
    cats: dict[str, int] = {}
    xs = {}
    for r in rows:
        text = ", ".join(_value(a, r.get("axes", {}).get(a)) for a in fed
                         if a in r.get("axes", {})) or "base"
        xs[r["key"]] = float(cats.setdefault(text, len(cats)))
    return xs, [float(i) for i in cats.values()], list(cats), False


def _line(ax: Any, xy: Sequence[tuple[float, float]], label: str, marker: str,
          no_dp: float | None) -> Any:
    """A series' line; the step to the no-DP column (x = ``no_dp``) dotted, across the break."""
    head = [(x, y) for x, y in xy if x != no_dp]
    tail = [(x, y) for x, y in xy if x == no_dp]
    (line,) = ax.plot([x for x, _ in head or tail], [y for _, y in head or tail],
                      marker=marker, label=label)
    if head and tail:
        ax.plot([head[-1][0], tail[0][0]], [head[-1][1], tail[0][1]], ls=":",
                marker=marker, markevery=[1], color=line.get_color())
    return line


def _metric_panel(ax: Any, key: str, rows: Sequence[Mapping[str, Any]], axes: Sequence[str],
                  xs: Mapping[str, float], no_dp: float | None) -> None:
    """One attack metric against x: a line per series, its random-start band, exact points."""
    series: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r["key"] in xs and not r.get("error") and (
                r.get(key) is not None or key in (r.get("exact") or ())):
            series.setdefault(series_label(r, axes), []).append(r)
    finite = [r[key] for pts in series.values() for r in pts if r.get(key) is not None]
    finite += [r[f"start_{key}"] for pts in series.values() for r in pts
               if r.get(f"start_{key}") is not None]
    top = (max(finite) if finite else 0.0) + (5.0 if key == "psnr" else 0.05)
    exact_drawn = False
    for label, pts in series.items():
        pts = sorted(pts, key=lambda p: xs[p["key"]])
        ys = [top if p.get(key) is None else p[key] for p in pts]
        line = _line(ax, list(zip([xs[p["key"]] for p in pts], ys, strict=True)), label,
                     "o", no_dp)
        ex = [(xs[p["key"]], top) for p in pts if p.get(key) is None]
        if ex:
            ax.scatter(*zip(*ex, strict=True), marker="*", s=120, color=line.get_color(),
                       zorder=3, label=None if exact_drawn else EXACT_LABEL)
            exact_drawn = True
        starts = [p[f"start_{key}"] for p in pts if p.get(f"start_{key}") is not None]
        if starts:  # the floor the attack falls towards as noise grows
            lo, hi = min(starts), max(starts)
            pad = 0.25 if key == "psnr" else 0.005
            ax.axhspan(lo - pad, hi + pad, color=line.get_color(), alpha=0.15,
                       label=f"{label}: random start ({lo:.3g}–{hi:.3g})")
    if exact_drawn:
        ax.axhline(top, color="grey", ls=":", lw=1)
    ax.set_ylabel(key.replace("_", " ") + (" (dB)" if key == "psnr" else ""))


def _utility_panel(ax: Any, rows: Sequence[Mapping[str, Any]], axes: Sequence[str],
                   xs: Mapping[str, float], no_dp: float | None) -> None:
    """The federation's final utility against x: one line per defense series (per simulation,
    not per attack cell)."""
    seen: dict[str, dict[float, float]] = {}
    for r in rows:
        if r["key"] in xs and r.get("utility") is not None:
            seen.setdefault(series_label(r, axes, attack=False), {}).setdefault(
                xs[r["key"]], float(r["utility"]))
    for label, pts in seen.items():
        _line(ax, sorted(pts.items()), label, "s", no_dp)
    metric = next((r.get("utility_metric") for r in rows if r.get("utility_metric")), "")
    ax.set_ylabel(f"utility: {_UTILITY.get(metric, metric or 'utility')}")


def privacy_figure(rows: Sequence[Mapping[str, Any]], axes: Sequence[str]) -> Any | None:
    """The matplotlib Figure of :func:`plot_privacy_utility` (Agg backend), or None when no
    cell has an attack metric or a utility, or matplotlib is missing. Its axes, top to bottom:
    one per attack metric present, then the utility; they share x."""
    rows = [r for r in rows if "key" in r]
    keys = [k for k in METRICS if any(r.get(k) is not None or k in (r.get("exact") or ())
                                      for r in rows)]
    has_utility = any(r.get("utility") is not None for r in rows)
    if not keys and not has_utility:
        return None
    try:
        import matplotlib  # lazy: keeps matplotlib out of this module's import
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: keeps matplotlib out of this module's import
    from matplotlib.ticker import NullLocator  # lazy: keeps matplotlib out of this module's import
    xs, ticks, tick_labels, log_x = _x_positions(rows, axes)
    no_dp = ticks[-1] if log_x and NO_DP in tick_labels else None
    n = len(keys) + has_utility
    fig, axs = plt.subplots(n, 1, figsize=(9.5, 2.5 * n + 1.2), sharex=True, squeeze=False)
    panels = list(axs[:, 0])
    for ax, key in zip(panels, keys, strict=False):
        _metric_panel(ax, key, rows, axes, xs, no_dp)
    if has_utility:
        _utility_panel(panels[-1], rows, axes, xs, no_dp)
    for ax in panels:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    bottom = panels[-1]
    if log_x:
        bottom.set_xscale("log")
        if no_dp is not None:  # a broken axis: the no-DP column sits behind a dotted gap
            gap = math.sqrt(no_dp * max(x for x in xs.values() if x < no_dp))
            for ax in panels:
                ax.axvline(gap, color="grey", ls=(0, (1, 3)), lw=1.5)
        bottom.set_xlabel("ε (log scale; right: no noise)")
    else:
        bottom.set_xlabel("swept values")
    bottom.xaxis.set_minor_locator(NullLocator())
    bottom.set_xticks(ticks, tick_labels, rotation=0 if log_x else 30,
                      ha="center" if log_x else "right", fontsize=8)
    title = "against ε" if log_x else "across the grid"
    panels[0].set_title(f"attack success and utility {title} (one line per defense · attack)")
    fig.tight_layout()
    return fig


def plot_privacy_utility(rows: Sequence[Mapping[str, Any]], axes: Sequence[str],
                         path: Path) -> Path | None:
    """Write :func:`privacy_figure` to ``path`` (PNG); None when there is nothing to plot."""
    fig = privacy_figure(rows, axes)
    if fig is None:
        return None
    import matplotlib.pyplot as plt  # lazy: keeps matplotlib out of this module's import
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
