"""The bench's self-contained ``report.html``: what was swept, the table, the
privacy–utility plot and every cell's image grid (or its error text), images as data URIs."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_sim.bench.grid import Plan
from fl_sim.bench.labels import img_tag, point_label

_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:right}th{background:#f3f3f3}h2{border-bottom:1px solid #ddd}
img{image-rendering:pixelated;max-width:100%}pre{background:#f7f7f7;padding:8px;
font-size:12px;overflow:auto}.error{color:#a00}.cell{margin-bottom:1.5em}
.wrap{overflow-x:auto}"""


def _table(records: Sequence[Mapping[str, Any]], cols: Sequence[str], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>"
                                    for c in cols) + "</tr>" for r in records)
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


def _description(plan: Plan) -> str:
    base = plan.simulations[0].config if plan.simulations else None
    parts = [f"<p>{len(plan.simulations)} simulation(s), {len(plan.cells)} attack cell(s). "
             "Each simulation is recorded once; every attack cell replays its recorded "
             "observations (fl-sim's attack runner).</p>"]
    if plan.axes:
        parts.append(_table([{"axis": k, "values": json.dumps(v)} for k, v in
                             plan.axes.items()], ["axis", "values"], "axes"))
    if base is not None:
        fed = base.federation
        parts.append(f"<p>Base experiment: data {html.escape(base.data.name)}, model "
                     f"{html.escape(base.model.name)}, task {html.escape(base.task.name)}, "
                     f"strategy {html.escape(base.strategy.name)}, {fed.num_clients} "
                     f"clients, {fed.num_rounds} rounds, batch size {fed.batch_size}, "
                     f"seed {base.run.seed}.</p>")
    if plan.source.is_file():
        parts.append("<details><summary>grid file</summary><pre>"
                     + html.escape(plan.source.read_text()) + "</pre></details>")
    return "".join(parts)


def write_html(plan: Plan, bench_dir: Path, rows: Sequence[Mapping[str, Any]],
               records: Sequence[Mapping[str, Any]], cols: Sequence[str],
               plot: Path | None) -> Path:
    """Write ``bench_dir/report.html`` and return its path."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fl-sim bench: "
             f"{html.escape(plan.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>fl-sim bench <code>{html.escape(plan.name)}</code></h1>",
             "<h2>Experiment</h2>", _description(plan), "<h2>Privacy–utility</h2>"]
    if plot is not None:
        parts.append("<p>Attack metrics (higher = more leakage; the shaded band: the "
                     "attack's random start) and the federation's utility (final evaluation "
                     "accuracy, or held-out diffusion loss) in separate panels against ε "
                     "(log scale; no DP at the right edge) or, in a grid without ε, the "
                     "swept values; one line per defense · attack (legend).</p>"
                     + img_tag(plot, "privacy-utility plot"))
    else:
        parts.append("<p>No plot (matplotlib missing or no cell with both an attack metric "
                     "and a utility).</p>")
    mia = Path(bench_dir) / "membership_epsilon.png"  # membership inference (issue 22)
    if mia.is_file() and any(r.get("auc") is not None for r in rows):
        parts += ["<h2>Membership inference against ε</h2>",
                  "<p>ROC AUC and TPR at 1 % FPR of each membership attack against the "
                  "cell's ε (log scale; ∞ = no noise, at the right edge).</p>",
                  img_tag(mia, "membership inference against epsilon")]
    audit = Path(bench_dir) / "audit_epsilon.png"  # privacy audits (issue 21)
    if audit.is_file():
        parts += ["<h2>Privacy audit: measured against claimed ε</h2>",
                  "<p>ε measured by each simulation's audits (estimate or lower bound) "
                  "against the accountant's claimed ε, log axes, the line y = x; runs without "
                  "a DP claim at the right edge (numbers: audits.csv).</p>",
                  img_tag(audit, "measured against claimed epsilon")]
    parts += ["<h2>Results</h2>", f"<p>{len(rows)} of {len(plan.cells)} cells done.</p>",
              "<div class='wrap'>" + _table(records, cols, "results") + "</div>",
              "<h2>Cells</h2>"]
    for r in rows:
        sok = f", class {r['threat_class']}" if r.get("threat_class") else ""
        title = (f"{r['attack']} ({r.get('view')}{sok}) round {r.get('round')} — "
                 f"{point_label(r, plan.axis_names) or 'base'}; defenses: "
                 f"{'; '.join(r.get('defenses') or []) or 'none'}")
        parts.append(f"<div class='cell'><h3>{html.escape(title)}</h3>")
        if r.get("error"):
            parts.append("<p class='error'><strong>This cell failed:</strong></p><pre>"
                         + html.escape(str(r["error"])) + "</pre>")
        elif r.get("grid"):
            parts.append("<p>top: private images · bottom: reconstructions (matched)</p>"
                         + img_tag(Path(bench_dir) / r["grid"], title))
        parts.append("</div>")
    parts.append("</body></html>")
    out = Path(bench_dir) / "report.html"
    out.write_text("\n".join(parts))
    return out
