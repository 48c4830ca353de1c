"""Where a command may write its output: checked before anything is written.

A leaf module (stdlib and fl_sim.errors only) so that every command -- train-prior,
train-identity, bench -- can check its ``--out`` without importing the run pre-flight.
"""

from __future__ import annotations

import os
from pathlib import Path

from fl_sim.errors import RunDirError


def check_output_dir(out: Path, *, what: str, markers: tuple[str, ...], option: str = "--out"
                     ) -> None:
    """``out`` may receive the output of a command that writes ``what``: no file on its way,
    writable, and either new, empty, or the output of an earlier run of the same command
    (it holds one of ``markers``; the command then continues or replaces it).

    Raises a one-line :class:`~fl_sim.errors.RunDirError` otherwise -- before anything is
    written, so a wrong ``--out`` (a file, a run directory, someone's home) is left alone.
    """
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = f"{option} {out}" if p == out else f"{option} {out}: its parent {p}"
                raise RunDirError(f"{where} is a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise RunDirError(f"{option} {out}: cannot write into {p} (permission denied)")
            break
    if not out.is_dir():
        return
    try:
        names = {c.name for c in out.iterdir()}
    except OSError as exc:
        raise RunDirError(f"{option} {out}: unreadable directory ({exc.strerror})") from None
    if names and not names & set(markers):
        kind = " (a run directory)" if "run.json" in names or "config.json" in names else ""
        raise RunDirError(f"{option} {out}: the directory{kind} holds other files and no "
                          f"{what}; choose a new or empty directory")
