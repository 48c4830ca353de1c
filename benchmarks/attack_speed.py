"""Speed of Inverting Gradients against one plain forward+backward, and time to breaching's PSNR.

Cases of FACTS.md ("Reference attack cases"): ConvNet-64 batch 1 and 4, ResNet-18 batch 1 (and
the tiny LeNet-sigmoid of DLG, where the lean double backward does not pay) on
CIFAR-10 test images (index order), seeded untrained models in eval mode, labels granted.

    .venv/bin/python benchmarks/attack_speed.py [--threads 2] [--skip-psnr] [--repeats 5]
        [--restart-iters 100] [--restart-repeats 1] [--skip-restarts]

Prints a table and writes ``benchmarks/out/attack_speed.json``. Times are wall-clock medians
of interleaved repetitions (the plain step and the attack alternate, so load from other
processes hits both alike); per-iteration attack time is the difference between runs of
``2k`` and ``k`` iterations, so set-up costs cancel; each case is also timed with stock
autograd double backward (``double_backward="autograd"``) for comparison. The restart
section times whole runs of ``--restart-iters`` iterations: R = 8 with successive halving
(the default) and without pruning (``"none"``, the paper's protocol) against R = 1,
interleaved. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from functools import partial  # noqa: E402

from fl_sim import cases  # noqa: E402
from fl_sim.cases import make_record, make_task  # noqa: E402

#: the vendored CIFAR-10 slice the tests use (data, read by path; provenance tests/data/README.md)
CIFAR_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "cifar10_ref.npz"
cifar_images = partial(cases.cifar_images, CIFAR_FILE)
cifar_labels = partial(cases.cifar_labels, CIFAR_FILE)

from attacks.inverting_gradients import InvertingGradients, invert  # noqa: E402
from fl_sim.metrics import score_reconstruction  # noqa: E402

BREACHING_PSNR, BREACHING_SECONDS = 17.6, 135.0  # ConvNet b1, 600 iterations at 0.22 s/it


def _case(model: str, batch: int) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    task, spec = make_task(model)
    x, y = cifar_images(batch), cifar_labels(batch)
    return task, make_record(task, spec, x, y, knowledge={"labels": y}), x, y


def per_iteration(model: str, batch: int, restarts: tuple[int, ...], repeats: int,
                  k: int) -> dict[str, Any]:
    """Median seconds of one plain forward+backward and of one IG iteration per restart count."""
    task, record, x, y = _case(model, batch)
    problem, _ = InvertingGradients(labels="granted").problem(
        record, generator=torch.Generator().manual_seed(0))
    net, inputs = task.model, task.normalize(x)

    def plain() -> None:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(inputs), y).backward()

    def attack(r: int, iters: int, double_backward: str = "lean") -> float:
        t = time.perf_counter()
        invert(problem, max_iterations=iters, restarts=r, lr=0.1, tv_weight=0.2,
               restart_pruning="none", double_backward=double_backward,
               generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t

    plain()
    for r in restarts:
        attack(r, 1)
    attack(1, 1, "autograd")
    fb: list[float] = []
    it: dict[int, list[float]] = {r: [] for r in restarts}
    stock: list[float] = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(k):
            plain()
        fb.append((time.perf_counter() - t) / k)
        for r in restarts:
            it[r].append((attack(r, 2 * k) - attack(r, k)) / k)
        stock.append((attack(1, 2 * k, "autograd") - attack(1, k, "autograd")) / k)
    out: dict[str, Any] = {"model": model, "batch": batch,
                           "plain_fwd_bwd_s": statistics.median(fb)}
    for r in restarts:
        out[f"ig_iteration_s_R{r}"] = statistics.median(it[r])
    out["ratio_ig_to_plain"] = out["ig_iteration_s_R1"] / out["plain_fwd_bwd_s"]
    # the same iteration with stock autograd double backward (double_backward="autograd")
    out["ig_iteration_s_R1_autograd"] = statistics.median(stock)
    out["ratio_autograd_to_plain"] = out["ig_iteration_s_R1_autograd"] / out["plain_fwd_bwd_s"]
    if len(restarts) > 1:
        r = max(restarts)
        out[f"ratio_R{r}_to_R1"] = out[f"ig_iteration_s_R{r}"] / out["ig_iteration_s_R1"]
        # how much batch R costs a PLAIN step: the hardware's own batching gain, for context
        big = torch.cat([inputs] * r)
        ybig = torch.cat([y] * r)
        tb: list[float] = []
        for _ in range(repeats):
            t = time.perf_counter()
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(big), ybig).backward()
            tb.append(time.perf_counter() - t)
        out[f"plain_batch_x{r}_ratio"] = statistics.median(tb) / out["plain_fwd_bwd_s"]
    return out


def restart_cost(model: str, batch: int, iterations: int, repeats: int,
                 restarts: int = 8) -> dict[str, Any]:
    """Median wall time of whole runs: ``restarts`` with halving / without pruning vs one."""
    _, record, _, _ = _case(model, batch)
    problem, _ = InvertingGradients(labels="granted").problem(
        record, generator=torch.Generator().manual_seed(0))
    variants = {"R1": (1, "none"), f"R{restarts}_halving": (restarts, "halving"),
                f"R{restarts}_none": (restarts, "none")}

    def run(r: int, pruning: str) -> tuple[float, int]:
        t = time.perf_counter()
        res = invert(problem, max_iterations=iterations, restarts=r, lr=0.1, tv_weight=0.2,
                     restart_pruning=pruning, generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t, res.evaluations

    times: dict[str, list[float]] = {k: [] for k in variants}
    evals: dict[str, int] = {}
    for _ in range(repeats):
        for name, (r, pruning) in variants.items():
            sec, evals[name] = run(r, pruning)
            times[name].append(sec)
    out: dict[str, Any] = {"model": model, "batch": batch, "iterations": iterations,
                           "repeats": repeats}
    for name in variants:
        out[f"{name}_s"] = statistics.median(times[name])
        out[f"{name}_evaluations"] = evals[name]
    for name in list(variants)[1:]:
        out[f"ratio_{name}_to_R1"] = out[f"{name}_s"] / out["R1_s"]
    return out


def time_to_psnr(iterations: int, schedule: str, target: float) -> dict[str, Any]:
    """Wall time (excluding scoring) until ConvNet b1 first reaches ``target`` dB."""
    _, record, x, _ = _case("convnet", 1)
    trace: list[tuple[int, float, float]] = []
    scoring = [0.0]
    start = time.perf_counter()

    def callback(i: int, images: torch.Tensor) -> None:
        t = time.perf_counter()
        p = score_reconstruction(images[0], x)["psnr"]
        trace.append((i + 1, t - start - scoring[0], p))
        scoring[0] += time.perf_counter() - t

    attack = InvertingGradients(max_iterations=iterations, labels="granted", schedule=schedule)
    out = attack.reconstruct(record, generator=torch.Generator().manual_seed(0),
                             callback=callback)
    hit = next(((i, s) for i, s, p in trace if p >= target), None)
    return {"schedule": schedule, "max_iterations": iterations,
            "final_psnr": score_reconstruction(out.images, x)["psnr"],
            "best_psnr": max(p for _, _, p in trace),
            "total_s": time.perf_counter() - start - scoring[0],
            "reached_at_iteration": None if hit is None else hit[0],
            "seconds_to_target": None if hit is None else hit[1],
            "fraction_of_breaching_135s": None if hit is None else hit[1] / BREACHING_SECONDS,
            "trace_every_25": [(i, round(s, 1), round(p, 2)) for i, s, p in trace
                               if i % 25 == 0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3, help="k of the 2k-minus-k difference")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-psnr", action="store_true")
    ap.add_argument("--skip-restarts", action="store_true")
    ap.add_argument("--restart-iters", type=int, default=100,
                    help="budget of the whole-run restart timings (R=8 vs R=1)")
    ap.add_argument("--restart-repeats", type=int, default=1)
    ap.add_argument("--psnr-runs", default="step:600,cosine:300",
                    help="schedule:iterations pairs for the time-to-PSNR runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "attack_speed.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"threads": args.threads, "torch": torch.__version__,
                              "speed": [], "restarts": [], "time_to_psnr": []}
    if not args.skip_speed:
        print(f"{'case':16s} {'fwd+bwd s':>10s} {'IG it s':>9s} {'ratio':>6s} "
              f"{'stock':>6s} {'R8/R1*':>6s} {'plain x8':>8s}  (*per iteration, no pruning; "
              "stock: double_backward='autograd')")
        for model, batch, restarts in (("convnet", 1, (1, 8)), ("convnet", 4, (1,)),
                                       ("resnet18", 1, (1, 8)), ("lenet", 1, (1,))):
            row = per_iteration(model, batch, restarts, args.repeats, args.iters)
            result["speed"].append(row)
            print(f"{model + ' b' + str(batch):16s} {row['plain_fwd_bwd_s']:10.4f} "
                  f"{row['ig_iteration_s_R1']:9.4f} {row['ratio_ig_to_plain']:6.2f} "
                  f"{row['ratio_autograd_to_plain']:6.2f} "
                  f"{row.get('ratio_R8_to_R1', float('nan')):6.2f} "
                  f"{row.get('plain_batch_x8_ratio', float('nan')):8.2f}", flush=True)
    if not args.skip_restarts:
        print(f"{'case':16s} {'iters':>5s} {'R1 s':>7s} {'R8 halv s':>9s} {'ratio':>6s} "
              f"{'R8 none s':>9s} {'ratio':>6s} {'evals h/n/1':>14s}")
        for model, batch in (("convnet", 1), ("resnet18", 1)):
            row = restart_cost(model, batch, args.restart_iters, args.restart_repeats)
            result["restarts"].append(row)
            ev = (f"{row['R8_halving_evaluations']}/{row['R8_none_evaluations']}/"
                  f"{row['R1_evaluations']}")
            print(f"{model + ' b' + str(batch):16s} {args.restart_iters:5d} {row['R1_s']:7.2f} "
                  f"{row['R8_halving_s']:9.2f} {row['ratio_R8_halving_to_R1']:6.2f} "
                  f"{row['R8_none_s']:9.2f} {row['ratio_R8_none_to_R1']:6.2f} {ev:>14s}",
                  flush=True)
    if not args.skip_psnr:
        for spec in args.psnr_runs.split(","):
            schedule, iters = spec.split(":")
            row = time_to_psnr(int(iters), schedule, BREACHING_PSNR)
            result["time_to_psnr"].append(row)
            print(f"ConvNet b1 {schedule}:{iters}: final {row['final_psnr']:.2f} dB, reached "
                  f"{BREACHING_PSNR} dB at it {row['reached_at_iteration']} after "
                  f"{row['seconds_to_target']} s (total {row['total_s']:.1f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
