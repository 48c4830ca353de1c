"""GIDM vs pixel-only gradient matching on digits, eps and t granted (issue 8's quality bars).

The global model is the tiny-UNet DDPM prior of ``fl_sim.cases`` (trained by
``fl_sim.train_prior`` on the digits TRAIN split); the victims are digits of the TEST split.
For each batch (FedSGD, eps/t drawn from ``--seed``, t uniform in ``--t-range``) it runs

- ``gidm``: ``--phase1`` latent iterations through a ``--sampler-steps`` DDIM sampler, then
  ``--phase2`` pixel iterations;
- pixel-only: ``gidm`` with ``phase1_iterations = 0`` (same objective, the image as the
  variable, uniform random start, same ``--second-order``), given the SAME time as GIDM
  took on that batch: it runs until its callback sees GIDM's seconds used up (``--clock
  cpu``, the default: this process's CPU time, which a loaded machine does not inflate;
  ``wall``: wall time) and is scored on its images at that moment,

and prints per-image PSNR after phase 1, after phase 2 and for pixel-only, seconds, the
means, the mean GIDM - pixel-only difference and on how many images GIDM is ahead. With
``--oracle N`` it also projects each TRUE image onto the prior (N Adam steps on the sampler's
latent minimising the pixel MSE to the victim): the best image phase 1 could reach, i.e.
whether the prior can represent the victims at all (an upper bound for the latent search,
not an attack). One thread (``torch.set_num_threads(1)``); the machine may be shared, so
compare the two columns of one run. Example::

    .venv/bin/python benchmarks/gidm_quality.py --prior /tmp/prior --images 8 --batch 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attacks.components.gradients import split_state  # noqa: E402
from attacks.gidm import GIDM, build_sampler  # noqa: E402
from fl_sim.cases import (  # noqa: E402
    diffusion_record,
    digits_victims,
    draw_aux,
    global_task,
    train_digits_prior,
)
from fl_sim.metrics import score_reconstruction  # noqa: E402


def _matched_psnr(images: torch.Tensor, truth: torch.Tensor) -> list[float]:
    s = score_reconstruction(images, truth)
    return [round(float(v), 2) for v in s["psnr_per_image"]]


class _OutOfTime(Exception):
    """Raised by the pixel-only run's callback when GIDM's time is used up."""


def _clock(kind: str) -> float:
    return time.process_time() if kind == "cpu" else time.perf_counter()


def _equal_time_pixel_only(rec, args, seed: int, budget_s: float) -> tuple[torch.Tensor, float,
                                                                              int]:
    """Pixel-only matching (``gidm`` without phase 1, random start) stopped when it has used
    ``budget_s`` seconds (``--clock``); returns (its images at that moment, clamped to the box
    as GIDM's are, seconds used, matching evaluations)."""
    state = {"images": None, "n": 0}
    t0 = _clock(args.clock)

    def stop(phase: int, it: int, images: torch.Tensor) -> None:
        state["images"], state["n"] = images, state["n"] + 1
        if _clock(args.clock) - t0 >= budget_s:
            raise _OutOfTime

    pix = GIDM(phase1_iterations=0, phase2_iterations=100_000, lr_pixels=args.lr_pixels,
               second_order=args.second_order, phase2_optimizer=args.phase2_optimizer)
    try:
        pix.device = torch.device("cpu")  # what Attack.__call__ sets; reconstruct takes the
        out = pix.reconstruct(rec, generator=torch.Generator().manual_seed(seed),  # callback
                              callback=stop)
        images = out.images
    except _OutOfTime:
        images = state["images"].clamp(0, 1)
    return images, _clock(args.clock) - t0, state["n"]


def oracle_psnr(rec, task, x: torch.Tensor, args, seed: int) -> list[float]:
    """PSNR of the closest sample of GIDM's prior (``--gidm-prior`` or the global model, the
    same sampler as phase 1) to the TRUE images ``x``: ``--oracle`` Adam steps (lr
    ``--lr-latent``) on the latent, minimising the pixel MSE -- the ceiling of GIDM's latent
    search on this prior."""
    params, buffers = split_state(task, rec.global_params)
    sample, _ = build_sampler(rec, task, params, buffers, prior=args.gidm_prior,
                              num_steps=args.sampler_steps, device=torch.device("cpu"))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=args.lr_latent)
    for _ in range(args.oracle):
        loss = (((sample(z) + 1) / 2).clamp(0, 1) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return _matched_psnr(((sample(z) + 1) / 2).clamp(0, 1), x)


def run_batch(task, spec, x, args, seed: int) -> dict:
    aux = draw_aux(len(x), seed=seed, t_range=tuple(args.t_range))
    rec = diffusion_record(task, spec, x, aux=aux)
    gidm = GIDM(phase1_iterations=args.phase1, phase2_iterations=args.phase2,
                sampler_steps=args.sampler_steps, lr_latent=args.lr_latent,
                prior=args.gidm_prior,
                phase2_optimizer=args.phase2_optimizer,
                lr_pixels=args.lr_pixels, second_order=args.second_order)
    t0 = _clock(args.clock)
    out = gidm(rec, generator=torch.Generator().manual_seed(seed))
    seconds = _clock(args.clock) - t0
    # pixel-only given exactly GIDM's time on this batch (stopped by its callback)
    pimages, pseconds, evals = _equal_time_pixel_only(rec, args, seed, seconds)
    return {"t": aux["t"].tolist(), "gidm_seconds": round(seconds, 1),
            "pixel_seconds": round(pseconds, 1), "pixel_evaluations": evals,
            "phase1_psnr": _matched_psnr(out.extras["phase1_images"], x),
            "gidm_psnr": _matched_psnr(out.images, x),
            "pixel_psnr": _matched_psnr(pimages, x),
            "phase1_loss": out.extras["phase1_matching_loss"],
            "phase2_loss": out.extras["phase2_matching_loss"],
            **({"oracle_psnr": oracle_psnr(rec, task, x, args, seed)} if args.oracle else {})}


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
    p.add_argument("--second-order", default="finite_difference",
                   choices=("exact", "finite_difference", "central_difference"))
    p.add_argument("--gidm-prior", default=None,
                   help="GIDM's phase-1 prior (`gidm.prior`: a train-prior output); default: "
                        "the global model itself, as in the paper")
    p.add_argument("--phase2-optimizer", default="lbfgs", choices=("lbfgs", "lbfgsb", "adam"),
                   help="pixel optimiser of GIDM's phase 2 AND of pixel-only (gidm option)")
    p.add_argument("--oracle", type=int, default=0, metavar="N",
                   help="also project the true images onto the prior with N Adam steps "
                        "(the ceiling of phase 1); 0 = skip")
    p.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                   help="equal time = equal CPU time of this process (robust on a shared "
                        "machine; one thread) or equal wall time")
    args = p.parse_args()
    torch.set_num_threads(1)
    # an existing prior directory (e.g. a longer `fl-sim train-prior` run) is used as it is
    prior = args.prior if (args.prior / "unet").is_dir() else train_digits_prior(args.prior)
    task, spec = global_task(prior)
    rows = []
    for b in range(0, args.images, args.batch):
        x = digits_victims(args.batch, args.start + b)
        row = run_batch(task, spec, x, args, seed=args.seed + b)
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = ("phase1_psnr", "gidm_psnr", "pixel_psnr") + (("oracle_psnr",) if args.oracle else ())
    mean = {k: round(sum(v for r in rows for v in r[k]) / args.images, 2) for k in keys}
    diffs = [g - q for r in rows for g, q in zip(r["gidm_psnr"], r["pixel_psnr"], strict=True)]
    print(json.dumps({"batch": args.batch, "images": args.images, "mean": mean,
                      "gidm_minus_pixel_db": round(sum(diffs) / len(diffs), 2),
                      "gidm_ahead_on": f"{sum(d > 0 for d in diffs)}/{len(diffs)}",
                      "gidm_seconds": sum(r["gidm_seconds"] for r in rows),
                      "pixel_seconds": sum(r["pixel_seconds"] for r in rows),
                      "args": {k: (str(v) if isinstance(v, Path) else v)
                               for k, v in vars(args).items()}}))


if __name__ == "__main__":
    main()
