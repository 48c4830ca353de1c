"""FedSGD (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", the FedSGD baseline): each sampled client computes ONE gradient on ONE
local batch; the server takes one SGD step on their weighted mean.

The step is a free function over ``name -> ndarray`` dicts (:func:`fedsgd_step`);
:class:`FedSGD` is a thin Flower ``FedAvg`` subclass that tells clients to return a gradient
(``config["update-kind"] = "gradient"``), lets FedAvg's own weighted averaging compute the mean
gradient, and applies :func:`fedsgd_step` in ``aggregate_train``. Clients reply with the
gradients of the model's PARAMETERS only (``named_parameters`` keys); buffers (e.g. BatchNorm
running statistics) are not updated by FedSGD and keep their global values.

**FedSGD under central DP** (``[[defenses]] name = "central_dp"``). Flower's DP wrappers and
clipping mods compute ``reply − global``, meaningless for a gradient reply. So when a
server-stage defense wraps this strategy (:mod:`fl_sim.federation.server_defenses` sets
:attr:`FedSGD.reply_steps`), clients are asked for the ONE-STEP WEIGHTS
``global − η·∇_i`` instead (``config["update-kind"] = "sgd-step"``, ``config["server-lr"] =
η``; parameters stepped, buffers as received, every key of the global in its order) and the
strategy aggregates them with FedAvg's weighted mean: ``Σ w_i (global − η ∇_i) / Σ w_i =
global − η · mean ∇`` — the same FedSGD step (up to float rounding), now a mean of deltas that
clipping (``||η ∇_i|| ≤ C``: C is in units of the step, not of the gradient) and noise apply to
as Flower intends. The server tap records the reply as a ``"delta"`` with ``lr = η`` and
``local_steps = 1``, so an attacker recovers the gradient exactly as ``−delta / η`` (the
attacks do so for a one-step delta); the curious peer still records its own gradient and
derives the others' mean gradient as ``(global_r − global_{r+1}) / η`` — now carrying the
noise. Without a server-stage defense nothing changes: clients reply gradients.
"""

from collections.abc import Iterable, Mapping
from typing import Annotated

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from fl_sim.capabilities import strategy_capabilities_of
from fl_sim.federation.flower_compat import flower_log
from fl_sim.federation.protocol import GRADIENT, SERVER_LR_KEY, SGD_STEP, UPDATE_KIND_KEY
from fl_sim.registry import STRATEGIES
from strategies.builtin import SAMPLE_ALL

#: ConfigRecord key/value FedSGD sets so that clients return a gradient instead of weights.

NDArrays = Mapping[str, np.ndarray]


def fedsgd_step(global_arrays: NDArrays, mean_gradient: NDArrays,
                server_lr: float) -> dict[str, np.ndarray]:
    """``new = global − server_lr · mean_gradient`` for keys in ``mean_gradient``; other keys
    (buffers) are copied unchanged. Dtypes follow ``global_arrays``.

    >>> new = fedsgd_step({"w": np.array([1.0]), "b": np.array([5])},
    ...                   {"w": np.array([2.0])}, 0.5)
    >>> float(new["w"][0]), int(new["b"][0])
    (0.0, 5)

    Raises ``KeyError`` if a gradient has no global array, ``ValueError`` on a shape mismatch.
    """
    out: dict[str, np.ndarray] = {}
    for k, g in global_arrays.items():
        if k in mean_gradient:
            grad = mean_gradient[k]
            if grad.shape != g.shape:
                raise ValueError(f"gradient {k!r} shape {grad.shape} != global {g.shape}")
            out[k] = np.asarray(g - server_lr * grad, dtype=g.dtype)
        else:
            out[k] = g.copy()
    missing = set(mean_gradient) - set(global_arrays)
    if missing:
        raise KeyError(f"gradients without a global array: {sorted(missing)}")
    return out


def step_reply(global_state: Mapping[str, torch.Tensor], gradient: Mapping[str, torch.Tensor],
               server_lr: float) -> dict[str, torch.Tensor]:
    """The ``"sgd-step"`` reply (see module doc): ``global − server_lr · gradient`` for the
    keys of ``gradient``, the global value for the rest (buffers), in ``global_state``'s order.

    >>> step_reply({"w": torch.tensor([1.0]), "n": torch.tensor([3])},
    ...            {"w": torch.tensor([2.0])}, 0.5)
    {'w': tensor([0.]), 'n': tensor([3])}
    """
    return {k: (v - server_lr * gradient[k].to(v.dtype)) if k in gradient else v.clone()
            for k, v in global_state.items()}


class FedSGD(FedAvg):
    """FedSGD: one local gradient per client, one server SGD step on their weighted mean.

    Weights are the replies' ``num-examples`` (the batch size the gradient was computed on).
    ``server_lr`` is the server learning rate η in ``new = global − η · mean_gradient``; it may
    be left ``None`` at construction and set before the first round (the server app sets it to
    ``federation.lr``). Raises ``AggregationError`` if it is still unset when aggregating.
    """

    def __init__(self, *, server_lr: float | None = None, **fedavg_kwargs: object) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        if server_lr is not None and not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.server_lr = None if server_lr is None else float(server_lr)
        self.current_arrays: dict[str, np.ndarray] | None = None
        #: set by a server-stage defense (central DP): clients reply one-step weights
        self.reply_steps = False

    def summary(self) -> None:
        """Log the FedSGD settings, then FedAvg's."""
        flower_log(20, "\t├──> FedSGD settings: server_lr (%s)", self.server_lr)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Snapshot the global arrays, ask clients for a gradient, then sample as FedAvg."""
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        if self.reply_steps:
            if self.server_lr is None:
                raise AggregationError("FedSGD: server_lr was never set")
            config[UPDATE_KIND_KEY] = SGD_STEP
            config[SERVER_LR_KEY] = float(self.server_lr)
        else:
            config[UPDATE_KIND_KEY] = GRADIENT
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted-mean the replied gradients (Flower's own averaging) and take one step;
        one-step weights (``reply_steps``) are averaged as they are (see module doc)."""
        mean_grad, metrics = super().aggregate_train(server_round, replies)
        if self.reply_steps:
            if mean_grad is not None:
                self.current_arrays = {k: a.numpy() for k, a in mean_grad.items()}
            return mean_grad, metrics
        if mean_grad is None:
            return None, metrics
        if self.current_arrays is None:
            raise AggregationError("FedSGD: configure_train was not called before "
                                   "aggregate_train")
        if self.server_lr is None:
            raise AggregationError("FedSGD: server_lr was never set")
        new = fedsgd_step(self.current_arrays, {k: a.numpy() for k, a in mean_grad.items()},
                          self.server_lr)
        self.current_arrays = new
        return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in new.items()}), metrics


__all__ = ["FedSGD", "fedsgd", "fedsgd_step", "step_reply"]


@STRATEGIES.register("fedsgd")
@strategy_capabilities_of(weighted_mean_of_updates=True, global_is_mean_step=True,
                          client_update="gradient")
def fedsgd(*, server_lr: Annotated[float, Field(gt=0.0)] | None = None) -> FedSGD:
    """FedSGD (McMahan et al., 2017): server SGD step on the mean one-batch client gradient.

    ``server_lr`` defaults to ``federation.lr`` (resolved by the server app). Declares
    ``client_update = "gradient"``: a client sends ONE batch's gradient (its record holds
    ``batch_size`` images), not the result of local training (:mod:`fl_sim.capabilities`).
    """
    return FedSGD(server_lr=server_lr, **SAMPLE_ALL)

