"""Run outputs for people: the training plot and a self-contained ``report.html``.

The report is written from files in the run directory only (``config.json``,
``metrics.jsonl``, ``attacks.jsonl``, the grid PNGs), so it can be re-written at any time
(``fl-sim report RUN_DIR``) and opened anywhere: every image is embedded as a data URI.
The files are named, read and written by :mod:`fl_sim.run_dir.files` and
:mod:`fl_sim.run_dir.images`; this module only consumes them.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defenses import central_dp
from defenses.accounting import describe_relation
from defenses.base import format_defense
from fl_sim.audit_report import audit_section
from fl_sim.bench.labels import img_tag
from fl_sim.errors import RunDirError
from fl_sim.prior_overlap import overlap_warning
from fl_sim.roc_svg import roc_svg
from fl_sim.run_dir.files import load_results, read_json_object, read_metrics, require_run_dir
from fl_sim.run_dir.images import round_sample_files
from fl_sim.store_guard import resolve_inside
from fl_sim.threat_class import class_of_row, threat_class_label


def plot_metrics(run_dir: Path, rows: list[dict[str, Any]] | None = None) -> Path | None:
    """``metrics.png``: training loss and evaluation metric per round (``rows``: as
    :func:`read_metrics`, read from ``run_dir`` when omitted)."""
    rows = read_metrics(run_dir) if rows is None else rows
    if not rows:
        return None
    import matplotlib  # lazy: matplotlib is heavy and only this plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib (as above)

    keys = [k for k in ("train_loss", "eval_accuracy", "eval_loss")
            if any(isinstance(r.get(k), int | float) for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3))
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, keys, strict=False):
        pts = [(r["round"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_xlabel("round")
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _run_img_tag(run_dir: Path, rel: Any, alt: str) -> str:
    """:func:`~fl_sim.bench.labels.img_tag` of a path named in a result row, only if it lies
    inside the run directory (a tampered ``attacks.jsonl`` cannot embed other files into the
    report)."""
    try:
        return img_tag(resolve_inside(run_dir, rel), alt)
    except RunDirError:
        return f"<p><em>refused image path {html.escape(str(rel))}</em></p>"



def _table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in cols)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


#: what a table shows for a metric that is +inf: a perfect reconstruction's PSNR (written as
#: null in strict JSON and named in the result's ``metrics["exact"]``)
EXACT_TEXT = "exact (∞)"
#: what a table shows for a metric of an attack that raised (its row has ``error``)
FAILED_TEXT = "failed"


def metric_value(result: Mapping[str, Any], key: str) -> Any:
    """A result's metric as tables show it: the number; :data:`EXACT_TEXT` where it was +inf
    (listed in ``metrics["exact"]``; rows written before that field: a ``psnr`` with
    ``mse == 0``); :data:`FAILED_TEXT` for an attack that raised; None where the attack has
    no such value (e.g. no images: PSNR is NaN, also null in JSON).

    >>> metric_value({"metrics": {"psnr": None, "mse": 0.0, "exact": ["psnr"]}}, "psnr")
    'exact (∞)'
    >>> metric_value({"error": "ValueError: x"}, "psnr"), metric_value({"metrics": {}}, "psnr")
    ('failed', None)
    """
    if result.get("error"):
        return FAILED_TEXT
    m = result.get("metrics") or {}
    v = m.get(key)
    if key in (m.get("exact") or ()) or v == float("inf") or (
            v is None and key == "psnr" and m.get("mse") == 0):
        return EXACT_TEXT
    return v


def fallback_text(result: Mapping[str, Any]) -> str | None:
    """The view fallback an attack took (``"server→aggregate (secagg_plus)"``), or None."""
    if result.get("view_fallback"):
        return str(result["view_fallback"])
    if result.get("fallback_from"):  # rows written before ``view_fallback``
        return f"{result['fallback_from']}→{result.get('view')}"
    return None


def view_text(result: Mapping[str, Any]) -> str:
    """The view an attack used, with the fallback it took if any:
    ``"aggregate (fallback: server→aggregate (secagg_plus))"``."""
    view, fb = str(result.get("view")), fallback_text(result)
    return f"{view} (fallback: {fb})" if fb else view


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_cell(x)}" for k, x in v.items() if x is not None)
    return "" if v is None else str(v)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:right}th{background:#f3f3f3}h2{border-bottom:1px solid #ddd}
img{image-rendering:pixelated;max-width:100%}pre{background:#f7f7f7;padding:8px;
font-size:12px;overflow:auto}.sec{margin-bottom:2em}.error{color:#a00}"""


def write_report(run_dir: Path) -> Path:
    """(Re)write ``run_dir/report.html``; returns its absolute path.

    Raises :class:`~fl_sim.errors.RunDirError` unless ``run_dir`` is a run directory (a
    directory with a readable ``config.json``, and a readable ``run.json`` when it has one:
    both are written atomically, so a corrupt one was damaged afterwards): nothing is
    written anywhere else.
    """
    run_dir = require_run_dir(Path(run_dir))
    cfg = read_json_object(run_dir / "config.json")
    if (run_dir / "run.json").exists():
        read_json_object(run_dir / "run.json")
    metrics = read_metrics(run_dir)
    results = load_results(run_dir)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fl-sim report: "
             f"{html.escape(run_dir.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>fl-sim run <code>{html.escape(run_dir.name)}</code></h1>"]
    parts.append("<div class='sec'><h2>Configuration</h2>" + _config_summary(cfg)
                 + "<details><summary>resolved config.json</summary><pre>"
                 + html.escape(json.dumps(cfg, indent=2)) + "</pre></details></div>")
    plot = plot_metrics(run_dir, metrics)
    parts.append("<div class='sec'><h2>Training</h2>")
    if plot is not None:
        parts.append(img_tag(plot, "training curves"))
        cols = [c for c in ("round", "train_loss", "eval_accuracy", "eval_loss",
                            "dp_epsilon_round", "dp_epsilon", "clients_sampled",
                            "clients_failed", "clients_rejected", "seconds")
                if any(c in r for r in metrics)]
        parts.append(_table(metrics, cols))
        parts.append(_epsilon_line(metrics))
        if note := central_dp.epsilon_note(metrics):  # whom central DP protects, its ε
            parts.append(f"<p>{html.escape(note)}</p>")
    else:
        parts.append("<p>No training metrics recorded.</p>")
    parts.append(_samples_section(run_dir, cfg))
    parts.append("</div><div class='sec'><h2>Attacks</h2>")
    if not results:
        parts.append("<p>No attack results.</p>")
    else:
        parts.append(_privacy_utility(results, metrics))
    for r in results:
        parts.append(_attack_section(run_dir, r))
    parts.append("</div>" + audit_section(run_dir))  # measured ε beside claimed (audits)
    parts.append("<p><small>Metric convention: images in [0, 1]; reconstructions are "
                 "matched to the private batch by the Hungarian algorithm on MSE, then PSNR "
                 "(dB, per image over all pixels and channels) and SSIM (11×11 Gaussian "
                 "window, σ = 1.5) are averaged over the batch.</small></p></body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts))
    return out.resolve()


#: At most this many per-round sample grids are embedded (evenly spaced, last included).
MAX_SAMPLE_GRIDS = 12


def _epsilon_line(metrics: Sequence[Mapping[str, Any]]) -> str:
    """One line on the client-side DP budget spent (``dp_epsilon*`` columns of
    :mod:`fl_sim.federation.dp_epsilon`), or ``""`` for a run without dp_sgd/local_dp."""
    rows = [r for r in metrics if "dp_epsilon" in r]
    if not rows:
        return ""

    def eps(v: Any) -> str:
        return "∞ (no noise)" if v is None else f"{float(v):.2f}"
    last = rows[-1]
    return (f"<p>Client-side differential privacy (dp_sgd / local_dp): ε spent per round "
            f"≤ {eps(max((r.get('dp_epsilon_round') for r in rows), key=_eps_key))}, cumulative "
            f"ε after round {last['round']} = {eps(last['dp_epsilon'])} (max over clients, at "
            f"each defense's δ; Opacus accountant). {html.escape(_relation_words(last))}</p>")


def _relation_words(row: Mapping[str, Any], prefix: str = "") -> str:
    """"Unit of privacy: client; neighbouring datasets: replace one client's data
    (sensitivity 2C)." from a metrics row's ``dp_unit`` / ``dp_neighbouring`` (or the
    ``central_`` ones); says so where a run recorded before these fields has none."""
    unit, rel = row.get(f"{prefix}dp_unit"), row.get(f"{prefix}dp_neighbouring")
    if not unit or not rel:
        return ("Unit of privacy and neighbouring relation: not recorded (a run from before "
                "fl-sim wrote them; its local_dp ε may be understated by a factor-2 "
                "sensitivity).")
    return (f"Unit of privacy: {unit}; neighbouring datasets: "
            f"{describe_relation(str(unit), str(rel))}.")


def _eps_key(v: Any) -> float:
    return float("inf") if v is None else float(v)


def _samples_section(run_dir: Path, cfg: Mapping[str, Any]) -> str:
    """Diffusion runs: the per-round DDIM sample grids of the global model."""
    files = round_sample_files(run_dir)
    if not files:
        return ""
    if len(files) > MAX_SAMPLE_GRIDS:
        step = (len(files) - 1) / (MAX_SAMPLE_GRIDS - 1)
        files = [files[round(i * step)] for i in range(MAX_SAMPLE_GRIDS)]
    s = cfg.get("samples", {})
    ema = s.get("ema") or 0
    whose = (f"an average of the global models over rounds (samples.ema = "
             f"{html.escape(str(ema))}, DDPM practice)" if ema else "the global model")
    out = [f"<h3>Samples of {whose}</h3>",
           f"<p>DDIM, {html.escape(str(s.get('num_inference_steps', '?')))} steps, the same "
           "noise every round (seeded by run.seed); eval loss above is the held-out "
           "diffusion loss.</p>"]
    for r, f in files:
        out.append(f"<p>round {r}</p>" + img_tag(f, f"samples after round {r}"))
    return "".join(out)


def _config_summary(cfg: Mapping[str, Any]) -> str:
    if not cfg:
        return "<p>No config.json.</p>"
    fed = cfg.get("federation", {})
    rows = [{"section": k, "value": _cell(cfg.get(k))} for k in
            ("run", "data", "partition", "model", "task", "strategy")]
    rows.append({"section": "federation", "value": _cell(
        {k: fed.get(k) for k in ("num_clients", "num_rounds", "fraction_train", "local_steps",
                                 "local_epochs", "batch_size", "lr", "peer_clients")})})
    rows.append({"section": "defenses", "value": ", ".join(
        format_defense({"name": d.get("name", "?"), **(d.get("params") or {})})
        for d in cfg.get("defenses", [])) or "none"})
    return _table(rows, ["section", "value"])


#: The utility of a run: the final global's held-out metric (classifier accuracy, or the
#: diffusion loss of a diffusion task), then the privacy budgets spent, if any.
UTILITY_KEYS = ("eval_accuracy", "eval_loss")
EPSILON_KEYS = ("dp_epsilon", "central_dp_epsilon")
#: what each ε is about (:mod:`defenses.accounting`): shown beside it wherever it is shown
PRIVACY_SEMANTICS_KEYS = {"dp_epsilon": ("dp_unit", "dp_neighbouring"),
                          "central_dp_epsilon": ("central_dp_unit", "central_dp_neighbouring")}


def utility(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The last round's utility metric and cumulative ε values (``{}`` if none recorded).

    >>> utility([{"round": 1, "eval_accuracy": 0.2}, {"round": 2, "eval_accuracy": 0.5,
    ...          "dp_epsilon": 3.1}])
    {'eval_accuracy': 0.5, 'dp_epsilon': 3.1}
    """
    last = metrics[-1] if metrics else {}
    key = next((k for k in UTILITY_KEYS if last.get(k) is not None), None)
    out = {key: last[key]} if key else {}
    for k in EPSILON_KEYS:
        if k in last:
            out[k] = last[k]
            out.update({f: last[f] for f in PRIVACY_SEMANTICS_KEYS[k] if f in last})
    return out


def _privacy_utility(results: Sequence[Mapping[str, Any]],
                     metrics: Sequence[Mapping[str, Any]]) -> str:
    """One row per attack: what it recovered beside the run's final utility and ε, so the
    price of the defenses in force is visible next to what they buy."""
    util = utility(metrics)
    varying = varying_params(results)
    rows = []
    for r in results:
        m = r.get("metrics") or {}
        rows.append({"attack": f"{r.get('attack')}{' (adaptive)' if r.get('adaptive') else ''}",
                     "view": view_text(r),
                     # the SoK attacker class (fl_sim.threat_class) and the vantage point
                     "threat": "" if r.get("error") else threat_class_label(r),
                     "round": r.get("round"), "client": r.get("client"),
                     # the parameters that tell this result from another of the same attack
                     "params": ", ".join(f"{k}={(r.get('params') or {}).get(k)}"
                                         for k in varying.get(r.get("attack"), ())),
                     "defenses": ", ".join(format_defense(d) for d in r.get("defenses", []))
                     or "none", "psnr": metric_value(r, "psnr"),
                     # the PSNR of the attack's random start: the floor a defense pushes to
                     "start_psnr": metric_value(r, "start_psnr"), "ssim": m.get("ssim"),
                     "label_accuracy": m.get("label_accuracy"),
                     # identity metric (fl_sim/identity.py), where the truth is one identity
                     **{k: m.get(k) for k in _IDENTITY_COLS},
                     "error": "failed" if r.get("error") else "", **util})
    cols = ["attack", "view", "threat", "round", "client", "params", "defenses", "psnr",
            "start_psnr", "ssim",
            "label_accuracy", *_IDENTITY_COLS, *util, "error"]
    cols = [c for c in cols if any(row.get(c) not in (None, "") for row in rows)]
    return ("<h3>Privacy and utility</h3><p>Each attack's result beside the final global "
            "model's utility and the privacy budget spent (last round).</p>"
            + _table(rows, cols))


def varying_params(results: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Per attack name, the parameters whose value differs between its results (in the
    order of the first result): what the privacy table shows so that two results of one
    attack never read identically.

    >>> varying_params([{"attack": "ig", "params": {"lr": 0.1, "restarts": 1}},
    ...                 {"attack": "ig", "params": {"lr": 0.1, "restarts": 4}},
    ...                 {"attack": "dlg", "params": {"lr": 1.0}}])
    {'ig': ['restarts']}
    """
    by_attack: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        by_attack.setdefault(str(r.get("attack")), []).append(r.get("params") or {})
    out: dict[str, list[str]] = {}
    for name, params in by_attack.items():
        keys = list(dict.fromkeys(k for p in params for k in p))
        diff = [k for k in keys if len({repr(p.get(k)) for p in params}) > 1]
        if diff:
            out[name] = diff
    return out


#: identity-metric columns (``[metrics] identity_model``), shown where a result has them
_IDENTITY_COLS = ("identity_top1", "identity_correct", "sim_own", "sim_others")


def _attack_section(run_dir: Path, r: Mapping[str, Any]) -> str:
    title = (f"{r.get('attack')}{' (adaptive)' if r.get('adaptive') else ''} — "
             f"{r.get('view')} view, round {r.get('round')}, client {r.get('client')}")
    summary = {k: metric_value(r, k) for k in ("psnr", "start_psnr", "ssim", "mse",
                                               "label_accuracy", "lpips", *_IDENTITY_COLS,
                                               "before_psnr", "before_ssim", "phase1_psnr",
                                               "phase1_ssim",
                                               # membership / property inference (issue 22)
                                               "auc", "tpr_at_fpr_10pct", "tpr_at_fpr_1pct",
                                               "tpr_at_fpr_0.1pct", "tpr_at_fpr_0",
                                               "balanced_accuracy")}
    summary = {k: v for k, v in summary.items() if v is not None}
    summary["seconds"] = r.get("seconds")
    out = [f"<h3>{html.escape(title)}</h3>"]
    if fb := fallback_text(r):  # never a silent change of view
        out.append(f"<p class='error'><strong>View fallback: {html.escape(fb)}</strong> — "
                   "the attack asked for one client's update, but under secure aggregation "
                   "the server holds only the aggregate: this result is an attack on the "
                   "sum of the round's updates, not on one client's.</p>")
    if overlap := r.get("prior_overlap"):  # measured by the scorer (fl_sim.prior_overlap)
        if warn := overlap_warning(overlap):
            out.append(f"<p class='error'><strong>{html.escape(warn)}</strong></p>")
        else:
            source = html.escape(str(overlap.get("source")))
            out.append(f"<p>Prior overlap with the attacked images: {overlap['count']} of "
                       f"{overlap['victims']} (content hashes, {source}).</p>")
    if r.get("error"):  # the attack raised: say so, with its error text
        out.append("<p class='error'><strong>This attack failed:</strong></p><pre>"
                   + html.escape(str(r["error"])) + "</pre>")
        return "".join(out)
    if r.get("grid"):
        middle = r.get("grid_plain")  # the extras key of the plain row (runner), if any
        out.append("<p>top: private images · " + (
            f"middle: plain reconstructions ({html.escape(str(middle))}) · bottom: with the "
            "prior (matched, same columns)</p>" if middle else
            "bottom: reconstructions (matched)</p>"))
        out.append(_run_img_tag(run_dir, r["grid"], title))
    out.append(_table([summary], list(summary)))
    m = r.get("metrics") or {}
    if m.get("roc_fpr") and m.get("roc_tpr"):  # membership inference: log-scale ROC curve
        out.append(roc_svg(m["roc_fpr"], m["roc_tpr"], title=f"{r.get('attack')} ROC "
                           f"(AUC {m.get('auc', float('nan')):.3f}; log-log)"))
    out.append(_threat_paragraph(r))
    out.append(_table([{"assumed knowledge": _cell(r.get("knowledge", {})),
                        "budget": _cell(r.get("budget", {})),
                        "defenses": ", ".join(format_defense(d) for d in r.get(
                            "defenses", [])) or "none",
                        # adaptive attacks (attacks/adaptive.py): what they modelled
                        "adapted to": "; ".join(r.get("adapted_to") or [])
                        or ("nothing" if r.get("adaptive") else "not adaptive")}],
                      ["assumed knowledge", "budget", "defenses", "adapted to"]))
    if note := central_dp.report_note(r.get("defenses"), str(r.get("view"))):
        out.append(f"<p><em>{html.escape(note)}</em></p>")
    out += _extras_figures(run_dir, r.get("extras") or {})
    return "".join(out)


def _threat_paragraph(r: Mapping[str, Any]) -> str:
    """The result's attacker class in the SoK's vocabulary, with the reasons it was derived
    from (:mod:`fl_sim.threat_class`) and the vantage point beside it."""
    tc = class_of_row(r)
    why = "; ".join(html.escape(str(x)) for x in tc["reasons"])
    return (f"<p><strong>Attacker class {html.escape(tc['class'])}</strong> "
            f"({html.escape(tc['name'])}; Carletti et al., SoK: Gradient Inversion Attacks in "
            f"FL, 2025), vantage point: {html.escape(tc['vantage'])}. Derived from: {why}.</p>")


def _extras_figures(run_dir: Path, extras: Mapping[str, Any]) -> list[str]:
    """Image-like extras the runner saved as PNG (e.g. a phase-1 reconstruction)."""
    return [f"<p>extras: {html.escape(key)}</p>" + _run_img_tag(run_dir, v["png"], key)
            for key, v in extras.items() if isinstance(v, Mapping) and v.get("png")]
