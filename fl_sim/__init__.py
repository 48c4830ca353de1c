"""fl-sim: federated-learning privacy simulator on Flower.

Importing ``fl_sim`` is cheap and never imports flwr or ray; the federation engine lives in
``fl_sim.federation`` and is imported only when a run starts. The Python API
(``fl_sim.api.run``, ``.replay``, ``.bench``, ...) lives in :mod:`fl_sim.api`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: the public API (:mod:`fl_sim.api`), imported on first use so ``import fl_sim`` stays light.
#: ``api.bench`` and ``api.report`` are not re-exported: ``fl_sim.bench`` and ``fl_sim.report``
#: are subpackages / modules.
_API = ("run", "replay", "load_config", "load_run", "to_dataframe")

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        # lazy: PEP 562: `import fl_sim` loads the API's modules only when one is used
        from fl_sim import api
        return getattr(api, name)
    raise AttributeError(f"module 'fl_sim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
