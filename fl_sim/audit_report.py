"""The "Privacy audit" section of report.html: measured ε beside the ε the accountant claims.

Reads ``audits.jsonl`` (written by :mod:`fl_sim.federation.canaries`) and draws the canary
score distributions (``audit_scores.png``: observed vs unobserved canaries, one panel per
audit). Each row says what the measured number is — an *estimate* (canary_clients, Andrew
et al. 2024) or a *lower bound* at a confidence (canary_examples, Steinke et al. 2023) — and
the claimed ε with its unit of privacy and neighbouring relation.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defenses.accounting import describe_relation
from fl_sim.run_dir.files import load_audits

AUDIT_PLOT = "audit_scores.png"


def plot_audit_scores(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> Path | None:
    """``audit_scores.png``: histograms of observed vs unobserved canary scores."""
    rows = [r for r in rows if r.get("observed_scores") and r.get("unobserved_scores")]
    if not rows:
        return None
    import matplotlib  # lazy: matplotlib is heavy; only the audit plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib (as above)

    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3))
    for ax, r in zip(np.atleast_1d(axes), rows, strict=True):
        obs = np.asarray(r["observed_scores"], float)
        unobs = np.asarray(r["unobserved_scores"], float)
        bins = np.histogram_bin_edges(np.concatenate([obs, unobs]), bins=30)
        ax.hist(unobs, bins=bins, alpha=0.6, density=True, label="never inserted")
        ax.hist(obs, bins=bins, alpha=0.6, density=True, label="inserted (population)")
        ax.set_xlabel(f"cosine ({r.get('view', '')})")
        ax.set_title(f"{r.get('name', '?')} [{r.get('audit_index', '')}]")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(run_dir) / AUDIT_PLOT
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _eps(v: Any, infinite: bool = False) -> str:
    if infinite:
        return "∞"
    return "—" if v is None else f"{float(v):.3g}"


def audit_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """One table row per audit: measured and claimed ε side by side, with their meaning."""
    out = []
    for r in rows:
        kind = r.get("kind", "estimate")
        measured = _eps(r.get("epsilon"), bool(r.get("epsilon_infinite")))
        what = ("estimate (Gaussian fit)" if kind == "estimate" else
                f"lower bound, {float(r.get('confidence', 0.95)):.0%} confidence")
        claimed = r.get("claimed_epsilon")
        rel = (describe_relation(str(r["claimed_unit"]), str(r["claimed_neighbouring"]))
               if r.get("claimed_unit") and r.get("claimed_neighbouring") else "")
        out.append({
            "audit": str(r.get("name", "?")), "unit": str(r.get("unit", "?")),
            "view": str(r.get("view", "?")), "δ": f"{r.get('delta')}",
            "measured ε": measured, "measured is": what,
            "claimed ε": "no DP claim" if r.get("claimed_by") is None else _eps(claimed),
            "claimed by": str(r.get("claimed_by") or "—"), "neighbouring": rel or "—",
            "canaries": str(r.get("num_canaries", "?")),
            "note": str(r.get("error", ""))})
    return out


def audit_section(run_dir: Path) -> str:
    """The report's "Privacy audit" section (``""`` for a run without audits)."""
    rows = load_audits(run_dir)
    if not rows:
        return ""
    table = audit_rows(rows)
    cols = list(table[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(t[c])}</td>" for c in cols) + "</tr>"
                   for t in table)
    parts = ["<div class='sec'><h2>Privacy audit</h2>",
             "<p>Measured ε from canaries in this run beside the ε the accountant claims. "
             "An estimate can fall on either side of the truth by its sampling error; a "
             "lower bound above the claim means a bug in the defense or its accounting.</p>",
             f"<table><tr>{head}</tr>{body}</table>"]
    plot = plot_audit_scores(run_dir, rows)
    if plot is not None:
        data = base64.b64encode(plot.read_bytes()).decode()
        parts.append(f'<img alt="canary score distributions" '
                     f'src="data:image/png;base64,{data}">')
    parts.append("</div>")
    return "".join(parts)
