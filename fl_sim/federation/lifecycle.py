"""Process lifecycle of a run: Ray started by the driver, interrupts that end the process.

What went wrong before (ray 2.55, flwr 1.42, measured): Ctrl-C printed the resume hint and
then hung forever, because ``run_simulation`` runs the ServerApp in a NON-daemon thread that
waits up to an hour for replies that never come once Ray is gone; SIGTERM hit Ray's C++
failure handler (installed by ``ray.init``) and aborted with a stack dump; after SIGKILL of the
driver, Ray's dashboard and runtime-env agents lived on.

* :func:`ray_session` starts Ray itself, in the main thread, BEFORE ``run_simulation`` (Flower
  then reuses it): the driver is the parent of ``gcs_server`` / ``raylet`` (the kernel kills
  them with the driver), a :mod:`~fl_sim.federation.watchdog` process kills the rest if the
  driver is SIGKILLed, and the SIGINT / SIGTERM handlers in force before ``ray.init`` are put
  back afterwards (Ray must not take over the process's signals). On any exception — an
  interrupt included — it shuts Ray down within :data:`SHUTDOWN_S` and kills what Ray left.
* :func:`exit_on_interrupt` (the CLI's policy) makes SIGINT and SIGTERM raise
  :class:`RunInterrupted` once in the main thread, so the run unwinds through Ray's shutdown,
  and arms a timer that ends the process with :func:`hard_exit` if unwinding takes longer
  than ``hard_exit_s``. The CLI ends with ``os._exit`` too: the stranded ServerApp thread
  must not keep the process alive. Exit status 128 + signal number (130 SIGINT, 143 SIGTERM).

* :class:`StoppableGrid` lets the ServerApp thread stop waiting as soon as the driver
  unwinds (``ServerSetup.stop``), so an in-process caller's interrupt ends that thread too.

The run directory stays resumable whatever point the interrupt hits: every store write is
atomic and a resume discards the unfinished round (:mod:`fl_sim.federation.resume`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from fl_sim.errors import FlSimError
from fl_sim.federation.processes import PROC, _signal, _stat, descendants

logger = logging.getLogger(__name__)

#: Seconds ``ray.shutdown`` may take on an interrupt before its leftovers are killed.
SHUTDOWN_S = 4.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the driver; ``exit_code`` is 128 + the signal number.

    A ``KeyboardInterrupt`` so that it unwinds through Flower's ``except Exception`` blocks.
    ``run_dir`` is set by the simulation driver once the run directory is known.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = int(signum)
        self.run_dir: Path | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state: dict[str, Any] = {"interrupted": None, "baseline": set()}


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state["interrupted"] is not None:
        return  # already unwinding: a second Ctrl-C must not abort the clean-up half-way
    _state["interrupted"] = signum
    # Ray's workers are re-parented once the raylet stops: remember them while we can.
    _state["seen"] = set(descendants(os.getpid()))
    # The Ctrl-C also reached Ray's workers (same process group): Flower's worker threads
    # then log "actor died" tracebacks while we stop. Those are the interrupt, not a fault.
    for name in ("flwr", "ray"):
        logging.getLogger(name).disabled = True
    hard_exit_s = _state.get("hard_exit_s")
    if hard_exit_s is not None:
        timer = threading.Timer(hard_exit_s, hard_exit, args=(128 + signum,))
        timer.daemon = True
        timer.start()
    raise RunInterrupted(signum)


def exit_on_interrupt(*, hard_exit_s: float | None = 8.0) -> None:
    """Install the interrupt policy (main thread only): SIGINT / SIGTERM raise
    :class:`RunInterrupted` once; after ``hard_exit_s`` seconds :func:`hard_exit` ends the
    process whatever the clean-up is doing (None: never)."""
    _state.update(interrupted=None, hard_exit_s=hard_exit_s, installed=True,
                  baseline=set(descendants(os.getpid())))
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def hard_exit(code: int) -> None:
    """Kill the processes this driver started since :func:`exit_on_interrupt` (Ray's, the
    watchdog's) and leave NOW with ``code``: no interpreter shutdown, which would wait for
    Flower's stranded ServerApp thread forever."""
    kill_new_descendants(_state["baseline"], also=_state.get("seen", set()))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not stop the exit
            pass
    os._exit(code)


def kill_new_descendants(baseline: set[tuple[int, int]], *,
                         also: set[tuple[int, int]] | None = None) -> None:
    """SIGKILL every live descendant of this process, and every live ``also`` process, that
    is not in ``baseline`` (``(pid, start time)`` pairs: a recycled pid is never hit)."""
    for pid, start in set(descendants(os.getpid())) | set(also or ()):
        if (pid, start) not in baseline:
            _signal(pid, start, signal.SIGKILL)


def _start_watchdog() -> subprocess.Popen[bytes] | None:
    st = _stat(os.getpid())
    if not PROC.is_dir() or st is None:
        return None
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "fl_sim.federation.watchdog", str(os.getpid()), str(st[1])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, cwd=str(Path(__file__).resolve().parents[2]))
    except OSError as exc:
        logger.warning("no Ray watchdog (%s); after a SIGKILL Ray helpers may outlive the run",
                       exc)
        return None


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ray_init(init_args: Mapping[str, Any]) -> None:
    """``ray.init`` as Flower's RayBackend would call it (same runtime env), keeping the
    process's own SIGINT / SIGTERM handlers."""
    import ray  # lazy: keeps ray out of this module's import
    if ray.is_initialized():
        return
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    args = {"include_dashboard": False, "logging_level": logging.WARNING, **init_args}
    try:
        with warnings.catch_warnings():  # Ray's FutureWarning about accelerator env vars
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **args)
    finally:  # (an earlier ray.init, e.g. probing a cluster, may have replaced ours too)
        for sig, handler in saved.items():
            if _state.get("installed"):
                signal.signal(sig, _handler)
            elif handler is not None:
                signal.signal(sig, handler)


def _shutdown_ray(timeout_s: float) -> None:
    import ray  # lazy: keeps ray out of this module's import
    t = threading.Thread(target=ray.shutdown, daemon=True, name="fl-sim-ray-shutdown")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        logger.warning("ray.shutdown() took over %.0f s; killing Ray's processes", timeout_s)


@contextmanager
def ray_session(init_args: Mapping[str, Any]) -> Iterator[None]:
    """Ray for one run (see the module doc); a no-op wrapper outside the main thread.

    Joining an existing cluster (``address`` in ``init_args``) starts no watchdog and kills
    nothing: those processes are the cluster's, not this run's."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    local = not init_args.get("address")
    baseline = set(descendants(os.getpid()))
    watchdog = _start_watchdog() if local else None
    if watchdog is not None:
        baseline.add((watchdog.pid, (_stat(watchdog.pid) or (0, 0))[1]))
    try:
        _ray_init(init_args)
        yield
    except BaseException:
        seen = set(descendants(os.getpid()))  # before the raylet's children are re-parented
        _shutdown_ray(SHUTDOWN_S)
        if local:
            kill_new_descendants(baseline, also=seen)
        raise
    finally:
        _stop(watchdog)


class RunStopped(FlSimError):
    """The driver stopped the run (an interrupt or an error) while the server waited."""


def poll_wait(interval: float, pending: int) -> float:
    """Seconds between two pulls while ``pending`` replies are awaited: ``interval`` up to
    1,000 pending, then proportionally longer (at most 1 s). Each pull checks every pending
    id, so node discovery of 10,000 nodes would otherwise spend its GIL re-checking 10,000
    ids ten times a second; a round's 100 sampled clients keep the 0.1 s latency.

    >>> poll_wait(0.1, 100), poll_wait(0.1, 5_000), poll_wait(0.1, 100_000)
    (0.1, 0.5, 1.0)
    """
    return min(max(interval, 1.0), interval * max(1.0, pending / 1_000))


class StoppableGrid:
    """A Flower Grid whose ``send_and_receive`` ends as soon as ``stop`` is set.

    ``run_simulation`` runs the ServerApp in a non-daemon thread; when the driver unwinds
    (Ctrl-C in a notebook, an error), that thread would otherwise wait up to the round
    timeout for replies that never come, keep the process alive, and then carry on writing
    rounds nobody trained. Same push / pull / poll loop as Flower's, every
    ``pull_interval`` (0.1 s; longer with thousands pending, :func:`poll_wait`); everything
    else delegates to the wrapped grid.
    """

    def __init__(self, grid: Any, stop: threading.Event) -> None:
        self._grid = grid
        self._stop = stop

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        ids = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        out: list[Any] = []
        interval = float(getattr(self._grid, "pull_interval", 0.1))
        while ids and (end is None or time.monotonic() < end):
            if self._stop.is_set():
                raise RunStopped("the run was stopped while the server waited for replies")
            got = list(self._grid.pull_messages(ids))
            out.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if ids:
                self._stop.wait(poll_wait(interval, len(ids)))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
