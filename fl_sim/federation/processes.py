"""Start and stop the long-running Flower processes of a loopback deployment (no flwr import).

Flower's SuperLink and SuperNode spawn helpers in NEW sessions (``flower-superexec``, which in
turn starts ``flwr-serverapp`` / ``flwr-clientapp``), so killing a process group is not
enough: :meth:`ManagedProcess.stop` snapshots the whole descendant tree from ``/proc`` BEFORE
signalling, then SIGTERMs the parent, waits, and SIGKILLs whatever of that snapshot is still
alive. Every pid is checked against its start time first, so a recycled pid is never hit.
Without ``/proc`` (macOS) only the process group is signalled.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

PROC = Path("/proc")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> tuple[int, int] | None:
    """``(ppid, start_time)`` of ``pid`` from ``/proc/<pid>/stat``, or None if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> list[tuple[int, int]]:
    """Every live descendant of ``pid`` as ``(pid, start_time)``, parents before children.

    Empty where ``/proc`` does not exist.
    """
    if not PROC.is_dir():
        return []
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append((int(entry.name), st[1]))
    out: list[tuple[int, int]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child[0])
    return out


def _alive(pid: int, start_time: int) -> bool:
    st = _stat(pid)
    if st is None:
        return False
    try:
        state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return st[1] == start_time and state != "Z"


def _signal(pid: int, start_time: int, sig: int) -> None:
    if _alive(pid, start_time):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@dataclass
class ManagedProcess:
    """One child process started by us, its log file and how to stop it (tree included)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, *, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait ``grace_s``, then SIGKILL the process and its descendants.

        Returns the exit code (None if it could not be reaped).
        """
        tree = descendants(self.pid)
        if self.running():
            self.popen.terminate()
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, self.pid)
                self._kill_group()
                self.popen.kill()
                try:
                    self.popen.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    logger.error("%s (pid %d) could not be killed", self.name, self.pid)
        _reap(tree, grace_s=grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.popen.returncode

    def _kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _reap(tree: Sequence[tuple[int, int]], *, grace_s: float) -> None:
    """SIGTERM the still-alive ``(pid, start_time)`` of ``tree``, wait, then SIGKILL them."""
    for p, t in tree:
        _signal(p, t, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p, t) for p, t in tree):
        time.sleep(0.1)
    for p, t in tree:
        _signal(p, t, signal.SIGKILL)
    # SIGKILL is asynchronous: wait (briefly) until the kernel has really ended them.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(_alive(p, t) for p, t in tree):
        time.sleep(0.02)


def start(name: str, argv: Sequence[str], *, log_path: Path, env: Mapping[str, str],
          cwd: Path | None = None) -> ManagedProcess:
    """Start ``argv`` in its own session with stdout+stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    logger.debug("starting %s: %s", name, " ".join(argv))
    try:
        popen = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=dict(env), cwd=cwd,
                                 start_new_session=True)
    except BaseException:
        log.close()
        raise
    return ManagedProcess(name=name, popen=popen, log_path=log_path, _log=log)


def wait_http_ok(url: str, *, timeout_s: float, process: ManagedProcess | None = None,
                 interval_s: float = 0.2) -> bool:
    """Poll ``url`` until it answers 2xx; False on timeout or if ``process`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and not process.running():
            return False
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:  # noqa: S310 (loopback)
                if 200 <= resp.status < 300:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(interval_s)
    return False


def stop_all(processes: Sequence[ManagedProcess], *, grace_s: float = 10.0) -> None:
    """Stop ``processes`` in reverse start order (nodes before the link), never raising."""
    for proc in reversed(processes):
        try:
            proc.stop(grace_s=grace_s)
        except Exception:  # noqa: BLE001 - cleanup must go on for the others
            logger.exception("could not stop %s (pid %d)", proc.name, proc.pid)


def find_pids(*needles: str) -> list[tuple[int, int]]:
    """Processes whose command line contains every one of ``needles`` (``/proc`` only).

    Used to find the detached local SuperLink that ``flwr run`` leaves behind: pass strings
    unique to THIS run (its port), never a bare program name.
    """
    if not needles or not PROC.is_dir():
        return []
    out = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in cmd for n in needles) and (st := _stat(int(entry.name))) is not None:
            out.append((int(entry.name), st[1]))
    return out


def terminate_tree(pid: int, start_time: int, *, grace_s: float = 10.0) -> None:
    """SIGTERM ``pid`` (not our child), wait, then SIGKILL it and its descendants."""
    tree = descendants(pid)
    _reap([(pid, start_time)], grace_s=grace_s)
    _reap(tree, grace_s=grace_s)
