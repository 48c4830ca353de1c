"""One-shot empirical privacy estimation with canary clients (client level).

Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot Empirical Privacy Estimation for
Federated Learning", ICLR 2024 (arXiv:2302.03098). Canary clients take part in client
sampling like real clients but do no training: each sends a fixed random direction c_i
(uniform on the unit sphere of the model's d parameters) scaled to the clipping norm. After
training, the auditor computes the cosine between each canary and the final model delta
θ_T − θ_0: canaries that were inserted ("observed") against canaries drawn the same way and
never inserted ("unobserved"). In high dimension the unobserved cosines are N(0, 1/d); the
paper fits a Gaussian to each of the two cosine samples and reports the ε, at the chosen δ,
of the Gaussian mechanism pair those fits describe — an *estimate* of ε (consistent for the
Gaussian mechanism as d grows), not a lower bound (:func:`estimate_epsilon` says how the
variances are fitted).

The second threat model sees every global model: per canary the statistic is the largest
cosine, over the rounds, between the canary and that round's model delta θ_t − θ_{t−1}
(:func:`all_iterates_statistic`); the same Gaussian fit turns the two samples into ε.

Checked against the paper (arXiv:2302.03098 v5) and the authors' estimator module
(Google's open-source module whose header cites the paper, read through the search tool:
``epsilon_two_gaussians``, ``epsilon_closed_form_null_gaussian_alt``), 2026-12-07:

* ε from two Gaussians: the same quantity — the smallest ε whose hockey-stick divergence,
  the larger of the two directions, is ≤ δ (:func:`gaussian_pair_delta`; theirs in log
  space, the same case split on the quadratic's leading coefficient).
* The null: the paper (Sec. 4) uses the closed form N(0, 1/d) for a never-inserted
  canary's cosine and fits only the observed cosines, each fit with its own variance.
  fl-sim's default (``null = "fitted"``) fits a Gaussian to never-inserted canaries as well
  and pools the two variances (:func:`estimate_epsilon` says why); ``null = "closed_form"``
  is the paper's estimator (:func:`estimate_epsilon_closed_form_null`). Measured on the
  synthetic Gaussian mechanism of tests/unit/test_audits.py (d = 20 000, 400 + 400
  canaries, seeds 0-4, δ = 1e-5), the largest relative error at σ = 0.5 / 1 / 2 / 4:
  pooled fit 11.6 / 13.3 / 27.1 / 53.6 %, the paper's 14.6 / 19.0 / 34.4 / 68.0 % (both
  overestimate at σ = 4, where a fitted mean's sampling error is a large part of μ).
* Final model vs all iterates: the final-model statistic is the cosine with θ_T − θ_0; for
  the observer of every iterate fl-sim takes, per canary, the largest cosine over the
  rounds' deltas θ_t − θ_{t−1} and fits a Gaussian to that statistic too (it is a max of T
  near-Gaussians, not Gaussian: the closed-form null is refused for it).
* Not implemented: the authors' module also has a Jagielski-style lower bound from the
  same cosines (Jeffreys intervals, ``optimal_epsilon_lower_bound``); fl-sim's lower bound
  is :mod:`fl_sim.audits.canary_examples`.

The search tool returned the paper's opening sections only, so the section numbers above
are the ones the authors' code cites, not re-read from the method section.
fl-sim inserts canary clients into the same round-sampling as real clients through its own
plumbing (fl_sim/federation/); the estimator here is independent of it.
Pure numpy/scipy: no torch, no flwr, no ray.

Shapes: canaries ``(k, d)`` float; deltas ``(d,)`` or ``(T, d)``; cosines ``(k,)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import Field
from scipy import optimize, stats

from fl_sim.audits.base import Audit
from fl_sim.capabilities import strategy_capabilities
from fl_sim.registry import AUDITS

#: largest ε :func:`gaussian_pair_epsilon` searches (beyond it the two fits barely overlap)
MAX_EPSILON = 200.0


def random_canaries(num: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` directions uniform on the unit sphere of R^dim, shape ``(num, dim)``."""
    c = rng.standard_normal((num, dim))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def cosines(canaries: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Cosine of each canary row ``(k, d)`` with the vector ``delta`` ``(d,)``: ``(k,)``.

    Raises ``ValueError`` for a zero ``delta`` (no model change: nothing to audit)."""
    norm = float(np.linalg.norm(delta))
    if norm == 0.0:
        raise ValueError("the model delta is zero: nothing to audit")
    return canaries @ delta / (np.linalg.norm(canaries, axis=1) * norm)


def all_iterates_statistic(per_round: np.ndarray) -> np.ndarray:
    """The all-iterates threat model's statistic: per canary, the largest cosine over the
    rounds. ``per_round`` is ``(T, k)`` (cosine of canary i with round t's model delta)."""
    return np.max(np.atleast_2d(per_round), axis=0)


def _hockey_stick(eps: float, m_p: float, s_p: float, m_q: float, s_q: float) -> float:
    """δ_{P‖Q}(ε) = sup_A P(A) − e^ε Q(A) for P = N(m_p, s_p²), Q = N(m_q, s_q²): the set A
    where the log-likelihood ratio exceeds ε is an interval or its complement (quadratic)."""
    a = 1 / (2 * s_q**2) - 1 / (2 * s_p**2)
    b = m_p / s_p**2 - m_q / s_q**2
    c = m_q**2 / (2 * s_q**2) - m_p**2 / (2 * s_p**2) + math.log(s_q / s_p) - eps

    def mass(lo: float, hi: float, m: float, s: float) -> float:
        return float(stats.norm.cdf(hi, m, s) - stats.norm.cdf(lo, m, s))

    if abs(a) < 1e-12 * max(abs(b), 1e-300):  # equal variances: a half-line
        if b == 0:
            return max(0.0, 1.0 - math.exp(eps)) if c > -eps else 0.0
        x0 = -c / b
        lo, hi = (x0, math.inf) if b > 0 else (-math.inf, x0)
        return max(0.0, mass(lo, hi, m_p, s_p) - math.exp(eps) * mass(lo, hi, m_q, s_q))
    disc = b * b - 4 * a * c
    if disc <= 0:
        if a < 0:
            return 0.0  # the ratio never exceeds e^ε
        return max(0.0, 1.0 - math.exp(eps))
    r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    if a < 0:  # inside the roots
        p, q = mass(r1, r2, m_p, s_p), mass(r1, r2, m_q, s_q)
    else:  # outside the roots
        p = 1.0 - mass(r1, r2, m_p, s_p)
        q = 1.0 - mass(r1, r2, m_q, s_q)
    return max(0.0, p - math.exp(eps) * q)


def gaussian_pair_delta(eps: float, mu0: float, sd0: float, mu1: float, sd1: float) -> float:
    """δ(ε) of the pair N(mu0, sd0²), N(mu1, sd1²): the larger hockey-stick divergence of
    the two directions (DP bounds both).

    >>> round(gaussian_pair_delta(1.0, 0.0, 1.0, 1.0, 1.0), 4)  # Gaussian mechanism, μ = 1
    0.1269
    """
    return max(_hockey_stick(eps, mu1, sd1, mu0, sd0), _hockey_stick(eps, mu0, sd0, mu1, sd1))


def gaussian_pair_epsilon(mu0: float, sd0: float, mu1: float, sd1: float,
                          delta: float) -> float:
    """The smallest ε ≥ 0 with :func:`gaussian_pair_delta` ≤ ``delta``; ``math.inf`` past
    :data:`MAX_EPSILON`. Raises ``ValueError`` for a non-positive std or δ outside (0, 1).

    >>> round(gaussian_pair_epsilon(0.0, 1.0, 1.0, 1.0, 0.1269), 2)
    1.0
    """
    if not (sd0 > 0 and sd1 > 0):
        raise ValueError(f"standard deviations must be > 0, got {sd0}, {sd1}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")

    def f(e: float) -> float:
        return gaussian_pair_delta(e, mu0, sd0, mu1, sd1) - delta

    if f(0.0) <= 0:
        return 0.0
    if f(MAX_EPSILON) > 0:
        return math.inf
    return float(optimize.brentq(f, 0.0, MAX_EPSILON, xtol=1e-9))


@dataclass(frozen=True)
class EpsilonEstimate:
    """ε estimated from two cosine samples (the paper's Gaussian fit) and the fits."""

    epsilon: float
    delta: float
    observed_mean: float
    observed_std: float
    unobserved_mean: float
    unobserved_std: float
    num_observed: int
    num_unobserved: int


def estimate_epsilon(observed: np.ndarray, unobserved: np.ndarray,
                     delta: float) -> EpsilonEstimate:
    """The estimate: a Gaussian fitted to each sample (mean, unbiased std), then the ε at
    ``delta`` of the Gaussian-mechanism pair N(0, s²), N(μ_obs − μ_unobs, s²) with s² the
    mean of the two fitted variances.

    Deviation: the two fits share one (pooled) variance. Under the Gaussian mechanism the
    two cosine distributions have the same variance asymptotically (the paper's analysis);
    letting the finite-sample variances differ makes the likelihood ratio unbounded in the
    tails, and at δ = 1e-5 that alone moved the synthetic estimates by up to 88 % (σ = 4,
    d = 1e4, 500 canaries), against 32 % with the pooled variance. The paper itself
    (Sec. 4) takes the null as N(0, 1/d) and keeps the observed fit's own variance:
    :func:`estimate_epsilon_closed_form_null` (``null = "closed_form"``); on the synthetic
    mechanism it was up to 19-68 % off where this estimate was 13-54 % (module doc).

    Raises ``ValueError`` with fewer than 2 values in either sample."""
    obs, unobs = np.asarray(observed, float).ravel(), np.asarray(unobserved, float).ravel()
    if obs.size < 2 or unobs.size < 2:
        raise ValueError(f"need >= 2 observed and unobserved canaries, got {obs.size}, "
                         f"{unobs.size}")
    m1, s1 = float(obs.mean()), float(obs.std(ddof=1))
    m0, s0 = float(unobs.mean()), float(unobs.std(ddof=1))
    pooled = math.sqrt((s0**2 + s1**2) / 2)
    if pooled == 0.0:
        eps = 0.0 if m1 == m0 else math.inf
    else:
        eps = gaussian_pair_epsilon(0.0, 1.0, (m1 - m0) / pooled, 1.0, delta)
    return EpsilonEstimate(eps, delta, m1, s1, m0, s0, obs.size, unobs.size)


def estimate_epsilon_closed_form_null(observed: np.ndarray, dim: int,
                                      delta: float) -> EpsilonEstimate:
    """The paper's estimate with the closed-form null (Andrew et al., Sec. 4, and the
    authors' ``epsilon_closed_form_null_gaussian_alt``): the never-inserted canaries'
    cosine is N(0, 1/d) (exact as d grows; no sample needed), the observed cosines get a
    Gaussian with their own mean and (unbiased) std, and ε at ``delta`` is that of the pair
    N(0, 1/d), N(μ_obs, s_obs²) with the two variances kept apart.

    Raises ``ValueError`` with fewer than 2 observed values or ``dim`` < 1000 (below it the
    null is not Gaussian; the authors integrate the exact cosine density there)."""
    obs = np.asarray(observed, float).ravel()
    if obs.size < 2:
        raise ValueError(f"need >= 2 observed canaries, got {obs.size}")
    if dim < 1000:
        raise ValueError(f"the closed-form null N(0, 1/d) needs d >= 1000, got {dim}")
    m1, s1 = float(obs.mean()), float(obs.std(ddof=1))
    s0 = dim ** -0.5
    eps = math.inf if s1 == 0.0 else gaussian_pair_epsilon(0.0, s0, m1, s1, delta)
    return EpsilonEstimate(eps, delta, m1, s1, 0.0, s0, obs.size, 0)


@AUDITS.register("canary_clients")
@dataclass(frozen=True)
class CanaryClients(Audit):
    """Canary clients: ε estimated from cosines of model deltas with canary directions.

    Andrew et al., "One-shot Empirical Privacy Estimation for Federated Learning", ICLR 2024."""

    unit = "client"
    #: canary clients inserted into client sampling (each a fixed random direction)
    num_canaries: Annotated[int, Field(ge=1)] = 8
    #: canaries drawn the same way and never inserted (the null distribution)
    num_unobserved: Annotated[int, Field(ge=2)] = 64
    #: "final_model": cosines with θ_T − θ_0; "every_global": max over rounds of the
    #: cosine with θ_t − θ_{t−1}; "server": each received canary update (needs per-client
    #: updates: refused under secagg_plus)
    view: Literal["final_model", "every_global", "server"] = "final_model"
    #: δ at which ε is estimated
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    #: null distribution: "fitted" (a Gaussian fitted to the never-inserted canaries'
    #: scores, variance pooled with the observed fit: fl-sim's default, see
    #: estimate_epsilon) or "closed_form" (the paper's N(0, 1/d) with the observed fit's
    #: own variance; final_model and server views only)
    null: Literal["fitted", "closed_form"] = "fitted"

    def problem(self, *, num_clients: int, num_rounds: int,
                defense_names: tuple[str, ...], strategy: str = "") -> str | None:
        if self.num_canaries > num_clients:
            return (f"num_canaries = {self.num_canaries} is more than the "
                    f"{num_clients} clients (federation.num_clients)")
        if self.null == "closed_form" and self.view == "every_global":
            return ('null = "closed_form" is N(0, 1/d), the cosine of ONE round; the '
                    'every_global statistic is a max over rounds (use null = "fitted")')
        if strategy and strategy_capabilities(strategy).sends_gradient:
            # FedSGD's replies are server steps global − η·g: a canary's weights-space update
            # would enter with the wrong sign and a 1/η scale (measured: mean cosine −0.38)
            return (f"canary clients send a model delta; strategy {strategy} aggregates "
                    "gradients (use fedavg or another delta-averaging strategy)")
        return super().problem(num_clients=num_clients, num_rounds=num_rounds,
                               defense_names=defense_names)
