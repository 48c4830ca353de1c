"""Driver of tests/integration/test_plugin_package.py, run in a subprocess whose PYTHONPATH
holds the installed example plug-in package (examples/plugin_example): a federation, a
replay and a bench grid through fl_sim.api, then a notebook-only plug-in refused before
its run. ``plugin_driver.py OUT SIGMA``; prints one JSON object (the last line)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from fl_sim import api


def main() -> None:
    out = Path(sys.argv[1])
    sigma = float(sys.argv[2])
    base = out / "base.toml"
    base.write_text("""
    [run]
    name = "plugin"
    seed = 0
    [data]
    name = "digits"
    image_size = 16
    max_train = 200
    max_test = 50
    [model]
    name = "mlp"
    hidden = [32]
    [federation]
    num_clients = 2
    num_rounds = 2
    batch_size = 1
    lr = 0.03
    [strategy]
    name = "fedsgd"
    server_lr = 0.03
    """)
    report: dict = {}

    # 1. a federation with the plug-in defense on every client and the plug-in attack online
    run = api.run(base, [f'defenses=[{{name = "update_noise", sigma = {sigma}}}]',
                         'attacks=[{name = "fc_analytic", view = "server", client = 1, '
                         'rounds = [1]}]'], run_dir=out / "run")
    report["online"] = run.attacks()
    # 2. the plug-in attack replayed offline on round 2 of the same recording
    report["replay"] = api.replay(run, "fc_analytic", rounds=[2], client=0)
    # 3. a 2-cell grid: one simulation with the plug-in defense at sigma = 0 (a no-op), the
    #    plug-in attack on the same client and round as online above, and on another
    grid = out / "grid.toml"
    grid.write_text(f"""
    [bench]
    name = "plugin_grid"
    base = "{base}"
    [[base.defenses]]
    name = "update_noise"
    sigma = 0.0
    [[attacks]]
    name = "fc_analytic"
    client = 1
    rounds = [1]
    [[attacks]]
    name = "fc_analytic"
    client = 0
    rounds = [2]
    """)
    table = api.bench(grid, out=out / "bench")
    report["grid"] = table.records()
    report["grid_rows"] = table.rows()

    # 4. a defense defined here only (as in a notebook): refused before its run directory exists
    from defenses.base import UpdateDefense
    from fl_sim.errors import PluginError
    from fl_sim.registry import DEFENSES

    @DEFENSES.register("notebook_zero")
    @dataclass(frozen=True)
    class NotebookZero(UpdateDefense):
        def apply(self, update, ctx):
            return {k: v * 0 for k, v in update.items()}

    try:
        api.run(base, ['defenses=[{name = "notebook_zero"}]'], run_dir=out / "refused")
        report["refused"] = None
    except PluginError as exc:
        report["refused"] = str(exc)
    report["refused_dir_exists"] = (out / "refused").exists()
    print(json.dumps(report, default=str))


if __name__ == "__main__":  # never at import (pytest's doctest collection)
    main()
