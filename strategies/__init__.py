"""Aggregation strategies, registered in :data:`fl_sim.registry.STRATEGIES`.

Flower's built-in Message-API strategies are wrapped (never re-implemented) by factory
functions in :mod:`strategies.builtin`; fl-sim's own strategies (:mod:`strategies.fedsgd`)
are thin Flower ``Strategy`` subclasses with their maths in free functions. Importing this
package imports flwr: only ``fl_sim.federation`` and the registry's lazy loader do so.
"""

from __future__ import annotations

from strategies import builtin, fedsgd  # noqa: F401  (register)
from strategies.fedsgd import FedSGD, fedsgd_step

__all__ = ["FedSGD", "fedsgd_step"]
