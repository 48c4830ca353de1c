"""GIDM vs pixel-only gradient matching on digits, eps and t granted (issue 8's quality bars).

The global model is the tiny-UNet DDPM prior of ``tests/diffusion_cases.py`` (trained by
``fl_sim.train_prior`` on the digits TRAIN split); the victims are digits of the TEST split.
For each batch (FedSGD, eps/t drawn from ``--seed``, t uniform in ``--t-range``) it runs

- ``gidm``: ``--phase1`` latent iterations through a ``--sampler-steps`` DDIM sampler, then
  ``--phase2`` pixel iterations;
- pixel-only: ``gidm`` with ``phase1_iterations = 0`` (same objective, the image as the
  variable, uniform random start), given the SAME wall time as GIDM took on that batch
  (its iteration count is set from a timed probe of its per-iteration cost),

and prints per-image PSNR after phase 1, after phase 2 and for pixel-only, seconds, and the
means. One thread (``torch.set_num_threads(1)``); the machine may be shared, so compare the
two columns of one run. Example::

    .venv/bin/python benchmarks/gidm_quality.py --prior /tmp/prior --images 8 --batch 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from diffusion_cases import (  # noqa: E402
    diffusion_record,
    digits_victims,
    draw_aux,
    global_task,
    train_digits_prior,
)

from attacks.gidm import GIDM  # noqa: E402
from fl_sim.metrics import score_reconstruction  # noqa: E402


def _matched_psnr(images: torch.Tensor, truth: torch.Tensor) -> list[float]:
    s = score_reconstruction(images, truth)
    return [round(float(v), 2) for v in s["psnr_per_image"]]


def run_batch(task, spec, x, args, seed: int) -> dict:
    aux = draw_aux(len(x), seed=seed, t_range=tuple(args.t_range))
    rec = diffusion_record(task, spec, x, aux=aux)
    gidm = GIDM(phase1_iterations=args.phase1, phase2_iterations=args.phase2,
                sampler_steps=args.sampler_steps, lr_latent=args.lr_latent,
                lr_pixels=args.lr_pixels)
    t0 = time.perf_counter()
    out = gidm(rec, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    # pixel-only at the same wall time: time a few of its iterations, then fill the budget
    probe = GIDM(phase1_iterations=0, phase2_iterations=3, lr_pixels=args.lr_pixels)
    t1 = time.perf_counter()
    probe(rec, generator=torch.Generator().manual_seed(seed))
    per_it = (time.perf_counter() - t1) / 3
    iters = max(1, int(seconds / per_it))
    pix = GIDM(phase1_iterations=0, phase2_iterations=iters, lr_pixels=args.lr_pixels)
    t2 = time.perf_counter()
    pout = pix(rec, generator=torch.Generator().manual_seed(seed))
    pseconds = time.perf_counter() - t2
    return {"t": aux["t"].tolist(), "gidm_seconds": round(seconds, 1),
            "pixel_seconds": round(pseconds, 1), "pixel_iterations": iters,
            "phase1_psnr": _matched_psnr(out.extras["phase1_images"], x),
            "gidm_psnr": _matched_psnr(out.images, x),
            "pixel_psnr": _matched_psnr(pout.images, x),
            "phase1_loss": out.extras["phase1_matching_loss"],
            "phase2_loss": out.extras["phase2_matching_loss"],
            "pixel_loss": pout.matching_loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prior", type=Path, default=Path("/tmp/fl-sim-digits-prior"),
                   help="prior directory (trained there first if absent)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--start", type=int, default=0, help="first test-split digit")
    p.add_argument("--phase1", type=int, default=150)
    p.add_argument("--phase2", type=int, default=150)
    p.add_argument("--sampler-steps", type=int, default=5)
    p.add_argument("--lr-latent", type=float, default=0.1)
    p.add_argument("--lr-pixels", type=float, default=0.02)
    p.add_argument("--t-range", type=int, nargs=2, default=(0, 500))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    prior = train_digits_prior(args.prior)
    task, spec = global_task(prior)
    rows = []
    for b in range(0, args.images, args.batch):
        x = digits_victims(args.batch, args.start + b)
        row = run_batch(task, spec, x, args, seed=args.seed + b)
        rows.append(row)
        print(json.dumps(row), flush=True)
    mean = {k: round(sum(v for r in rows for v in r[k]) / args.images, 2)
            for k in ("phase1_psnr", "gidm_psnr", "pixel_psnr")}
    print(json.dumps({"batch": args.batch, "images": args.images, "mean": mean,
                      "gidm_seconds": sum(r["gidm_seconds"] for r in rows),
                      "pixel_seconds": sum(r["pixel_seconds"] for r in rows),
                      "args": {k: (str(v) if isinstance(v, Path) else v)
                               for k, v in vars(args).items()}}))


if __name__ == "__main__":
    main()
