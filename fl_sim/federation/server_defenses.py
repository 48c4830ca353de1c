"""Server-stage defenses on Flower: central DP through Flower's DP strategy wrappers.

:func:`wrap_server_defenses` wraps the configured strategy (fl-sim's ``build_strategy``) in
Flower's wrapper for ``[[defenses]] name = "central_dp"`` (:mod:`defenses.central_dp`):
``DifferentialPrivacy{ServerSide,ClientSide}{Fixed,Adaptive}Clipping``. The server app then
puts fl-sim's :class:`~fl_sim.federation.taps.TapStrategy` AROUND it, so

* the tap's ``server_in`` records are the replies as the server received them, BEFORE the
  wrapper clips (server-side clipping) or adds noise: what a curious server sees, identical to
  an undefended run's records of the same round;
* the ``aggregate`` record and the next global — what a curious peer derives its view from —
  carry the clipping and the noise.

Adaptive clipping uses Flower's wrappers with one fix, the direction of the clip-norm update
(:class:`_AdaptiveRule`). Client-side clipping uses Flower's ``fixedclipping_mod`` /
``adaptiveclipping_mod``, listed in :data:`fl_sim.federation.client_mods.TRAIN_MODS`
behind :func:`central_dp_clipping_mod`, which acts only on messages whose config carries the
wrapper's ``clipping_norm``.

FedSGD: the wrapper and the mods compute ``reply − global``, so a FedSGD strategy wrapped here
asks its clients for one-step weights instead of gradients (``FedSGD.reply_steps``; see
:mod:`strategies.fedsgd`).

**Seeding.** Flower's wrappers draw their noise (and adaptive clipping's noisy clipped count)
from numpy's GLOBAL RNG. :class:`CentralDPStrategy` seeds it, for each round's aggregation,
from ``derive_seed(run.seed, "round", r, "central_dp")`` and restores the previous global state
afterwards: the same seed gives the same noise in every run and after a resume.

**Resume.** The wrapper's state (the adaptive clipping norm, the released-rounds counter used
for ε) is plain attributes of the wrapped strategies, which
:mod:`fl_sim.federation.checkpoint` saves and restores generically.

**ε.** :meth:`CentralDPStrategy.metrics_row` gives the round's ``metrics.jsonl`` columns:
``central_dp_epsilon`` (cumulative over the noisy aggregates released so far),
``central_dp_epsilon_round`` (one release), ``central_dp_unit`` /
``central_dp_neighbouring`` (what the ε bounds: one client, add-or-remove-one),
``central_dp_clipping_norm`` (C after the round) and ``central_dp_noise_std`` (σC/m of the
round), from :meth:`defenses.central_dp.CentralDP.round_epsilon` (Opacus' accountant).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from defenses.accounting import privacy_fields
from fl_sim.defended import build_defenses
from fl_sim.federation.flower_compat import install_zero_norm_fix
from fl_sim.seeding import derive_seed
from strategies.fedsgd import FedSGD

logger = logging.getLogger(__name__)

#: config key telling the client which clipping mod to run (client-side clipping only)
CLIPPING_MODE_KEY = "central-dp-clipping"
#: config key Flower's client-side wrappers set (its differential_privacy module)
KEY_CLIPPING_NORM = "clipping_norm"


# Flower's clipping divided by a zero update norm (flower_compat.install_zero_norm_fix)
install_zero_norm_fix()


class _AdaptiveRule:
    """Andrew et al.'s update of the clipping norm for Flower's adaptive wrappers.

    Flower (1.41 / 1.42) counts CLIPPED updates (``norm_bit`` = the update was scaled down)
    but applies the paper's rule for UNCLIPPED ones, ``C ← C·exp(−η_C (b̄ − γ))``: when more
    than the target fraction is clipped, its C shrinks, and keeps shrinking (measured: every
    update clipped, C 0.1 → 0.090 → 0.082). With b̄ = 1 − f (f the noisy clipped fraction)
    and γ = 1 − ``target_clipped_quantile`` the paper's rule is ``C ← C·exp(η_C (f − q))``:
    C grows while more than q of the updates are clipped. fl-sim's subclasses use that."""

    clipping_norm: float
    clip_norm_lr: float
    target_clipped_quantile: float

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm *= math.exp(
            self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile))


class ServerSideAdaptiveClipping(_AdaptiveRule, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with the paper's clip-norm rule."""


class ClientSideAdaptiveClipping(_AdaptiveRule, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping with the paper's clip-norm rule."""


def central_dp_of(cfg: Any) -> Any:
    """The configured ``central_dp`` defense, or None."""
    return next((d for d in build_defenses(cfg) if d.name == "central_dp"), None)


def wrap_server_defenses(strategy: Strategy, cfg: Any) -> Strategy:
    """``strategy`` wrapped for the server-stage defenses of ``cfg`` (itself if none)."""
    d = central_dp_of(cfg)
    if d is None:
        return strategy
    if isinstance(strategy, FedSGD):
        strategy.reply_steps = True  # replies become deltas the wrapper can clip
    m = d.sampled(cfg)
    if d.adaptive:
        cls = ClientSideAdaptiveClipping if d.client_side else ServerSideAdaptiveClipping
        dp: Strategy = cls(strategy, d.noise_multiplier, m,
                           initial_clipping_norm=d.clipping_norm,
                           target_clipped_quantile=d.target_clipped_quantile,
                           clip_norm_lr=d.clip_norm_lr,
                           clipped_count_stddev=d.clipped_count_stddev)
    else:
        cls = DifferentialPrivacyClientSideFixedClipping if d.client_side else \
            DifferentialPrivacyServerSideFixedClipping
        dp = cls(strategy, d.noise_multiplier, d.clipping_norm, m)
    return CentralDPStrategy(dp, defense=d, seed=cfg.run.seed, num_sampled=m, cfg=cfg)


class CentralDPStrategy(Strategy):
    """Delegates to Flower's DP wrapper ``dp``; seeds its noise per round and counts the
    released aggregates for ε (see module doc). Sits INSIDE the tap, outside the wrapper."""

    def __init__(self, dp: Strategy, *, defense: Any, seed: int, num_sampled: int,
                 cfg: Any) -> None:
        self.dp = dp
        self.seed = int(seed)
        self.num_sampled = int(num_sampled)
        #: noisy aggregates released so far (checkpointed: ε survives a resume)
        self.releases = 0
        self._defense = defense
        self._cfg = cfg
        self._noise_std = 0.0

    def summary(self) -> None:
        logger.info("central DP (%s) around the strategy", self._defense.clipping)
        self.dp.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self._defense.client_side:
            config[CLIPPING_MODE_KEY] = self._defense.clipping
        return self.dp.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapper's aggregation with numpy's global RNG seeded for this round."""
        replies = [float_buffers(m) for m in replies]
        saved = np.random.get_state()
        np.random.seed(derive_seed(self.seed, "round", server_round, "central_dp") % 2**32)
        try:
            new, metrics = self.dp.aggregate_train(server_round, list(replies))
        finally:
            np.random.set_state(saved)
        if new is not None:
            self.releases += 1
            nm = float(getattr(self.dp, "noise_multiplier", 0.0))
            self._noise_std = nm * float(self.clipping_norm) / self.num_sampled
        return new, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.dp.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.dp.aggregate_evaluate(server_round, replies)

    @property
    def clipping_norm(self) -> float:
        """C now (changes under adaptive clipping)."""
        return float(self.dp.clipping_norm)  # type: ignore[attr-defined]

    def metrics_row(self) -> dict[str, float | str | None]:
        """This round's ``metrics.jsonl`` columns (``None`` for an infinite ε, σ = 0)."""
        d, cfg = self._defense, self._cfg
        return {"central_dp_epsilon": _finite(d.round_epsilon(cfg, self.releases)),
                "central_dp_epsilon_round": _finite(d.round_epsilon(cfg, 1)),
                **privacy_fields(d.privacy_unit, d.neighbouring, prefix="central_"),
                "central_dp_clipping_norm": self.clipping_norm,
                "central_dp_noise_std": self._noise_std}


def central_dp_row(strategy: Strategy) -> dict[str, float | str | None]:
    """The central-DP columns of a round's metrics row, ``{}`` without central DP."""
    return strategy.metrics_row() if isinstance(strategy, CentralDPStrategy) else {}


def central_dp_clipping_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Client side of central DP with client-side clipping: Flower's ``fixedclipping_mod``
    or ``adaptiveclipping_mod`` when the message's config asks for it, else a no-op (the
    ClientApp serves every experiment)."""
    config = next(iter(msg.content.config_records.values()), None)
    if config is None or KEY_CLIPPING_NORM not in config or CLIPPING_MODE_KEY not in config:
        return call_next(msg, ctxt)
    adaptive = str(config[CLIPPING_MODE_KEY]).endswith("adaptive")
    mod = adaptiveclipping_mod if adaptive else fixedclipping_mod
    return mod(msg, ctxt, lambda m, c: float_buffers(call_next(m, c)))


def float_buffers(msg: Message) -> Message:
    """``msg`` with its integer arrays (BatchNorm's ``num_batches_tracked``) as float64:
    Flower's clipping scales every array in place (``array *= scale``), which numpy refuses
    for an integer array once the scale is below 1. The server tap casts the aggregate back
    to the global's dtypes (rounding), so integer buffers stay integers between rounds.
    Error replies and float-only records are returned as they are."""
    if msg.has_error():
        return msg
    for name, record in list(msg.content.array_records.items()):
        arrays = {k: a.numpy() for k, a in record.items()}
        if all(not np.issubdtype(a.dtype, np.integer) for a in arrays.values()):
            continue
        msg.content[name] = ArrayRecord({
            k: Array(a.astype(np.float64) if np.issubdtype(a.dtype, np.integer) else a)
            for k, a in arrays.items()})
    return msg


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
