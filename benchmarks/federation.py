"""Federation speed and memory: seconds per round, tap overhead, memory per round.

The tiny classifier (digits 16×16, MLP 256→32→10, FedAvg, one local step of batch 8) with 10
and 100 clients (all sampled) for 21 rounds on Flower's Ray simulation backend, through
:func:`fl_sim.federation.simulation.run_experiment`, once with the taps off and once on.

Reported per (clients, taps), over rounds 2..R (round 1 holds Ray's start and the actors'
first torch import):

* ``round_s``: MEDIAN wall-clock seconds per round, timed between the progress events
  ``run_experiment`` emits after each round; ``server_s``: median of the ServerApp's own
  round time (``metrics.jsonl`` ``seconds``);
* ``taps_s``: median of the taps' OWN work per round (``metrics.jsonl`` ``taps_seconds``:
  the tap's perf_counter accumulation around the global snapshot and store, the reply checks
  and records, the aggregate's record). With taps off it is the NaN check and snapshot alone.
* ``rss_mb``: the peak, within each round, of the summed resident memory of the driver and all
  its descendants (Ray's GCS, raylet and worker actors), sampled every 0.25 s from ``/proc``
  (psutil if present); target: flat after round 2.

Two taps ratios (target ≤ 1.10 at 10 and 100 clients):

* ``taps_ratio_own`` = 1 + (``taps_s`` on − ``taps_s`` off) / ``round_s`` off: what recording
  adds to a round, measured where it happens. Whole-round times move in steps of Flower's
  0.1 s message polling, so a few ms of recording can add a whole quantum to one round and
  none to the next; this ratio is not subject to that quantum;
* ``taps_ratio_rounds`` = median ``round_s`` on ÷ median ``round_s`` off (whole rounds,
  medians over ≥ 20 rounds, so the quantum shifts the median only when it shifts most rounds).

Usage::

    python benchmarks/federation.py                     # 10 and 100 clients, 21 rounds
    python benchmarks/federation.py --clients 10 --rounds 6

Writes ``benchmarks/out/federation.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
    warm_rows = rows[1:] or rows
    return {
        "clients": num_clients, "rounds": num_rounds, "taps": taps,
        "total_s": round(total, 2),
        "round_s_each": [round(x, 3) for x in round_s],
        "round_s": round(statistics.median(round_s[1:] or round_s), 4),
        "round_s_mean": round(statistics.mean(round_s[1:] or round_s), 4),
        "server_s_each": [round(float(r["seconds"]), 3) for r in rows],
        "server_s": round(statistics.median(float(r["seconds"]) for r in warm_rows), 4),
        "taps_s_each": [r.get("taps_seconds") for r in rows],
        "taps_s": round(statistics.median(float(r.get("taps_seconds", 0.0))
                                          for r in warm_rows), 5),
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
    ap.add_argument("--rounds", type=int, default=21)
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
                      f"taps_s={res['taps_s']:.4f}", flush=True)
    ratios = {str(n): taps_ratios(results, n) for n in args.clients}
    report = {
        "benchmark": "federation", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "cpus": os.cpu_count()},
        "setup": "digits 16x16, mlp [32], fedavg, 1 local step, batch 8, all clients "
                 "sampled, Ray simulation, client_resources.num_cpus=1",
        "load_avg_1_5_15": list(os.getloadavg()),
        "taps_ratio": ratios, "taps_target": TAPS_TARGET, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(results, ratios)
    print(f"wrote {args.out}")
    return 0


def taps_ratios(results: list[dict[str, Any]], clients: int) -> dict[str, float]:
    """``own`` and ``rounds`` taps ratios of one population (see module doc)."""
    off = next(r for r in results if r["clients"] == clients and not r["taps"])
    on = next(r for r in results if r["clients"] == clients and r["taps"])
    return {"own": round(1 + (on["taps_s"] - off["taps_s"]) / off["round_s"], 4),
            "rounds": round(on["round_s"] / off["round_s"], 4)}


def _print_table(results: list[dict[str, Any]], ratios: dict[str, dict[str, float]]) -> None:
    head = (f"{'clients':>7} {'taps':>4} {'s/round':>8} {'server s':>8} {'taps s':>8} "
            f"{'ratio own':>9} {'ratio rounds':>12}  peak RSS MB first/last round")
    print(head)
    print("-" * len(head))
    for r in results:
        rat = ratios[str(r["clients"])]
        own, rounds = (f"{rat['own']:.3f}", f"{rat['rounds']:.3f}") if r["taps"] else ("", "")
        print(f"{r['clients']:>7} {'on' if r['taps'] else 'off':>4} {r['round_s']:>8.3f} "
              f"{r['server_s']:>8.3f} {r['taps_s']:>8.4f} {own:>9} {rounds:>12}  "
              f"{r['rss_mb_each'][0]:.0f} / {r['rss_mb_each'][-1]:.0f}")


if __name__ == "__main__":
    sys.exit(main())
