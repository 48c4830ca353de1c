"""Passive white-box membership inference from one observed update (Nasr, Shokri, Houmansadr,
"Comprehensive Privacy Analysis of Deep Learning: Passive and Active White-box Inference
Attacks against Centralized and Federated Learning", IEEE S&P 2019).

The curious party holds the round's global model and an observed update: the server a client's
own update (``server`` view), a peer the others' update derived from consecutive globals
(``peer`` view, :func:`fl_sim.views.others_mean_delta`). For each candidate ``(x, y)`` it
computes the candidate's gradient ``g(x) = ∇_θ ℓ(θ_r; x, y)`` at the global ``θ_r`` and scores:

* ``"cosine"`` (gradient alignment): ``cos(g(x), G)`` with ``G`` the observed update read as a
  mean batch gradient (:func:`attacks.components.gradients.mean_gradient_target`: FedSGD's gradient
  as is, a FedAvg delta times ``-1 / (lr · steps)``). A member's gradient is a summand of ``G``.
* ``"grad_norm"``: ``-‖g(x)‖`` (a trained-on example has a smaller loss gradient).
* ``"both"``: the cosine minus the norm's z-score (``z = (‖g‖ − mean) / std`` over the
  candidates), an unsupervised combination of the two.

Deviation from the paper: Nasr et al. feed gradients, activations, loss and label of each
candidate into a learned attack model trained on KNOWN members of the target (their passive
attacker knows part of the training set). These scores are the unsupervised core of that
model's gradient features; they need no known members and no training, which is the threat
model fl-sim grants (candidates without membership). Shapes: candidates ``[N, C, H, W]``,
scores ``[N]`` float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from attacks.components.gradients import attack_task, mean_gradient_target, split_state
from attacks.components.inference import Auxiliary, Candidates, InferenceAttack, candidate_counts
from fl_sim.errors import ConfigError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS
from fl_sim.tasks.base import Batch
from fl_sim.view_types import check_declarable

Score = Literal["cosine", "grad_norm", "both"]


def per_example_gradients(task: Any, params: Mapping[str, Tensor],
                          buffers: Mapping[str, Tensor], images: Tensor, labels: Tensor,
                          *, chunk: int = 64) -> Tensor:
    """Flattened loss gradients of each example at ``(params, buffers)``: ``[N, P]``
    (:func:`torch.func.vmap` over :func:`torch.func.grad`, ``chunk`` examples at a time)."""
    def loss_one(p: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return task.loss(p, buffers, Batch(x[None], y[None]), {})

    grad_fn = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))
    out = []
    for i in range(0, images.shape[0], chunk):
        g = grad_fn(dict(params), images[i:i + chunk], labels[i:i + chunk])
        out.append(torch.cat([g[k].flatten(1) for k in params], dim=1).detach())
    return torch.cat(out)


@ATTACKS.register("mia_gradient")
class MiaGradient(InferenceAttack):
    """Gradient-alignment / gradient-norm membership scores of candidates against one update
    (Nasr et al. 2019, passive white-box; see the module doc for the deviation).

    ``view``: "server" (a client's update) or "peer" (the others' derived update).
    ``score``: "cosine", "grad_norm" or "both". ``num_members`` / ``num_nonmembers``: the
    candidates the runner draws (members are capped by the target's data). Raises
    :class:`~fl_sim.errors.ConfigError` for an unknown score or view, or no candidates; a
    delta under Adam cannot be read as a gradient
    (:func:`~attacks.components.gradients.delta_scale`).
    """

    tasks = ("classifier",)

    def __init__(self, *, view: str = "server", score: Score = "cosine",
                 num_members: int = 16, num_nonmembers: int = 16) -> None:
        self.num_members, self.num_nonmembers = candidate_counts(
            "mia_gradient", num_members, num_nonmembers)
        check_declarable("mia_gradient.view", view)
        if score not in ("cosine", "grad_norm", "both"):
            raise ConfigError(f"mia_gradient.score: got {score!r}; allowed: cosine, "
                              "grad_norm, both")
        self.view = view  # type: ignore[misc]
        self.score_kind = score

    def score(self, record: ObservationRecord, candidates: Candidates, *,
              auxiliary: Auxiliary | None, generator: torch.Generator,
              final_model: Mapping[str, Tensor] | None = None
              ) -> tuple[Tensor, Mapping[str, Any]]:
        task = attack_task(record, "eval", device=self.device)
        params, buffers = split_state(task, record.global_params, device=self.device)
        target = mean_gradient_target(record, task)
        g_obs = torch.cat([target[k].flatten() for k in params]).to(self.device).double()
        grads = per_example_gradients(task, params, buffers,
                                      candidates.images.to(self.device).float(),
                                      candidates.labels.to(self.device)).double()
        norms = grads.norm(dim=1)
        cosine = grads @ g_obs / (norms * g_obs.norm()).clamp_min(1e-30)
        if self.score_kind == "cosine":
            scores = cosine
        elif self.score_kind == "grad_norm":
            scores = -norms
        else:
            scores = cosine - (norms - norms.mean()) / norms.std().clamp_min(1e-30)
        return scores.cpu(), {"score": self.score_kind,
                              "update_norm": float(g_obs.norm())}
