"""Flower client mods that the ClientApp's ``train`` runs, in order (outermost first).

Defenses that Flower implements as client mods (SecAgg+'s ``secaggplus_mod``, the DP
clipping mods of central DP with client-side clipping) are listed here. A mod must be a no-op
for a message of a run that does not configure its defense (the ClientApp is one object for
every experiment), so each entry checks the message before acting.
"""

from __future__ import annotations

from typing import Any

#: mods of ``@app.train(mods=TRAIN_MODS)``; outermost first
TRAIN_MODS: list[Any] = []

# central DP with client-side clipping: Flower's fixed/adaptive clipping mod, only for
# messages whose config asks for it (fl_sim.federation.server_defenses)
from fl_sim.federation.server_defenses import central_dp_clipping_mod  # noqa: E402

TRAIN_MODS.append(central_dp_clipping_mod)

# SecAgg+: Flower's secaggplus_mod and fl-sim's legacy-layout bridge, only for SecAgg+
# messages (fl_sim.federation.secagg)
from fl_sim.federation.secagg import SECAGG_MODS  # noqa: E402

TRAIN_MODS.extend(SECAGG_MODS)
