"""The run directory must be the SAME directory on every node: checked before round 1.

Clients write their ground truth (``truth/``) and, for curious peers, their peer records
(``peer/c{k}/``) straight into the run directory, by its absolute path. On one machine that
always holds. On a multi-node Ray cluster (``--ray-address``) every node must see the run
directory at the same path on a shared file system (NFS, a cluster file system, a bind mount);
otherwise a client on another node would silently create a private copy of the path on its
own disk and the driver would never see those records.

So the server writes a marker with a fresh random token into the run directory
(:func:`write_probe`) and sends the path and token with the node-discovery query; every client
checks that it reads that token at that path (:func:`check_probe`) and otherwise fails the
discovery, which ends the run with one line naming the node and the path -- before any
training.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_sim.errors import FlSimError
from fl_sim.federation.protocol import RUN_DIR_KEY

MARKER = ".fl-sim-reachable"
TOKEN_KEY = "fl-sim-run-dir-token"


def write_probe(run_dir: Path) -> dict[str, str]:
    """Write a fresh token into ``run_dir/MARKER``; returns what the query carries."""
    token = secrets.token_hex(16)
    tmp = run_dir / f".tmp-{MARKER}"
    tmp.write_text(token)
    os.replace(tmp, run_dir / MARKER)
    return {RUN_DIR_KEY: str(run_dir), TOKEN_KEY: token}


def check_probe(probe: Mapping[str, Any], *, where: str) -> None:
    """Raise :class:`~fl_sim.errors.FlSimError` unless this process reads the probe's token in
    the probe's run directory (a probe without a token is not checked)."""
    if TOKEN_KEY not in probe:
        return
    run_dir = Path(str(probe[RUN_DIR_KEY]))
    try:
        seen = (run_dir / MARKER).read_text()
    except OSError:
        seen = None
    if seen != probe[TOKEN_KEY]:
        state = "has no marker" if seen is None else "holds another run's marker"
        raise FlSimError(f"run directory {run_dir} is not reachable from {where} (it "
                         f"{state} there): clients write ground truth and peer records into "
                         "it, so every Ray node must see it at the same path on a shared "
                         "file system")
