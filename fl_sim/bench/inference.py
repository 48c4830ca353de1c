"""Bench output for membership inference (issue 22): ROC AUC and TPR at 1 % FPR against the
privacy budget ε of each cell (a DP noise sweep), one curve per defense and attack."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: the (y) metrics plotted against ε
KEYS = ("auc", "tpr_at_fpr_1pct")


def _epsilon(row: Mapping[str, Any]) -> float | None:
    """The cell's ε as a number (``inf`` for no noise), None where the run has none."""
    eps = row.get("epsilon")
    if eps in ("inf", float("inf")):
        return math.inf
    return float(eps) if isinstance(eps, int | float) else None


def plot_membership_epsilon(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """``membership_epsilon.png``: AUC and TPR@1 % FPR (y) against ε (x, log scale; an
    undefended / noise-free cell, ε = ∞, is drawn at the right edge and labelled "∞"), one
    curve per defense · attack. None when no cell has a membership metric and an ε, or
    matplotlib is missing."""
    pts = [r for r in rows if r.get("auc") is not None and _epsilon(r) is not None]
    if not pts:
        return None
    try:
        import matplotlib  # lazy: keeps matplotlib out of this module's import
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: keeps matplotlib out of this module's import
    finite = [e for r in pts if math.isfinite(e := _epsilon(r) or 0.0) and e > 0]
    right = (max(finite) * 10) if finite else 10.0
    fig, axs = plt.subplots(1, len(KEYS), figsize=(5.5 * len(KEYS), 4.2), squeeze=False)
    curves: dict[str, list[Mapping[str, Any]]] = {}
    for r in pts:
        names = sorted({d.split("(")[0] for d in r.get("defenses") or []}) or ["none"]
        curves.setdefault(f"{'+'.join(names)} · {r['attack']} ({r.get('view')})", []).append(r)
    for ax, key in zip(axs[0], KEYS, strict=True):
        for label, group in curves.items():
            xy = sorted((min(_epsilon(p) or 0.0, right), p[key]) for p in group
                        if p.get(key) is not None)
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=label)
        ax.set_xscale("log")
        ax.axvline(right, color="grey", lw=0.5, ls=":")
        ax.annotate("ε = ∞", (right, 0.02), xycoords=("data", "axes fraction"), fontsize=7)
        if key == "auc":
            ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
        else:
            ax.axhline(0.01, color="grey", ls="--", lw=1, label="chance (= FPR)")
        ax.set_xlabel("ε (log scale)")
        ax.set_ylabel({"auc": "ROC AUC", "tpr_at_fpr_1pct": "TPR at 1 % FPR"}[key])
        ax.set_title(f"membership inference: {ax.get_ylabel()} vs ε")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
