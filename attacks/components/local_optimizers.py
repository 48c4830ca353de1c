"""The client's local optimiser as a pure, differentiable update step (for unrolling).

Attacks that simulate FedAvg's local training (Inverting Gradients sec. 5, Geiping et al.
2020; GIDM's unrolled FedAvg delta) must take the same steps the client took. A client builds
``torch.optim.SGD`` or ``torch.optim.Adam`` FRESH every round
(:func:`fl_sim.federation.local.make_optimizer`), so the momentum buffer and Adam's moments
start at zero in every round: :func:`init_state` gives exactly that state.

:func:`functional_step` reproduces ``torch.optim.SGD`` (momentum, weight decay; PyTorch's
formulation: the first step's buffer is the gradient itself, no dampening, no Nesterov) and
``torch.optim.Adam`` (Kingma & Ba 2015, Alg. 1, with weight decay added to the gradient as
torch does, bias corrections, no AMSGrad) out of place, so the new parameters stay connected
to the gradients and through them to candidate images (double back-propagation, and
:func:`torch.func.vmap` over restarts). Deviation, for differentiability only: Adam's
``sqrt(v)`` is taken as ``where(v > 0, sqrt(v), 0)`` so that a coordinate whose gradient is
exactly zero (a dead ReLU's weights) contributes a zero derivative instead of ``0 * inf``;
the value is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fl_sim.records import LocalOptimizer

__all__ = ["init_state", "functional_step", "describe"]

State = dict[str, dict[str, Tensor]]


def init_state(optimizer: LocalOptimizer, params: Mapping[str, Tensor]) -> State:
    """The optimiser's state at the start of a round: empty (buffers and moments appear at
    the first step, as in torch, where they start from zero)."""
    del optimizer, params
    return {}


def _safe_sqrt(v: Tensor) -> Tensor:
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(),
                       torch.zeros_like(v))


def functional_step(optimizer: LocalOptimizer, params: Mapping[str, Tensor],
                    grads: Mapping[str, Tensor], state: State, *, lr: float, step: int
                    ) -> tuple[dict[str, Tensor], State]:
    """One optimiser step ``(params, grads, state) -> (new params, new state)``, out of place.

    ``params``/``grads``: per name, same shapes; ``state``: what the previous step returned
    (:func:`init_state` at the start of the round); ``step``: 1 for the round's first step
    (Adam's bias correction). Equal to ``torch.optim.SGD``/``Adam`` with the same settings to
    float rounding (tests/unit/test_local_optimizers.py). Raises ``ValueError`` for ``step <
    1``.

    >>> p, g = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}
    >>> functional_step(LocalOptimizer("sgd"), p, g, {}, lr=0.1, step=1)[0]["w"].tolist()
    [0.949999988079071]
    """
    if step < 1:
        raise ValueError(f"optimiser steps count from 1, got {step}")
    wd = optimizer.weight_decay
    new_p: dict[str, Tensor] = {}
    new_s: State = {}
    for name, p in params.items():
        g = grads[name]
        if wd:
            g = g + wd * p
        if optimizer.name == "sgd":
            if optimizer.momentum:
                prev = state.get(name, {}).get("momentum_buffer")
                buf = g if prev is None else optimizer.momentum * prev + g
                new_s[name] = {"momentum_buffer": buf}
                g = buf
            new_p[name] = p - lr * g
            continue
        b1, b2 = optimizer.betas
        s = state.get(name)
        m = (1 - b1) * g if s is None else b1 * s["exp_avg"] + (1 - b1) * g
        v = (1 - b2) * g * g if s is None else b2 * s["exp_avg_sq"] + (1 - b2) * g * g
        new_s[name] = {"exp_avg": m, "exp_avg_sq": v}
        denom = _safe_sqrt(v) / (1 - b2 ** step) ** 0.5 + optimizer.eps
        new_p[name] = p - (lr / (1 - b1 ** step)) * m / denom
    return new_p, new_s


def describe(optimizer: LocalOptimizer, lr: float) -> dict[str, object]:
    """What an unrolling attack assumed about the local optimiser (for ``assumed``)."""
    return {**optimizer.to_json(), "lr": lr, "state": "fresh each round"}
