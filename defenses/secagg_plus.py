"""SecAgg+: the server learns only the weighted sum of the sampled clients' updates.

Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with (Poly)
Logarithmic Overhead" (CCS 2020) — SecAgg (Bonawitz et al., CCS 2017) with each client
sharing its masks with ``num_shares`` neighbours instead of everyone. fl-sim runs Flower's
implementation (``SecAggPlusWorkflow`` + ``secaggplus_mod``; adapter in
:mod:`fl_sim.federation.secagg`); this module only holds the public parameters and the
pre-flight checks (no flwr import).

What travels: each client quantises ``w·x`` (``w = num_examples / max_weight`` rounded to
``quantization_range`` levels; ``x`` its update clipped coordinate-wise to
``[−clipping_range, clipping_range]`` and quantised to ``quantization_range`` levels), adds
pairwise and private masks modulo ``modulus_range``, and the server unmasks only the sum, so
it obtains ``Σ w_i x_i / Σ w_i`` — FedAvg's weighted mean — and never one ``x_i``.

Deviation from Flower's examples (documented in docs/how-to/secagg.md): clients mask their update
``x = new − global`` (or the gradient, FedSGD) instead of their full weights, so the clipping
range bounds the update (weights such as BatchNorm's running variance or integer counters can
exceed 8) and the quantisation step is spent on small numbers; the server adds the global
back. The quantisation error of one coordinate of the mean is at most
``2·K·clipping_range/quantization_range / Σ w_i`` for ``K`` clients (:func:`error_bound`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import Field

from defenses.base import Defense
from fl_sim.capabilities import defenses_with, strategies_with, strategy_capabilities
from fl_sim.registry import ATTACKS, DEFENSES
from fl_sim.view_types import VIEWS

# What may run beside it is declared by the plug-ins (fl_sim.capabilities), not listed here:
# a strategy must declare ``weighted_mean_of_updates`` (its aggregation, before any server
# optimiser step, is the weighted mean: the only kind that can run on a sum it cannot open);
# a defense that declares ``needs_per_client_updates`` (central DP) cannot.


@DEFENSES.register("secagg_plus")
@dataclass(frozen=True)
class SecAggPlus(Defense):
    """Flower's SecAgg+ (see module doc). Parameters as in ``SecAggPlusWorkflow``:

    * ``num_shares`` — shares of each client's secrets: an int ≥ 3, or a float in (0, 1]
      = that fraction of the sampled clients (default 1.0: everyone, i.e. SecAgg).
    * ``reconstruction_threshold`` — shares needed to reconstruct: an int < ``num_shares``,
      or a float in (0, 1] = that fraction of ``num_shares`` (default 0.5; at least 2).
    * ``clipping_range`` — each update coordinate is clipped to ±this before quantisation.
    * ``quantization_range`` — levels of the quantisation (2**22).
    * ``modulus_range`` — masks live modulo this power of two (2**32).
    * ``max_weight`` — the largest ``num_examples`` a client may carry; 0 (default) = the
      largest a client of this experiment can send (computed by the server from the
      partitions), which keeps the weights' quantisation tight.
    * ``timeout`` — seconds per protocol stage (0 = wait for every reply).
    """

    stage: ClassVar[str] = "protocol"
    protects_server_view: ClassVar[bool] = True
    #: the server unmasks only the sum (fl_sim.capabilities; the SecAgg+ fallback of views)
    hides_per_client_updates: ClassVar[bool] = True

    num_shares: Annotated[int | float, Field(gt=0)] = 1.0
    reconstruction_threshold: Annotated[int | float, Field(gt=0)] = 0.5
    clipping_range: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 8.0
    quantization_range: Annotated[int, Field(gt=1)] = 2 ** 22
    modulus_range: Annotated[int, Field(gt=1, le=2 ** 32)] = 2 ** 32
    max_weight: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    timeout: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0

    def problem(self, cfg: Any) -> str | None:
        """Parameters Flower would refuse, too few sampled clients, a strategy or defense
        that needs the individual updates, a ``max_weight`` below what a client sends."""
        return (self._param_problem() or self._sampling_problem(cfg)
                or _combination_problem(cfg) or self._weight_problem(cfg))

    def _param_problem(self) -> str | None:
        s, t = self.num_shares, self.reconstruction_threshold
        if isinstance(s, float) and s > 1:
            return f"num_shares {s} as a fraction must be in (0, 1] (or an integer ≥ 3)"
        if isinstance(s, int) and s == 2:
            return "num_shares as an integer must be 1 or ≥ 3 (Flower's SecAgg+)"
        if isinstance(t, float) and t > 1:
            return f"reconstruction_threshold {t} as a fraction must be in (0, 1]"
        if isinstance(t, int) and isinstance(s, int) and s > 1 and t >= s:
            return f"reconstruction_threshold {t} must be below num_shares {s}"
        if self.modulus_range & (self.modulus_range - 1):
            return f"modulus_range {self.modulus_range} must be a power of 2"
        if self.modulus_range <= self.quantization_range:
            return (f"modulus_range {self.modulus_range} must exceed quantization_range "
                    f"{self.quantization_range}")
        return None

    def shares_and_threshold(self, k: int) -> tuple[int, int]:
        """``(num_shares, threshold)`` Flower derives for ``k`` sampled clients."""
        s, t = self.num_shares, self.reconstruction_threshold
        if isinstance(s, float) or s == 1:
            n = round(float(s) * k)
            n = n + 1 if n < k and n % 2 == 0 else n
            n = k if n <= 2 else n
        else:
            n = int(s) + (1 if k != s and s % 2 == 0 else 0)
        th = max(round(float(t) * n), 2) if isinstance(t, float) or t == 1 else int(t)
        return n, th

    def _sampling_problem(self, cfg: Any) -> str | None:
        fed = cfg.federation
        k = sampled_per_round(fed.num_clients, fed.fraction_train)
        if k < 2:
            return (f"SecAgg+ needs at least 2 sampled clients per round; num_clients "
                    f"{fed.num_clients} × fraction_train {fed.fraction_train} samples {k}")
        n, th = self.shares_and_threshold(k)
        if min(n, k) < th:
            return (f"reconstruction threshold {th} exceeds the {min(n, k)} clients that "
                    f"hold shares ({k} sampled per round, num_shares {n})")
        return None

    def _weight_problem(self, cfg: Any) -> str | None:
        bound = config_num_examples_bound(cfg)
        if self.max_weight and bound is not None and self.max_weight < bound:
            return (f"max_weight {self.max_weight:g} is below the {bound} examples a client "
                    f"sends per round (its weight would overflow the masked sum)")
        return None


def sampled_per_round(num_clients: int, fraction: float) -> int:
    """How many clients fl-sim samples per round (``fl_sim.federation.taps.sample_clients``)."""
    return min(num_clients, max(1, int(num_clients * fraction + 1e-9)))


def config_num_examples_bound(cfg: Any) -> int | None:
    """An upper bound of a reply's ``num_examples`` from the config alone (None for
    ``local_epochs``: the partition size, known once the data is loaded)."""
    fed = cfg.federation
    if strategy_capabilities(cfg.strategy.name).sends_gradient:  # one batch's gradient
        return int(fed.batch_size)
    if fed.local_steps is not None:
        return int(fed.local_steps) * int(fed.batch_size)
    return None


def _combination_problem(cfg: Any) -> str | None:
    if not strategy_capabilities(cfg.strategy.name).weighted_mean_of_updates:
        return (f"strategy {cfg.strategy.name!r} needs the individual updates; under SecAgg+ "
                f"the server has only their sum (use one whose aggregate is a weighted mean "
                f"of the updates: {', '.join(strategies_with('weighted_mean_of_updates'))})")
    for a in cfg.attacks:
        if VIEWS[a.view].server_side and getattr(
                ATTACKS.get(a.name), "needs_client_update", False):
            return (f"attack {a.name} needs one client's update; under SecAgg+ the server "
                    "has only the aggregate")
    for name in defenses_with("needs_per_client_updates", cfg.defenses):
        return (f"cannot be combined with {name}: it needs each client's update on the "
                "server (declares needs_per_client_updates)")
    return None


def error_bound(num_clients: int, total_weight: float, *, clipping_range: float = 8.0,
                quantization_range: int = 2 ** 22) -> float:
    """Largest error of one coordinate of the unmasked mean: ``K`` values each rounded
    stochastically to a step of ``2·clipping_range/quantization_range`` (error < 1 step),
    divided by the total weight ``Σ w_i`` (``w_i = num_examples_i / max_weight``), plus one
    step for the weights' own rounding (for updates well inside the clipping range).

    >>> round(error_bound(4, 1.0), 9)
    1.9073e-05
    """
    step = 2 * clipping_range / quantization_range
    return (num_clients + 1) * step / total_weight
