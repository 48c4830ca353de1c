"""An attack's plan before it starts, and its progress while it runs (issue 24 item 8).

Before an attack computes anything, :func:`plan_attack` states what it will do: the images
it reconstructs, the local steps it unrolls, its iterations and restarts, a rough time and a
rough peak memory, and, when the plan is big, the cheaper choices. The time and memory come
from a cost model calibrated by a probe of a few milliseconds (:func:`probe`): a forward +
backward and one gradient-matching evaluation (double back-propagation to the images) of the
record's model on at most 4 random images, each the fastest of :data:`PROBE_REPEATS`
repetitions, and the bytes autograd saves per image (counted with
:func:`torch.autograd.graph.saved_tensors_hooks`). Nothing of the attack's size is
allocated, so a plan that would exhaust memory is printed before it does.

Cost model (one iteration, per surviving restart): the matching objective runs the client's
``S`` unrolled steps of ``batch`` images (or one gradient of ``N`` images), each costing the
probe's matching evaluation scaled by images; a diffusion prior's sampler adds ``K``
(``sampler_steps``) forward + backward passes per image; DLG's budget is its L-BFGS steps x
``inner_iterations``. Peak memory: the graph of the objective holds ~:data:`GRAPH_COPIES`
times the saved activations of all its images. The time is a range (``~2-7 min``): low = the
machine to ourselves (the probe's fastest repetition), high = low x the load per CPU (a run
of minutes gets its share of a loaded machine; a probe of milliseconds does not show it);
``AttackPlan.seconds`` is their geometric mean. It counts the matching term only: a learned
image prior loaded from disk is not probed.

Estimate / measured time (``benchmarks/plan_estimate.py --repeats 2 --baseline-commit
1466b4b``, 2026-12-07, CPU, 2 cores, shared and loaded: load average 9-11, niced, 2 torch
threads; the baseline is this module before the range, planned at the same moment):

=================  ==================  ===========================  ==============
case               before (point)      after: point [low, high]     measured
=================  ==================  ===========================  ==============
ig_lenet_fedavg    1.33, 0.46          0.42 [0.19, 0.90],           20.9 s, 22.1 s
                                       0.71 [0.31, 1.63]
gidm_tiny          1.08, 1.05          1.44 [0.64, 3.24],           187 s, 177 s
                                       1.68 [0.71, 3.97]
dlg_lenet          0.04, 0.001         0.11 [0.05, 0.26],           25.1 s, 21.9 s
                                       0.27 [0.11, 0.65]
=================  ==================  ===========================  ==============

Earlier runs of the same cases under load 10-14 gave before-ratios of 0.03-1.34 (the
two-run probe caught loaded or idle moments), and the probe's fastest time itself varied up
to 16x between runs of the same case: a probe of milliseconds cannot calibrate better than
that on a machine this loaded. The range holds the measured time in 3 of these 6 runs (IG
once, gidm twice); DLG stays under-estimated (its strong-Wolfe line search makes more than
one evaluation per L-BFGS iteration, which the plan does not model). Once a run has started,
the progress lines' "~X left in this phase", from the run's own pace, are the better figure.

:func:`progress_lines` is the listener the runner installs around the attack (:func:`announced`):
a log line (the CLI log, on stdout) at the first iteration of each phase and then every
``every`` seconds; when one iteration takes longer, a "still computing" line every ``6 x
every`` seconds (a heartbeat thread), so a long attack is never silent for minutes.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from fl_sim.records import ObservationRecord

__all__ = ["AttackPlan", "Probe", "plan_attack", "progress_lines"]

logger = logging.getLogger(__name__)

#: forward + backward passes per image of one double-back-propagated objective evaluation
DOUBLE_BACKWARD = 3.0
#: copies of the saved activations alive at the objective's peak (forward, create_graph
#: backward, and the backward through both)
GRAPH_COPIES = 3.0
#: a plan above either threshold is "big": the cheaper choices are printed with it
BIG_SECONDS, BIG_BYTES = 120.0, 2 * 1024 ** 3
#: timed repetitions of the probe's forward + backward (after one warm-up)
PROBE_REPEATS = 3


@dataclass(frozen=True)
class AttackPlan:
    """What one attack on one record will do. ``seconds`` / ``peak_bytes``: estimates."""

    attack: str
    images: int
    unrolled_steps: int
    batch_size: int
    iterations: int
    restarts: int
    sampler_steps: int
    seconds: float
    peak_bytes: float
    cheaper: list[str] = field(default_factory=list)
    #: ``(low, high)``: the machine to ourselves / sharing it as loaded as at the probe
    seconds_range: tuple[float, float] | None = None

    @property
    def big(self) -> bool:
        return self.seconds > BIG_SECONDS or self.peak_bytes > BIG_BYTES

    def _time(self) -> str:
        low, high = self.seconds_range or (self.seconds, self.seconds)
        if _duration(low) == _duration(high):
            return f"~{_duration(high)}"
        a, b = _duration(low).split(" "), _duration(high).split(" ")
        return f"~{a[0]}-{' '.join(b)}" if a[1] == b[1] else f"~{_duration(low)}-{' '.join(b)}"

    def lines(self) -> list[str]:
        """The plan in words, one line each (the first is the summary)."""
        steps = (f"{self.unrolled_steps} unrolled local steps of {self.batch_size}"
                 if self.unrolled_steps > 1 else "1 gradient step")
        head = (f"plan: {self.attack}: {self.images} images, {steps}, {self.iterations} "
                f"iterations x {self.restarts} restart(s)"
                + (f", sampler {self.sampler_steps} steps" if self.sampler_steps else "")
                + f": {self._time()}, peak ~{self.peak_bytes / 1024 ** 3:.1f} GB "
                  "(rough estimate)")
        if not self.big:
            return [head]
        return [head, "plan is big; cheaper: " + "; ".join(self.cheaper)]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _iterations(attack: Any) -> int:
    """The attack's optimisation budget per restart, as its parameters name it."""
    for name in ("iterations", "max_iterations"):
        value = getattr(attack, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            # DLG: each of its max_iterations L-BFGS steps makes up to inner_iterations
            inner = getattr(attack, "inner_iterations", 1)
            return value * (inner if isinstance(inner, int) and inner > 0 else 1)
    return sum(int(v) for k, v in vars(attack).items()
               if k.endswith("_iterations") and isinstance(v, int))


def _mean_alive(attack: Any, restarts: int, iterations: int) -> float:
    """Mean number of restarts optimised per iteration (successive halving prunes them)."""
    if restarts <= 1 or iterations <= 0 or getattr(attack, "restart_pruning", None) != "halving":
        return float(max(restarts, 1))
    from attacks.components.restarts import pruning_schedule  # lazy: attacks import fl_sim
    alive, total, last = restarts, 0.0, 0
    for it, size in pruning_schedule(restarts, iterations):
        total += alive * (it + 1 - last)
        alive, last = size, it + 1
    return (total + alive * (iterations - last)) / iterations


@dataclass(frozen=True)
class Probe:
    """Timings of a record's task loss on ``images`` random images, each the fastest of
    :data:`PROBE_REPEATS` repetitions (the one least slowed by other processes):
    ``seconds``, one forward + backward; ``matching_seconds``, one evaluation of a gradient
    matching objective as the attacks run it (the parameter gradient with ``create_graph``,
    its squared norm back-propagated to the images: double back-propagation with the same
    functional overheads); ``saved_bytes``, what autograd kept in the forward.
    ``contention``: how much slower a run that lasts minutes is expected to be, sharing the
    machine at its current load (1-minute load average per CPU, at least 1): a probe of
    milliseconds gets a CPU at once even on a loaded machine, a long run only its share."""

    images: int
    seconds: float
    matching_seconds: float
    saved_bytes: float
    contention: float


def _contention() -> float:
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return 1.0
    return max(1.0, load / max(1, os.cpu_count() or 1))


def probe(record: ObservationRecord, images: int = 4) -> Probe:
    """Time the record's task loss on ``images`` random images (CPU, no attack state):
    forward + backward and one matching evaluation (:class:`Probe`), each
    :data:`PROBE_REPEATS` times after a warm-up. A task whose loss has no double backward
    gets ``DOUBLE_BACKWARD`` x the forward + backward for the matching time."""
    task = record.spec.build_task()
    params = {k: v.detach().requires_grad_(True) for k, v in task.model.named_parameters()}
    buffers = dict(task.model.named_buffers())
    gen = torch.Generator().manual_seed(0)
    shape = (images, record.spec.in_channels, record.spec.image_size, record.spec.image_size)
    from fl_sim.tasks.base import Batch  # lazy: the tasks import the models
    x = torch.rand(shape, generator=gen).requires_grad_(True)
    batch = Batch(x, torch.zeros(images, dtype=torch.int64))
    aux = task.sample_aux(batch, gen) if hasattr(task, "sample_aux") else {}
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    def plain() -> None:
        saved[0] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = task.loss(params, buffers, batch, aux)
        torch.autograd.grad(loss, list(params.values()), allow_unused=True)

    def matching() -> None:
        loss = task.loss(params, buffers, batch, aux)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True,
                                    allow_unused=True)
        torch.autograd.grad(sum((g * g).sum() for g in grads if g is not None), [x])

    seconds = _fastest(plain)
    bytes_saved = float(saved[0])
    try:
        matching_seconds = _fastest(matching)
    except RuntimeError:  # no double backward through this model here
        matching_seconds = DOUBLE_BACKWARD * seconds
    return Probe(images, seconds, matching_seconds, bytes_saved, _contention())


def _fastest(fn: Callable[[], None]) -> float:
    """Wall seconds of the fastest of :data:`PROBE_REPEATS` calls of ``fn`` after a warm-up."""
    times = []
    for _ in range(1 + PROBE_REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def plan_attack(name: str, attack: Any, record: ObservationRecord) -> AttackPlan:
    """The plan of ``attack`` (registered as ``name``) on ``record``; probes the model."""
    n = int(record.num_examples)
    unrolled = record.update_kind == "delta" and record.local_steps > 1
    steps = int(record.local_steps) if unrolled else 1
    batch = int(record.batch_size) if unrolled else n
    per_eval = steps * batch if unrolled else n
    iterations, restarts = _iterations(attack), int(getattr(attack, "restarts", 1) or 1)
    k = int(getattr(attack, "sampler_steps", 0) or 0)
    pr = probe(record, images=max(1, min(4, batch)))
    # a pass of `batch` images: the probe's pass scaled by images (its fixed cost is paid
    # once per unrolled step, not once per image)
    scale = max(1.0, batch / pr.images)
    bytes_img = pr.saved_bytes / pr.images
    alive = _mean_alive(attack, restarts, iterations)
    per_it = steps * pr.matching_seconds * scale + k * pr.seconds * scale * n / batch
    params_bytes = sum(v.numel() * v.element_size() for v in record.global_params.values())
    peak = GRAPH_COPIES * bytes_img * per_eval * restarts + (4 + 2 * steps) * params_bytes
    knob = next((k for k in ("max_iterations", "iterations", "phase1_iterations")
                 if k in inspect.signature(type(attack)).parameters), "max_iterations")
    cheaper = [f"--set {knob}=<fewer> (now {iterations} in all)"]
    if restarts > 1:
        cheaper.append(f"--set restarts=1 (now {restarts})")
    if unrolled:
        cheaper.append(f"record a FedSGD round (--set strategy.name=fedsgd), fewer local steps "
                       f"(federation.local_steps={steps}) or a smaller batch "
                       f"(federation.batch_size={batch}) with `fl-sim run`: {per_eval} images "
                       "pass through the model per iteration")
    elif n > 8:
        cheaper.append(f"a smaller batch (federation.batch_size={batch}) with `fl-sim run`")
    if k > 2:
        cheaper.append(f"--set sampler_steps=<fewer> (now {k})")
    low = iterations * alive * per_it
    high = low * pr.contention
    return AttackPlan(name, n, steps, batch, iterations, restarts, k,
                      seconds=math.sqrt(low * high), peak_bytes=peak, cheaper=cheaper,
                      seconds_range=(low, high))


def progress_lines(name: str, *, every: float = 10.0,
                   write: Callable[[str], None] | None = None
                   ) -> Callable[[str, int, int], None]:
    """A listener for :func:`attacks.components.progress.reporting` writing one line (via
    ``write``, default this module's logger at INFO) at the first report of each phase and
    then at most every ``every`` seconds: phase, done/total, elapsed time and the time left
    in the phase at its pace so far. ``listener.last`` holds the time of the last line."""
    emit = write or (lambda text: logger.info("%s", text))
    start = time.perf_counter()
    phase_start: dict[str, float] = {}

    def listener(phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        new = phase not in phase_start
        if new:
            phase_start[phase] = now
        if now - listener.last < every and not new:  # type: ignore[attr-defined]
            return
        listener.last = now  # type: ignore[attr-defined]
        pace = now - phase_start[phase]
        left = (f", ~{_duration(pace / done * (total - done))} left in this phase"
                if done else "")
        emit(f"{name}: {phase} {done}/{total}, {_duration(now - start)} elapsed{left}")
    listener.last = -float("inf")  # type: ignore[attr-defined]
    return listener


@contextmanager
def announced(name: str, attack: Any, record: ObservationRecord, *,
              every: float = 10.0) -> Iterator[AttackPlan | None]:
    """Log the plan, then report progress while the ``with`` block runs the attack. A plan
    that cannot be made (a task without a loss to probe) is logged and skipped, not fatal."""
    from attacks.components.progress import reporting  # lazy: attacks import fl_sim
    try:
        plan: AttackPlan | None = plan_attack(name, attack, record)
    except Exception as exc:  # noqa: BLE001 (the plan is advice; the attack still runs)
        logger.debug("no plan for %s: %s", name, exc)
        plan = None
    for line in plan.lines() if plan else []:
        logger.info("%s", line)
    listener = progress_lines(name, every=every)
    stop, start = threading.Event(), time.perf_counter()

    def heartbeat() -> None:  # an iteration can take minutes: never silent that long
        while not stop.wait(every):
            if time.perf_counter() - listener.last >= 6 * every:  # type: ignore[attr-defined]
                listener.last = time.perf_counter()  # type: ignore[attr-defined]
                logger.info("%s: still computing, %s elapsed", name,
                            _duration(time.perf_counter() - start))

    beat = threading.Thread(target=heartbeat, name="attack-heartbeat", daemon=True)
    beat.start()
    try:
        with reporting(listener):
            yield plan
    finally:
        stop.set()
