"""Per-round hooks of the server loop: what fl-sim does around Flower's training rounds.

The ServerApp (:func:`fl_sim.federation.server_app.run_server`) owns the round loop (Flower's
``Strategy.start`` split open so that a run can resume) and calls, in list order, the hooks
the run built and passed in (:attr:`~fl_sim.federation.server_app.ServerSetup.hooks`):
``on_run_start`` once the global model (or the checkpoint) is loaded, ``on_round_start`` and
``on_round_end`` around each round, ``on_run_end`` after the final model is written. As
Flower's Strategy exposes a few hooks over a loop it owns, a hook here is a small class with
no-op defaults; it reads and extends one mutable :class:`RoundContext`.

The built-in hooks (:func:`default_hooks`, in this order): :class:`AuditHook` (canary
clients' per-round cosines, audit scores at the end), :class:`MetricsHook` (centralised
evaluation, diffusion sample grids, the ``metrics.jsonl`` line), :class:`AttackHook` (online
attacks on the round's records, attacks on the final model), :class:`CheckpointHook`,
:class:`ProgressHook` (the caller's progress callback). The observation records are not a
hook: the taps sit in Flower's message path as the outermost strategy wrapper
(:class:`~fl_sim.federation.taps.TapStrategy`) and flush before ``on_round_end``, so every
hook sees the round's records on disk.

Deviation from the loop before the hooks: at the end of a run the audits are scored before
the final-model attacks (was after). Neither reads the other's output or a global random
state, so the files written are the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fl_sim.attack_runner import run_final_attacks, run_round_attacks
from fl_sim.config import ExperimentConfig
from fl_sim.federation.canaries import audit_state, finish_audits, start_audits
from fl_sim.federation.canary_data import score_and_write
from fl_sim.federation.checkpoint import CheckpointStore
from fl_sim.federation.taps import TapStrategy, arrays_to_tensors, tensors_to_arrays
from fl_sim.run_dir.files import METRICS_FILE
from fl_sim.run_dir.images import round_samples_path
from fl_sim.samples import SamplingEMA, save_sample_grid
from fl_sim.seeding import torch_generator
from fl_sim.stores import append_jsonl

logger = logging.getLogger(__name__)

#: Test-set examples the server evaluates the global model on after every round.
MAX_EVAL_EXAMPLES = 1000

Progress = Callable[[dict[str, Any]], None]


@dataclass
class RoundContext:
    """What the hooks of one run share: the run's fixed parts, then the current round.

    ``strategy`` is the wrapped strategy (central DP included) whose state is checkpointed;
    ``arrays`` is the global model (the initial or resumed one, then the new global after
    each round); ``row`` the round's ``metrics.jsonl`` row, which hooks may extend before
    :class:`MetricsHook` writes it; ``round_started`` the round's ``time.perf_counter()``."""

    cfg: ExperimentConfig
    run_dir: Path
    task: Any
    splits: Any
    tap: TapStrategy
    strategy: Strategy
    start_round: int
    arrays: ArrayRecord
    #: θ_0, the model before round 1 (also when resuming)
    initial: dict[str, torch.Tensor]
    #: the ``extra`` of the checkpoint a resumed run continues from (empty for a fresh run)
    resumed: dict[str, Any] = field(default_factory=dict)
    #: what hooks add to every checkpoint's ``extra`` (read back as ``resumed``)
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)
    server_round: int = 0
    row: dict[str, Any] = field(default_factory=dict)
    round_started: float = 0.0

    def global_tensors(self) -> dict[str, torch.Tensor]:
        """The global model as a state dict of CPU tensors."""
        return arrays_to_tensors(self.arrays)


class RoundHook:
    """Base of a per-round hook: override what you need (every method is a no-op)."""

    def on_run_start(self, ctx: RoundContext) -> None:
        """Once, before the first round to run (after a resume: the first round not done)."""

    def on_round_start(self, ctx: RoundContext) -> None:
        """Before round ``ctx.server_round`` is sent to the clients."""

    def on_round_end(self, ctx: RoundContext) -> None:
        """After round ``ctx.server_round`` is aggregated and its records are on disk."""

    def on_run_end(self, ctx: RoundContext) -> None:
        """After the last round; the final model is written and sent to the peers."""


class AuditHook(RoundHook):
    """``[[audits]]``: canary clients hooked into the tap (their state resumed from and
    written into every checkpoint), scored with the canary examples at the end."""

    def __init__(self) -> None:
        self.audits: list[Any] = []

    def on_run_start(self, ctx: RoundContext) -> None:
        self.audits = start_audits(ctx.cfg, ctx.run_dir, ctx.initial, ctx.tap,
                                   ctx.resumed.get("audits", {}))

    def on_round_end(self, ctx: RoundContext) -> None:
        for audit in self.audits:
            audit.after_round(ctx.server_round, ctx.global_tensors())
        ctx.checkpoint_extra["audits"] = audit_state(self.audits)

    def on_run_end(self, ctx: RoundContext) -> None:
        final = ctx.global_tensors()
        finish_audits(self.audits, ctx.cfg, final)
        score_and_write(ctx.cfg, ctx.task, final, ctx.run_dir)


class MetricsHook(RoundHook):
    """Held-out metrics of each new global, DDIM sample grids (diffusion), and the round's
    ``metrics.jsonl`` line (``seconds``: the round up to this hook)."""

    def __init__(self) -> None:
        self.test: tuple[Any, Any] = ((), ())
        self.ema: SamplingEMA | None = None

    def on_run_start(self, ctx: RoundContext) -> None:
        test = ctx.splits.test
        self.test = (test.images[:MAX_EVAL_EXAMPLES], test.labels[:MAX_EVAL_EXAMPLES])
        if ctx.cfg.samples.ema and getattr(ctx.task, "name", "") == "diffusion":
            self.ema = SamplingEMA(ctx.cfg.samples.ema)
            if ctx.start_round and not self.ema.load(ema_path(ctx.run_dir), ctx.start_round):
                logger.warning("samples.ema: no saved average of round %d; the average "
                               "restarts at round %d's global", ctx.start_round,
                               ctx.start_round + 1)

    def on_round_end(self, ctx: RoundContext) -> None:
        ctx.row.update(central_eval(ctx.task, ctx.arrays, self.test, ctx.cfg.run.seed,
                                    ctx.server_round))
        arrays = ctx.arrays
        if self.ema is not None:
            arrays = tensors_to_arrays(self.ema.update(ctx.server_round, ctx.global_tensors()))
            self.ema.save(ema_path(ctx.run_dir))
            if sample_round(ctx.cfg, ctx.server_round):
                ema_eval = central_eval(ctx.task, arrays, self.test, ctx.cfg.run.seed,
                                        ctx.server_round)
                ctx.row.update({f"{k}_ema": v for k, v in ema_eval.items()})
        round_samples(ctx.task, arrays, ctx.cfg, ctx.run_dir, ctx.server_round)
        ctx.row["seconds"] = round(time.perf_counter() - ctx.round_started, 4)
        append_jsonl(ctx.run_dir / METRICS_FILE, ctx.row)


class AttackHook(RoundHook):
    """``[[attacks]]`` online: each round's records as soon as they are on disk, then the
    attacks on the final model (:mod:`fl_sim.attack_runner`)."""

    def on_round_end(self, ctx: RoundContext) -> None:
        run_round_attacks(ctx.run_dir, ctx.cfg, ctx.server_round)

    def on_run_end(self, ctx: RoundContext) -> None:
        run_final_attacks(ctx.run_dir, ctx.cfg)


class CheckpointHook(RoundHook):
    """The global model, the strategy's state, what the tap published and the hooks'
    ``checkpoint_extra`` after every round (where a resume starts)."""

    def on_round_end(self, ctx: RoundContext) -> None:
        CheckpointStore(ctx.run_dir).save(ctx.server_round, ctx.global_tensors(), ctx.strategy,
                                          {"published": ctx.tap.published,
                                           **ctx.checkpoint_extra})


class ProgressHook(RoundHook):
    """Calls ``progress({"event": "round", **row})`` after every round."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def on_round_end(self, ctx: RoundContext) -> None:
        self.progress({"event": "round", **ctx.row})


def default_hooks(cfg: ExperimentConfig, progress: Progress | None = None) -> list[RoundHook]:
    """The hooks of a run of ``cfg``, in the order they run (see the module doc)."""
    hooks: list[RoundHook] = []
    if cfg.audits:
        hooks.append(AuditHook())
    hooks.append(MetricsHook())
    if cfg.attacks:
        hooks.append(AttackHook())
    hooks.append(CheckpointHook())
    if progress is not None:
        hooks.append(ProgressHook(progress))
    return hooks


def call_hooks(hooks: Sequence[RoundHook], event: str, ctx: RoundContext) -> None:
    """Call ``hook.<event>(ctx)`` on every hook, in order."""
    for hook in hooks:
        getattr(hook, event)(ctx)


# -- what MetricsHook computes -----------------------------------------------------------------
def central_eval(task: Any, arrays: ArrayRecord, test: tuple[Any, Any], seed: int,
                 r: int) -> dict[str, float]:
    """Held-out metrics of the new global (diffusion: the loss with the same eps/t every
    round, so the curve shows the model, not the noise draw)."""
    if len(test[1]) == 0:
        return {}
    task.model.load_state_dict(arrays_to_tensors(arrays), strict=True)
    gen = torch_generator(seed, "server_eval")
    with torch.no_grad():
        metrics = task.evaluate(test[0], test[1], generator=gen)
    return {f"eval_{k}": float(v) for k, v in metrics.items()}


def sample_round(cfg: ExperimentConfig, r: int) -> bool:
    """Whether round ``r`` gets a sample grid (every ``samples.every`` rounds and the last)."""
    s = cfg.samples
    return s.num_images > 0 and (r % s.every == 0 or r == cfg.federation.num_rounds)


def ema_path(run_dir: Path) -> Path:
    """``RUN_DIR/samples/ema.safetensors``: the ``[samples] ema`` average after the last round."""
    return round_samples_path(run_dir, 0).with_name("ema.safetensors")


def round_samples(task: Any, arrays: ArrayRecord, cfg: ExperimentConfig, run_dir: Path,
                  r: int) -> None:
    """Diffusion tasks: DDIM samples of round ``r``'s global (or of its ``[samples] ema``
    average, which the caller passes as ``arrays``) in ``samples/r{r:04d}.png``."""
    s = cfg.samples
    if getattr(task, "name", "") != "diffusion" or not sample_round(cfg, r):
        return
    task.model.load_state_dict(arrays_to_tensors(arrays), strict=True)
    save_sample_grid(task, round_samples_path(run_dir, r), num_images=s.num_images,
                     num_steps=s.num_inference_steps, seed=cfg.run.seed)
