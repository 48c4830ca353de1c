"""Inverting Gradients (or DLG) against pruning, Soteria and quantisation, plain and adaptive.

For each CIFAR-10 test image (vendored, ``tests/data``; average-pooled to ``--size``) a
seeded, untrained eval-mode model (``--model``, default LeNet as in DLG) produces one FedSGD
gradient (batch 1). Each defense transforms it as a client would (``defenses/``), the record
names the defense, and Inverting Gradients (``--iterations``, labels granted, seed 0)
(or DLG, ``--attack dlg``) attacks the undefended gradient and each defended one
(``--defenses``), plain and ``adaptive = true``
(``attacks/adaptive.py``). Prints one JSON line per image (PSNR dB per variant) and the means.
One torch thread; the machine may be shared: compare the columns of one run. Example::

    .venv/bin/python benchmarks/defense_attacks.py --images 8
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial  # noqa: E402
from pathlib import Path

import torch
import torch.nn.functional as F

from fl_sim import cases  # noqa: E402
from fl_sim.cases import make_record, make_spec, with_update  # noqa: E402

#: the vendored CIFAR-10 slice the tests use (data, read by path; provenance tests/data/README.md)
CIFAR_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "cifar10_ref.npz"
cifar_images = partial(cases.cifar_images, CIFAR_FILE)
cifar_labels = partial(cases.cifar_labels, CIFAR_FILE)

from attacks.dlg import DLG  # noqa: E402
from attacks.inverting_gradients import InvertingGradients  # noqa: E402
from defenses.base import UpdateContext  # noqa: E402
from defenses.pruning import Pruning  # noqa: E402
from defenses.quantization import Quantization  # noqa: E402
from defenses.soteria import Soteria  # noqa: E402
from fl_sim.metrics import psnr  # noqa: E402
from fl_sim.records import TruthStep  # noqa: E402
from fl_sim.tasks import build_task  # noqa: E402

DEFENSES = {"pruning_0.9": Pruning(ratio=0.9), "soteria_0.8": Soteria(pruning_rate=0.8),
            "quant_4bit": Quantization(bits=4), "quant_sign": Quantization(mode="sign")}
ATTACKS = {"inverting_gradients": InvertingGradients, "dlg": DLG}


def run_image(i: int, args: argparse.Namespace) -> dict:
    params = {"width": 16} if args.model == "convnet" else {}
    spec = make_spec(args.model, params, image_size=args.size)
    task = build_task(spec, seed=0)
    task.model.eval()
    x = F.adaptive_avg_pool2d(cifar_images(1, start=i), args.size)
    y = cifar_labels(1, start=i)
    rec = make_record(task, spec, x, y, knowledge={"labels": y})
    ctx = UpdateContext("gradient", rec.global_params, task,
                        (TruthStep(0, x, y, torch.tensor([i])),), 0.0, 1, 1, 0,
                        torch.Generator().manual_seed(i))
    variants = [("undefended", rec, False)]
    for name in args.defenses:
        d = DEFENSES[name]
        r = with_update(rec, d.apply(rec.update, ctx), x, y, defenses=(d.describe(),))
        variants += [(name, r, False), (name + "_adaptive", r, True)]
    row: dict = {"image": i}
    t0 = time.perf_counter()
    for name, r, adaptive in variants:
        attack = ATTACKS[args.attack](max_iterations=args.iterations, labels="granted",
                                      adaptive=adaptive)
        out = attack(r, generator=torch.Generator().manual_seed(0))
        row[name] = round(float(psnr(out.images, x).mean()), 2)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--model", default="lenet", choices=["lenet", "convnet"])
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--iterations", type=int, default=300,
                   help="max_iterations of the attack (DLG: L-BFGS steps of 20 iterations)")
    p.add_argument("--attack", default="inverting_gradients", choices=list(ATTACKS))
    p.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=list(DEFENSES))
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for i in range(args.start, args.start + args.images):
        rows.append(run_image(i, args))
        print(json.dumps(rows[-1]), flush=True)
    keys = [k for k in rows[0] if k not in ("image", "seconds")]
    print(json.dumps({"mean_psnr": {k: round(sum(r[k] for r in rows) / len(rows), 2)
                                    for k in keys},
                      "seconds": round(sum(r["seconds"] for r in rows), 1),
                      "args": vars(args)}))


if __name__ == "__main__":
    main()
