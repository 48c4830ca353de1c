"""Speed of Inverting Gradients against one plain forward+backward, and time to breaching's PSNR.

Cases of FACTS.md ("Reference attack cases"): ConvNet-64 batch 1 and 4, ResNet-18 batch 1 (and
the tiny LeNet-sigmoid of DLG, where the lean double backward does not pay) on
CIFAR-10 test images (index order), seeded untrained models in eval mode, labels granted.

    .venv/bin/python benchmarks/attack_speed.py [--threads 2] [--skip-psnr] [--repeats 5]
        [--restart-iters 100] [--restart-repeats 1] [--skip-restarts]
    .venv/bin/python benchmarks/attack_speed.py --equal-time [--budgets wall,work]

Prints a table and writes ``benchmarks/out/attack_speed.json``. Times are wall-clock medians
of interleaved repetitions (the plain step and the attack alternate, so load from other
processes hits both alike); per-iteration attack time is the difference between runs of
``2k`` and ``k`` iterations, so set-up costs cancel; each case is also timed with stock
autograd double backward (``double_backward="autograd"``) for comparison. The restart
section times whole runs of ``--restart-iters`` iterations: R = 8 with successive halving
(the default) and without pruning (``"none"``, the paper's protocol) against R = 1,
interleaved. ``--equal-time`` races fl-sim against breaching's 600 iterations on ConvNet b1
(:func:`equal_time`): each setting gets breaching's work (600 iterations x 3.0 plain
forward+backward passes) and its wall time (135 s = 3,470 plain passes of the idle machine),
counted in plain passes timed interleaved, so the load of a shared machine does not change
the iterations a budget buys. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
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


#: breaching's ConvNet b1 iteration cost 3.0 plain forward+backward passes on its day (FACTS.md;
#: its cheapest case), so its 600 iterations were worth 1,800 plain passes of that machine
BREACHING_PASSES = 600 * 3.0
#: fl-sim's plain ConvNet b1 forward+backward on the idle machine (2 threads, 2026-11-23,
#: RESULTS.md): breaching's 135 s of wall time are worth 135 / 0.0389 plain passes there
IDLE_PLAIN_S = 0.0389
#: fl-sim settings raced against breaching, fixed before the first equal-time run: the paper's
#: default, the cosine schedule, and 4 restarts with successive halving under the cosine one
EQUAL_TIME_VARIANTS = (("step", 1), ("cosine", 1), ("cosine", 4))


def _run_ig(record: Any, x: torch.Tensor, iterations: int, schedule: str,
            restarts: int) -> tuple[float, float]:
    """Wall seconds of a whole attack (problem set-up included) and its PSNR on ``x``."""
    attack = InvertingGradients(max_iterations=iterations, restarts=restarts,
                                labels="granted", schedule=schedule)
    t = time.perf_counter()
    out = attack.reconstruct(record, generator=torch.Generator().manual_seed(0))
    sec = time.perf_counter() - t
    return sec, float(score_reconstruction(out.images, x)["psnr"])


def _cost_in_passes(plain: Any, record: Any, x: torch.Tensor, restarts: int, calib: int,
                    repeats: int) -> tuple[float, float]:
    """``(a, b)``: a whole run of ``n`` iterations costs ``a + b * n`` plain passes.

    Runs of ``calib`` and ``2 * calib`` iterations alternate with plain passes (so load from
    other processes hits both alike); medians over ``repeats``. The step schedule stands for
    every schedule (same work per iteration); halving is included (its plan scales with n).
    """
    aa, bb = [], []
    for _ in range(repeats):
        p1 = plain()
        t1, _ = _run_ig(record, x, calib, "step", restarts)
        p2 = plain()
        t2, _ = _run_ig(record, x, 2 * calib, "step", restarts)
        p = (p1 + p2 + plain()) / 3
        b = max(t2 - t1, 1e-9) / calib / p
        bb.append(b)
        aa.append(max(t1 / p - b * calib, 0.0))
    return statistics.median(aa), statistics.median(bb)


def equal_time(budgets: dict[str, float], variants: tuple[tuple[str, int], ...] =
               EQUAL_TIME_VARIANTS, calib: int = 20, repeats: int = 3,
               ratio: float | None = None) -> list[dict[str, Any]]:
    """PSNR of fl-sim on ConvNet b1 when each variant gets the work of ``budgets`` (plain
    forward+backward passes, by name).

    Budgets are counted in plain passes timed interleaved with the attack, so the iteration
    count a budget buys does not depend on the load of this shared machine:
    ``iterations = (budget - a) / b`` (:func:`_cost_in_passes`; ``ratio`` given: ``b = ratio``,
    ``a = 0`` for single-restart settings, uncalibrated). Each final run's wall time
    and the plain pass timed right after it are reported beside it.
    """
    task, record, x, y = _case("convnet", 1)
    net, inputs = task.model, task.normalize(x)

    def plain(k: int = 5) -> float:
        ts = []
        for _ in range(k):
            t = time.perf_counter()
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(inputs), y).backward()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    plain(3)
    cost = {r: (0.0, ratio) if ratio is not None and r == 1
            else _cost_in_passes(plain, record, x, r, calib, repeats)
            for r in sorted({r for _, r in variants})}
    rows = []
    for name, passes in budgets.items():
        for schedule, restarts in variants:
            a, b = cost[restarts]
            iters = max(1, int((passes - a) / b))
            sec, psnr = _run_ig(record, x, iters, schedule, restarts)
            after = plain()
            rows.append({"budget": name, "budget_plain_passes": passes, "schedule": schedule,
                         "restarts": restarts,
                         "restart_pruning": "halving" if restarts > 1 else "none",
                         "passes_per_iteration": b, "setup_passes": a, "iterations": iters,
                         "wall_s": sec, "plain_s_after": after,
                         "passes_used": sec / after, "psnr": psnr,
                         "minus_breaching_db": psnr - BREACHING_PSNR})
    return rows


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
    ap.add_argument("--equal-time", action="store_true",
                    help="only the equal-wall-time race with breaching's 600 iterations")
    ap.add_argument("--budgets", default="work,wall",
                    help="work: breaching's 600 iterations x 3.0 plain passes; wall: its 135 s "
                         "in plain passes of the idle machine (135 / 0.0389 s); or a number of "
                         "plain passes")
    ap.add_argument("--calib", type=int, default=20,
                    help="--equal-time: iterations of the shorter calibration run")
    ap.add_argument("--ratio", type=float, default=None,
                    help="--equal-time: plain passes per single-restart IG iteration to use "
                         "instead of calibrating (e.g. the idle figure 2.57)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "attack_speed.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"threads": args.threads, "torch": torch.__version__,
                              "speed": [], "restarts": [], "time_to_psnr": []}
    if args.equal_time:
        return _main_equal_time(args)
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


def _main_equal_time(args: argparse.Namespace) -> int:
    """``--equal-time``: table + ``benchmarks/out/attack_speed_equal_time.json``."""
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    named = {"wall": BREACHING_SECONDS / IDLE_PLAIN_S, "work": BREACHING_PASSES}
    budgets = {b: named[b] if b in named else float(b) for b in args.budgets.split(",")}
    print(f"breaching: {BREACHING_PSNR} dB after 600 it in {BREACHING_SECONDS:.0f} s; budgets "
          f"in plain passes: " + ", ".join(f"{k} {v:.0f}" for k, v in budgets.items())
          + f"; load {load:.2f}")
    print(f"{'budget':>6s} {'passes':>6s} {'schedule':>8s} {'R':>2s} {'pass/it':>7s} "
          f"{'iters':>6s} {'wall s':>7s} {'used':>6s} {'PSNR dB':>8s} {'vs breaching':>12s}")
    result: dict[str, Any] = {"threads": args.threads, "torch": torch.__version__,
                              "calib": args.calib, "loadavg_1min_start": load,
                              "breaching_psnr": BREACHING_PSNR,
                              "breaching_seconds": BREACHING_SECONDS, "rows": []}
    out = args.out.with_name(args.out.stem + "_equal_time.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for row in equal_time(budgets, calib=args.calib, ratio=args.ratio):
        result["rows"].append(row)
        out.write_text(json.dumps(result, indent=2))  # partial results survive an interrupt
        print(f"{row['budget']:>6s} {row['budget_plain_passes']:6.0f} {row['schedule']:>8s} "
              f"{row['restarts']:2d} {row['passes_per_iteration']:7.2f} {row['iterations']:6d} "
              f"{row['wall_s']:7.1f} {row['passes_used']:6.0f} {row['psnr']:8.2f} "
              f"{row['minus_breaching_db']:+12.2f}", flush=True)
    result["loadavg_1min_end"] = os.getloadavg()[0]
    out.write_text(json.dumps(result, indent=2))
    print(f"load at end {result['loadavg_1min_end']:.2f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
