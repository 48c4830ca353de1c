"""GIAS (diffusion prior) vs Inverting Gradients at equal wall time, and GIAS's cost per phase.

The case of ``tests/unit/test_gias.py`` (``fl_sim.cases.gias``, read through the server view):
breaching's ReLU ConvNet (width 16, BN eval) on grey 16x16 digits, one client's FedSGD gradient
of a batch of ``--batch`` digits of the TEST split (labels granted), the digits prior trained on
the TRAIN split (``fl_sim.cases.train_digits_prior``). For each of ``--batches`` consecutive
batches: GIAS runs its budget (timed), then Inverting Gradients gets the SAME
seconds (its seconds per iteration measured on a 20-iteration probe, then ``floor(seconds /
that)`` iterations with the step schedule spanning them). Prints per-batch and mean PSNR / SSIM
of GIAS after phase 1, after phase 2 and of IG, then the seconds of one iteration of each phase
relative to one plain training step of the ConvNet (forward + backward + SGD on the same images)
and to one sampler pass (K DDIM steps, no gradient, batch N). Writes JSON to ``--out``. One
thread; wall-clock on a shared machine: compare ratios of one run. Example::

    .venv/bin/python benchmarks/gias.py --prior /tmp/prior   # or --train-prior DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from prior_costs import unit_costs  # noqa: E402  (the sibling module, found beside the script)

from attacks.components.ddim_sampler import DDIMSampler  # noqa: E402
from attacks.gias import GIAS  # noqa: E402
from attacks.inverting_gradients import InvertingGradients  # noqa: E402
from fl_sim.cases import train_digits_prior  # noqa: E402
from fl_sim.cases.gias import GIAS_BUDGET, IG_BASE, MODEL, gias_case  # noqa: E402
from fl_sim.metrics import score_reconstruction  # noqa: E402
from fl_sim.priors import load_prior_for  # noqa: E402


def equal_time_ig(record, seconds: float, *, seed: int = 0,
                  probe: int = 20) -> tuple[object, int]:
    """Inverting Gradients given ``seconds`` of wall time: its seconds per iteration are
    measured on a ``probe``-iteration run, then it runs ``floor(seconds / that)`` iterations
    (the step schedule spans the whole budget). Returns ``(reconstruction, iterations)``."""
    t0 = time.perf_counter()
    InvertingGradients(max_iterations=probe, **IG_BASE)(
        record, generator=torch.Generator().manual_seed(seed))
    per = (time.perf_counter() - t0) / probe
    iters = max(1, int(seconds / per))
    out = InvertingGradients(max_iterations=iters, **IG_BASE)(
        record, generator=torch.Generator().manual_seed(seed))
    return out, iters


def base_costs(record, prior: str, n: int, steps: int, repeats: int) -> dict[str, float]:
    """Seconds of one plain training step of the attacked classifier and one no-grad sampler
    pass on ``n`` images."""
    p = load_prior_for(prior, record.spec, attack="gias")
    sampler = DDIMSampler.from_scheduler(p.unet, p.scheduler, steps)
    return unit_costs(record.spec, sampler, n, step_repeats=repeats * 20,
                      sampler_repeats=repeats)


def one_batch(prior: str, start: int, n: int, budget: dict, seed: int, data=None) -> dict:
    """GIAS then equal-time IG on TEST images ``start .. start+n-1`` (digits, or ``data``)."""
    record, truth = gias_case(start, n, data=data, **MODEL)
    t0 = time.perf_counter()
    g = GIAS(prior=prior, **budget)(record, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    ig, ig_iters = equal_time_ig(record, seconds, seed=seed)
    s1 = score_reconstruction(g.extras["phase1_images"], truth)
    s2, si = score_reconstruction(g.images, truth), score_reconstruction(ig.images, truth)
    return {"start": start, "gias_seconds": seconds, "ig_iterations": ig_iters,
            "phase1_psnr": s1["psnr"], "phase1_ssim": s1["ssim"],
            "gias_psnr": s2["psnr"], "gias_ssim": s2["ssim"],
            "ig_psnr": si["psnr"], "ig_ssim": si["ssim"],
            "phase1_seconds": g.extras["phase1_seconds"],
            "phase2_seconds": g.extras["phase2_seconds"],
            "relative_drift": g.extras["relative_drift"],
            "gias_psnr_per_image": s2["psnr_per_image"], "ig_psnr_per_image":
                si["psnr_per_image"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", help="a prior saved by fl-sim train-prior (digits, 16x16 grey)")
    ap.add_argument("--train-prior", help="train the tests' digits prior into this directory")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--phase1", type=int, default=GIAS_BUDGET["phase1_iterations"])
    ap.add_argument("--phase2", type=int, default=GIAS_BUDGET["phase2_iterations"])
    ap.add_argument("--sampler-steps", type=int, default=GIAS_BUDGET["sampler_steps"])
    ap.add_argument("--lr-params", type=float, default=1e-4)
    ap.add_argument("--drift-weight", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mnist", help="an npz of MNIST (e.g. ../shared/data/mnist_test.npz): "
                    "victims from the npz source's TEST split (seed-0 20%% split), at 16x16; "
                    "the --prior must be trained on that source's TRAIN split")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "gias.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    prior = args.prior or str(train_digits_prior(Path(args.train_prior or "/tmp/gias_prior")))
    budget = {**GIAS_BUDGET, "phase1_iterations": args.phase1,
              "phase2_iterations": args.phase2, "sampler_steps": args.sampler_steps,
              "lr_params": args.lr_params, "drift_weight": args.drift_weight}
    data = None
    if args.mnist:
        from fl_sim.registry import DATA_SOURCES
        data = DATA_SOURCES.get("npz")(path=Path(args.mnist), image_size=16)
    rows = [one_batch(prior, b * args.batch, args.batch, budget, args.seed, data)
            for b in range(args.batches)]
    print(f"GIAS {args.phase1}+{args.phase2} it, K={args.sampler_steps}, batch {args.batch}; "
          "IG at equal wall time")
    print("batch  seconds  IG it  PSNR p1  PSNR GIAS  PSNR IG  SSIM p1  SSIM GIAS  SSIM IG")
    for r in rows:
        print(f"{r['start']:5d}  {r['gias_seconds']:7.1f}  {r['ig_iterations']:5d}  "
              f"{r['phase1_psnr']:7.2f}  {r['gias_psnr']:9.2f}  {r['ig_psnr']:7.2f}  "
              f"{r['phase1_ssim']:7.3f}  {r['gias_ssim']:9.3f}  {r['ig_ssim']:7.3f}")
    mean = {k: statistics.fmean(r[k] for r in rows) for k in
            ("phase1_psnr", "gias_psnr", "ig_psnr", "phase1_ssim", "gias_ssim", "ig_ssim")}
    print(f" mean  {'':7s}  {'':5s}  {mean['phase1_psnr']:7.2f}  {mean['gias_psnr']:9.2f}  "
          f"{mean['ig_psnr']:7.2f}  {mean['phase1_ssim']:7.3f}  {mean['gias_ssim']:9.3f}  "
          f"{mean['ig_ssim']:7.3f}")
    rec, _ = gias_case(0, args.batch, data=data, **MODEL)
    timing = base_costs(rec, prior, args.batch, args.sampler_steps, args.repeats)
    p1 = statistics.fmean(r["phase1_seconds"] for r in rows) / max(args.phase1, 1)
    p2 = statistics.fmean(r["phase2_seconds"] for r in rows) / max(args.phase2, 1)
    timing.update({"phase1_iteration_s": p1, "phase2_iteration_s": p2,
                   "phase1_over_train_step": p1 / timing["train_step_s"],
                   "phase2_over_train_step": p2 / timing["train_step_s"],
                   "phase1_over_sampler_pass": p1 / timing["sampler_pass_s"],
                   "phase2_over_sampler_pass": p2 / timing["sampler_pass_s"]})
    print(json.dumps({k: round(v, 5) for k, v in timing.items()}))
    result = {"data": args.mnist or "digits", "model": MODEL, "batch": args.batch,
              "batches": args.batches, "budget": budget, "seed": args.seed, "prior": prior,
              "rows": rows, "mean": mean, "timing": timing}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
