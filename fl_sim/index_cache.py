"""Parsed store indexes, kept per process until the index file changes.

A view lookup (``ServerView.record``, ``clients``, ``rounds``, a peer record) asks its store
for the index rows; without a cache every lookup re-read and re-parsed the whole JSONL index
and checked every row's file, so looking up all clients of a round cost O(clients²).
:func:`cached_index` rebuilds the rows only when the index's ``(inode, size, mtime)``
changes: an append grows it, a truncation (resume) replaces it with a new file.

The signature is taken BEFORE reading, so a line appended meanwhile makes the next lookup
read again rather than serve stale rows. A data file deleted behind an unchanged index is not
noticed (its row stays until the index changes; loading it then raises ``RunDirError``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: How many indexes one process keeps parsed (one per store: observations, truth, peers).
MAX_INDEXES = 64

Rows = list[dict[str, Any]]
_CACHE: OrderedDict[tuple[str, str], tuple[tuple[int, int, int], Rows]] = OrderedDict()


def index_signature(path: Path) -> tuple[int, int, int] | None:
    """``(inode, size, mtime_ns)`` of ``path``, None if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def cached_index(path: Path, build: Callable[[Path], Rows], *, tag: str = "") -> Rows:
    """``build(path)``, computed once per version of ``path`` (a shallow copy each call;
    the row dicts are shared: do not mutate them). ``tag`` separates builders of one file.

    >>> import tempfile, json
    >>> p = Path(tempfile.mkdtemp()) / "index.jsonl"
    >>> calls = []
    >>> def build(path):
    ...     calls.append(1)
    ...     return [json.loads(x) for x in path.read_text().splitlines()]
    >>> _ = p.write_text('{"round": 1}\\n')
    >>> cached_index(p, build), cached_index(p, build), len(calls)
    ([{'round': 1}], [{'round': 1}], 1)
    >>> with open(p, "a") as fh:
    ...     _ = fh.write('{"round": 2}\\n')
    >>> len(cached_index(p, build)), len(calls)
    (2, 2)
    """
    sig = index_signature(path)
    key = (str(path), tag)
    hit = _CACHE.get(key)
    if sig is not None and hit is not None and hit[0] == sig:
        _CACHE.move_to_end(key)
        return list(hit[1])
    rows = build(path)
    if sig is not None:
        _CACHE[key] = (sig, rows)
        _CACHE.move_to_end(key)
        while len(_CACHE) > MAX_INDEXES:
            _CACHE.popitem(last=False)
    return list(rows)


def clear() -> None:
    """Forget every cached index (tests)."""
    _CACHE.clear()
