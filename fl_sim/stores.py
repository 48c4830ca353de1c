"""Streaming on-disk stores of a run: observations, ground truth and peer views.

Every tensor payload is one safetensors file (no pickle) written atomically (temporary file +
``os.replace``); every store keeps a JSONL index whose lines are appended with a single
``write`` on an ``O_APPEND`` descriptor, so concurrent writers (Ray actors writing ground
truth) never interleave lines. Readers treat the FILES as the source of truth: an index line
whose file is missing is ignored and duplicates (a round re-run after a resume) are collapsed,
last line wins. Nothing is kept in memory between writes, so memory stays flat in rounds.

Layout under the run directory::

    observations/globals/r0001.safetensors        global model (params + buffers), once a round
    observations/server_in/r0001/c0002.safetensors each update as the server received it
    observations/aggregate/r0001.safetensors      what left aggregation (new global − global)
    observations/index.jsonl
    truth/r0001/c0002.safetensors                 the private batches of one client-round
    truth/index.jsonl
    peer/c0/globals/r0001.safetensors              globals peer 0 received
    peer/c0/updates/r0001.safetensors              peer 0's own update
    peer/c0/index.jsonl

Only :mod:`fl_sim.run_dir` reads these stores; the peer view is built from ONE
``peer/c{k}`` directory (see :class:`PeerStore`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fl_sim.errors import RunDirError
from fl_sim.records import GroundTruthRecord, TruthStep

INDEX = "index.jsonl"


# -- primitives ----------------------------------------------------------------------------
def write_tensors(path: Path, tensors: Mapping[str, Tensor],
                  metadata: Mapping[str, Any] | None = None) -> None:
    """Atomically write ``tensors`` (detached, contiguous CPU copies) + JSON ``metadata``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"json": json.dumps(dict(metadata or {}), sort_keys=True)}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(data, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a file written by :func:`write_tensors`.

    Raises :class:`~fl_sim.errors.RunDirError` if the file is missing or unreadable.
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = json.loads((fh.metadata() or {}).get("json", "{}"))
            return {k: fh.get_tensor(k) for k in fh.keys()}, meta  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise RunDirError(f"cannot read {path}: {exc}") from None


def append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    """Append one JSON line with a single ``O_APPEND`` write (atomic between processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(dict(row), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All parseable JSON lines of ``path`` ([] if absent); torn lines (a crash) skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def rewrite_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Atomically replace ``path`` with ``rows`` (used when truncating after a resume)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(dict(r), sort_keys=True) + "\n" for r in rows))
    os.replace(tmp, path)


def _rname(server_round: int) -> str:
    return f"r{server_round:04d}"


def _cname(client_id: int) -> str:
    return f"c{client_id:04d}"


_ROUND_RE = re.compile(r"^r(\d+)(?:\.safetensors)?$")


def _round_of(name: str) -> int | None:
    m = _ROUND_RE.match(name)
    return int(m.group(1)) if m else None


def _dedupe(rows: Iterable[dict[str, Any]], root: Path, key: Sequence[str]
            ) -> list[dict[str, Any]]:
    """Last line per key whose file exists, in first-seen key order."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        if "file" in row and not (root / row["file"]).is_file():
            continue
        out[tuple(row.get(k) for k in key)] = row
    return list(out.values())


def _truncate_rounds(root: Path, after_round: int, dirs: Sequence[str],
                     key: Sequence[str]) -> None:
    """Delete files of rounds > ``after_round`` under ``root/<dir>`` and rewrite the index."""
    for d in dirs:
        base = root / d
        if not base.is_dir():
            continue
        for p in base.iterdir():
            r = _round_of(p.name)
            if p.name.startswith(".tmp-") or (r is not None and r > after_round):
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    idx = root / INDEX
    if idx.exists():
        rows = [r for r in read_jsonl(idx) if int(r.get("round", 0)) <= after_round]
        rewrite_jsonl(idx, _dedupe(rows, root, key))


class _IndexedStore:
    """A directory of safetensors files listed in one JSONL index (``root/INDEX``).

    ``KEY`` identifies a row (a re-written row replaces the older one), ``FIELD`` is what
    :meth:`entries` filters on, ``DIRS`` are the per-round sub-directories :meth:`truncate`
    prunes.
    """

    KEY: tuple[str, ...]
    FIELD: str
    DIRS: tuple[str, ...]
    root: Path

    def entries(self, value: str | None = None) -> list[dict[str, Any]]:
        """Index rows (deduplicated), only those whose ``FIELD`` equals ``value`` if given."""
        rows = _dedupe(read_jsonl(self.root / INDEX), self.root, self.KEY)
        return [r for r in rows if value is None or r[self.FIELD] == value]

    def load(self, rel: str) -> dict[str, Tensor]:
        return read_tensors(self.root / rel)[0]

    def _write(self, rel: str, tensors: Mapping[str, Tensor], row: Mapping[str, Any]) -> None:
        """The file first, then its index row (a crash in between leaves no dangling row)."""
        write_tensors(self.root / rel, tensors, row)
        append_jsonl(self.root / INDEX, row)

    def truncate(self, after_round: int) -> None:
        """Drop everything recorded for rounds > ``after_round`` (resume)."""
        _truncate_rounds(self.root, after_round, self.DIRS, self.KEY)


# -- observations (written by the server process only) ----------------------------------
class ObservationStore(_IndexedStore):
    """Server-side taps: globals once per round, per-client updates, aggregates.

    :meth:`entries` filters on the tap (``global``, ``server_in``, ``aggregate``).
    """

    KEY = ("tap", "round", "client")
    FIELD = "tap"
    DIRS = ("globals", "server_in", "aggregate")

    def __init__(self, run_dir: Path | str) -> None:
        self.root = Path(run_dir) / "observations"

    def global_file(self, server_round: int) -> str:
        return f"globals/{_rname(server_round)}.safetensors"

    def write_global(self, server_round: int, state: Mapping[str, Tensor]) -> str:
        """Store the global model the round starts from; returns its relative path."""
        rel = self.global_file(server_round)
        write_tensors(self.root / rel, state, {"round": server_round})
        append_jsonl(self.root / INDEX, {"tap": "global", "round": server_round,
                                         "client": None, "file": rel})
        return rel

    def write_update(self, tap: str, server_round: int, client_id: int | None,
                     update: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Store one update (``server_in`` per client, ``aggregate`` with client None)."""
        if tap == "aggregate":
            rel = f"aggregate/{_rname(server_round)}.safetensors"
        else:
            rel = f"{tap}/{_rname(server_round)}/{_cname(int(client_id or 0))}.safetensors"
        row = {**dict(meta), "tap": tap, "round": server_round, "client": client_id,
               "file": rel, "global": self.global_file(server_round)}
        self._write(rel, update, row)


# -- ground truth (written concurrently by clients, one file per (round, client)) --------
class TruthStore:
    """Private batches per (round, client). Read by metrics only, never by an attack."""

    def __init__(self, run_dir: Path | str) -> None:
        self.root = Path(run_dir) / "truth"

    def path(self, server_round: int, client_id: int) -> Path:
        return self.root / _rname(server_round) / f"{_cname(client_id)}.safetensors"

    def write(self, server_round: int, client_id: int, steps: Sequence[TruthStep]) -> None:
        """Store a client-round's steps; images as uint8 when that is lossless."""
        images_u8 = [_as_uint8(s.images) for s in steps]
        lossless = all(u is not None for u in images_u8)
        tensors: dict[str, Tensor] = {}
        aux_keys: list[str] = []
        for i, s in enumerate(steps):
            tensors[f"s{i}.images"] = images_u8[i] if lossless else s.images.float()  # type: ignore[assignment]
            tensors[f"s{i}.labels"] = s.labels
            tensors[f"s{i}.indices"] = s.indices.to(torch.int64)
            for k, v in s.aux.items():
                tensors[f"s{i}.aux.{k}"] = v
                if k not in aux_keys:
                    aux_keys.append(k)
        meta = {"round": server_round, "client": client_id, "num_steps": len(steps),
                "steps": [s.step for s in steps], "images": "uint8" if lossless else "float32",
                "aux": aux_keys}
        write_tensors(self.path(server_round, client_id), tensors, meta)
        append_jsonl(self.root / INDEX, {**meta, "file": str(
            self.path(server_round, client_id).relative_to(self.root))})

    def keys(self) -> list[tuple[int, int]]:
        """All recorded ``(round, client)`` pairs, rebuilt from the files."""
        out = []
        for d in sorted(self.root.glob("r*")):
            r = _round_of(d.name)
            if r is None or not d.is_dir():
                continue
            for f in sorted(d.glob("c*.safetensors")):
                out.append((r, int(f.stem[1:])))
        return out

    def read(self, run_id: str, server_round: int, client_id: int) -> GroundTruthRecord:
        """The :class:`GroundTruthRecord`; raises RunDirError if none was recorded."""
        p = self.path(server_round, client_id)
        if not p.is_file():
            raise RunDirError(f"no ground truth for round {server_round}, client {client_id} "
                              f"(expected {p})")
        t, meta = read_tensors(p)
        steps = []
        for i in range(int(meta["num_steps"])):
            img = t[f"s{i}.images"]
            img = img.float() / 255.0 if meta["images"] == "uint8" else img
            aux = {k: t[f"s{i}.aux.{k}"] for k in meta.get("aux", []) if f"s{i}.aux.{k}" in t}
            steps.append(TruthStep(step=int(meta["steps"][i]), images=img,
                                   labels=t[f"s{i}.labels"], indices=t[f"s{i}.indices"],
                                   aux=aux))
        return GroundTruthRecord(run_id=run_id, server_round=server_round, client_id=client_id,
                                 steps=tuple(steps))

    def truncate(self, after_round: int) -> None:
        _truncate_rounds(self.root, after_round, (".",), ("round", "client"))


def _as_uint8(images: Tensor) -> Tensor | None:
    """``images`` [.., in [0,1]] as uint8 if ``u8 / 255`` reproduces them bitwise, else None."""
    x = images.detach().to("cpu", torch.float32)
    u8 = (x * 255.0).round().clamp(0, 255).to(torch.uint8)
    return u8 if torch.equal(u8.float() / 255.0, x) else None


# -- peer views (written by ONE client into its own directory) ---------------------------
class PeerStore(_IndexedStore):
    """What one curious client ``k`` kept: every global it received and its own updates.

    Lives entirely in ``run_dir/peer/c{k}``; holds no path to any other store.
    :meth:`entries` filters on the kind (``global``, ``update``).
    """

    KEY = ("kind", "round")
    FIELD = "kind"
    DIRS = ("globals", "updates")

    def __init__(self, run_dir: Path | str, client_id: int) -> None:
        self.client_id = int(client_id)
        self.root = Path(run_dir) / "peer" / f"c{self.client_id}"

    def write_global(self, server_round: int, state: Mapping[str, Tensor],
                     meta: Mapping[str, Any]) -> None:
        """The global model received at the start of ``server_round`` (+ what came with it)."""
        rel = f"globals/{_rname(server_round)}.safetensors"
        row = {**dict(meta), "kind": "global", "round": server_round, "file": rel}
        self._write(rel, state, row)

    def write_update(self, server_round: int, update: Mapping[str, Tensor],
                     meta: Mapping[str, Any]) -> None:
        """The peer's own update of ``server_round``."""
        rel = f"updates/{_rname(server_round)}.safetensors"
        row = {**dict(meta), "kind": "update", "round": server_round, "file": rel}
        self._write(rel, update, row)


def truncate_run(run_dir: Path | str, after_round: int) -> None:
    """Discard every record of rounds > ``after_round`` in all stores of ``run_dir``."""
    run_dir = Path(run_dir)
    ObservationStore(run_dir).truncate(after_round)
    TruthStore(run_dir).truncate(after_round)
    peer_root = run_dir / "peer"
    if peer_root.is_dir():
        for d in sorted(peer_root.glob("c*")):
            if d.is_dir() and d.name[1:].isdigit():
                PeerStore(run_dir, int(d.name[1:])).truncate(after_round)
