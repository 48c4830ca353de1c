"""What ``fl-sim run --resume RUN_DIR`` may do with a run directory, decided before Ray starts.

A resume continues after the last CHECKPOINTED round (``checkpoint/state.json``): the rounds
``1..done`` are finished and nothing that belongs to them is rewritten or deleted; records of
the unfinished round ``done + 1`` are discarded and that round runs again (bit-identical:
every random number derives from ``(seed, round, client)``).

``federation.num_rounds`` on resume may only move the end FORWARD from what is done:

* ``num_rounds < done`` is refused (one line, exit 2). Shrinking a run would have to delete
  finished rounds' records (metrics rows, observations, ground truth, peer globals) and label
  the last global with a round it is not; a run directory must never say two things at once.
  Copy the run directory first, or start a new run, to study fewer rounds.
* ``num_rounds == done`` on a COMPLETE run is a no-op that touches nothing on disk;
  on an interrupted run it only finishes (final model, peer broadcast, final attacks).
* ``num_rounds > done`` continues (an interrupted run) or extends (a finished run); the
  resolved ``config.json`` is rewritten with the new count when the run really starts.

Any other change of the experiment is refused by the simulation driver (the saved config must
match except ``num_rounds``, the Ray address and client resources).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_sim.config import ExperimentConfig
from fl_sim.errors import RunDirError

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
STATE_FILE = Path("checkpoint") / "state.json"


@dataclass(frozen=True)
class ResumePlan:
    """``done``: rounds finished (checkpointed); ``num_rounds``: where the run will end;
    ``complete``: the run already ended there (nothing to do)."""

    run_dir: Path
    done: int
    saved_rounds: int
    num_rounds: int
    complete: bool

    @property
    def nothing_to_do(self) -> bool:
        return self.complete and self.num_rounds == self.done


def rounds_done(run_dir: Path) -> int:
    """The last checkpointed round of ``run_dir`` (0 if none); RunDirError if unreadable."""
    p = Path(run_dir) / STATE_FILE
    if not p.is_file():
        return 0
    try:
        return int(json.loads(p.read_text())["round"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RunDirError(f"corrupt checkpoint {p}: {type(exc).__name__}: {exc}") from None


def plan_resume(cfg: ExperimentConfig, run_dir: Path | str) -> ResumePlan:
    """Decide what resuming ``run_dir`` with ``cfg`` means (see the module doc).

    Raises :class:`~fl_sim.errors.RunDirError` (one line) for a directory that holds no run
    or a round count below the rounds already done.
    """
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise RunDirError(f"resume: {run_dir} is not a run directory (no config.json)")
    try:
        saved = json.loads(cfg_file.read_text())
        saved_rounds = int(saved["federation"]["num_rounds"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RunDirError(f"resume: corrupt {cfg_file}: {type(exc).__name__}: {exc}") from None
    done = rounds_done(run_dir)
    n = cfg.federation.num_rounds
    if n < done:
        raise RunDirError(
            f"resume: federation.num_rounds = {n} is below the {done} rounds already done in "
            f"{run_dir}; a resume only continues or extends a run (num_rounds >= {done})")
    try:
        status = json.loads((run_dir / RUN_FILE).read_text()).get("status")
    except (OSError, json.JSONDecodeError, AttributeError):
        status = None
    complete = status == "complete" and done == saved_rounds
    return ResumePlan(run_dir=run_dir, done=done, saved_rounds=saved_rounds, num_rounds=n,
                      complete=complete)


def remove_partial_files(run_dir: Path | str) -> list[Path]:
    """Delete every ``.tmp-*`` file under ``run_dir`` (what a killed atomic write leaves);
    returns them. Called when a resume really starts, never on a no-op."""
    gone = []
    for p in sorted(Path(run_dir).rglob(".tmp-*")):
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            gone.append(p)
    if gone:
        logger.info("resume: removed %d partial file(s) of an interrupted write", len(gone))
    return gone


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (sorted keys, final newline) through a temporary file
    and ``os.replace``: a reader or a kill sees the old file or the new one, never a torn
    one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
