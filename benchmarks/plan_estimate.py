"""The attack plan's time estimate against the measured time of the attack (issue 24 item 8).

Three tiny cases, fixed before any outcome was seen (seeded models, first images):

* ``ig_lenet_fedavg``: inverting_gradients, LeNet at 16 px, a FedAvg delta of CIFAR-10 test
  images 0-3 (2 local steps of 2), 30 iterations, labels granted;
* ``gidm_tiny``: gidm, the tiny UNet on digits 0-7, a FedAvg delta of 2 local steps of 4,
  3 + 3 iterations (Adam in phase 2), sampler 4 steps;
* ``dlg_lenet``: dlg, LeNet (sigmoid) at 32 px, CIFAR-10 test image 0, 3 outer L-BFGS steps
  of <= 20 iterations, labels recovered (iDLG).

Each case is planned and run ``--repeats`` times, interleaved; the ratio estimate / measured
(the plan's point estimate; its range's ends where it states one) is printed and written to
``benchmarks/out/plan_estimate.json``. ``--baseline-commit C`` also plans each run with
``fl_sim/attack_plan.py`` as of commit ``C`` (read with ``git show``), at the same moment, so
both estimates face the same load. Run from the repository root:

    .venv/bin/python benchmarks/plan_estimate.py [--repeats 3] [--threads 2]
        [--baseline-commit 1466b4b]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import attacks  # noqa: F401  (registers the plug-ins)
from fl_sim import cases
from fl_sim.attack_plan import plan_attack
from fl_sim.cases.data import digits_victims, global_task
from fl_sim.cases.records import diffusion_delta_record
from fl_sim.registry import ATTACKS

ROOT = Path(__file__).resolve().parents[1]
CIFAR_FILE = ROOT / "tests" / "data" / "cifar10_ref.npz"
cifar_images = partial(cases.cifar_images, CIFAR_FILE)
cifar_labels = partial(cases.cifar_labels, CIFAR_FILE)


def _granted(rec: Any, y: torch.Tensor) -> Any:
    return dataclasses.replace(rec, knowledge={"granted": ("labels",), "labels": y})


def ig_lenet_fedavg() -> tuple[str, Any, Any]:
    spec = cases.make_spec("lenet", {}, image_size=16)
    from fl_sim.tasks import build_task
    task = build_task(spec, seed=0)
    task.model.eval()
    x, y = F.adaptive_avg_pool2d(cifar_images(4), 16), cifar_labels(4)
    rec = _granted(cases.fedavg_delta_record(task, spec, x, y, lr=0.1, steps=2, batch_size=2), y)
    return "inverting_gradients", ATTACKS.create("inverting_gradients", max_iterations=30,
                                                 labels="granted"), rec


def gidm_tiny() -> tuple[str, Any, Any]:
    task, spec = global_task()
    rec = diffusion_delta_record(task, spec, digits_victims(8), lr=0.01, steps=2, batch_size=4)
    return "gidm", ATTACKS.create("gidm", phase1_iterations=3, phase2_iterations=3,
                                  sampler_steps=4, phase2_optimizer="adam"), rec


def dlg_lenet() -> tuple[str, Any, Any]:
    task, spec = cases.make_task("lenet")
    rec = cases.make_record(task, spec, cifar_images(1), cifar_labels(1))
    return "dlg", ATTACKS.create("dlg", max_iterations=3), rec


CASES: dict[str, Callable[[], tuple[str, Any, Any]]] = {
    "ig_lenet_fedavg": ig_lenet_fedavg, "gidm_tiny": gidm_tiny,
    "dlg_lenet": dlg_lenet}


def _module_at(commit: str) -> Any:
    """``fl_sim/attack_plan.py`` as of ``commit``, as a module (for the baseline estimate)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:fl_sim/attack_plan.py"],
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(f"attack_plan_{commit}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f"attack_plan@{commit}", "exec"), mod.__dict__)  # noqa: S102
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "plan_estimate.json"))
    ap.add_argument("--baseline-commit", default=None)
    args = ap.parse_args()
    baseline = _module_at(args.baseline_commit) if args.baseline_commit else None
    torch.set_num_threads(args.threads)
    built = {name: CASES[name]() for name in args.cases.split(",")}
    rows: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for case, (name, attack, rec) in built.items():
            load = os.getloadavg()[0]
            before = baseline.plan_attack(name, attack, rec).seconds if baseline else None
            plan = plan_attack(name, attack, rec)
            t0 = time.perf_counter()
            attack(rec, generator=torch.Generator().manual_seed(0))
            measured = time.perf_counter() - t0
            low, high = getattr(plan, "seconds_range", (plan.seconds, plan.seconds))
            row = {"case": case, "repeat": rep, "load_1min": round(load, 1),
                   "estimate_s": round(plan.seconds, 2), "low_s": round(low, 2),
                   "high_s": round(high, 2), "measured_s": round(measured, 2),
                   "ratio": round(plan.seconds / measured, 2),
                   "low_ratio": round(low / measured, 2),
                   "high_ratio": round(high / measured, 2), "plan": plan.lines()[0]}
            if before is not None:
                row.update(baseline_s=round(before, 2), baseline_ratio=round(before / measured, 2))
            rows.append(row)
            print(f"{case:16s} rep {rep} load {load:4.1f}: estimate {plan.seconds:7.2f} s "
                  f"[{low:.2f}, {high:.2f}]  measured {measured:7.2f} s  ratio "
                  f"{row['ratio']:.2f} [{row['low_ratio']:.2f}, {row['high_ratio']:.2f}]"
                  + (f"  baseline {before:.2f} s ratio {row['baseline_ratio']:.2f}"
                     if before is not None else ""), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
