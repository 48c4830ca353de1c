"""Central DP: the server clips each client's update and adds Gaussian noise to the aggregate.

DP-FedAvg of McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models" (ICLR 2018) with fixed clipping, and the adaptive clipping of Andrew,
Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping"
(NeurIPS 2021), as Flower implements them (``flwr.serverapp.strategy``
``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`` and the client mods
``fixedclipping_mod`` / ``adaptiveclipping_mod``). Each sampled client's update
``Δ_i = reply_i − global`` (all arrays of the model state, as Flower computes it) is scaled to
L2 norm at most C, the strategy takes the mean, and N(0, (σC/m)²) is added to every
coordinate of the new global (m = ``num_sampled_clients``):

    global' = global + mean_i(Δ_i · min(1, C / ||Δ_i||)) + N(0, (σ·C / m)² I)

``clipping`` says who clips and how C evolves: ``"server_fixed"`` (the server clips, C fixed),
``"client_fixed"`` (each client clips with ``fixedclipping_mod`` before sending),
``"server_adaptive"`` / ``"client_adaptive"`` (C follows the noisy fraction of clipped updates
towards ``target_clipped_quantile``, geometric step ``clip_norm_lr``; ``clipping_norm`` is the
initial C; ``clipped_count_stddev`` the noise on that count, Flower's default m/20).
Deviation from Flower 1.42: its adaptive wrappers move C the wrong way (they count clipped
updates but apply the paper's rule for unclipped ones, so C shrinks while most updates are
clipped); fl-sim uses the paper's direction, ``C ← C·exp(η_C (f − q))`` for a noisy clipped
fraction f (:class:`fl_sim.federation.server_defenses.ServerSideAdaptiveClipping`).

**Whom it protects.** The noise is added AFTER the server has seen every client's update: it
does NOT protect against the (honest-but-curious) server — ``protects_server_view = False``;
fl-sim records the server tap outside Flower's wrapper, so the server view is exactly what an
undefended run's server sees (server-side clipping happens after the tap too). It does protect
against everyone who sees only the new global model: a curious peer's derivation
``global_{r+1} − global_r`` carries the noise. With client-side clipping the server sees
clipped (but noise-free) updates.

**Unit of privacy and neighbouring relation: one client, add-or-remove-one** (McMahan et
al. 2018's user-level DP, and Flower's own: its fixed-clipping accountant accepts only
``add-or-remove-one`` without amplification and feeds the Google accountant σ itself).
Flower's wrappers divide the sum of the clipped updates by the FIXED m
(``num_sampled_clients``) and add N(0, (σC/m)²) — ``compute_stdv(σ, C, m) = σC/m`` in
``flwr.supercore.differential_privacy`` — i.e. noise σC on the sum. Adding or removing one
client moves that sum by at most C: sensitivity C relative to the noise σC, so the
accountant gets σ (:func:`defenses.accounting.effective_noise_multiplier` with
``"add-or-remove-one"`` is the identity). Replace-one would move the sum by 2C and halve the
effective multiplier; it is not the relation the Poisson-sampled accountant (nor the paper)
is written for. Results write ``central_dp_unit = "client"`` and
``central_dp_neighbouring = "add-or-remove-one"`` beside ε.

**ε** is not read from Flower (its accountant covers only fixed clipping with uniform
weights and no sampling amplification): fl-sim accounts each round as one sampled Gaussian
mechanism with noise multiplier σ (sensitivity C of one client's clipped update in the sum
over a fixed m, as above) and sampling rate q = m / num_clients, by Opacus' accountant
(:func:`defenses.accounting.epsilon`, steps = rounds released): user-level (ε, δ)-DP of the
sequence of global models. Approximations, as in the papers: fl-sim samples exactly m clients
without replacement (the accountants assume Poisson sampling), and FedAvg weights replies by
``num-examples`` (equal for ``local_steps`` federations; unequal weights would raise one
client's sensitivity above C/m). Under adaptive clipping σ is the noise multiplier of the
whole mechanism (Flower raises the update noise to pay for the noisy clipped count, Andrew et
al. Thm 1), so ε is computed with σ as given. Pure parameters: fl_sim.federation adapts it to
Flower (:mod:`fl_sim.federation.server_defenses`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from defenses.accounting import (
    ADD_OR_REMOVE_ONE,
    CLIENT,
    DEFAULT_DELTA,
    describe_relation,
    effective_noise_multiplier,
    epsilon,
)
from defenses.base import Defense
from fl_sim.capabilities import defenses_with, strategies_with, strategy_capabilities
from fl_sim.registry import DEFENSES

Clipping = Literal["server_fixed", "client_fixed", "server_adaptive", "client_adaptive"]
# Strategies it accepts declare ``global_is_mean_step`` (fl_sim.capabilities): the new
# global moves by the (num-examples weighted) mean of the client updates, the only kind whose
# sensitivity Flower's noise (σC/m on the mean) is calibrated for.


def sampled_clients(num_clients: int, fraction: float) -> int:
    """How many clients fl-sim samples per round (as :func:`fl_sim.federation.taps.
    sample_clients`): ``max(1, int(num_clients · fraction))``.

    >>> sampled_clients(10, 0.25), sampled_clients(3, 1.0), sampled_clients(3, 0.1)
    (2, 3, 1)
    """
    return max(1, int(num_clients * fraction + 1e-9))


@DEFENSES.register("central_dp")
@dataclass(frozen=True)
class CentralDP(Defense):
    """Central DP with Flower's strategy wrappers (clipping + noise on the aggregate)."""

    stage: ClassVar[str] = "server"
    protects_server_view: ClassVar[bool] = False
    #: the server clips each update (its client-side variant needs the per-client norms)
    needs_per_client_updates: ClassVar[bool] = True
    #: unit of privacy and neighbouring relation (module doc): sensitivity C on the sum
    privacy_unit: ClassVar[str] = CLIENT
    neighbouring: ClassVar[str] = ADD_OR_REMOVE_ONE

    #: who clips and whether C adapts (see module doc)
    clipping: Clipping = "server_fixed"
    #: σ: noise std on the mean is σ·C / m
    noise_multiplier: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1.0
    #: C: L2 bound of one client's update (the initial C under adaptive clipping)
    clipping_norm: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0
    #: m: clients sampled per round; unset = what federation.fraction_train samples
    num_sampled_clients: Annotated[int, Field(ge=1)] | None = None
    #: δ at which ε is reported
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] = DEFAULT_DELTA
    #: Opacus accountant for ε: "rdp" or "prv"
    accountant: Literal["rdp", "prv"] = "rdp"
    #: adaptive clipping: the quantile of update norms C tracks
    target_clipped_quantile: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    #: adaptive clipping: geometric learning rate of C
    clip_norm_lr: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 0.2
    #: adaptive clipping: std of the noise on the clipped count (unset: m / 20)
    clipped_count_stddev: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None

    @property
    def adaptive(self) -> bool:
        return self.clipping.endswith("adaptive")

    @property
    def client_side(self) -> bool:
        return self.clipping.startswith("client")

    def sampled(self, cfg: Any) -> int:
        """m: ``num_sampled_clients`` or what ``cfg.federation`` samples per round."""
        fed = cfg.federation
        return self.num_sampled_clients or sampled_clients(fed.num_clients, fed.fraction_train)

    def problem(self, cfg: Any) -> str | None:
        fed = cfg.federation
        m = sampled_clients(fed.num_clients, fed.fraction_train)
        if self.num_sampled_clients is not None and self.num_sampled_clients != m:
            return (f"num_sampled_clients = {self.num_sampled_clients} but the federation "
                    f"samples {m} per round (num_clients {fed.num_clients} × fraction_train "
                    f"{fed.fraction_train}); the noise σC/m would be miscalibrated — leave it "
                    "unset")
        for name in defenses_with("hides_per_client_updates", cfg.defenses):
            return (f"cannot be combined with {name}: the server clips each client's update, "
                    f"and under {name} it has only their sum")
        if not strategy_capabilities(cfg.strategy.name).global_is_mean_step:
            return (f"needs a strategy whose aggregate is the mean of the clients' updates "
                    f"({', '.join(strategies_with('global_is_mean_step'))}); got "
                    f"{cfg.strategy.name!r}")
        if self.adaptive and self.noise_multiplier > 0:
            stddev = self.clipped_count_stddev if self.clipped_count_stddev is not None \
                else m / 20
            if self.noise_multiplier >= 2 * stddev:
                return (f"adaptive clipping needs noise_multiplier < 2 × clipped_count_stddev "
                        f"({2 * stddev:g} with {m} sampled clients); raise "
                        "clipped_count_stddev or lower noise_multiplier")
        return None

    def round_epsilon(self, cfg: Any, releases: int = 1) -> float:
        """ε at ``delta`` after ``releases`` noisy aggregates (q = m / num_clients); ``inf``
        for σ = 0 (clipping only)."""
        q = min(1.0, self.sampled(cfg) / cfg.federation.num_clients)
        sigma = effective_noise_multiplier(self.noise_multiplier, self.neighbouring)
        return epsilon(sigma, q, releases, self.delta, self.accountant)


#: what report.html says beside an attack result under central DP, by view
REPORT_NOTES = {
    "server": ("Central DP does not protect against the server: the server saw this "
               "client's update before any noise was added (its noise goes on the aggregate), "
               "so this attack is unaffected by it."),
    "peer": ("Central DP protects against a curious peer: the peer derives the others' "
             "update from global models that carry the server's Gaussian noise."),
    "aggregate": ("Central DP: the recorded aggregate is the published, noisy one (what a "
                  "peer sees); the server itself saw every update before the noise."),
}


def report_note(defenses: Any, view: str) -> str:
    """The sentence :data:`REPORT_NOTES` has for ``view`` when ``defenses`` (describe()
    dicts or names) include central_dp, else ``""``.

    >>> report_note([{"name": "central_dp"}], "peer").startswith("Central DP protects")
    True
    >>> report_note([{"name": "pruning"}], "server")
    ''
    """
    names = {d if isinstance(d, str) else d.get("name") for d in defenses or ()}
    return REPORT_NOTES.get(view, "") if "central_dp" in names else ""


def epsilon_note(metrics: Any) -> str:
    """One sentence on central DP's ε from ``metrics.jsonl`` rows (``central_dp_epsilon``
    columns), or ``""`` for a run without central DP."""
    rows = [r for r in metrics if "central_dp_epsilon" in r]
    if not rows:
        return ""
    last = rows[-1]
    eps = last["central_dp_epsilon"]
    text = "∞ (no noise)" if eps is None else f"{float(eps):.2f}"
    unit = last.get("central_dp_unit", CLIENT)
    rel = last.get("central_dp_neighbouring", ADD_OR_REMOVE_ONE)
    return (f"Central DP: the global models after round {last['round']} are ({text}, δ)-DP "
            f"per {unit} (unit of privacy: {unit}; neighbouring datasets: "
            f"{describe_relation(unit, rel)}; Opacus accountant, sampling rate = fraction of "
            f"clients sampled; noise std {float(last.get('central_dp_noise_std', 0)):.4g} on "
            f"the aggregate). It does not protect against the server, which sees every update "
            f"before the noise; it protects against curious peers.")
