"""The environment of tests that run Flower on Ray in-process (quiet, project-local home).

    from federation_env import flower_env
    with flower_env(tmp_path / "flwr_home"):
        run_experiment(cfg, run_dir=...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

#: Environment every Flower/Ray test runs with (no telemetry, no update check, no usage stats).
QUIET_FLOWER = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "RAY_USAGE_STATS_ENABLED": "0"}


@contextlib.contextmanager
def flower_env(home: Path, *, threads: int | None = 1) -> Iterator[None]:
    """Run the block with :data:`QUIET_FLOWER` and ``FLWR_HOME=home`` set (restored after),
    and ``threads`` torch threads in this process (the online attacks run here)."""
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**QUIET_FLOWER, "FLWR_HOME": str(home)}.items():
            mp.setenv(k, v)
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)
