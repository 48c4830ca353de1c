"""RMIA (Zarifzadeh, Liu, Chang, Shokri, "Low-Cost High-Power Membership Inference Attacks",
ICML 2024): a likelihood ratio of the candidate against population samples, powerful with
few reference models.

For a candidate ``x`` and population samples ``z`` (the attacker's auxiliary data, never
candidates), with ``p(·|θ)`` the target model's probability of the true label:

    LR_θ(x, z) = (p(x|θ) / p(x)) / (p(z|θ) / p(z)),    score(x) = Pr_z[LR_θ(x, z) ≥ γ]

``p(x)`` is the mean of ``p(x|θ_ref)`` over the reference models. Online (references trained
with the candidates IN about half of them), the mean over all references. Offline
(references that never saw a candidate), the paper's linear approximation from the OUT
models, ``p(x) = ½((1 + a)·p_OUT(x) + (1 − a))`` with the dataset constant ``a``. ``p(z)``:
the mean over all reference models. Reference models come from :mod:`attacks.components.shadow`
(cached by content hash; shared with LiRA, so a grid that runs both trains them once).

Deviations: no query augmentations; ``a`` is a parameter (the paper tunes it on reference
models per dataset; default 0.3), ``γ`` defaults to 1 (the paper's default for the ROC sweep
over thresholds of the score). Shapes: candidates ``[N, C, H, W]``, scores ``[N]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from attacks.components.inference import Auxiliary, Candidates
from attacks.mia_lira import MiaLira, Target
from fl_sim.errors import ConfigError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS


@ATTACKS.register("mia_rmia")
class MiaRmia(MiaLira):
    """RMIA (Zarifzadeh et al. 2024), online or offline; parameters as :class:`MiaLira`'s,
    plus ``gamma`` (the LR threshold, > 0), ``offline_a`` (offline ``p(x)``'s constant, in
    [0, 1]) and ``population`` (population samples z drawn from the auxiliary data). Raises
    :class:`~fl_sim.errors.ConfigError` (one line) for a bad value."""

    def __init__(self, *, online: bool = False, num_shadows: int = 4, shadow_size: int = 256,
                 shadow_steps: int = 300, shadow_lr: float = 0.05,
                 shadow_batch_size: int = 32, target: Target = "final",
                 num_members: int = 32, num_nonmembers: int = 200, gamma: float = 1.0,
                 offline_a: float = 0.3, population: int = 500) -> None:
        super().__init__(online=online, num_shadows=num_shadows, shadow_size=shadow_size,
                         shadow_steps=shadow_steps, shadow_lr=shadow_lr,
                         shadow_batch_size=shadow_batch_size, target=target,
                         num_members=num_members, num_nonmembers=num_nonmembers)
        if not gamma > 0 or not 0 <= offline_a <= 1 or population < 1:
            raise ConfigError(f"mia_rmia: gamma > 0, offline_a in [0, 1] and population >= 1 "
                              f"needed (got {gamma}, {offline_a}, {population})")
        self.gamma, self.offline_a, self.population = float(gamma), float(offline_a), population

    def score(self, record: ObservationRecord, candidates: Candidates, *,
              auxiliary: Auxiliary | None, generator: torch.Generator,
              final_model: Mapping[str, Tensor] | None = None
              ) -> tuple[Tensor, Mapping[str, Any]]:
        _, p_t, pop_t, _, p, in_mask, pop = self._statistics(record, candidates, auxiliary,
                                                             final_model)
        if self.online:
            p_x = p.mean(0)
        else:
            p_out = p.mean(0)  # every reference model is OUT for every candidate
            p_x = 0.5 * ((1 + self.offline_a) * p_out + (1 - self.offline_a))
        z = torch.randperm(pop.shape[1], generator=generator)[:self.population]
        ratio_x = p_t / p_x.clamp_min(1e-30)                        # [N]
        ratio_z = pop_t[z] / pop[:, z].mean(0).clamp_min(1e-30)     # [Z]
        scores = (ratio_x[:, None] / ratio_z[None, :] >= self.gamma).double().mean(1)
        return scores, {"online": self.online, "num_shadows": self.num_shadows,
                        "target_model": self.target_model, "gamma": self.gamma,
                        "population": int(z.numel())}
