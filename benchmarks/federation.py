"""Federation speed and memory: seconds per round, tap overhead, memory per round.

The tiny classifier (digits 16×16, MLP 256→32→10, FedAvg, one local step of batch 8) with 10
and 100 clients for 5 rounds on Flower's Ray simulation backend, through
:func:`fl_sim.federation.simulation.run_experiment`, once with the taps off and once on.

Reported per (clients, taps):

* ``round_s``: wall-clock seconds per round after warm-up (round 1, which includes Ray's
  start and the actors' first torch import, is excluded), timed between the progress events
  ``run_experiment`` emits after each round; ``server_s``: the ServerApp's own round time
  (``metrics.jsonl`` ``seconds``);
* ``taps_ratio``: ``round_s`` with taps on ÷ with taps off (target ≤ 1.10);
* ``rss_mb``: the peak, within each round, of the summed resident memory of the driver and all
  its descendants (Ray's GCS, raylet and worker actors), sampled every 0.25 s from ``/proc``
  (psutil if present); target: flat from round 2 to 5.

Usage::

    python benchmarks/federation.py                     # 10 and 100 clients, 5 rounds
    python benchmarks/federation.py --clients 10 --rounds 3

Writes ``benchmarks/out/federation.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

OUT = Path(__file__).resolve().parent / "out" / "federation.json"
TAPS_TARGET = 1.10


def tiny_config(num_clients: int, num_rounds: int, *, taps: bool, output_dir: Path) -> Any:
    from fl_sim import config
    return config.from_dict({
        "run": {"name": f"bench-{num_clients}-{'taps' if taps else 'notaps'}", "seed": 0,
                "output_dir": str(output_dir)},
        "data": {"name": "digits", "image_size": 16},
        "model": {"name": "mlp", "hidden": [32]},
        "federation": {"num_clients": num_clients, "num_rounds": num_rounds,
                       "local_steps": 1, "batch_size": 8, "lr": 0.1, "taps": taps},
        "strategy": {"name": "fedavg"},
    })


# -- memory ------------------------------------------------------------------------------------
def _tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants, summed (bytes)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(root)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total
    from fl_sim.federation.processes import descendants
    total = 0
    for pid in [root, *(p for p, _ in descendants(root))]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


class PeakSampler:
    """A background thread keeping the peak tree RSS since the last :meth:`take`."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _tree_rss_bytes(os.getpid())
            with self._lock:
                self._peak = max(self._peak, rss)
            self._stop.wait(self.interval_s)

    def take(self) -> int:
        """The peak since the previous call (bytes), and start a new window."""
        rss = _tree_rss_bytes(os.getpid())
        with self._lock:
            peak, self._peak = max(self._peak, rss), 0
        return peak

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# -- one run -----------------------------------------------------------------------------------
def run_case(num_clients: int, num_rounds: int, *, taps: bool, workdir: Path
             ) -> dict[str, Any]:
    from fl_sim.federation.simulation import run_experiment

    cfg = tiny_config(num_clients, num_rounds, taps=taps, output_dir=workdir)
    run_dir = workdir / cfg.run.name
    stamps: list[float] = []
    peaks: list[int] = []
    with PeakSampler() as sampler:
        sampler.take()
        t0 = time.perf_counter()

        def progress(event: dict[str, Any]) -> None:
            if "round" in event:
                stamps.append(time.perf_counter())
                peaks.append(sampler.take())

        run_experiment(cfg, run_dir=run_dir, progress=progress)
        total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    round_s = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    warm = round_s[1:] or round_s
    server_warm = [float(r["seconds"]) for r in rows[1:]] or [float(rows[0]["seconds"])]
    return {
        "clients": num_clients, "rounds": num_rounds, "taps": taps,
        "total_s": round(total, 2),
        "round_s_each": [round(x, 3) for x in round_s],
        "round_s": round(sum(warm) / len(warm), 3),
        "server_s_each": [round(float(r["seconds"]), 3) for r in rows],
        "server_s": round(sum(server_warm) / len(server_warm), 3),
        "rss_mb_each": [round(p / 2**20, 1) for p in peaks],
        "rss_growth_mb_r2_r5": round((peaks[-1] - peaks[1]) / 2**20, 1) if len(peaks) > 2
        else None,
        "observations_mb": round(dir_mb(run_dir / "observations"), 2),
        "eval_accuracy": rows[-1].get("eval_accuracy"),
    }


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20 \
        if path.is_dir() else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 is warm-up)")

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fl-sim-bench-") as tmp:
        for n in args.clients:
            for taps in (False, True):
                res = run_case(n, args.rounds, taps=taps, workdir=Path(tmp))
                results.append(res)
                print(f"clients={n:>4} taps={'on ' if taps else 'off'} "
                      f"round_s={res['round_s']:.3f} server_s={res['server_s']:.3f} "
                      f"rss_mb={res['rss_mb_each']}", flush=True)
    ratios = {}
    for n in args.clients:
        off = next(r for r in results if r["clients"] == n and not r["taps"])
        on = next(r for r in results if r["clients"] == n and r["taps"])
        ratios[str(n)] = round(on["round_s"] / off["round_s"], 3)
    report = {
        "benchmark": "federation", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "cpus": os.cpu_count()},
        "setup": "digits 16x16, mlp [32], fedavg, 1 local step, batch 8, Ray simulation, "
                 "client_resources.num_cpus=1",
        "taps_ratio": ratios, "taps_target": TAPS_TARGET, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(results, ratios)
    print(f"wrote {args.out}")
    return 0


def _print_table(results: list[dict[str, Any]], ratios: dict[str, float]) -> None:
    head = (f"{'clients':>7} {'taps':>4} {'s/round':>8} {'server s':>8} "
            f"{'taps ratio':>10}  peak RSS MB per round (driver + Ray)")
    print(head)
    print("-" * len(head))
    for r in results:
        ratio = f"{ratios[str(r['clients'])]:.3f}" if r["taps"] else ""
        print(f"{r['clients']:>7} {'on' if r['taps'] else 'off':>4} {r['round_s']:>8.3f} "
              f"{r['server_s']:>8.3f} {ratio:>10}  "
              + " ".join(f"{x:.0f}" for x in r["rss_mb_each"]))


if __name__ == "__main__":
    sys.exit(main())
