"""Passive property inference from observed updates (Melis, Song, De Cristofaro, Shmatikov,
"Exploiting Unintended Feature Leakage in Collaborative Learning", IEEE S&P 2019).

The curious party (a peer: the others' update derived from consecutive globals; or the
server: one client's update) decides, round by round, whether the batch behind the observed
update has a property — here "the batch contains class ``k``" (``property_class``). At the
round's global model ``θ_r`` it computes updates of batches of its auxiliary data (same
distribution, never the clients' data), ``num_batches`` with the property and ``num_batches``
without, each of ``batch_size`` examples (default: the record's own batch size, or for a
peer the others' number of examples), trains a binary classifier on them (logistic
regression over the flattened, L2-normalised gradients) and applies it to the
observed update read as a mean gradient (:func:`attacks.components.gradients.mean_gradient_target`).
The score is the classifier's probability that the property holds.

Deviation from the paper: Melis et al. train the classifier on the aggregated updates of
several rounds collected by an active participant and use a random forest / logistic
regression on features of the gradient; here a fresh logistic regression is fit per round at
that round's global model (passive, stateless — every round is scored independently), on
"with / without" batches of the auxiliary data only. Shapes: one score per record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attacks.components.gradients import attack_task, mean_gradient_target, split_state
from attacks.components.inference import Auxiliary, Candidates, InferenceAttack
from fl_sim.errors import ConfigError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS
from fl_sim.tasks.base import Batch
from fl_sim.view_types import TAP_VIEWS, check_declarable


def batch_gradients(task: Any, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                    images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Mean-loss gradients of ``S`` batches at once: ``images [S, B, C, H, W]``, ``labels
    [S, B]`` -> per parameter ``[S, *shape]`` (:func:`torch.func.vmap` of
    :func:`torch.func.grad`)."""
    def loss(p: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return task.loss(p, buffers, Batch(x, y), {})

    out = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(dict(params), images,
                                                                         labels)
    return {k: v.detach() for k, v in out.items()}


def _flat(grads: Mapping[str, Tensor], names: list[str]) -> np.ndarray:
    v = torch.cat([grads[k].flatten() for k in names]).double()
    return (v / v.norm().clamp_min(1e-30)).numpy()


@ATTACKS.register("property_inference")
class PropertyInference(InferenceAttack):
    """Melis et al. 2019 passive property inference, "batch contains class k" (module doc).

    ``property_class``: k (checked against the data set's classes at run time).
    ``view``: "peer" or "server". ``num_batches``: auxiliary batches per side.
    ``batch_size``: 0 = the observed update's number of examples. Raises
    :class:`~fl_sim.errors.ConfigError` (one line) for a negative class, an unknown view or
    non-positive counts.
    """

    view = "peer"  # declared: the curious peer of the paper (``view`` may say "server")
    inference = "property"
    needs_auxiliary = True
    tasks = ("classifier",)

    def __init__(self, *, property_class: int = 0, view: str = "peer", num_batches: int = 32,
                 batch_size: int = 0) -> None:
        if isinstance(property_class, bool) or not isinstance(property_class, int) \
                or property_class < 0:
            raise ConfigError(f"property_inference.property_class: got {property_class!r}; "
                              "a class index >= 0")
        check_declarable("property_inference.view", view)
        if num_batches < 2 or batch_size < 0:
            raise ConfigError("property_inference: num_batches >= 2 and batch_size >= 0 needed")
        self.view = view  # type: ignore[misc]
        self.property_class, self.num_batches, self.batch_size = (property_class, num_batches,
                                                                 batch_size)

    def batch_examples(self, record: ObservationRecord) -> int:
        """Examples behind the observed update: ``batch_size``, else the peer's others' count
        (published total minus its own) or the client's batch."""
        if self.batch_size:
            return self.batch_size
        if not TAP_VIEWS[record.tap].server_side:  # a peer's derived update
            total = int(record.knowledge.get("aggregated_num_examples", 0))
            return max(total - int(record.num_examples), 1)
        return max(int(record.batch_size or record.num_examples), 1)

    def score(self, record: ObservationRecord, candidates: Candidates | None, *,
              auxiliary: Auxiliary | None, generator: torch.Generator,
              final_model: Mapping[str, Tensor] | None = None
              ) -> tuple[Tensor, Mapping[str, Any]]:
        assert auxiliary is not None  # InferenceAttack.infer checks
        k = self.property_class
        has = auxiliary.labels == k
        if k >= record.spec.num_classes or int(has.sum()) == 0:
            raise ConfigError(f"property_inference.property_class = {k}: no such class in the "
                              f"data set ({record.spec.num_classes} classes)")
        task = attack_task(record, "eval", device=self.device)
        params, buffers = split_state(task, record.global_params, device=self.device)
        names = list(params)
        b = self.batch_examples(record)
        with_k, without_k = torch.nonzero(has).flatten(), torch.nonzero(~has).flatten()
        picks, ys = [], []
        for i in range(2 * self.num_batches):
            prop = i % 2 == 0
            pick = without_k[torch.randint(0, len(without_k), (b,), generator=generator)]
            if prop:  # at least one example of class k, the rest drawn as it comes
                n_k = 1 + int(torch.randint(0, max(b // 2, 1), (1,), generator=generator))
                pick[:n_k] = with_k[torch.randint(0, len(with_k), (n_k,), generator=generator)]
            picks.append(pick)
            ys.append(int(prop))
        idx = torch.stack(picks)  # [2 * num_batches, b]: every batch's gradient in one vmap
        grads = batch_gradients(task, params, buffers,
                                auxiliary.images[idx].to(self.device).float(),
                                auxiliary.labels[idx].to(self.device))
        feats = [_flat({k: v[i] for k, v in grads.items()}, names) for i in range(len(ys))]
        x, y = torch.as_tensor(np.stack(feats)), torch.tensor(ys, dtype=torch.float64)
        w, bias = fit_logistic(x, y)
        observed = torch.as_tensor(_flat(mean_gradient_target(record, task), names))
        p = float(torch.sigmoid(observed @ w + bias))
        train_acc = float(((x @ w + bias > 0).double() == y).double().mean())
        return torch.tensor([p], dtype=torch.float64), {
            "property": f"batch contains class {k}", "batch_examples": b,
            "train_accuracy": train_acc}


def fit_logistic(x: Tensor, y: Tensor, *, l2: float = 1e-3, steps: int = 100
                 ) -> tuple[Tensor, Tensor]:
    """L2-regularised logistic regression ``(w [D], b)`` on ``x [n, D]``, ``y [n]`` in {0, 1}
    by L-BFGS (:class:`torch.optim.LBFGS`; scikit-learn's ``LogisticRegression`` fits the
    same objective, but its import alone costs seconds per process on the CI machine)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) \
            + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()
