"""Inverting Gradients against DP-SGD's noise on the reference ConvNet case, and ε figures.

ConvNet-64 (FACTS.md "Reference attack cases": seeded, untrained, BatchNorm in eval mode),
CIFAR-10 test images in index order, batch 1, FedSGD, labels granted, IG without TV (a TV
prior alone smooths the random start towards higher PSNR). Per image: the random-start PSNR
(the attack's own initial guess, restart 0, against the truth), IG on the plain gradient and
IG on DP-SGD's private gradient at each ``--sigmas`` (clip bound ``--clip``; σ = 0 is
clipping only). DLG's "no leakage at noise variance ≥ 1e-2" is σ = 0.1 at C = 1.

    .venv/bin/python benchmarks/dp_attacks.py [--images 3] [--iterations 200]
        [--sigmas 0.1] [--clip 1.0] [--threads 1] [--epsilon-only]

Prints a table and writes ``benchmarks/out/dp_attacks.json``; also prints ε (RDP and PRV,
δ = 1e-5) of a few DP-SGD / local-DP settings, each through the defense's own accounting
(``round_epsilon``: DP-SGD add/remove one example, sensitivity C; local DP replace one
client's data, sensitivity 2C — the unit and relation are printed beside ε).
``--epsilon-only`` prints just those (no attack). Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from functools import partial  # noqa: E402

from fl_sim import cases  # noqa: E402
from fl_sim.cases import make_record, make_task, with_update  # noqa: E402

#: the vendored CIFAR-10 slice the tests use (data, read by path; provenance tests/data/README.md)
CIFAR_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "cifar10_ref.npz"
cifar_images = partial(cases.cifar_images, CIFAR_FILE)
cifar_labels = partial(cases.cifar_labels, CIFAR_FILE)

from attacks.components.objectives import NormalisedImages  # noqa: E402
from attacks.inverting_gradients import InvertingGradients  # noqa: E402
from defenses.dp_sgd import DPSGD  # noqa: E402
from defenses.local_dp import LocalDP  # noqa: E402
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
            with_update(rec, update, x, y), generator=torch.Generator().manual_seed(0))
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
    ap.add_argument("--epsilon-only", action="store_true", help="print the ε figures only")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for i in range(0 if a.epsilon_only else a.images):
        rows.append(one_image(i, a.iterations, a.sigmas, a.clip))
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                          for k, v in rows[-1].items()}), flush=True)
    eps = epsilon_figures()
    for e in eps:
        print(f"{e['setting']} [{e['dp_unit']}, {e['dp_neighbouring']}]: RDP {e['rdp']:.3f}, "
              f"PRV {e['prv']:.3f}")
    if a.epsilon_only:  # keep an earlier run's attack figures
        return
    out = ROOT / "benchmarks" / "out" / "dp_attacks.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "rows": rows, "epsilon": eps}, indent=1))


def epsilon_figures() -> list[dict[str, object]]:
    """ε at δ = 1e-5 (RDP and PRV) of a few settings, each through the defense's own
    ``round_epsilon`` (so the sensitivity follows from its neighbouring relation)."""
    out: list[dict[str, object]] = []
    # DP-SGD: (σ, batch, partition, steps): q = batch / partition
    for s, b, n, k in [(1.0, 10, 100, 10), (1.0, 1, 100, 1000), (0.1, 1, 1, 1)]:
        d = {acc: DPSGD(noise_multiplier=s, accountant=acc) for acc in ("rdp", "prv")}
        out.append({"setting": f"dp_sgd sigma={s}, q={b / n:g}, steps={k}",
                    "dp_unit": DPSGD.privacy_unit, "dp_neighbouring": DPSGD.neighbouring,
                    **{acc: d[acc].round_epsilon(batch_size=b, partition_size=n, steps=k)
                       for acc in d}})
    # local DP: (σ, rounds the client took part in)
    for s, r in [(1.0, 1), (0.1, 1), (2.0, 25)]:
        d = {acc: LocalDP(noise_multiplier=s, accountant=acc) for acc in ("rdp", "prv")}
        out.append({"setting": f"local_dp sigma={s}, rounds={r}",
                    "dp_unit": LocalDP.privacy_unit, "dp_neighbouring": LocalDP.neighbouring,
                    **{acc: d[acc].round_epsilon(rounds=r) for acc in d}})
    return out


if __name__ == "__main__":
    main()
