"""What keeps a store's reader inside its store: path containment and index-row validation.

Views are the threat model (a curious peer wrote its own ``peer/c{k}`` directory and index),
so :mod:`fl_sim.stores` reads only through :func:`resolve_inside` and accepts only rows that
pass :func:`check_index_row`: integer round/client, a known update kind, finite numbers, and
every path field equal to the one canonical file the store itself writes for that row.
"""

from __future__ import annotations

import math
import stat
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_sim.errors import RunDirError
from fl_sim.records import UpdateKind


def resolve_inside(root: Path, rel: Any) -> Path:
    """``root / rel`` if that path stays inside ``root``, else :class:`RunDirError`.

    ``rel`` must be a relative path without ``..``; after symbolic links are followed the
    file must still lie under ``root`` (whose own last component must not be a link), and a
    regular file there must have exactly one hard link. This is what keeps a view inside its
    store: an index row naming ``../../truth/...``, a symbolic link planted in a peer's
    directory or a hard link to another client's record is refused, not read.
    """
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() \
            or ".." in Path(rel).parts or "\\" in rel:
        raise RunDirError(f"{root}: refusing path {rel!r} (not a plain path inside the store)")
    if root.is_symlink():
        raise RunDirError(f"{root}: refusing a store directory that is a symbolic link")
    real_root = root.parent.resolve() / root.name
    path = root / rel
    if not path.resolve().is_relative_to(real_root):
        raise RunDirError(f"{root}: refusing {rel!r}, which leads outside the store")
    try:
        st = path.stat()
    except OSError:  # not there (yet): the reader's own error names it
        return path
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        # the store writes every file fresh (temporary file + os.replace): one link. A second
        # link means the same bytes also sit elsewhere -- e.g. a peer's "own update" hard-
        # linked to another client's server-side record -- so it is not the file written here
        raise RunDirError(f"{root}: refusing {rel!r}, which has {st.st_nlink} hard links "
                          "(a store writes every record as a file of its own)")
    return path


def is_count(v: Any) -> bool:
    """A non-negative int (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


#: Row fields the views compute with; each must be a finite number when present.
_NUMERIC_FIELDS = ("num_examples", "local_steps", "lr", "batch_size", "aggregated_round",
                   "aggregated_num_examples", "aggregated_num_clients",
                   "num_clients_aggregated")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_index_row(row: Any, expected: Mapping[str, str], where: Path) -> dict[str, Any]:
    """``row`` if its ``round`` (and ``client`` when set) are counts and each path field
    equals the store's canonical file name for that row (``expected``); else RunDirError.

    A row that names any other file -- another round's, another client's, or one outside the
    store -- is refused, so a forged index line cannot make a store serve foreign data.
    """
    if not isinstance(row, dict) or not is_count(row.get("round")):
        raise RunDirError(f"{where}: invalid index row {row!r} (round must be an int >= 0)")
    if row.get("client") is not None and not is_count(row["client"]):
        raise RunDirError(f"{where}: invalid index row {row!r} (client must be an int >= 0)")
    if "update_kind" in row and row["update_kind"] not in typing.get_args(UpdateKind):
        raise RunDirError(f"{where}: invalid index row {row!r} (update_kind must be one of "
                          f"{list(typing.get_args(UpdateKind))})")
    bad = [k for k in _NUMERIC_FIELDS if k in row and not _is_number(row[k])]
    if bad:
        raise RunDirError(f"{where}: invalid index row {row!r} ({', '.join(bad)} must be "
                          "finite numbers)")
    for field, name in expected.items():
        if row.get(field) != name:
            raise RunDirError(f"{where}: refusing index row {row!r}: {field} must be "
                              f"{name!r}")
    return row
