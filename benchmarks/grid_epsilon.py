"""local_dp ε of a bench grid's simulations, recomputed without running them.

For each simulation of a grid (``fl-sim bench`` TOML) whose only client-side DP defense is
``local_dp``: the cumulative ε after the last round, maximum over clients, exactly as the
clients write it into ``metrics.jsonl`` (:func:`fl_sim.federation.dp_epsilon.
client_epsilons`, the seeded client sampling replayed), with its unit of privacy and
neighbouring relation. local DP's ε depends only on σ, δ and the rounds a client took part in
(not on its data), so the docs' grid figures can be recomputed when the accounting changes
without re-running the grids (DP-SGD's also needs the partition sizes: read those runs'
``metrics.jsonl``).

    .venv/bin/python benchmarks/grid_epsilon.py configs/bench/dp_sweep.toml [...]

Run from the repository root.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from fl_sim.bench.grid import load_grid  # noqa: E402
from fl_sim.federation.dp_epsilon import (  # noqa: E402
    client_dp_defenses,
    client_epsilons,
    privacy_semantics,
    rounds_sampled,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grids", nargs="+")
    a = ap.parse_args()
    for grid in a.grids:
        for sim in load_grid(grid).simulations:
            cfg = sim.config
            if [d.name for d in client_dp_defenses(cfg)] != ["local_dp"]:
                continue
            fed = cfg.federation
            clients = range(fed.num_clients)
            eps = max(client_epsilons(cfg, c, fed.num_rounds, partition_size=1,
                                      steps=1)["dp-epsilon"] for c in clients)
            ks = [rounds_sampled(cfg, c, fed.num_rounds) for c in clients]
            d = next(d for d in cfg.defenses if d.name == "local_dp")
            print(f"{Path(grid).name} local_dp sigma={d.params['noise_multiplier']}: ε after "
                  f"round {fed.num_rounds} = {eps:.4g} (rounds per client {ks}) "
                  f"{privacy_semantics(cfg)}")


if __name__ == "__main__":
    main()
