"""Peak memory and time per iteration of back-propagating through the K-step DDIM sampler.

Issue 24 item 2: an attack iteration through a K-step differentiable sampler keeps K UNet calls'
activations alive unless the sampler is checkpointed
(:class:`attacks.components.ddim_sampler.DDIMSampler`, ``checkpoint=``). One cell = one
checkpoint mode at one K, run in a FRESH subprocess (``--cell``) so that its peak resident
memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own. The iteration measured is
the part of every prior attack's phase-1 iteration that grows with K: ``z -> sampler(z) ->
scalar loss -> backward to z`` (``--objective sampler``, the default: the sampler's own cost,
the worst case for the time ratio), or a whole GIDM phase-1 iteration (``--objective gidm``:
the sampler runs on the global model's functional weights, as GIDM's default prior, and its
images are scored by :class:`~attacks.components.diffusion_matching.DiffusionMatching` against
the FedSGD gradient of random images with granted eps/t, GIDM's default ``second_order =
"finite_difference"``).

Model: the DDPM CIFAR-10 architecture (``unet`` preset ``cifar``: 35.7 M parameters, 32 px,
3 channels) with random weights (seed 0), eval mode, batch 1 by default, float32, one torch
thread. Reported per cell: ``peak_rss_mb`` (whole process: Python, torch, the weights and the
iteration), ``base_rss_mb`` (the same process after building the model and one no-grad
sampler pass, before any iteration), their difference ``iteration_mb`` (what the iterations
added), seconds per iteration (mean after one warm-up; wall and this process's CPU time:
on a shared machine the CPU time is the steadier one, and the time ratios use it; on CUDA the
wall time), and on CUDA ``cuda_peak_mb`` (``torch.cuda.max_memory_allocated`` over the
iterations: the whole allocation, weights included, as the target is stated) and
``cuda_added_mb`` (the same less what was allocated before the first iteration). Ratios are
taken against K = 1 without checkpointing (memory) and against the same K without
checkpointing (time).

    nice -n 10 .venv/bin/python benchmarks/memory_sampler.py \
        --out benchmarks/out/memory_sampler.json

``--preset tiny --image-size 16 --channels 1`` runs the 0.7 M digits UNet instead (seconds);
``--preset celebahq --image-size 256`` the published CelebA-HQ DDPM architecture
(``google/ddpm-ema-celebahq-256``'s UNet2DModel config, 113.7 M parameters; ``--image-size 128``
runs the same network at 128 px). Such cells need GBs: cap each cell's address space with
``--max-vm-gb`` (a cell over it fails with MemoryError instead of swapping the machine) and
skip the cells known not to fit with ``--skip K:MODE``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MODES = ("none", "sampler", "full", "auto")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _model_params(preset: str, image_size: int) -> dict[str, Any]:
    if preset == "celebahq":
        from fl_sim.diffusers_dirs import PUBLISHED_UNETS

        cfg = PUBLISHED_UNETS["google/ddpm-ema-celebahq-256"]
        return {"config": {**cfg, "sample_size": image_size}}
    return {"preset": preset}


def _gidm_objective(task: Any, batch: int, device: str) -> tuple[Any, dict, dict]:
    """GIDM's matching of a FedSGD gradient of ``batch`` random images (eps/t granted)."""
    from attacks.components.diffusion_matching import DiffusionMatching, diffusion_update

    params = {k: v.detach() for k, v in task.model.named_parameters()}
    buffers = {k: v.detach() for k, v in task.model.named_buffers()}
    g = torch.Generator().manual_seed(2)
    cfg = task.model.config
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    truth = torch.rand(shape, generator=g).to(device)
    aux = {"eps": torch.randn(shape, generator=g).to(device),
           "t": torch.randint(0, task.num_train_timesteps, (batch,), generator=g).to(device)}
    target = {k: v.detach() for k, v in diffusion_update(task, params, buffers, truth,
                                                         aux).items()}
    match = DiffusionMatching(task, params, buffers, target, aux,
                              second_order="finite_difference")
    return match, params, buffers


def run_cell(*, preset: str, image_size: int, channels: int, batch: int, steps: int, mode: str,
             iterations: int, device: str, objective: str = "sampler") -> dict[str, object]:
    """One cell in THIS process: ``{"peak_rss_mb", "base_rss_mb", "s_per_iter", ...}``."""
    from diffusers import DDPMScheduler

    from attacks.components.ddim_sampler import DDIMSampler
    from fl_sim.records import ModelSpec
    from fl_sim.tasks import build_task

    spec = ModelSpec(model="unet", model_params=_model_params(preset, image_size),
                     task="diffusion",
                     task_params={"num_train_timesteps": 1000}, in_channels=channels,
                     num_classes=10, image_size=image_size, mean=(0.5,) * channels,
                     std=(0.5,) * channels)
    task = build_task(spec, seed=0)
    model = task.model.eval().to(device)
    for p in model.parameters():  # a frozen prior: gradients flow to z only
        p.requires_grad_(False)
    sampler = DDIMSampler.from_scheduler(model, DDPMScheduler(num_train_timesteps=1000), steps)
    z0 = torch.randn(batch, channels, image_size, image_size,
                     generator=torch.Generator().manual_seed(1)).to(device)
    if objective == "gidm":
        match, params, buffers = _gidm_objective(task, batch, device)

        def loss_of(z: Tensor) -> Tensor:
            x = sampler.sample(z, params=params, buffers=buffers, checkpoint=mode)
            return match(((x + 1) / 2).clamp(0, 1))
    else:
        params = buffers = None

        def loss_of(z: Tensor) -> Tensor:
            return sampler.sample(z, checkpoint=mode).square().mean()
    with torch.no_grad():
        sampler.sample(z0)
    base = _rss_mb()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()

    def iteration() -> None:
        z = z0.clone().requires_grad_(True)
        loss_of(z).backward()
        if cuda:
            torch.cuda.synchronize()

    iteration()  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iterations):
        iteration()
    seconds = (time.perf_counter() - t0) / iterations
    cpu_seconds = (time.process_time() - c0) / iterations
    peak = _rss_mb()  # before the probe below, which holds one step's activations
    out: dict[str, object] = {
        "steps": steps, "mode": mode, "objective": objective, "batch": batch, "preset": preset,
        "image_size": image_size, "device": device, "iterations": iterations,
        "s_per_iter": seconds, "cpu_s_per_iter": cpu_seconds, "base_rss_mb": base,
        "peak_rss_mb": peak, "iteration_mb": peak - base,
        "plan": list(sampler.checkpoint_plan(mode, z0.requires_grad_(True), params, buffers)),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_activation_mb": sampler.step_activation_bytes(z0, params, buffers) / 2**20}
    if cuda:
        # the whole allocation (weights included: the target is stated on the whole peak)
        # and what the iterations added on top of the weights and inputs
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_added_mb"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def table(rows: list[dict[str, object]]) -> str:
    """Markdown table of the cells, with the ratios the issue's target is stated in."""
    ref = {(r["mode"], r["steps"]): r for r in rows}
    k1 = ref.get(("none", 1))
    key = "s_per_iter" if any("cuda_peak_mb" in r for r in rows) else "cpu_s_per_iter"
    head = ("| K | checkpoint | wall s / it | CPU s / it | time vs none (same K) | peak RSS MB | "
            "added by iterations MB | peak vs K=1 none |")
    cuda = any("cuda_peak_mb" in r for r in rows)
    if cuda:
        head += " CUDA peak MB | CUDA peak vs K=1 none |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        same = ref.get(("none", r["steps"]))
        t_ratio = (f"{float(r[key]) / float(same[key]):.2f}x"  # type: ignore[index]
                   if same else "-")
        m_ratio = (f"{float(r['peak_rss_mb']) / float(k1['peak_rss_mb']):.2f}x"  # type: ignore[index]
                   if k1 else "-")
        label = str(r["mode"])
        if r["mode"] == "auto":  # what auto chose: (mode, steps recomputed)
            label += f" ({r['plan'][0]}, {r['plan'][1]} of {r['steps']} recomputed)"  # type: ignore[index]
        line = (f"| {r['steps']} | {label} | {float(r['s_per_iter']):.2f} | "
                f"{float(r['cpu_s_per_iter']):.2f} | {t_ratio} | "  # type: ignore[arg-type]
                f"{float(r['peak_rss_mb']):.0f} | {float(r['iteration_mb']):.0f} | {m_ratio} |")  # type: ignore[arg-type]
        if cuda:
            c_ratio = (f"{float(r['cuda_peak_mb']) / float(k1['cuda_peak_mb']):.2f}x"  # type: ignore[index, arg-type]
                       if k1 and "cuda_peak_mb" in r else "-")
            line += f" {float(r.get('cuda_peak_mb', float('nan'))):.0f} | {c_ratio} |"  # type: ignore[arg-type]
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=["none", "sampler"])
    ap.add_argument("--preset", choices=("tiny", "cifar", "celebahq"), default="cifar")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--auto-budget-mb", type=float, default=None,
                    help="AUTO_BUDGET_BYTES for the 'auto' cells (default: the library's)")
    ap.add_argument("--objective", choices=("sampler", "gidm"), default="sampler")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the cells")
    ap.add_argument("--max-vm-gb", type=float, default=None,
                    help="address-space limit of each cell (RLIMIT_AS), e.g. 9")
    ap.add_argument("--skip", nargs="*", default=[], metavar="K:MODE",
                    help="cells not to run, e.g. 4:none (too large for this machine)")
    ap.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.cell:  # child: one cell, JSON on stdout
        if args.max_vm_gb:
            limit = int(args.max_vm_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if args.auto_budget_mb is not None:
            import attacks.components.ddim_sampler as ddim

            ddim.AUTO_BUDGET_BYTES = int(args.auto_budget_mb * 2**20)
        row = run_cell(preset=args.preset, image_size=args.image_size, channels=args.channels,
                       batch=args.batch, steps=args.steps[0], mode=args.mode,
                       iterations=args.iterations, device=args.device,
                       objective=args.objective)
        print(json.dumps(row))
        return 0
    rows: list[dict[str, object]] = []
    common = ["--preset", args.preset, "--image-size", str(args.image_size), "--channels",
              str(args.channels), "--batch", str(args.batch), "--iterations",
              str(args.iterations), "--device", args.device, "--objective", args.objective]
    if args.auto_budget_mb is not None:
        common += ["--auto-budget-mb", str(args.auto_budget_mb)]
    if args.max_vm_gb:
        common += ["--max-vm-gb", str(args.max_vm_gb)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in args.steps:
        for mode in args.modes:
            if f"{k}:{mode}" in args.skip:
                continue
            cmd = [sys.executable, __file__, "--cell", "--steps", str(k), "--mode", mode, *common]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if done.returncode:
                print(f"cell K={k} {mode} failed:\n{done.stderr}", file=sys.stderr)
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            if args.out:  # after every cell: a long run stopped half-way keeps its cells
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"cells": rows}, indent=1) + "\n")
            print(f"K={k:>2} {mode:<8} {rows[-1]['s_per_iter']:.2f} s/it, peak RSS "
                  f"{rows[-1]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    md = table(rows)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cells": rows, "table": md}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
