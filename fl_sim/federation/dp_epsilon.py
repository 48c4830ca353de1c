"""ε of the client-side DP defenses, as clients report it and ``metrics.jsonl`` shows it.

A client running ``dp_sgd`` and/or ``local_dp`` puts two numbers into its reply's META
ConfigRecord (not the MetricRecord: FedAvg would average them):

* ``dp-epsilon-round`` — ε at the defense's δ spent on this round's update;
* ``dp-epsilon`` — its cumulative ε over every round it was SAMPLED in up to this one.

The cumulative figure is recomputed by the client: sampling is a pure function of
``(seed, round, fraction_train)`` (:func:`fl_sim.federation.taps.sample_clients` over all
``num_clients`` partitions), and each of a client's rounds has the same σ, sampling rate and
number of steps, so the composition is the accountant over ``k × steps`` steps (``k`` rounds
sampled). It needs no server state and survives a resume. Rounds in which the client was
sampled but failed are counted too (an upper bound: a failed client may still have leaked).
With both defenses the two ε are added (basic composition, an upper bound). ``inf`` (σ = 0,
clipping only) is written as ``null`` in ``metrics.jsonl``.

The server tap keeps each accepted reply's pair; the round's ``metrics.jsonl`` row gets
``dp_epsilon_round`` and ``dp_epsilon``, each the MAX over that round's clients (the weakest
guarantee in force), and beside them what the ε is about (:func:`privacy_semantics`):
``dp_unit`` and ``dp_neighbouring`` — ``"example"`` / ``"add-or-remove-one"`` for
``dp_sgd``, ``"client"`` / ``"replace-one"`` for ``local_dp``. With both defenses the summed
ε is reported per EXAMPLE, add-or-remove-one: local DP's client-level replace-one guarantee
covers any change of the client's data, so it bounds adding or removing one example too,
and the sum bounds the two together (DP-SGD gives no finite client-level ε).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any

from defenses.accounting import ADD_OR_REMOVE_ONE, EXAMPLE, privacy_fields
from fl_sim.defended import build_defenses

ROUND_KEY = "dp-epsilon-round"
CUMULATIVE_KEY = "dp-epsilon"


def client_dp_defenses(cfg: Any) -> list[Any]:
    """The configured defenses whose ε the clients report: those that declare
    ``reports_epsilon`` (:mod:`fl_sim.capabilities`; dp_sgd, local_dp), in order."""
    return [d for d in build_defenses(cfg) if d.reports_epsilon]


def dp_train_defense(cfg: Any) -> Any:
    """The configured ``"train"``-stage DP defense (one that reports ε: ``dp_sgd``), or
    None."""
    return next((d for d in client_dp_defenses(cfg) if d.stage == "train"), None)


def rounds_sampled(cfg: Any, client_id: int, upto_round: int) -> int:
    """In how many of rounds ``1 .. upto_round`` ``client_id`` is sampled for training."""
    fed = cfg.federation
    return sum(client_id in _sampled(cfg.run.seed, r, fed.num_clients, fed.fraction_train)
               for r in range(1, upto_round + 1))


@lru_cache(maxsize=65536)
def _sampled(seed: int, server_round: int, num_clients: int, fraction: float
             ) -> frozenset[int]:
    # lazy: keeps flwr out of this module's import
    from fl_sim.federation.taps import sample_clients
    return frozenset(sample_clients(seed, server_round, list(range(num_clients)), fraction))


def client_epsilons(cfg: Any, client_id: int, server_round: int, *, partition_size: int,
                    steps: int) -> dict[str, float]:
    """``{ROUND_KEY: ε, CUMULATIVE_KEY: ε}`` for the reply's META, or ``{}`` without DP.

    ``steps``: local steps this round (each one DP-SGD step); ``partition_size``: the
    client's number of training examples (DP-SGD's sampling rate is batch / partition)."""
    dps = client_dp_defenses(cfg)
    if not dps:
        return {}
    k = max(1, rounds_sampled(cfg, client_id, server_round))
    bs = cfg.federation.batch_size
    per_round, total = 0.0, 0.0
    for d in dps:
        if d.stage == "train":  # per-step accounting (DPSGD.round_epsilon)
            per_round += d.round_epsilon(batch_size=bs, partition_size=partition_size,
                                         steps=steps)
            total += d.round_epsilon(batch_size=bs, partition_size=partition_size,
                                     steps=steps, rounds=k)
        else:
            per_round += d.round_epsilon()
            total += d.round_epsilon(rounds=k)
    return {ROUND_KEY: float(per_round), CUMULATIVE_KEY: float(total)}


def privacy_semantics(cfg: Any) -> dict[str, str]:
    """``{"dp_unit": ..., "dp_neighbouring": ...}`` of the configured client-side DP
    defenses' ε (module doc), ``{}`` without one."""
    dps = client_dp_defenses(cfg)
    if not dps:
        return {}
    if len(dps) == 1:
        return privacy_fields(dps[0].privacy_unit, dps[0].neighbouring)
    return privacy_fields(EXAMPLE, ADD_OR_REMOVE_ONE)


def epsilon_row(epsilons: Mapping[int, tuple[float, float]], cfg: Any = None
                ) -> dict[str, float | str | None]:
    """``metrics.jsonl`` columns from ``client -> (round ε, cumulative ε)``: the max over
    clients of each (``None`` for ``inf``), with :func:`privacy_semantics` of ``cfg`` beside
    them when given; ``{}`` when no client reported ε.

    >>> epsilon_row({0: (1.0, 2.0), 1: (1.5, 1.5)})
    {'dp_epsilon_round': 1.5, 'dp_epsilon': 2.0}
    >>> epsilon_row({0: (math.inf, math.inf)})
    {'dp_epsilon_round': None, 'dp_epsilon': None}
    """
    if not epsilons:
        return {}
    rnd = max(e[0] for e in epsilons.values())
    cum = max(e[1] for e in epsilons.values())
    row: dict[str, float | str | None] = {"dp_epsilon_round": _finite_or_none(rnd),
                                          "dp_epsilon": _finite_or_none(cum)}
    if cfg is not None:
        row.update(privacy_semantics(cfg))
    return row


def reply_epsilons(replies: Iterable[Any], client_of: Callable[[Any], int]
                   ) -> dict[int, tuple[float, float]]:
    """``client -> (round ε, cumulative ε)`` of the train replies (Flower Messages) that
    carry ε in their META record; error replies carry none."""
    from fl_sim.federation import protocol as P  # lazy: keeps flwr out of this module's import
    out = {}
    for msg in replies:
        if msg.has_error():
            continue
        rec = msg.content.config_records.get(P.META)
        eps = epsilons_of(dict(rec)) if rec is not None else None
        if eps is not None:
            out[client_of(msg)] = eps
    return out


def epsilons_of(meta: Mapping[str, Any]) -> tuple[float, float] | None:
    """``(round ε, cumulative ε)`` from a reply's META, or None if it carries none."""
    if ROUND_KEY not in meta:
        return None
    return float(meta[ROUND_KEY]), float(meta.get(CUMULATIVE_KEY, meta[ROUND_KEY]))


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
