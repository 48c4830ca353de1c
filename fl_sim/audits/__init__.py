"""Audit plug-ins: measured ε beside the ε the DP defenses claim (one file per method).

Each audit is a frozen dataclass registered in ``fl_sim.registry.AUDITS`` (see
:mod:`fl_sim.audits.base`); its estimator is a pure numpy/scipy function. The federation
plumbing that inserts canaries lives in :mod:`fl_sim.federation`.
"""

from fl_sim.audits import canary_clients, canary_examples  # noqa: F401  (registers them)
