"""How ``fl-sim bench`` outputs show values: ε without noise, a perfect reconstruction, a
point's label (swept values and ε) and an embedded PNG. Shared by
:mod:`fl_sim.bench.outputs` (CSV, markdown) and :mod:`fl_sim.bench.html` (report.html).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from defenses.base import format_defense

#: ε of a mechanism without noise (null in metrics.jsonl), kept as text in JSON and CSV
INF = "inf"
#: a +inf metric (a perfect reconstruction's PSNR) in results.csv / .md / report.html
EXACT = "exact (∞)"


def point_label(row: Mapping[str, Any], axes: Sequence[str]) -> str:
    """A point's annotation: the swept federation values (strength) and ε."""
    parts = [_axis_value(a, row["axes"][a]) for a in axes
             if not a.startswith("attack.") and a in row.get("axes", {})]
    eps = row.get("epsilon")
    if eps is not None:
        parts.append("ε=∞" if eps == INF else f"ε={float(eps):.3g}")
    return ", ".join(parts)

def _axis_value(axis: str, v: Any) -> str:
    """``noise_multiplier=0.1``; a whole ``defenses`` list as ``pruning(ratio=0.9)``."""
    if isinstance(v, list) and all(isinstance(d, Mapping) for d in v):
        return "; ".join(format_defense(d) for d in v) or "no defense"
    return f"{axis.split('.')[-1]}={v}"

def img_tag(path: Path, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a data URI (or a 'missing' note)."""
    if not path.is_file():
        return f"<p><em>missing image {html.escape(path.name)}</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
