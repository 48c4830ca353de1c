"""Auditing with one training run: canary examples and a lower bound on ε (example level).

Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
(arXiv:2305.08846). m canary examples are each included in training independently with
probability 1/2 (a seeded coin per canary, S ∈ {−1, +1}^m). After training the auditor
scores every canary (here: its loss under the final model; lower loss = more likely a
member), guesses "included" for the k+ most confident and "excluded" for the k− least
confident canaries and abstains on the rest: r = k+ + k− guesses, v of them correct.

If training is (ε, δ)-DP in the canaries, the number of correct guesses is stochastically
dominated as in the paper's Theorem (δ = 0: by Binomial(r, e^ε / (1 + e^ε)); δ > 0: with the
extra term 2mδ · max_i P[v − i ≤ Binomial < v] / i). :func:`p_value` is that tail bound;
:func:`epsilon_lower_bound` is the largest ε whose p-value is still below 1 − confidence
(bisection, as the paper's algorithm): with the stated confidence the run is not
(ε, δ)-DP for any smaller ε. A lower bound, not an estimate.

Checked against the paper (arXiv:2305.08846) on 2026-12-07: :func:`p_value` is its
numerical bound term for term — q = e^ε/(1 + e^ε) ("ε-DP randomized response"), P[B ≥ v],
plus 2mδ times the largest (1/i)·P[v − i ≤ B < v] over i = 1..v — and
:func:`epsilon_lower_bound` its search (grow an upper end until the p-value reaches
1 − confidence, then bisect; here doubling and 40 steps); the same as an independent
transcription of the paper's algorithm found by the search tool. Abstention (r < m) and the
95 % confidence are the paper's. The score is the canary's loss under the final model only
(the paper's black-box, last-iterate setting; its white-box audit of every DP-SGD step, with
gradient canaries, is not implemented). k_pos and k_neg are fixed in the config before the
scores are seen: trying several and keeping the best would need a union bound over the
choices, which the bound here does not include. The search tool returned the paper's
opening sections only, so no page numbers are given.

Pure numpy/scipy: no torch, no flwr, no ray. Shapes: ``scores`` ``(m,)``,
``included`` ``(m,)`` bool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import Field
from scipy import stats

from fl_sim.audits.base import Audit
from fl_sim.registry import AUDITS

#: bisection steps of :func:`epsilon_lower_bound` (the paper's algorithm uses a fixed count)
BISECTION_STEPS = 40


def inclusion_draw(m: int, rng: np.random.Generator) -> np.ndarray:
    """Which of ``m`` canaries are included: independent fair coins, ``(m,)`` bool."""
    return rng.random(m) < 0.5


def guesses(scores: np.ndarray, k_pos: int, k_neg: int) -> np.ndarray:
    """+1 ("included") for the ``k_pos`` highest scores, −1 for the ``k_neg`` lowest, 0
    (abstain) for the rest; ``(m,)`` int. Ties are broken by index (stable sort).

    Raises ``ValueError`` if ``k_pos + k_neg`` exceeds the number of scores."""
    s = np.asarray(scores, float).ravel()
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > s.size:
        raise ValueError(f"k_pos + k_neg = {k_pos + k_neg} guesses for {s.size} canaries")
    order = np.argsort(-s, kind="stable")
    out = np.zeros(s.size, dtype=int)
    out[order[:k_pos]] = 1
    if k_neg:
        out[order[s.size - k_neg:]] = -1
    return out


def count_correct(guess: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """``(r, v)``: guesses made (non-zero) and correct ones."""
    g = np.asarray(guess).ravel()
    truth = np.where(np.asarray(included, bool).ravel(), 1, -1)
    made = g != 0
    return int(made.sum()), int((g[made] == truth[made]).sum())


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The paper's bound on P[≥ v correct of r guesses] under (ε, δ)-DP with m canaries:
    P[B ≥ v] + 2mδ · max_{1≤i≤v} P[v − i ≤ B < v] / i, B ~ Binomial(r, e^ε / (1 + e^ε));
    capped at 1. Raises ``ValueError`` unless 0 ≤ v ≤ r ≤ m, ε ≥ 0, 0 ≤ δ ≤ 1."""
    if not (0 <= v <= r <= m) or epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need 0 <= v <= r <= m, epsilon >= 0, delta in [0, 1]; got m={m}, "
                         f"r={r}, v={v}, epsilon={epsilon}, delta={delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))  # P[B >= v]
    extra = 0.0
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        below = stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q)
        extra = 2 * m * delta * float(np.max(below / i))
    return min(1.0, tail + extra)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float = 0.0,
                        confidence: float = 0.95) -> float:
    """The largest ε (to ~1e-9) with :func:`p_value` < 1 − ``confidence``: with that
    confidence the audited run is not (ε', δ)-DP for any ε' below it. 0.0 when even ε = 0
    is not rejected.

    >>> round(epsilon_lower_bound(10, 10, 10, confidence=0.95), 4)  # logit(0.05 ** 0.1)
    1.0519
    """
    beta = 1.0 - confidence
    if not 0 < beta < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return math.inf
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class LowerBound:
    """The audit's result: guesses made, correct, and the ε lower bound."""

    epsilon: float
    confidence: float
    delta: float
    num_canaries: int
    guesses: int
    correct: int


def audit_scores(scores: np.ndarray, included: np.ndarray, *, k_pos: int, k_neg: int,
                 delta: float, confidence: float) -> LowerBound:
    """Guess from ``scores`` (higher = more likely included), count, bound ε."""
    g = guesses(scores, k_pos, k_neg)
    r, v = count_correct(g, included)
    m = int(np.asarray(scores).size)
    eps = epsilon_lower_bound(m, r, v, delta=delta, confidence=confidence)
    return LowerBound(eps, confidence, delta, m, r, v)


@AUDITS.register("canary_examples")
@dataclass(frozen=True)
class CanaryExamples(Audit):
    """Canary examples, each in training w.p. 1/2: a one-run lower bound on ε.

    Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023."""

    unit = "example"
    #: canary examples m (each included in one client's data with probability 1/2)
    num_canaries: Annotated[int, Field(ge=1)] = 100
    #: guesses "included" on the k_pos lowest-loss canaries
    k_pos: Annotated[int, Field(ge=0)] = 10
    #: guesses "excluded" on the k_neg highest-loss canaries
    k_neg: Annotated[int, Field(ge=0)] = 10
    #: how each canary is scored: its loss under the final model
    score: Literal["loss"] = "loss"
    view: Literal["final_model"] = "final_model"
    #: δ of the (ε, δ) the bound is about
    delta: Annotated[float, Field(ge=0, lt=1)] = 1e-5
    #: confidence of the lower bound
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95

    def problem(self, *, num_clients: int, num_rounds: int,
                defense_names: tuple[str, ...], strategy: str = "") -> str | None:
        if self.k_pos + self.k_neg > self.num_canaries:
            return (f"k_pos + k_neg = {self.k_pos + self.k_neg} guesses for "
                    f"{self.num_canaries} canaries (num_canaries)")
        if self.k_pos + self.k_neg == 0:
            return "k_pos + k_neg = 0: the auditor makes no guess"
        return super().problem(num_clients=num_clients, num_rounds=num_rounds,
                               defense_names=defense_names)
