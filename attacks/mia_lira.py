"""The Likelihood Ratio Attack, LiRA (Carlini, Chien, Nasr, Song, Terzis, Tramèr, "Membership
Inference Attacks From First Principles", IEEE S&P 2022), online and offline.

Target model: the final global model (``target = "final"``, what every client and anyone it
is published to holds) or a client's local model ``global_r + delta`` that the server rebuilds
from a FedAvg update (``target = "local"``, server view). For each candidate ``(x, y)`` the
statistic is the logit-scaled confidence ``φ = log(p_y / (1 − p_y))`` of the model on ``x``.
Shadow models of the same architecture are trained on the attacker's auxiliary data
(:mod:`attacks.components.shadow`, cached by content hash):

* offline: reference models that never saw a candidate; fit ``N(μ_out, σ²_out)`` to the
  candidate's ``φ`` over them; score = ``(φ_target − μ_out) / σ_out`` (a monotone form of the
  paper's one-sided test ``1 − Pr[Z > φ_target]``);
* online: shadow models trained on random halves of auxiliary data + candidates (each
  candidate IN about half of them); score = ``log N(φ; μ_in, σ²_in) − log N(φ; μ_out,
  σ²_out)``.

Deviations from the paper: no query augmentations (a single query per candidate: fl-sim's
classifiers are small and trained without augmentation); with fewer than 64 shadow models the
variances are global (pooled over candidates), the paper's own recommendation for few shadows,
always — per-candidate variances need many models; the shadow recipe (steps, lr, batch, size)
is the attacker's guess of the federation's training, declared in the parameters (the paper
trains shadows exactly like the target). Shapes: candidates ``[N, C, H, W]``, scores ``[N]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from attacks.components.inference import Auxiliary, Candidates, InferenceAttack, candidate_counts
from attacks.components.shadow import ShadowRecipe, shadow_set, true_class_logits
from fl_sim.errors import ConfigError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS

Target = Literal["final", "local"]


def target_state(record: ObservationRecord, target: str,
                 final_model: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """The attacked model's state: the final global, or ``global + delta`` of a FedAvg record
    (the client's local model). Raises :class:`~fl_sim.errors.ConfigError` for a local model
    from a record that is not a delta."""
    if target == "final":
        assert final_model is not None  # InferenceAttack.infer checks
        return {k: v.clone() for k, v in final_model.items()}
    if record.update_kind != "delta":
        raise ConfigError(f"target = \"local\" rebuilds the client's model from a FedAvg "
                          f"delta; this record holds a {record.update_kind!r}")
    return {k: (v + record.update[k].to(v.dtype)) if k in record.update else v.clone()
            for k, v in record.global_params.items()}


def reference_statistics(record: ObservationRecord, candidates: Candidates,
                         auxiliary: Auxiliary, recipe: ShadowRecipe, *, num_shadows: int,
                         online: bool, seed: int, device: torch.device
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(phi [K, N], p [K, N], in_mask [K, N], pool_p [K, M'])`` of the candidates over the
    ``K`` shadow models (online: trained on auxiliary + candidates; offline: auxiliary only),
    plus every shadow's true-label probability on the auxiliary population (RMIA's ``z``)."""
    from fl_sim.inference import digest
    n = len(candidates)
    if online:
        pool_x = torch.cat([candidates.images, auxiliary.images])
        pool_y = torch.cat([candidates.labels, auxiliary.labels])
        pool_digest = digest(pool_x, pool_y)
    else:
        pool_x, pool_y, pool_digest = auxiliary.images, auxiliary.labels, auxiliary.digest
    states, mask = shadow_set(record.spec, pool_x, pool_y, pool_digest, recipe,
                              num_models=num_shadows, seed=seed,
                              halves=n if online else 0, device=device)
    in_mask = mask[:, :n] if online else torch.zeros(num_shadows, n, dtype=torch.bool)
    phis, ps, pops = [], [], []
    for state in states:
        phi, p = true_class_logits(record.spec, state, candidates.images, candidates.labels,
                                   device=device)
        phis.append(phi)
        ps.append(p)
        pops.append(true_class_logits(record.spec, state, auxiliary.images, auxiliary.labels,
                                      device=device)[1])
    return torch.stack(phis), torch.stack(ps), in_mask, torch.stack(pops)


def _gaussian_logpdf(x: Tensor, mu: Tensor, sd: Tensor) -> Tensor:
    return -0.5 * ((x - mu) / sd) ** 2 - torch.log(sd)


@ATTACKS.register("mia_lira")
class MiaLira(InferenceAttack):
    """LiRA (Carlini et al. 2022), online or offline, on the final or a client's local model.

    ``online``: shadows trained with the candidates (IN / OUT per candidate) or reference
    models without them. ``num_shadows``: shadow models (≥ 2 for a variance). ``shadow_size``,
    ``shadow_steps``, ``shadow_lr``, ``shadow_batch_size``: the shadow recipe
    (:class:`attacks.components.shadow.ShadowRecipe`). ``target``: "final" or "local" (module doc).
    Raises :class:`~fl_sim.errors.ConfigError` (one line) for no candidates, fewer than two
    shadows, an unknown target, or (at run time) a shadow set larger than the auxiliary data.
    """

    tasks = ("classifier",)
    needs_auxiliary = True

    def __init__(self, *, online: bool = False, num_shadows: int = 8, shadow_size: int = 256,
                 shadow_steps: int = 300, shadow_lr: float = 0.05,
                 shadow_batch_size: int = 32, target: Target = "final",
                 num_members: int = 32, num_nonmembers: int = 200) -> None:
        self.num_members, self.num_nonmembers = candidate_counts(
            type(self).__name__, num_members, num_nonmembers)
        if isinstance(num_shadows, bool) or not isinstance(num_shadows, int) or num_shadows < 2:
            raise ConfigError(f"{type(self).__name__}.num_shadows: got {num_shadows!r}; at "
                              "least 2 (a Gaussian needs a variance)")
        if target not in ("final", "local"):
            raise ConfigError(f"{type(self).__name__}.target: got {target!r}; allowed: "
                              "final, local")
        if shadow_size < 1 or shadow_steps < 1 or shadow_batch_size < 1 or shadow_lr <= 0:
            raise ConfigError(f"{type(self).__name__}: shadow_size, shadow_steps, "
                              "shadow_batch_size and shadow_lr must be positive")
        self.online, self.num_shadows, self.target_model = bool(online), num_shadows, target
        self.recipe = ShadowRecipe(size=shadow_size, steps=shadow_steps,
                                   batch_size=shadow_batch_size, lr=float(shadow_lr))

    def _statistics(self, record: ObservationRecord, candidates: Candidates,
                    auxiliary: Auxiliary | None, final_model: Mapping[str, Tensor] | None
                    ) -> tuple[Tensor, ...]:
        """Target's ``(phi [N], p [N], population p [M])`` and the shadows' ``(phi [K, N],
        p [K, N], in_mask [K, N], population p [K, M])``."""
        assert auxiliary is not None  # InferenceAttack.infer checks
        state = target_state(record, self.target_model, final_model)
        phi_t, p_t = true_class_logits(record.spec, state, candidates.images,
                                       candidates.labels, device=self.device)
        pop_t = true_class_logits(record.spec, state, auxiliary.images, auxiliary.labels,
                                  device=self.device)[1]
        phi, p, in_mask, pop = reference_statistics(
            record, candidates, auxiliary, self.recipe, num_shadows=self.num_shadows,
            online=self.online, seed=0, device=self.device)
        return phi_t, p_t, pop_t, phi, p, in_mask, pop

    def score(self, record: ObservationRecord, candidates: Candidates, *,
              auxiliary: Auxiliary | None, generator: torch.Generator,
              final_model: Mapping[str, Tensor] | None = None
              ) -> tuple[Tensor, Mapping[str, Any]]:
        phi_t, _, _, phi, _, in_mask, _ = self._statistics(record, candidates, auxiliary,
                                                           final_model)
        out_mask = ~in_mask
        mu_out = _masked_mean(phi, out_mask)
        sd_out = _pooled_sd(phi, out_mask, mu_out)
        if not self.online:
            scores = (phi_t - mu_out) / sd_out
        else:
            mu_in = _masked_mean(phi, in_mask)
            sd_in = _pooled_sd(phi, in_mask, mu_in)
            scores = (_gaussian_logpdf(phi_t, mu_in, sd_in)
                      - _gaussian_logpdf(phi_t, mu_out, sd_out))
        return scores, {"online": self.online, "num_shadows": self.num_shadows,
                        "target_model": self.target_model}


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Per-candidate mean of ``x [K, N]`` over the models where ``mask``; a candidate no model
    covers gets the global mean (rare with K ≥ 8 halves)."""
    count = mask.sum(0)
    total = (x * mask).sum(0)
    glob = x[mask].mean() if mask.any() else x.mean()
    return torch.where(count > 0, total / count.clamp_min(1), glob)


def _pooled_sd(x: Tensor, mask: Tensor, mu: Tensor) -> Tensor:
    """One (global) standard deviation of ``x`` around the per-candidate means (module doc)."""
    resid = (x - mu)[mask]
    return resid.std().clamp_min(1e-6) if resid.numel() > 1 else torch.tensor(1.0)
