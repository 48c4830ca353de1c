"""What ``fl-sim`` writes to the terminal: a progress bar, the results table, the summary.

Only the command line (:mod:`fl_sim.cli`) uses this module; the library logs and never prints.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fl_sim.threat_class import class_of_row

logger = logging.getLogger("fl_sim")


class Progress:
    """A rich progress bar fed by ``run_experiment``'s ``progress(event: dict)`` callback."""

    def __init__(self, *, enabled: bool, total: int, label: str = "rounds",
                 key: str = "round") -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total
        self.label, self.key = label, key
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            # lazy: keeps rich out of this module's import
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[info]}"), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, info="")
        return self

    def update(self, event: dict[str, Any]) -> None:
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in event.items()
                        if k not in {self.key, "event", "total", "client_errors"})
        if self._bar is not None:
            if self.key in event:
                self._bar.update(self._task, completed=event[self.key], info=info)
            else:
                self._bar.update(self._task, info=info)
        else:
            logger.info("%s %s/%s %s", self.key, event.get(self.key, "?"), self.total, info)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def print_results(results: Sequence[dict[str, Any]]) -> None:
    """The results table: PSNR ``exact (∞)`` for a perfect reconstruction, ``failed`` for an
    attack that raised, ``-`` where there is no value; a view fallback (SecAgg+: the server's
    attack ran on the aggregate) is written in the view column; ``threat`` is the SoK attacker
    class A-E (:mod:`fl_sim.threat_class`) -- the vantage point is the view column."""
    from rich.console import Console  # lazy: rich only where a table is printed
    from rich.table import Table  # lazy: rich (as above)

    # lazy: report loads torch; the CLI starts without it
    # lazy: keeps torch out of this module's import
    from fl_sim.report import metric_value, view_text
    if not results:
        return
    table = Table(title="attack results", header_style="bold")
    for col in ("attack", "view", "threat", "round", "client", "PSNR dB", "SSIM", "label acc",
                "AUC", "TPR@1%", "s"):  # AUC / TPR at 1 % FPR: membership inference
        table.add_column(col)
    for r in results:
        name = r["attack"] + (" (adaptive)" if r.get("adaptive") else "")
        threat = "-" if "error" in r else class_of_row(r)["class"]
        table.add_row(name, view_text(r), threat, str(r["round"]), str(r.get("client")),
                      _fmt(metric_value(r, "psnr")), _fmt(metric_value(r, "ssim"), 3),
                      _fmt(metric_value(r, "label_accuracy"), 2),
                      _fmt(metric_value(r, "auc"), 3), _fmt(metric_value(r, "tpr_at_fpr_1pct"), 3),
                      _fmt(r.get("seconds"), 1))
    Console(width=120).print(table)


def _fmt(v: Any, nd: int = 2) -> str:
    if isinstance(v, str):  # "exact (∞)", "failed"
        return v
    return "-" if v is None else f"{v:.{nd}f}"


def print_summary(run_dir: Path) -> None:
    # lazy: report and the run_dir package load torch; the CLI starts without it
    from fl_sim.report import write_report  # lazy: keeps torch out of this module's import
    from fl_sim.run_dir.files import load_results  # lazy: (as above)
    print_results(load_results(run_dir))
    report = write_report(run_dir)
    sys.stdout.write(f"run directory: {run_dir}\n")
    sys.stdout.write(f"{report}\n")
