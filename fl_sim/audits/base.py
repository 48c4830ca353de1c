"""What every audit plug-in is: a frozen dataclass of its public parameters.

An audit measures the privacy a run actually loses, beside the ε its DP defenses claim
(:mod:`defenses.accounting`). It is registered with ``@AUDITS.register("name")`` on a
``@dataclass(frozen=True)`` subclass of :class:`Audit`; ``[[audits]]`` params are validated
against the dataclass' ``__init__`` (pydantic, from the annotations), so a bad value is one
config line naming the field.

An audit declares:

* its unit of privacy (``unit``: one example or one client, :mod:`defenses.accounting`), so
  the report sets its measured ε beside the claimed ε of the same unit;
* the view it scores from (``view``): ``"final_model"`` (the last global model only),
  ``"every_global"`` (every round's global model) or ``"server"`` (each per-client update
  as the server received it). ``"server"`` needs per-client updates, which a SecAgg+ server
  never gets: :meth:`Audit.problem` refuses it before the run.

Canary data, canary clients and their truth belong to the run directory's truth store;
attacks never see them. The estimators are pure numpy/scipy functions: no flwr, no ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from fl_sim.capabilities import defenses_with

#: views an audit may score from (see module doc)
VIEWS = ("final_model", "every_global", "server")


@dataclass(frozen=True)
class Audit:
    """Base of every audit: a frozen dataclass of public parameters (see module doc)."""

    #: registry name: set by ``@AUDITS.register("canary_clients")``
    name: ClassVar[str] = ""
    #: unit of privacy the measured ε is about: ``"example"`` or ``"client"``
    unit: ClassVar[str] = "client"

    @property
    def needs_client_update(self) -> bool:
        """Whether the audit reads per-client updates (a SecAgg+ server has only the sum)."""
        return getattr(self, "view", "final_model") == "server"

    def problem(self, *, num_clients: int, num_rounds: int,
                defense_names: tuple[str, ...], strategy: str = "") -> str | None:
        """Why this audit cannot run in the federation described (None if it can)."""
        hiding = defenses_with("hides_per_client_updates", defense_names)
        if self.needs_client_update and hiding:
            return (f'view = "server" needs per-client updates; under {hiding[0]} the '
                    "server receives only their sum")
        return None

    def params(self) -> dict[str, Any]:
        """The resolved parameters, JSON-ready."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> dict[str, Any]:
        """``{"name": ..., "unit": ..., **params}``: what audits.jsonl carries."""
        return {"name": self.name, "unit": self.unit, **self.params()}
