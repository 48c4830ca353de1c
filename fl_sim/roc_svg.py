"""A ROC curve as inline SVG for report.html (a leaf module: no fl_sim imports)."""

from __future__ import annotations

import html as _html
import math
from typing import Any


def roc_svg(fpr: Any, tpr: Any, *, title: str = "ROC", size: int = 260) -> str:
    """A self-contained inline SVG of a ROC curve on log-log axes (the field's convention
    for low-FPR performance, Carlini et al. 2022), with the chance diagonal. Axes run from
    ``1 / (number of FPR steps)`` (at least 1e-4) to 1; zeros are drawn on the lower edge."""
    f = [float(v) for v in fpr]
    t = [float(v) for v in tpr]
    positive = [v for v in f + t if v > 0]
    lo = max(min(positive, default=1e-4), 1e-4) if positive else 1e-4
    lo = 10 ** math.floor(math.log10(lo))
    pad, span = 34, size - 44

    def xy(a: float, b: float) -> str:
        def pos(v: float) -> float:
            return (math.log10(max(v, lo)) - math.log10(lo)) / -math.log10(lo)
        return f"{pad + pos(a) * span:.1f},{size - pad - pos(b) * span + 10:.1f}"

    pts = " ".join(xy(a, b) for a, b in zip(f, t, strict=True))
    ticks = []
    decade = lo
    while decade <= 1.0 + 1e-12:
        x, y = xy(decade, lo).split(",")
        _, y2 = xy(lo, decade).split(",")
        ticks.append(f"<text x='{x}' y='{size - 6}' font-size='8' text-anchor='middle'>"
                     f"{decade:g}</text><text x='2' y='{y2}' font-size='8'>{decade:g}</text>")
        decade *= 10
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{size}' height='{size + 10}' "
            f"role='img' aria-label='{_html.escape(title)}'>"
            f"<text x='{size // 2}' y='10' font-size='10' text-anchor='middle'>"
            f"{_html.escape(title)}</text>"
            f"<polyline points='{xy(lo, lo)} {xy(1, 1)}' fill='none' stroke='#999' "
            f"stroke-dasharray='4 3'/>"
            f"<polyline points='{pts}' fill='none' stroke='#c0392b' stroke-width='1.5'/>"
            f"{''.join(ticks)}<text x='{size // 2}' y='{size + 8}' font-size='8' "
            f"text-anchor='middle'>FPR (log)</text></svg>")
