"""Inverting Gradients against DP-SGD's noise on the reference ConvNet case, and ε figures.

ConvNet-64 (FACTS.md "Reference attack cases": seeded, untrained, BatchNorm in eval mode),
CIFAR-10 test images in index order, batch 1, FedSGD, labels granted, IG without TV (a TV
prior alone smooths the random start towards higher PSNR). Per image: the random-start PSNR
(the attack's own initial guess, restart 0, against the truth), IG on the plain gradient and
IG on DP-SGD's private gradient at each ``--sigmas`` (clip bound ``--clip``; σ = 0 is
clipping only). DLG's "no leakage at noise variance ≥ 1e-2" is σ = 0.1 at C = 1.

    .venv/bin/python benchmarks/dp_attacks.py [--images 3] [--iterations 200]
        [--sigmas 0.1] [--clip 1.0] [--threads 1]

Prints a table and writes ``benchmarks/out/dp_attacks.json``; also prints ε (RDP and PRV,
δ = 1e-5) of a few DP-SGD / local-DP settings. Run from the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from attack_cases import cifar_images, cifar_labels, make_record, make_task  # noqa: E402

from attacks.inverting_gradients import InvertingGradients  # noqa: E402
from attacks.objectives import NormalisedImages  # noqa: E402
from defenses.accounting import epsilon  # noqa: E402
from defenses.dp_sgd import DPSGD  # noqa: E402
from fl_sim.metrics import psnr, score_reconstruction  # noqa: E402
from fl_sim.tasks.base import Batch  # noqa: E402


def one_image(i: int, iterations: int, sigmas: list[float], clip: float) -> dict:
    task, spec = make_task("convnet")
    x, y = cifar_images(1, start=i), cifar_labels(1, start=i)
    rec = make_record(task, spec, x, y, knowledge={"labels": y})
    start = NormalisedImages((1, *x.shape), spec.mean, spec.std,
                             generator=torch.Generator().manual_seed(0))
    start.clamp_()
    row = {"image": i, "random_start": float(psnr(start.images()[0].detach(), x).mean())}

    def attack(update: dict) -> tuple[float, float]:
        t0 = time.perf_counter()
        out = InvertingGradients(max_iterations=iterations, labels="granted", tv_weight=0.0)(
            dataclasses.replace(rec, update=update), generator=torch.Generator().manual_seed(0))
        return score_reconstruction(out.images, x)["psnr"], time.perf_counter() - t0

    row["undefended"], row["seconds"] = attack(rec.update)
    for s in sigmas:
        g = DPSGD(noise_multiplier=s, max_grad_norm=clip).private_gradient(
            task, Batch(x, y), {}, torch.Generator().manual_seed(i))[1]
        row[f"sigma={s}"], _ = attack(g)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--sigmas", type=lambda s: [float(v) for v in s.split(",")], default=[0.1])
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for i in range(a.images):
        rows.append(one_image(i, a.iterations, a.sigmas, a.clip))
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                          for k, v in rows[-1].items()}), flush=True)
    eps = [{"setting": f"sigma={s}, q={q}, steps={n}", "rdp": epsilon(s, q, n, 1e-5, "rdp"),
            "prv": epsilon(s, q, n, 1e-5, "prv")}
           for s, q, n in [(1.0, 1.0, 1), (1.0, 0.1, 10), (1.0, 0.01, 1000), (0.1, 1.0, 1),
                           (2.0, 1.0, 25)]]
    for e in eps:
        print(f"{e['setting']}: RDP {e['rdp']:.3f}, PRV {e['prv']:.3f}")
    out = ROOT / "benchmarks" / "out" / "dp_attacks.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "rows": rows, "epsilon": eps}, indent=1))


if __name__ == "__main__":
    main()
