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

Every read stays inside its store and every index row is validated
(:mod:`fl_sim.store_guard`). Only :mod:`fl_sim.run_dir` reads these stores; the peer view is
built from ONE ``peer/c{k}`` directory (see :class:`PeerStore`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file
from torch import Tensor

from fl_sim.errors import RunDirError
from fl_sim.index_cache import cached_index
from fl_sim.records import GroundTruthRecord, TruthStep
from fl_sim.store_guard import check_index_row, is_count, resolve_inside

INDEX = "index.jsonl"


# -- primitives ----------------------------------------------------------------------------
def write_tensors(path: Path, tensors: Mapping[str, Tensor],
                  metadata: Mapping[str, Any] | None = None) -> None:
    """Atomically write ``tensors`` (detached, contiguous CPU copies) + JSON ``metadata``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"json": dumps_strict(dict(metadata or {}))}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        _save_file(data, tmp, meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_file(data: Mapping[str, Tensor], filename: str, meta: dict[str, str]) -> None:
    """One safetensors file, through safetensors' numpy writer where every dtype allows it:
    the same bytes, without the torch writer's per-tensor shared-storage analysis (~1 ms of
    Python per file, most of a tap record's cost). Other dtypes (bfloat16) take the torch
    writer."""
    try:
        arrays = {k: v.numpy() for k, v in data.items()}
    except TypeError:  # a dtype numpy does not have
        save_file(dict(data), filename, metadata=meta)
        return
    save_numpy(arrays, filename, metadata=meta)


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


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN / infinite float (also nested) replaced by None.

    >>> finite_or_none({"loss": float("nan"), "xs": [1.0, float("inf")], "n": 3})
    {'loss': None, 'xs': [1.0, None], 'n': 3}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def dumps_strict(value: Any) -> str:
    """Strict JSON (RFC 8259): non-finite floats are written as ``null``, never ``NaN``.

    >>> dumps_strict({"b": [1.5, float("inf")], "a": 1})
    '{"a": 1, "b": [1.5, null]}'
    """
    try:  # fast path: the taps write a row per record; the rewrite is for non-finite rows
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (ValueError, TypeError):
        return json.dumps(finite_or_none(value), sort_keys=True, allow_nan=False)


def append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    """Append one strict-JSON line with a single ``O_APPEND`` write (atomic between
    processes); NaN / infinity are written as ``null`` (see :func:`dumps_strict`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (dumps_strict(dict(row)) + "\n").encode()
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
    tmp.write_text("".join(dumps_strict(dict(r)) + "\n" for r in rows))
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
                     key: Sequence[str], *, keep: Mapping[str, int] | None = None) -> None:
    """Delete files of rounds > ``after_round`` under ``root/<dir>`` and rewrite the index.

    ``keep`` maps a dir to a later last round kept there (a row counts as in the dir its
    ``file`` starts with)."""
    keep = dict(keep or {})
    for d in dirs:
        base = root / d
        if not base.is_dir():
            continue
        for p in base.iterdir():
            r = _round_of(p.name)
            if p.name.startswith(".tmp-") or (r is not None and r > keep.get(d, after_round)):
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    idx = root / INDEX
    if idx.exists():
        rows = [r for r in read_jsonl(idx) if int(r.get("round", 0)) <= keep.get(
            str(r.get("file", "")).split("/", 1)[0], after_round)]
        rewrite_jsonl(idx, _dedupe(rows, root, key))


class _IndexedStore:
    """A directory of safetensors files listed in one JSONL index (``root/INDEX``).

    ``KEY`` identifies a row (a re-written row replaces the older one), ``FIELD`` is what
    :meth:`entries` filters on (one of ``KINDS``), ``DIRS`` are the per-round
    sub-directories :meth:`truncate` prunes. Rows are validated (:meth:`check_row`) and
    files are read only from inside ``root`` (:func:`resolve_inside`).
    """

    KEY: tuple[str, ...]
    FIELD: str
    KINDS: tuple[str, ...]
    DIRS: tuple[str, ...]
    root: Path

    def entries(self, value: str | None = None) -> list[dict[str, Any]]:
        """Index rows (validated, deduplicated), only those whose ``FIELD`` equals ``value``
        if given. Raises :class:`RunDirError` for a row that fails :meth:`check_row`."""
        rows = cached_index(self.root / INDEX, self._index_rows, tag=type(self).__name__)
        return [r for r in rows if value is None or r[self.FIELD] == value]

    def _index_rows(self, index: Path) -> list[dict[str, Any]]:
        return _dedupe(self.valid_rows(read_jsonl(index)), self.root, self.KEY)

    def valid_rows(self, rows: Iterable[Any]) -> list[dict[str, Any]]:
        """Every row through :meth:`check_row` (the first bad one raises)."""
        return [self.check_row(r) for r in rows]

    def check_row(self, row: Any) -> dict[str, Any]:
        """``row`` if it is one this store could have written (see :func:`check_index_row`)."""
        kind = row.get(self.FIELD) if isinstance(row, dict) else None
        expected = self.expected_files(kind, row.get("round"), row.get("client")) \
            if kind in self.KINDS and is_count(row.get("round")) else None
        if expected is None:
            raise RunDirError(f"{self.root / INDEX}: invalid index row {row!r} ({self.FIELD} "
                              f"must be one of {list(self.KINDS)}, round an int >= 0)")
        return check_index_row(row, expected, self.root / INDEX)

    def expected_files(self, kind: str, server_round: int, client: Any) -> dict[str, str]:
        """The canonical relative file name(s) of a row of ``kind`` (per store)."""
        raise NotImplementedError

    def load(self, rel: str) -> dict[str, Tensor]:
        """The tensors of ``rel``, which must lie inside this store (:func:`resolve_inside`)."""
        return read_tensors(resolve_inside(self.root, rel))[0]

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
    KINDS = ("global", "server_in", "aggregate")
    DIRS = ("globals", "server_in", "aggregate")

    def __init__(self, run_dir: Path | str) -> None:
        self.root = Path(run_dir) / "observations"

    def expected_files(self, kind: str, server_round: int, client: Any) -> dict[str, str]:
        if kind == "global":
            return {"file": self.global_file(server_round)}
        if kind == "aggregate":
            rel = f"aggregate/{_rname(server_round)}.safetensors"
        else:
            c = client if is_count(client) else -1  # a server_in row must name its client
            rel = f"{kind}/{_rname(server_round)}/{_cname(c)}.safetensors"
        return {"file": rel, "global": self.global_file(server_round)}

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
                if f.stem[1:].isdigit():  # only names the store writes (c0002), no strays
                    out.append((r, int(f.stem[1:])))
        return out

    def read(self, run_id: str, server_round: int, client_id: int) -> GroundTruthRecord:
        """The :class:`GroundTruthRecord`; raises RunDirError if none was recorded."""
        p = self.path(server_round, client_id)
        if not p.is_file():
            raise RunDirError(f"no ground truth for round {server_round}, client {client_id} "
                              f"(expected {p})")
        t, meta = read_tensors(resolve_inside(self.root, str(p.relative_to(self.root))))
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
    KINDS = ("global", "update")
    DIRS = ("globals", "updates")

    def __init__(self, run_dir: Path | str, client_id: int) -> None:
        self.client_id = int(client_id)
        self.root = Path(run_dir) / "peer" / f"c{self.client_id}"

    def expected_files(self, kind: str, server_round: int, client: Any) -> dict[str, str]:
        return {"file": f"{kind}s/{_rname(server_round)}.safetensors"}

    def check_row(self, row: Any) -> dict[str, Any]:
        """Also refuses a row that names another client as its owner."""
        row = super().check_row(row)
        if row.get("client") is not None and row["client"] != self.client_id:
            raise RunDirError(f"{self.root / INDEX}: refusing index row {row!r}: this store "
                              f"holds client {self.client_id}'s records only")
        return row

    def write_global(self, server_round: int, state: Mapping[str, Tensor],
                     meta: Mapping[str, Any]) -> None:
        """The global model received at the start of ``server_round`` (+ what came with it).

        Already recorded with the same row (a resume re-runs the round after the last
        finished one, whose global a resume keeps, see :meth:`truncate`): nothing is
        rewritten."""
        rel = f"globals/{_rname(server_round)}.safetensors"
        row = {**dict(meta), "kind": "global", "round": server_round, "file": rel}
        if json.loads(dumps_strict(row)) in self.entries("global"):
            return
        self._write(rel, state, row)

    def write_update(self, server_round: int, update: Mapping[str, Tensor],
                     meta: Mapping[str, Any]) -> None:
        """The peer's own update of ``server_round``."""
        rel = f"updates/{_rname(server_round)}.safetensors"
        row = {**dict(meta), "kind": "update", "round": server_round, "file": rel}
        self._write(rel, update, row)

    def truncate(self, after_round: int) -> None:
        """Drop rounds > ``after_round`` but KEEP the global of round ``after_round + 1``: it
        is the output of the last finished round (a finished run's final model, broadcast to
        the peers), identical to what a re-run would store, and a peer attack on round
        ``after_round`` needs it even when this peer is not sampled, or fails, next round."""
        _truncate_rounds(self.root, after_round, self.DIRS, self.KEY,
                         keep={"globals": after_round + 1})


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
