"""GPU suite (issue 24 item 5): the paper-scale speed figures in one command.

Cases (random weights and seeded random images: speed does not depend on their content):

* ``diffusion_round`` -- one FedAvg round of a diffusion federation on the CIFAR-10 DDPM
  architecture (``google/ddpm-cifar10-32``'s UNet2DModel config, 35.7 M parameters, 32 px):
  every client's local training (:func:`fl_sim.federation.local.local_train`, Adam, the
  DDPM loss) and the weighted mean, in one process on one device (Ray's and Flower's message
  overhead is not in it: ``benchmarks/federation.py`` measures that);
* ``gidm_32`` / ``gidm_256`` -- GIDM phase-1 iterations (latent search through the K-step
  differentiable DDIM sampler of the global model + gradient matching, FedSGD, eps/t granted)
  on the CIFAR-10 architecture at 32 px and the CelebA-HQ architecture
  (``google/ddpm-ema-celebahq-256``, 113.7 M parameters) at 256 px, sampler checkpointed at
  256 px (memory);
* ``ig_b1`` / ``ig_b8`` -- Inverting Gradients iterations on ResNet-18 (CIFAR variant) at
  batch 1 and 8 (one restart, labels granted);
* ``fedavg_100`` -- one FedAvg round of 100 ResNet-18 clients (5 local SGD steps of batch 10).

Each case reports seconds per iteration (per round), its rate, and the RATIO to one plain
training step of the same network at the same batch (forward + backward + optimiser step),
measured in the same process: the ratios hold on any device, the absolute figures only on the
one named. Iteration times are the median gap between consecutive attack callbacks (warm-up
excluded); CUDA is synchronised at each stamp. Times are wall seconds on CUDA and this
process's CPU seconds on a CPU (``--cpu-small`` sets one torch thread: on a shared machine the
wall clock counts the other processes).

    .venv/bin/python benchmarks/gpu_suite.py --out benchmarks/out/gpu_suite      # GPU, <= 8 min
    .venv/bin/python benchmarks/gpu_suite.py --cpu-small --out benchmarks/out/gpu_suite_cpu

``--cpu-small`` shrinks every case (tiny UNet ``block_out_channels (32, 64)`` at 32 px and
at 64 px in place of 256 px, ResNet-18 of width 8, few iterations) to run in about a minute on
a CPU. Writes ``OUT.json`` and ``OUT.md`` (a Markdown table with the command, date, device).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fl_sim.diffusers_dirs import PUBLISHED_SCHEDULER, PUBLISHED_UNETS
from fl_sim.records import ModelSpec

TINY_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8,
    "in_channels": 3, "out_channels": 3}


@dataclass(frozen=True)
class Sizes:
    """How big each case is (full: GPU, paper scale; small: ``--cpu-small``)."""

    unet32: dict[str, Any]
    unet256: dict[str, Any]
    big_size: int
    resnet_width: int
    round_clients: int = 4
    round_steps: int = 5
    round_batch: int = 64
    rounds: int = 3
    gidm_batch: int = 1
    gidm_steps: int = 10
    gidm_iters: int = 12
    gidm256_iters: int = 6
    ig_iters: int = 40
    fedavg_clients: int = 100
    fedavg_images: int = 50
    fedavg_batch: int = 10
    step_repeats: int = 10
    labels: dict[str, str] = field(default_factory=dict)


FULL = Sizes(unet32=PUBLISHED_UNETS["google/ddpm-cifar10-32"],
             unet256=PUBLISHED_UNETS["google/ddpm-ema-celebahq-256"], big_size=256,
             resnet_width=64, labels={"unet32": "CIFAR-10 DDPM UNet (35.7 M)",
                                      "unet256": "CelebA-HQ DDPM UNet (113.7 M)",
                                      "resnet": "ResNet-18 (11.2 M)"})
SMALL = Sizes(unet32={**TINY_UNET, "sample_size": 32}, unet256={**TINY_UNET, "sample_size": 64},
              big_size=64, resnet_width=8, round_clients=2, round_steps=2, round_batch=4,
              rounds=2, gidm_steps=2, gidm_iters=4, gidm256_iters=3, ig_iters=5,
              fedavg_images=10, step_repeats=2,
              labels={"unet32": "tiny UNet (0.7 M) 32 px", "unet256": "tiny UNet 64 px",
                      "resnet": "ResNet-18 width 8"})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """Wall seconds on CUDA; this process's CPU seconds on a CPU (one torch thread: on a
    shared, loaded machine the wall clock counts other people's work)."""
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = clock(device)
        fn()
        sync(device)
        times.append(clock(device) - t0)
    return statistics.median(times)


class Stamps:
    """An attack callback that stamps each iteration; :meth:`per_iteration` = median gap."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.t = device, []

    def __call__(self, *_: Any) -> None:
        sync(self.device)
        self.t.append(clock(self.device))

    def per_iteration(self) -> float:
        gaps = [b - a for a, b in zip(self.t[1:], self.t[2:], strict=False)]  # no warm-up
        return statistics.median(gaps) if gaps else float("nan")


def unet_spec(cfg: dict[str, Any], size: int) -> ModelSpec:
    return ModelSpec(model="unet", model_params={"config": {**cfg, "sample_size": size}},
                     task="diffusion",
                     task_params={"num_train_timesteps": 1000, "beta_schedule": "linear",
                                  "prediction_type": "epsilon",
                                  "scheduler_config": PUBLISHED_SCHEDULER},
                     in_channels=3, num_classes=10, image_size=size, mean=(0.5,) * 3,
                     std=(0.5,) * 3)


def resnet_spec(width: int) -> ModelSpec:
    return ModelSpec(model="resnet18", model_params={"width": width}, task="classifier",
                     task_params={}, in_channels=3, num_classes=10, image_size=32,
                     mean=(0.4915, 0.4823, 0.4468), std=(0.2470, 0.2435, 0.2616))


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def plain_step(task: Any, x: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Seconds of one training step (forward + backward + SGD step) of ``task`` on ``x``."""
    from fl_sim.tasks.base import Batch

    model = task.model.to(device).train()
    x = x.to(device)
    batch = Batch(x, torch.arange(len(x), device=device) % 10)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        aux = {k: v.to(device) for k, v in task.sample_aux(Batch(x.cpu(), batch.labels.cpu()),
                                                           gen).items()} \
            if task.name == "diffusion" else {}
        task.loss(params, buffers, batch, aux).backward()
        opt.step()
    return timed(step, repeats, device)


def fedavg_round(spec: ModelSpec, *, clients: int, n_images: int, batch: int, steps: int,
                 optimizer: str, lr: float, rounds: int, device: torch.device) -> float:
    """Median seconds of one in-process FedAvg round (all clients' local training + mean)."""
    from fl_sim.federation.local import local_train
    from fl_sim.tasks import build_task

    task = build_task(spec, device=device, seed=0)
    glob = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    data = [images(n_images, spec.image_size, seed=c) for c in range(clients)]
    labels = torch.arange(n_images) % spec.num_classes

    def one_round() -> None:
        total: dict[str, torch.Tensor] = {}
        for c in range(clients):
            task.model.load_state_dict(glob)
            res = local_train(task, data[c].to(device), labels.to(device),
                              torch.arange(n_images), seed=0, server_round=1, client_id=c,
                              batch_size=batch, local_steps=steps, local_epochs=None,
                              optimizer=optimizer, lr=lr, device=device)
            for k, v in res.update.items():
                if v.is_floating_point():
                    total[k] = total.get(k, 0) + v.to(device) * (1 / clients)
    return timed(one_round, max(1, rounds - 1), device)


def gidm_case(spec: ModelSpec, sz: Sizes, iters: int, *, checkpoint: bool | str,
              device: torch.device) -> tuple[float, float, float | None]:
    """``(seconds per GIDM phase-1 iteration, seconds per plain training step, CUDA peak MB)``.

    The peak is ``torch.cuda.max_memory_allocated`` over the attack (None on a CPU)."""
    from attacks.gidm import GIDM
    from fl_sim.cases.records import diffusion_record
    from fl_sim.tasks import build_task

    task = build_task(spec, seed=0)
    task.model.eval()
    x = images(sz.gidm_batch, spec.image_size)
    g = torch.Generator().manual_seed(0)
    aux = {"eps": torch.randn(x.shape, generator=g),
           "t": torch.randint(0, 1000, (len(x),), generator=g)}
    record = diffusion_record(task, spec, x, aux=aux)
    attack = GIDM(phase1_iterations=iters, phase2_iterations=0, sampler_steps=sz.gidm_steps,
                  checkpoint=checkpoint)
    attack.device = device
    stamps = Stamps(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    attack.reconstruct(record, generator=torch.Generator().manual_seed(0), callback=stamps)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else None)
    step = plain_step(build_task(spec, seed=0), x, device, sz.step_repeats)
    return stamps.per_iteration(), step, peak


def ig_case(spec: ModelSpec, batch: int, sz: Sizes, device: torch.device) -> tuple[float, float]:
    """``(seconds per Inverting-Gradients iteration, seconds per plain training step)``."""
    from attacks.inverting_gradients import InvertingGradients
    from fl_sim.cases.records import make_record
    from fl_sim.tasks import build_task

    task = build_task(spec, seed=0)
    task.model.eval()
    x, y = images(batch, 32), torch.arange(batch) % 10
    record = make_record(task, spec, x, y, knowledge={"labels": y})
    attack = InvertingGradients(max_iterations=sz.ig_iters, restarts=1, labels="granted")
    attack.device = device
    stamps = Stamps(device)
    attack.reconstruct(record, generator=torch.Generator().manual_seed(0), callback=stamps)
    return stamps.per_iteration(), plain_step(build_task(spec, seed=0), x, device,
                                              sz.step_repeats)


def run_suite(sz: Sizes, device: torch.device, only: set[str] | None = None
              ) -> list[dict[str, Any]]:
    """Every case as ``{"case", "model", "seconds", "per_second", "plain_step_s", "ratio",
    "what"}`` (ratio = seconds / plain_step_s; for rounds: / (clients x steps x plain step))."""
    from fl_sim.tasks import build_task

    rows: list[dict[str, Any]] = []

    def add(case: str, model: str, what: str, seconds: float, step: float, units: float = 1.0,
            cuda_peak_mb: float | None = None) -> None:
        rows.append({"case": case, "model": model, "what": what, "seconds": seconds,
                     "per_second": 1 / seconds, "plain_step_s": step,
                     "ratio": seconds / (step * units)})
        if cuda_peak_mb is not None:
            rows[-1]["cuda_peak_mb"] = cuda_peak_mb
        logging.info("%s: %.4f s (%s)", case, seconds, what)

    def want(case: str) -> bool:
        return only is None or case in only

    u32, u256 = unet_spec(sz.unet32, 32), unet_spec(sz.unet256, sz.big_size)
    res = resnet_spec(sz.resnet_width)
    if want("diffusion_round"):
        s = fedavg_round(u32, clients=sz.round_clients, n_images=sz.round_batch * sz.round_steps,
                         batch=sz.round_batch, steps=sz.round_steps, optimizer="adam",
                         lr=2e-4, rounds=sz.rounds, device=device)
        step = plain_step(build_task(u32, seed=0), images(sz.round_batch, 32), device,
                          sz.step_repeats)
        add("diffusion_round", sz.labels["unet32"],
            f"{sz.round_clients} clients x {sz.round_steps} Adam steps of batch "
            f"{sz.round_batch}; rounds/s", s, step, sz.round_clients * sz.round_steps)
    if want("gidm_32"):
        it, step, peak = gidm_case(u32, sz, sz.gidm_iters, checkpoint=False, device=device)
        add("gidm_32", sz.labels["unet32"], f"GIDM phase-1 iteration, batch {sz.gidm_batch}, "
            f"K = {sz.gidm_steps}; it/s", it, step, cuda_peak_mb=peak)
    if want("gidm_256"):
        it, step, peak = gidm_case(u256, sz, sz.gidm256_iters, checkpoint=True, device=device)
        add("gidm_256", sz.labels["unet256"], f"GIDM phase-1 iteration at {sz.big_size} px, "
            f"batch {sz.gidm_batch}, K = {sz.gidm_steps}, sampler checkpointed; it/s",
            it, step, cuda_peak_mb=peak)
    for b in (1, 8):
        if want(f"ig_b{b}"):
            it, step = ig_case(res, b, sz, device)
            add(f"ig_b{b}", sz.labels["resnet"], f"Inverting Gradients iteration, batch {b}; "
                "it/s", it, step)
    if want("fedavg_100"):
        steps = sz.fedavg_images // sz.fedavg_batch
        s = fedavg_round(res, clients=sz.fedavg_clients, n_images=sz.fedavg_images,
                         batch=sz.fedavg_batch, steps=steps, optimizer="sgd", lr=0.01,
                         rounds=2, device=device)
        step = plain_step(build_task(res, seed=0), images(sz.fedavg_batch, 32), device,
                          sz.step_repeats)
        add("fedavg_100", sz.labels["resnet"], f"{sz.fedavg_clients} clients x {steps} SGD "
            f"steps of batch {sz.fedavg_batch}; rounds/s", s, step, sz.fedavg_clients * steps)
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"GPU suite, `{meta['command']}` on {meta['device']}, {meta['date']} "
             f"({meta['wall_s']:.0f} s in all). Ratio: seconds per iteration (round) / one "
             "plain training step of the same network at the same batch (rounds: / clients x "
             "local steps).", "",
             "| case | model | what | s per it/round | it or rounds per s | plain step s | "
             "ratio | CUDA peak MB |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = f"{r['cuda_peak_mb']:.0f}" if "cuda_peak_mb" in r else "-"
        lines.append(f"| {r['case']} | {r['model']} | {r['what']} | {r['seconds']:.4f} | "
                     f"{r['per_second']:.2f} | {r['plain_step_s']:.4f} | {r['ratio']:.2f} | "
                     f"{peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-small", action="store_true", help="shrink every case (CPU, ~1 min)")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    ap.add_argument("--out", default="benchmarks/out/gpu_suite",
                    help="writes OUT.json and OUT.md")
    ap.add_argument("--only", default="", help="comma-separated cases (default: all)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's; 1 with --cpu-small)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads or args.cpu_small:
        torch.set_num_threads(args.threads or 1)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() and not args.cpu_small else "cpu"
    device = torch.device(dev)
    sizes = SMALL if args.cpu_small else FULL
    only = {c.strip() for c in args.only.split(",") if c.strip()} or None
    t0 = time.perf_counter()
    rows = run_suite(sizes, device, only)
    meta = {"command": "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:] if argv is None
                                                                    else argv),
            "device": device_name(device), "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "cpu_small": args.cpu_small,
            "wall_s": time.perf_counter() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
