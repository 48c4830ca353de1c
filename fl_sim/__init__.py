"""fl-sim: federated-learning privacy simulator on Flower.

Importing ``fl_sim`` is cheap and never imports flwr or ray; the federation engine lives in
``fl_sim.federation`` and is imported only when a run starts.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_run"]


def __getattr__(name: str) -> Any:
    if name == "load_run":
        from fl_sim.run_dir import load_run
        return load_run
    raise AttributeError(name)
