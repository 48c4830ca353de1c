"""Curious-peer gradient inversion: a client inverts the OTHER clients' aggregate update.

A participating client receives consecutive global models; their difference, minus its own
(weighted) contribution, is the aggregate update of the ``num_clients_aggregated`` other
clients (the framework derives it into ``record.update``). Under FedSGD that aggregate is the
example-weighted mean gradient of their batches, i.e. the gradient of the mean loss over all
``num_examples`` of their images; under FedAvg it is the mean of their local-training deltas.
The peer inverts it with the machinery of Inverting Gradients (Geiping et al., NeurIPS 2020),
unrolling each other client's local SGD for deltas -- the "curious peer" threat of e.g.
Hitaj et al. (CCS 2017) with Geiping et al.'s optimisation attack.
"""

from __future__ import annotations

from attacks.inverting_gradients import (
    AuxSource,
    Distance,
    DoubleBackward,
    InvertingGradients,
    LabelSource,
    ModelMode,
    MultiStep,
    RestartPruning,
    Schedule,
    Unroll,
)
from fl_sim.errors import ConfigError, ThreatModelError
from fl_sim.records import ObservationRecord
from fl_sim.registry import ATTACKS


@ATTACKS.register("peer_inversion")
class PeerInversion(InvertingGradients):
    """Inverting Gradients on a peer view: reconstruct the other clients' ``num_examples`` images.

    Same hyper-parameters as :class:`~attacks.inverting_gradients.InvertingGradients`. For a
    FedAvg delta with ``multi_step="unroll"`` (or ``"auto"`` and ``local_steps > 1``) it ASSUMES
    the others are ``num_clients_aggregated`` clients with equally many examples
    (``num_examples / num_clients_aggregated`` each), equal aggregation weights, and the
    record's ``lr``, ``local_steps`` and ``batch_size`` (the federation's shared config), plain
    SGD with sequential batches. Returns ``images [num_examples, C, H, W]`` ordered client by
    client. Raises :class:`~fl_sim.errors.ConfigError` when the examples do not split evenly.
    ``model_mode`` defaults to ``"train"`` here: a peer record only comes from a federation,
    whose clients take their gradients and steps in train mode
    (:mod:`fl_sim.federation.local`); a FedSGD aggregate is then matched client by client
    (each other client's own batch statistics).
    """

    view = "peer"

    def __init__(self, *, max_iterations: int = 600, restarts: int = 1, lr: float = 0.1,
                 tv_weight: float = 0.2, labels: LabelSource = "auto",
                 bn_prior_weight: float = 0.0, multi_step: MultiStep = "auto",
                 schedule: Schedule = "step", distance: Distance = "cosine",
                 restart_pruning: RestartPruning = "halving", restart_keep: int = 1,
                 double_backward: DoubleBackward = "lean", aux: AuxSource = "none",
                 adaptive: bool = False, model_mode: ModelMode = "train") -> None:
        """Inverting Gradients' parameters (:class:`InvertingGradients`); a peer is granted
        no ground truth, so ``labels = "granted"`` and ``aux = "granted"`` are refused here
        (:class:`~fl_sim.errors.ThreatModelError`), before any record is read."""
        super().__init__(max_iterations=max_iterations, restarts=restarts, lr=lr,
                         tv_weight=tv_weight, labels=labels, bn_prior_weight=bn_prior_weight,
                         multi_step=multi_step, schedule=schedule, distance=distance,
                         restart_pruning=restart_pruning, restart_keep=restart_keep,
                         double_backward=double_backward, aux=aux, adaptive=adaptive,
                         model_mode=model_mode)
        asked = [f"{k} = \"granted\"" for k in ("labels", "aux") if getattr(self, k) == "granted"]
        if asked:
            raise ThreatModelError(f"{type(self).__name__}: {', '.join(asked)}: a peer is "
                                   "granted no ground truth (labels are recovered: 'auto', "
                                   "'batch' or 'idlg')")

    def num_images(self, record: ObservationRecord) -> int:
        """All images behind the others' aggregate: ``record.num_examples``."""
        return record.num_examples

    def gradient_groups(self, record: ObservationRecord, unroll: Unroll | None) -> int:
        """In train mode, a matched FedSGD aggregate is forwarded client by client."""
        clients = max(1, int(record.num_clients_aggregated))
        if unroll is not None or self.model_mode != "train" or clients == 1:
            return 1
        if record.num_examples % clients:
            raise ConfigError(f"peer_inversion.model_mode: {record.num_examples} examples do "
                              f"not split evenly over {clients} clients; use 'eval'")
        return clients

    def unroll_plan(self, record: ObservationRecord) -> Unroll | None:
        """Unroll each other client's local training; their deltas are averaged."""
        plan = super().unroll_plan(record)
        if plan is None:
            return None
        clients = max(1, int(record.num_clients_aggregated))
        if record.num_examples % clients:
            raise ConfigError(f"peer_inversion.multi_step: {record.num_examples} examples do "
                              f"not split evenly over {clients} clients; use 'single'")
        return Unroll(plan.lr, plan.steps, plan.batch_size, clients, plan.optimizer)
