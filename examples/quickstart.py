"""fl-sim from Python, end to end, in seconds: simulate, read results, replay, DataFrames.

Run from the repository root::

    python examples/quickstart.py [OUT_DIR]

A 2-round FedSGD federation of 2 clients on scikit-learn's bundled digits (no download).
The honest-but-curious server inverts client 1's round-1 gradient with Inverting Gradients
during the run; afterwards the same recording is attacked again offline with DLG (record
once, attack many times). The last line printed is the run directory.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from fl_sim import api

CONFIG = {
    "run": {"name": "quickstart", "seed": 0, "output_dir": "runs"},
    "data": {"name": "digits", "image_size": 32},
    "partition": {"name": "iid"},
    "model": {"name": "mlp", "hidden": [64]},
    "task": {"name": "classifier"},
    "federation": {"num_clients": 2, "num_rounds": 2, "local_steps": 1, "batch_size": 1,
                   "lr": 0.03},
    "strategy": {"name": "fedsgd", "server_lr": 0.03},
    # the server's attack during the run: one image, its gradient, cosine matching
    "attacks": [{"name": "inverting_gradients", "view": "server", "client": 1, "rounds": [1],
                 "max_iterations": 100, "tv_weight": 0.0, "schedule": "cosine",
                 "labels": "idlg"}],
}


def main(out: Path) -> Path:
    # 1. simulate (overrides are the CLI's --set strings; a TOML path works as well as a dict)
    run = api.run(CONFIG, overrides=["run.seed=0"], run_dir=out / "run")
    for m in run.metrics():
        print(f"round {m['round']}: eval accuracy {m.get('eval_accuracy')}")

    # 2. attack the same recording offline (parameters as keywords)
    api.replay(run, "dlg", rounds=[1], max_iterations=30)

    # 3. every result, as plain records ...
    for r in run.attacks():
        print(f"{r['attack']:<20} round {r['round']} client {r['client']}: "
              f"PSNR {r['metrics'].get('psnr', float('nan')):.1f} dB, "
              f"knowledge {r['knowledge']}")
    # ... or as a DataFrame (needs the [pandas] extra)
    try:
        df = run.attacks_df()
        print(df[["attack", "round", "client"]].to_string(index=False))
    except api.MissingDependencyError as exc:
        print(f"(no DataFrame: {exc})")
    print(run.path)
    return run.path


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fl-sim-")))
