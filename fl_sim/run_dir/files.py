"""The run directory's JSON files: their names, readers and writers (one owner per kind).

``config.json`` / ``run.json`` (one JSON object each), ``metrics.jsonl`` (one row per round,
written by the server loop), ``attacks.jsonl`` (one row per attack result, written by
:mod:`fl_sim.attack_runner`) and ``audits.jsonl`` (one row per audit, written by
:mod:`fl_sim.federation.canaries`). Report, bench, the CLI and the API read them through
this module only. Importing it imports neither flwr nor ray.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_sim.errors import RunDirError
from fl_sim.stores import append_jsonl, read_jsonl

logger = logging.getLogger(__name__)

#: one attack result per line (the last line written for a result ``key`` wins)
RESULTS_FILE = "attacks.jsonl"
#: one training-metrics row per round (the last line written for a round wins)
METRICS_FILE = "metrics.jsonl"
#: one privacy-audit result per line
AUDITS_FILE = "audits.jsonl"


def require_run_dir(path: Path) -> Path:
    """``path`` if it is a directory holding ``config.json``; else one-line RunDirError."""
    if not path.exists():
        raise RunDirError(f"{path}: no such run directory")
    if not path.is_dir():
        raise RunDirError(f"{path}: not a directory (expected a run directory)")
    if not (path / "config.json").is_file():
        raise RunDirError(f"{path} is not a run directory (no config.json)")
    return path


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`RunDirError` if it is unreadable or not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path}: corrupt ({exc})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: corrupt (a JSON {type(data).__name__}, expected an "
                          "object)")
    return data


def load_results(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``attacks.jsonl``, one per result ``key`` (the last line written for it,
    at the place of the first): a replay that re-ran an attack after an error replaces it."""
    rows: dict[Any, dict[str, Any]] = {}
    for i, r in enumerate(read_jsonl(Path(run_dir) / RESULTS_FILE)):
        if _well_formed_result(r):
            rows[r.get("key") or ("#", i)] = r
        else:
            logger.warning("%s line %d: not a result row; ignored", RESULTS_FILE, i + 1)
    return list(rows.values())


def _well_formed_result(r: Any) -> bool:
    """A JSON object whose sections have the types the report reads."""
    return isinstance(r, dict) and all(
        isinstance(r.get(k, {}), dict) for k in ("metrics", "knowledge", "budget")) and (
        isinstance(r.get("extras") or {}, dict)) and isinstance(r.get("defenses", []), list) \
        and all(isinstance(d, (str, dict)) for d in r.get("defenses", []))


def append_result(run_dir: Path, row: Mapping[str, Any]) -> None:
    """Append one attack result (a JSON-ready dict) to ``attacks.jsonl``."""
    append_jsonl(Path(run_dir) / RESULTS_FILE, row)


def append_metrics(run_dir: Path, row: Mapping[str, Any]) -> None:
    """Append one round's training-metrics row to ``metrics.jsonl``."""
    append_jsonl(Path(run_dir) / METRICS_FILE, row)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """One row per round of ``metrics.jsonl`` (the last line written for it), in round order;
    lines without an integer ``round`` are ignored."""
    rows = {r["round"]: r for r in read_jsonl(Path(run_dir) / METRICS_FILE)
            if isinstance(r, dict) and isinstance(r.get("round"), int)}
    return [rows[k] for k in sorted(rows)]


def append_audit(run_dir: Path, row: Mapping[str, Any]) -> None:
    """Append one audit result row to ``audits.jsonl``."""
    append_jsonl(Path(run_dir) / AUDITS_FILE, row)


def load_audits(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/audits.jsonl`` (``[]`` without one; unreadable lines skipped)."""
    path = Path(run_dir) / AUDITS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
