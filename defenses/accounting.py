"""Privacy accounting for the DP defenses: thin functions over Opacus' accountants.

Mironov, "Rényi Differential Privacy" (CSF 2017) and Mironov, Talwar, Zhang, "Rényi
Differential Privacy of the Sampled Gaussian Mechanism" (2019) for ``"rdp"``; Gopi, Lee,
Wutschitz, "Numerical Composition of Differential Privacy" (NeurIPS 2021) for ``"prv"``. The
numbers come from Opacus (``opacus.accountants.RDPAccountant`` / ``PRVAccountant``), so an
ε from fl-sim is Opacus' ε for the same (σ, q, steps, δ) — :func:`epsilon` only builds the
accountant's history and asks it.

The mechanism accounted is the sampled Gaussian mechanism: each step samples a fraction
``sample_rate`` q of the client's data, clips each example's contribution to norm C and adds
N(0, σ²C²). Both accountants assume Poisson sampling; fl-sim draws batches by shuffling
(fixed-size batches without replacement, :func:`fl_sim.federation.local.batch_plan`), and
accounting it with q = batch_size / partition_size is the standard approximation (Opacus'
own examples do the same with shuffled loaders). Pure python/numpy: no flwr, no torch.

**Unit of privacy and neighbouring relation.** An ε means nothing without the pair of
datasets it bounds. Every DP defense declares its *unit* (:data:`EXAMPLE` or :data:`CLIENT`:
whose data two neighbouring datasets differ in) and its *relation*
(:data:`ADD_OR_REMOVE_ONE` or :data:`REPLACE_ONE`, spelled as Flower's
``NeighboringRelation``), and the sensitivity follows from the relation: a quantity clipped
to L2 norm C moves by at most C when one unit is added or removed (the other's contribution
is zero) and by at most 2C when one unit is replaced (C one way, C the other). Opacus'
accountants are written for sensitivity C (add/remove, Poisson sampling — their convention),
so a replace-one mechanism with noise std σC is accounted with the effective noise
multiplier σ / 2 (:func:`effective_noise_multiplier`). Results carry both words beside ε under
the names :data:`UNIT_FIELD` and :data:`RELATION_FIELD` (``metrics.jsonl``, report.html).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

Accountant = Literal["rdp", "prv"]

#: accountants fl-sim exposes (``accountant = ...`` in the DP defenses)
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
#: δ used when a defense does not set one
DEFAULT_DELTA = 1e-5

#: units of privacy: one training example, or one client's whole data
EXAMPLE, CLIENT = "example", "client"
#: neighbouring relations (the spelling of Flower's ``NeighboringRelation``)
ADD_OR_REMOVE_ONE, REPLACE_ONE = "add-or-remove-one", "replace-one"
#: how far a quantity clipped to norm C moves between neighbours, in units of C
SENSITIVITY_IN_C = {ADD_OR_REMOVE_ONE: 1.0, REPLACE_ONE: 2.0}
#: the result fields written beside ε (client-side DP; central DP prefixes ``central_``)
UNIT_FIELD, RELATION_FIELD = "dp_unit", "dp_neighbouring"


def effective_noise_multiplier(noise_multiplier: float, relation: str) -> float:
    """σ / (sensitivity in units of C): the multiplier an accountant written for sensitivity
    C must be fed for a mechanism with noise std σ·C under ``relation``.

    >>> effective_noise_multiplier(1.0, REPLACE_ONE)
    0.5
    >>> effective_noise_multiplier(1.0, ADD_OR_REMOVE_ONE)
    1.0

    Raises ``ValueError`` for an unknown relation."""
    if relation not in SENSITIVITY_IN_C:
        raise ValueError(f"unknown neighbouring relation {relation!r}; known: "
                         f"{list(SENSITIVITY_IN_C)}")
    return float(noise_multiplier) / SENSITIVITY_IN_C[relation]


def privacy_fields(unit: str, relation: str, prefix: str = "") -> dict[str, str]:
    """``{prefix + "dp_unit": unit, prefix + "dp_neighbouring": relation}``: what a result
    writes beside its ε.

    >>> privacy_fields(CLIENT, REPLACE_ONE)
    {'dp_unit': 'client', 'dp_neighbouring': 'replace-one'}
    """
    return {prefix + UNIT_FIELD: unit, prefix + RELATION_FIELD: relation}


def describe_relation(unit: str, relation: str) -> str:
    """Words for report.html: ``"replace one client's data (sensitivity 2C)"``.

    >>> describe_relation(EXAMPLE, ADD_OR_REMOVE_ONE)
    'add or remove one example (sensitivity C)'
    """
    what = "one example" if unit == EXAMPLE else "one client's data" if unit == CLIENT \
        else f"one {unit}"
    verb = "replace" if relation == REPLACE_ONE else "add or remove" \
        if relation == ADD_OR_REMOVE_ONE else relation
    factor = SENSITIVITY_IN_C.get(relation)
    sens = "C" if factor == 1.0 else f"{factor:g}C" if factor else "?"
    return f"{verb} {what} (sensitivity {sens})"


def make_accountant(accountant: str) -> object:
    """A fresh Opacus accountant: ``"rdp"`` -> ``RDPAccountant``, ``"prv"`` ->
    ``PRVAccountant``. Raises ``ValueError`` for another name."""
    from opacus.accountants import PRVAccountant, RDPAccountant
    if accountant == "rdp":
        return RDPAccountant()
    if accountant == "prv":
        return PRVAccountant()
    raise ValueError(f"unknown accountant {accountant!r}; known: {list(ACCOUNTANTS)}")


def epsilon(noise_multiplier: float, sample_rate: float, steps: int,
            delta: float = DEFAULT_DELTA, accountant: str = "rdp") -> float:
    """ε at ``delta`` after ``steps`` sampled-Gaussian steps (noise σ = ``noise_multiplier``
    times the clip bound, sampling rate ``sample_rate`` in (0, 1]).

    ``steps == 0`` gives 0.0; ``noise_multiplier == 0`` (clipping only) gives ``math.inf``.
    Raises ``ValueError`` for a negative σ or steps, q outside (0, 1], δ outside (0, 1).

    >>> round(epsilon(1.0, 1.0, 1, 1e-5), 3)  # one full-batch Gaussian mechanism, RDP
    4.729
    >>> epsilon(0.0, 0.1, 10), epsilon(1.0, 0.1, 0)
    (inf, 0.0)
    """
    _check(noise_multiplier, sample_rate, steps, delta)
    return _composed(((float(noise_multiplier), float(sample_rate), int(steps)),),
                     float(delta), accountant)


def compose(history: Sequence[tuple[float, float, int]], delta: float = DEFAULT_DELTA,
            accountant: str = "rdp") -> float:
    """ε at ``delta`` of a sequence of ``(noise_multiplier, sample_rate, steps)`` phases
    (e.g. one per round a client took part in, when its parameters changed between rounds).
    Same conventions as :func:`epsilon`."""
    for s, q, n in history:
        _check(s, q, n, delta)
    return _composed(tuple((float(s), float(q), int(n)) for s, q, n in history),
                     float(delta), accountant)


def gaussian_epsilon(noise_multiplier: float, delta: float = DEFAULT_DELTA,
                     accountant: str = "rdp", releases: int = 1, *,
                     relation: str = ADD_OR_REMOVE_ONE) -> float:
    """ε of ``releases`` Gaussian mechanisms with std σ·C on a quantity clipped to norm C (no
    subsampling: q = 1), the sensitivity following from ``relation`` (C for add/remove, 2C for
    replace-one: the accountant gets :func:`effective_noise_multiplier`) — what
    :mod:`defenses.local_dp` spends per round (``releases = 1``, replace-one) and over the
    rounds a client took part in.

    >>> round(gaussian_epsilon(1.0, 1e-5, relation=REPLACE_ONE), 2)  # = σ/2 with sensitivity C
    10.73
    """
    return epsilon(effective_noise_multiplier(noise_multiplier, relation), 1.0, releases,
                   delta, accountant)


def dp_sgd_round_epsilon(noise_multiplier: float, sample_rate: float, steps_per_round: int,
                         rounds: int = 1, delta: float = DEFAULT_DELTA,
                         accountant: str = "rdp") -> float:
    """ε of ``rounds`` client-rounds of DP-SGD with ``steps_per_round`` steps each (one round:
    the per-round ε; the rounds a client took part in: its cumulative ε — every round has the
    same σ and q for a client, so the composition is ``rounds × steps_per_round`` steps)."""
    return epsilon(noise_multiplier, sample_rate, steps_per_round * rounds, delta, accountant)


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@lru_cache(maxsize=256)
def _composed(history: tuple[tuple[float, float, int], ...], delta: float,
              accountant: str) -> float:
    history = tuple(h for h in history if h[2] > 0)
    if not history:
        make_accountant(accountant)  # still reject an unknown name
        return 0.0
    if any(s == 0 for s, _, _ in history):
        return math.inf
    acc = make_accountant(accountant)
    acc.history = [tuple(h) for h in history]  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        # q = 1 makes PRV take log(0) on a masked branch, and the RDP optimum may sit at the
        # smallest order: both are Opacus' warnings about bounds it still returns correctly
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))  # type: ignore[attr-defined]
