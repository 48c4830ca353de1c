"""Curious peer + diffusion prior (``peer_diffusion_prior``): per-image figures before/after.

The case of ``tests/unit/test_peer_diffusion_prior.py``, a recorded run directory written by
:func:`fl_sim.cases.digits_peer_case` and read through the PEER view (nothing granted): the
sigmoid LeNet on grey 16x16 digits, ``--others`` clients with one digit of the TEST split each
(FedSGD), the peer inverts the others' mean gradient it derives from consecutive globals
(Inverting Gradients, ``--iterations``, labels recovered by the peer itself, no TV), then
each reconstruction is projected onto the digits prior (TRAIN split,
:data:`fl_sim.cases.DIGITS_PRIOR_CONFIG`). Prints per-image PSNR / SSIM before and after the
prior (images in true order), the peer's label accuracy, the prior's measured overlap with
the victims (content hashes), an ablation of the projection on the SAME plain
reconstructions (pooling, iterations, latent start), and the cost of one projection
iteration relative to one plain training step of the classifier (forward + backward + SGD
step on the same N images) and to one sampler pass (K DDIM steps, no gradient). Writes
everything as JSON to ``--out``. One thread; wall-clock times on a shared machine: compare
the ratios of one run. Example::

    .venv/bin/python benchmarks/peer_prior.py --prior /tmp/prior   # or --train-prior DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from prior_costs import seconds_per_call, unit_costs

from attacks.components.ddim_sampler import DDIMSampler
from attacks.peer_diffusion_prior import PeerDiffusionPrior, ddim_invert, project
from fl_sim.cases import DIGITS_PRIOR_CONFIG, digits_peer_case, others_truth
from fl_sim.metrics import label_accuracy, score_reconstruction
from fl_sim.prior_overlap import prior_overlap
from fl_sim.priors import load_prior_for
from fl_sim.run_dir import load_run
from fl_sim.train_prior import train_prior

ROOT = Path(__file__).resolve().parents[1]
#: the inversion of the tests' quality case (tests/unit/test_peer_diffusion_prior.py)
INVERSION = {"max_iterations": 200, "labels": "auto", "tv_weight": 0.0}

#: projection variants scored on the same plain reconstructions: (label, pool, iterations, init)
ABLATION = [("round trip only", 4, 0, "inversion"), ("pool 4, 20 it (default)", 4, 20, "inversion"),
            ("pool 4, 40 it", 4, 40, "inversion"), ("pool 2, 20 it", 2, 20, "inversion"),
            ("pool 1, 20 it (full-res MSE)", 1, 20, "inversion"),
            ("pool 4, 40 it, random start", 4, 40, "random")]


def _scores(images: torch.Tensor, truth: torch.Tensor) -> dict:
    s = score_reconstruction(images, truth)
    return {"psnr": s["psnr"], "ssim": s["ssim"],
            "psnr_per_image": s["psnr_per_image"], "ssim_per_image": s["ssim_per_image"]}


def costs(record, sampler: DDIMSampler, n: int, repeats: int) -> dict[str, float]:
    """Seconds of one classifier training step, one sampler pass, one projection iteration."""
    x = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    z = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    out = unit_costs(record.spec, sampler, n, step_repeats=repeats * 10,
                     sampler_repeats=repeats)
    out["projection_iteration_s"] = seconds_per_call(
        lambda: project(sampler, x, z, iterations=1, lr=0.05, pool=4), repeats)
    out["projection_over_train_step"] = out["projection_iteration_s"] / out["train_step_s"]
    out["projection_over_sampler_pass"] = out["projection_iteration_s"] / out["sampler_pass_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", help="a prior saved by fl-sim train-prior (digits, 16x16 grey)")
    ap.add_argument("--train-prior", help="train the tests' digits prior into this directory")
    ap.add_argument("--others", type=int, default=16, help="clients behind the aggregate")
    ap.add_argument("--iterations", type=int, default=INVERSION["max_iterations"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "peer_prior.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    prior = args.prior or str(train_prior(copy.deepcopy(DIGITS_PRIOR_CONFIG),
                                          Path(args.train_prior or "/tmp/peer_prior")))
    run = load_run(digits_peer_case(Path(tempfile.mkdtemp(prefix="peer_case-")),
                                    args.others))
    kw = {**INVERSION, "max_iterations": args.iterations}
    attack = PeerDiffusionPrior(prior=prior, **kw)
    record = run.view("peer", client=0, grant=attack.required_knowledge()).record(1)
    truth, true_labels = others_truth(run, 1, 0)
    out = attack(record, generator=torch.Generator().manual_seed(args.seed))
    before, after = _scores(out.extras["before_images"], truth), _scores(out.images, truth)
    labels_acc = float(label_accuracy(out.labels, true_labels))
    label_source = dict(out.knowledge).get("labels")  # how the peer got them (recovered)
    overlap = prior_overlap(prior, truth)
    print(f"{args.others} images, IG {args.iterations} it ({out.extras['inversion_seconds']:.1f}"
          f" s), projection {out.extras['projection_iterations']} it "
          f"({out.extras['projection_seconds']:.1f} s); labels recovered by the peer "
          f"({label_source}): accuracy {labels_acc:.3f}; prior overlap with the "
          f"victims: {overlap['count']} of {overlap['victims']} ({overlap['source']})")
    print("image  PSNR before  PSNR after  SSIM before  SSIM after")
    rows = list(zip(before["psnr_per_image"], after["psnr_per_image"],
                    before["ssim_per_image"], after["ssim_per_image"], strict=True))
    for i, (pb, pa, sb, sa) in enumerate(rows):
        print(f"{i:5d}  {pb:11.2f}  {pa:10.2f}  {sb:11.3f}  {sa:10.3f}")
    print(f" mean  {before['psnr']:11.2f}  {after['psnr']:10.2f}  {before['ssim']:11.3f}  "
          f"{after['ssim']:10.3f}")
    ablation = run_ablation(record, out.extras["before_images"], truth, prior, args.seed)
    timing = costs(record, DDIMSampler.from_scheduler(
        *_unet_and_scheduler(prior, record), 5), args.others, args.repeats)
    print(json.dumps(timing))
    result = {"others": args.others, "iterations": args.iterations, "seed": args.seed,
              "prior": prior, "case": str(run.path), "labels": label_source,
              "label_accuracy": labels_acc, "prior_overlap": overlap,
              "before": before, "after": after, "ablation": ablation,
              "timing": timing, "extras": {k: v for k, v in out.extras.items()
                                           if isinstance(v, (int, float, str))}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


def _unet_and_scheduler(prior: str, record) -> tuple:
    p = load_prior_for(prior, record.spec, attack="peer_diffusion_prior")
    return p.unet, p.scheduler


def run_ablation(record, before: torch.Tensor, truth: torch.Tensor, prior: str,
                 seed: int) -> list[dict]:
    """Each :data:`ABLATION` variant of the projection on the same plain reconstructions."""
    sampler = DDIMSampler.from_scheduler(*_unet_and_scheduler(prior, record), 5)
    rows = []
    print("projection variant               PSNR    SSIM   seconds")
    for label, pool, iterations, init in ABLATION:
        t0 = time.perf_counter()
        z0 = (ddim_invert(sampler, before * 2 - 1) if init == "inversion" else
              torch.randn(before.shape, generator=torch.Generator().manual_seed(seed)))
        images, _, _ = project(sampler, before, z0, iterations=iterations, lr=0.05, pool=pool)
        s = _scores(images, truth)
        rows.append({"variant": label, "pool": pool, "iterations": iterations, "init": init,
                     "psnr": s["psnr"], "ssim": s["ssim"],
                     "seconds": time.perf_counter() - t0})
        print(f"{label:31s} {s['psnr']:6.2f}  {s['ssim']:.3f}  {rows[-1]['seconds']:7.1f}")
    return rows


if __name__ == "__main__":
    main()
