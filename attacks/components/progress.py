"""Progress of an attack's optimisation loop, reported to whoever listens (issue 24 item 8).

The loops of the attacks call :func:`report` once per iteration; it costs a context-variable
read when nobody listens (library use, tests). The command line listens through
:func:`reporting` (see :mod:`fl_sim.attack_plan`) and writes a line every few seconds, so a
long attack never runs for minutes without output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["report", "reporting"]

#: ``(phase, done, total)``: ``done`` of ``total`` iterations of ``phase`` are finished
Listener = Callable[[str, int, int], None]

_LISTENER: ContextVar[Listener | None] = ContextVar("attack_progress", default=None)


def report(phase: str, done: int, total: int) -> None:
    """Tell the current listener (if any) that ``done`` of ``total`` iterations of ``phase``
    (e.g. ``"iterations"``, ``"phase 1"``) are finished."""
    listener = _LISTENER.get()
    if listener is not None:
        listener(phase, done, total)


@contextmanager
def reporting(listener: Listener) -> Iterator[None]:
    """Route :func:`report` calls made inside the ``with`` block to ``listener``."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)
