"""Outlive the driver by a moment: kill the Ray helpers it started if it dies without stopping them.

Ray shares the fate of the processes a driver starts directly (``gcs_server``, ``raylet``: the
kernel SIGKILLs them when the driver dies, ``PR_SET_PDEATHSIG``), but not of what the raylet
starts in turn: after ``kill -9`` of the driver, ``ray::DashboardAgent`` and
``ray::RuntimeEnvAgent`` were still running minutes later (ray 2.55, measured; Ray's own
reports: ray-project/ray#2005, #39092). This watchdog,
started by :func:`fl_sim.federation.lifecycle.ray_session` in its own session (so a Ctrl-C to
the terminal's process group does not stop it first), polls the driver every
:data:`POLL_S` seconds, remembers every process that became the driver's descendant after the
watchdog started (``(pid, start time)``, so a recycled pid is never hit), and when the driver is
gone SIGKILLs those that are still alive, then exits. The driver ends it with SIGTERM when
the session ends, which kills the same leftovers (Ray has been shut down by then). No flwr or
ray import: it starts in a fraction of a second.

Run as ``python -m fl_sim.federation.watchdog DRIVER_PID DRIVER_START_TIME``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence

from fl_sim.federation.processes import _alive, _signal, _stat, descendants

#: Seconds between two looks at the driver and its process tree.
POLL_S = 0.25


class _Stop(Exception):
    """SIGTERM from the driver: the session ended."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def watch(driver_pid: int, driver_start: int, *, poll_s: float = POLL_S) -> int:
    """Block until the driver dies (or SIGTERM ends the session), then SIGKILL the
    remembered descendants still alive; returns how many.

    Processes that were already the driver's descendants when the watch began (e.g. other
    children of a test runner) are never touched. At the end of a session Ray has been shut
    down, so whatever of the session is still alive then is a leftover as well.
    """
    me = os.getpid()
    before = set(descendants(driver_pid))
    known: dict[int, int] = {}
    try:
        while _alive(driver_pid, driver_start):
            for pid, start in descendants(driver_pid):
                if pid != me and (pid, start) not in before:
                    known[pid] = start
            time.sleep(poll_s)
    except _Stop:
        pass
    alive = [(p, t) for p, t in known.items() if _alive(p, t)]
    for p, t in alive:
        _signal(p, t, signal.SIGKILL)
    return len(alive)


def main(argv: Sequence[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the terminal is the driver's
    signal.signal(signal.SIGTERM, _raise_stop)
    pid = int(argv[0])
    start = int(argv[1]) if len(argv) > 1 else (_stat(pid) or (0, 0))[1]
    watch(pid, start)
    return 0


if __name__ == "__main__":  # pragma: no cover - a separate process
    sys.exit(main(sys.argv[1:]))
