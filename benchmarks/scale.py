"""Scale: 10 / 100 / 1,000 simulated clients on one machine (tiny classifier, 10 % sampled).

Each population runs the same experiment through
:func:`fl_sim.federation.simulation.run_experiment` on Flower's Ray simulation backend:
digits 16×16, MLP [32], FedAvg, one local step of batch 8, ``fraction_train = 0.1`` and
``fraction_evaluate = 0.1`` (so 1 / 10 / 100 clients train and evaluate per round), taps and
ground truth on, 6 rounds by default. Reported per population:

* ``round_s``: median wall-clock seconds per round after warm-up (round 1 holds Ray's start,
  node discovery and the actors' first torch import), from the progress events;
  ``per_sampled_ms``: ``round_s`` / sampled clients (flat if time grows with the SAMPLED
  clients, not the population);
* ``peak_rss_gb``: peak summed resident memory of the driver and all its descendants (Ray's
  GCS, raylet, workers), sampled every 0.25 s; target: 1,000 clients within 24 GiB;
* ``run_dir_mb_per_round``: growth of the run directory per round after warm-up;
* ``startup_s``: seconds to the end of round 1.

Usage::

    python benchmarks/scale.py                       # 10, 100, 1000 clients, 6 rounds
    python benchmarks/scale.py --clients 10 100 --rounds 4

Writes ``benchmarks/out/scale.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from federation import PeakSampler, dir_mb  # noqa: E402  (the sibling benchmark's helpers)

OUT = Path(__file__).resolve().parent / "out" / "scale.json"
RSS_TARGET_GB = 24.0


#: digits has 1,438 training images; past that many clients the run uses ``synthetic``
#: (60,000 training images, same 16x16 gray format; see ``fl_sim/data/synthetic.py``).
DIGITS_TRAIN = 1438
DATA = {"digits": {"name": "digits", "image_size": 16},
        "synthetic": {"name": "synthetic", "image_size": 16, "num_train": 60_000}}


def scale_config(num_clients: int, num_rounds: int, *, fraction: float, output_dir: Path,
                 data: str = "digits") -> Any:
    from fl_sim import config
    return config.from_dict({
        "run": {"name": f"scale-{num_clients}", "seed": 0, "output_dir": str(output_dir)},
        "data": dict(DATA[data]),
        "model": {"name": "mlp", "hidden": [32]},
        "federation": {"num_clients": num_clients, "num_rounds": num_rounds,
                       "fraction_train": fraction, "fraction_evaluate": fraction,
                       "local_steps": 1, "batch_size": 8, "lr": 0.1,
                       "client_resources": {"num_cpus": 1}},
        "strategy": {"name": "fedavg"},
    })


def run_case(num_clients: int, num_rounds: int, *, fraction: float, workdir: Path,
             data: str = "digits") -> dict[str, Any]:
    from fl_sim.federation.simulation import run_experiment

    cfg = scale_config(num_clients, num_rounds, fraction=fraction, output_dir=workdir,
                       data=data)
    run_dir = workdir / cfg.run.name
    stamps: list[float] = []
    sizes: list[float] = []
    with PeakSampler() as sampler:
        t0 = time.perf_counter()

        def progress(event: dict[str, Any]) -> None:
            if "round" in event:
                stamps.append(time.perf_counter())
                sizes.append(dir_mb(run_dir))

        run_experiment(cfg, run_dir=run_dir, progress=progress)
        peak = sampler.take()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    round_s = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    warm = round_s[1:] or round_s
    sampled = len(rows[-1]["clients_sampled"])
    growth = [b - a for a, b in zip(sizes[:-1], sizes[1:], strict=False)]
    median = statistics.median(warm)
    return {
        "clients": num_clients, "data": data, "sampled_per_round": sampled, "rounds": num_rounds,
        "startup_s": round(round_s[0], 2),
        "round_s_each": [round(x, 3) for x in round_s],
        "round_s": round(median, 3),
        "per_sampled_ms": round(1000 * median / sampled, 2),
        "server_s_each": [round(float(r["seconds"]), 3) for r in rows],
        "peak_rss_gb": round(peak / 2**30, 2),
        "run_dir_mb_each": [round(x, 2) for x in sizes],
        "run_dir_mb_per_round": round(statistics.median(growth), 3) if growth else None,
        "fed_eval_accuracy": rows[-1].get("fed_eval_accuracy"),
        "failed": sum(len(r.get("clients_failed", [])) for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--sampled", type=int, default=None,
                    help="clients sampled per round in every population (sets the fraction "
                         "per population, e.g. 100 of 1,000 and 100 of 10,000)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--data", choices=sorted(DATA), default=None,
                    help="data source for every population (default: digits, or synthetic "
                         f"when a population exceeds digits' {DIGITS_TRAIN} training images)")
    args = ap.parse_args(argv)
    data = args.data or ("synthetic" if max(args.clients) > DIGITS_TRAIN else "digits")
    if args.rounds < 3:
        ap.error("--rounds must be >= 3 (round 1 is warm-up)")
    results = []
    with tempfile.TemporaryDirectory(prefix="fl-sim-scale-") as tmp:
        for n in args.clients:
            fraction = args.sampled / n if args.sampled else args.fraction
            load = os.getloadavg()[0]
            res = run_case(n, args.rounds, fraction=fraction, workdir=Path(tmp), data=data)
            res["load_1min_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
            results.append(res)
            print(json.dumps(res), flush=True)
    report = {
        "benchmark": "scale", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "cpus": os.cpu_count()},
        "setup": f"{data} 16x16, mlp [32], fedavg, 1 local step, batch 8, fraction_train = "
                 f"fraction_evaluate = {args.sampled or args.fraction}"
                 f"{' clients' if args.sampled else ''}, taps + truth on, Ray simulation, "
                 "client_resources.num_cpus = 1",
        "rss_target_gb": RSS_TARGET_GB, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out}")
    return 0


def print_table(results: list[dict[str, Any]]) -> None:
    head = (f"{'clients':>7} {'sampled':>7} {'start s':>7} {'s/round':>8} {'ms/sampled':>10} "
            f"{'peak RSS GB':>11} {'run dir MB/round':>16} {'failed':>6}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['clients']:>7} {r['sampled_per_round']:>7} {r['startup_s']:>7.1f} "
              f"{r['round_s']:>8.3f} {r['per_sampled_ms']:>10.1f} {r['peak_rss_gb']:>11.2f} "
              f"{r['run_dir_mb_per_round'] or 0:>16.3f} {r['failed']:>6}")


if __name__ == "__main__":
    sys.exit(main())
