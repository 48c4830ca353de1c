"""Defense plug-ins: pure tensor transforms plus privacy accounting (no flwr, no ray).

Each defense is one file, a frozen dataclass registered in ``fl_sim.registry.DEFENSES``
(see :mod:`defenses.base`); fl_sim applies client-side ones before an update leaves the client
(:mod:`fl_sim.defended`) and adapts server-side ones to Flower (:mod:`fl_sim.federation`).
"""

from defenses import (  # noqa: F401  (each import registers its defenses)
    central_dp,
    dp_sgd,
    local_dp,
    pruning,
    quantization,
    secagg_plus,
    soteria,
)
