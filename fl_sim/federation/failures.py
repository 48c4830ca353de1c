"""Client failures: quiet (one log line per failed client per round) and counted.

A ClientApp function that raises sends its exception across Ray, where Flower logs it as a
~55-line traceback on stdout AND stderr (1,600 lines for ten injected failures, measured).
:func:`failures_as_replies` turns the exception into an error REPLY instead (Flower's own
``Error`` record, code ``CLIENT_APP_RAISED_EXCEPTION``): its reason is one summary line,
then the traceback. The server counts the client as failed (``clients_failed`` and
``client_errors`` in ``metrics.jsonl``) and :func:`log_failures` logs the summary line as one
warning per client; the tracebacks appear only with debug logging (``fl-sim --debug``).
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message

from fl_sim.errors import RunFailedError
from fl_sim.stores import read_jsonl

logger = logging.getLogger(__name__)

#: Flower's ``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``.
CLIENT_APP_RAISED_EXCEPTION = 2
#: Longest summary line kept in ``metrics.jsonl``.
MAX_SUMMARY = 300

ClientFn = Callable[[Message, Context], Message]


def summary(reason: str | None) -> str:
    """The first line of an error reason, at most :data:`MAX_SUMMARY` characters.

    >>> summary("ValueError: bad\\nTraceback (most recent call last): ...")
    'ValueError: bad'
    """
    first = (reason or "unknown error").strip().splitlines()
    line = first[0] if first else "unknown error"
    return line if len(line) <= MAX_SUMMARY else line[:MAX_SUMMARY - 3] + "..."


def failure_reply(msg: Message, exc: BaseException) -> Message:
    """An error reply to ``msg``: ``"<Type>: <message>"`` on the first line, then the
    traceback."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{text}\n{tb}"),
                   reply_to=msg)


def failures_as_replies(fn: ClientFn) -> ClientFn:
    """Decorate a ClientApp function so that an ``Exception`` becomes an error reply."""

    @functools.wraps(fn)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return fn(msg, context)
        except Exception as exc:  # noqa: BLE001 - every client failure is reported, not raised
            return failure_reply(msg, exc)

    return wrapper


def log_failures(server_round: int, errors: Mapping[int, str | None], *,
                 what: str = "train") -> dict[str, Any]:
    """One warning per failed client (its summary line), the full reason at debug level;
    returns ``{"<client>": summary}`` for ``metrics.jsonl``."""
    out: dict[str, Any] = {}
    for cid in sorted(errors):
        line = summary(errors[cid])
        logger.warning("round %d: client %d failed%s: %s", server_round, cid,
                       "" if what == "train" else f" ({what})", line)
        logger.debug("round %d: client %d: %s", server_round, cid, errors[cid])
        out[str(cid)] = line
    return out


def check_something_aggregated(run_dir: Path, num_rounds: int) -> None:
    """Raise :class:`~fl_sim.errors.RunFailedError` (one line) if no round of ``run_dir``'s
    ``metrics.jsonl`` aggregated a client update: such a run trained nothing, and its final
    model is the initial one."""
    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    if any(row.get("aggregated") for row in rows):
        return
    example = next(((row["round"], c, e) for row in rows
                    for c, e in sorted((row.get("client_errors") or {}).items())), None)
    why = (f"e.g. round {example[0]}, client {example[1]}: {example[2]}" if example
           else "every sampled client failed or sent a rejected (non-finite) update")
    raise RunFailedError(f"no client update was aggregated in any of the {num_rounds} "
                         f"round(s) of {run_dir} ({why})")
