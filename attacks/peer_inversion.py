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

from attacks.inverting_gradients import InvertingGradients, Unroll
from fl_sim.errors import ConfigError
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
    """

    view = "peer"

    def num_images(self, record: ObservationRecord) -> int:
        """All images behind the others' aggregate: ``record.num_examples``."""
        return record.num_examples

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
