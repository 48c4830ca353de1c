"""Cost units shared by the prior-attack benchmarks (``gias.py``, ``peer_prior.py``).

A prior attack's iteration is reported in two units measured in the same run: one plain
training step of the attacked classifier (forward + cross-entropy backward + SGD step on the
same N images) and one no-grad pass of the K-step DDIM sampler on N latents. Wall-clock, one
thread: compare ratios of one run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from attacks.components.ddim_sampler import DDIMSampler
from fl_sim.records import ModelSpec
from fl_sim.tasks import build_task


def seconds_per_call(fn: Callable[[], object], repeats: int) -> float:
    """Mean wall seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def unit_costs(spec: ModelSpec, sampler: DDIMSampler, n: int, *, step_repeats: int,
               sampler_repeats: int) -> dict[str, float]:
    """``{"train_step_s", "sampler_pass_s"}`` for ``n`` images of ``spec``'s shape."""
    task = build_task(spec, seed=0)
    task.model.eval()
    shape = (n, spec.in_channels, spec.image_size, spec.image_size)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % spec.num_classes
    opt = torch.optim.SGD(task.model.parameters(), lr=0.01)

    def train_step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(task.model(task.normalize(x)), y).backward()
        opt.step()

    z = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def sampler_pass() -> None:
        with torch.no_grad():
            sampler.sample(z)

    return {"train_step_s": seconds_per_call(train_step, step_repeats),
            "sampler_pass_s": seconds_per_call(sampler_pass, sampler_repeats)}
