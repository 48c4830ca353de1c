"""What plug-ins declare they can do, so the core asks instead of matching names.

Strategies, defenses and attacks each declare their capabilities where they are defined; the
core (views, attack runner, pre-flight checks, defenses' own ``problem``) reads them here. An
entry-point plug-in that declares the same capabilities takes part exactly like a built-in.

* **Strategies** (factory functions in :data:`~fl_sim.registry.STRATEGIES`) carry a
  :class:`StrategyCapabilities` as their ``capabilities`` attribute, set by
  :func:`strategy_capabilities_of` (a decorator). A strategy that declares nothing is treated
  as the most restrictive one: not a weighted mean, clients send deltas.
* **Defenses** declare class variables on :class:`defenses.base.Defense`:
  ``hides_per_client_updates`` (the server receives only a sum: SecAgg+),
  ``needs_per_client_updates`` (the defense itself works on each client's update on the
  server: central DP), ``reports_epsilon`` (the clients report the defense's ε with their
  reply: ``round_epsilon`` as in :mod:`defenses.dp_sgd` (stage ``"train"``) or
  :mod:`defenses.local_dp`).
* **Attacks** declare ``view`` and ``needs_client_update`` (:class:`attacks.base.Attack`).

This module imports no flwr: a lookup reads the registry, which imports the strategy's module
(and flwr with it) the first time a strategy is read, as configuration checks already do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from fl_sim.registry import DEFENSES, STRATEGIES

F = TypeVar("F")


@dataclass(frozen=True)
class StrategyCapabilities:
    """What a strategy's aggregation is, as far as the threat models need to know.

    ``weighted_mean_of_updates``: the server's aggregation step is the num-examples weighted
    mean of the clients' updates (a server optimiser such as FedAdam may then step on it), so
    it can run on a sum it cannot open (SecAgg+).
    ``global_is_mean_step``: the new global is the old one plus a fixed multiple of that mean
    (no server optimiser state: FedAvg, FedProx, FedSGD), so a peer can subtract its own share
    from the difference of two globals and central DP's noise σC/m on the mean is calibrated.
    ``client_update``: ``"gradient"`` — FedSGD semantics: each client sends ONE batch's
    gradient (one local step, no local optimiser) and the server steps with its learning rate
    ``server_lr``; ``"delta"`` — local training, the client sends ``new − global``.
    """

    weighted_mean_of_updates: bool = False
    global_is_mean_step: bool = False
    client_update: Literal["delta", "gradient"] = "delta"

    def __post_init__(self) -> None:
        if self.global_is_mean_step and not self.weighted_mean_of_updates:
            raise ValueError("global_is_mean_step implies weighted_mean_of_updates")
        if self.client_update not in ("delta", "gradient"):
            raise ValueError(f"client_update must be 'delta' or 'gradient', got "
                             f"{self.client_update!r}")

    @property
    def sends_gradient(self) -> bool:
        """FedSGD semantics: one batch's gradient per client and round (see class doc)."""
        return self.client_update == "gradient"


def strategy_capabilities_of(**declared: Any) -> Callable[[F], F]:
    """Decorator declaring a strategy factory's :class:`StrategyCapabilities`.

    >>> @strategy_capabilities_of(weighted_mean_of_updates=True)
    ... def mine(): ...
    >>> mine.capabilities.weighted_mean_of_updates, mine.capabilities.client_update
    (True, 'delta')
    """
    caps = StrategyCapabilities(**declared)

    def decorator(obj: F) -> F:
        obj.capabilities = caps  # type: ignore[attr-defined]
        return obj

    return decorator


def strategy_capabilities(name: str) -> StrategyCapabilities:
    """The capabilities strategy ``name`` declares (unknown name: the registry's one-line
    :class:`~fl_sim.errors.PluginError`). A plug-in that declares none gets the defaults; one
    that only sets the older ``client_update`` attribute keeps it."""
    obj = STRATEGIES.get(name)
    caps = getattr(obj, "capabilities", None)
    if isinstance(caps, StrategyCapabilities):
        return caps
    return StrategyCapabilities(client_update=getattr(obj, "client_update", "delta"))


def strategies_with(capability: str) -> list[str]:
    """The registered strategies that declare ``capability`` (for error messages)."""
    return [n for n in STRATEGIES.names() if getattr(strategy_capabilities(n), capability)]


def defense_class(entry: Any) -> Any:
    """The registered class of a defense entry: a ``DefenseConfig``, a ``describe()`` dict,
    a name, or a built defense."""
    if isinstance(entry, str):
        return DEFENSES.get(entry)
    if isinstance(entry, dict):
        return DEFENSES.get(str(entry.get("name")))
    if hasattr(type(entry), "hides_per_client_updates"):  # a built defense
        return type(entry)
    return DEFENSES.get(entry.name)


def defenses_with(capability: str, defenses: Iterable[Any]) -> list[str]:
    """Names of the ``defenses`` (config entries, ``describe()`` dicts, names or built
    defenses) whose class declares ``capability`` true, in order.

    >>> defenses_with("hides_per_client_updates", ["pruning", "secagg_plus"])
    ['secagg_plus']
    """
    out = []
    for d in defenses:
        cls = defense_class(d)
        if getattr(cls, capability, False):
            out.append(str(getattr(cls, "name", "") or getattr(d, "name", d)))
    return out
