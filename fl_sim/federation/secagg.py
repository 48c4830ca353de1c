"""A training round under Flower's SecAgg+ (``defenses/secagg_plus.py``), both sides.

Flower has SecAgg+ only in its legacy stack (``SecAggPlusWorkflow`` driven by a
``LegacyContext`` and a legacy strategy; ``secaggplus_mod`` on the client, which hands the
inner app the legacy ``fitins.*`` layout and expects ``fitres.*`` back); that bridge, the one
part that touches Flower's internals, is in :mod:`fl_sim.federation.flower_compat`. fl-sim
keeps its own round loop, sampling and Message-API strategies:

* **server** (:func:`secagg_train`): the tap's ``configure_train`` samples the clients and the
  wrapped strategy builds their messages as in a plaintext round; a relay legacy strategy
  hands those to the workflow as ``FitIns`` (array names travel in the config) and collects
  what the workflow unmasks — the weighted mean of the clients' UPDATES, identical for every
  client. The wrapped strategy then aggregates ONE reply carrying that mean (``global + mean``
  for weight replies, the mean gradient for FedSGD), so FedAvg, FedSGD and the server
  optimisers (FedAdam, …) all run; the tap records only the ``aggregate`` (no ``server_in``).
* **client** (:data:`SECAGG_MODS`): ``secagg_mod`` runs Flower's ``secaggplus_mod`` only for
  SecAgg+ messages (a no-op for every other run) with numpy's global RNG seeded per
  ``(seed, round, client)`` (its stochastic rounding uses it) and restored afterwards;
  ``secagg_bridge`` turns ``fitins.*`` into fl-sim's ``arrays``/``config`` for ``train`` and
  its reply into ``fitres.*`` whose parameters are the UPDATE (``reply − global``, or the
  gradient) — the clipping range then bounds the update, not the weights.

``num-examples`` and ``train-loss`` (and the DP clients' ε) travel in plaintext metadata, as in
Flower's legacy FitRes; fl-sim never stores them per client, only the round's totals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fl_sim.capabilities import strategy_capabilities
from fl_sim.config import ExperimentConfig
from fl_sim.defended import build_defenses
from fl_sim.errors import FlSimError
from fl_sim.federation import protocol as P
from fl_sim.federation.dp_epsilon import epsilons_of
from fl_sim.federation.flower_compat import (
    fitins_of,
    mean_reply,
    run_secaggplus,
    secagg_bridge,
    secagg_mod,
)
from fl_sim.federation.partitions import load_partitions, section_json
from fl_sim.seeding import derive_seed

logger = logging.getLogger(__name__)


def secagg_defense(cfg: ExperimentConfig) -> Any | None:
    """The configured ``secagg_plus`` defense, or None."""
    return next((d for d in build_defenses(cfg) if d.name == "secagg_plus"), None)


def max_num_examples(cfg: ExperimentConfig) -> int:
    """The largest ``num-examples`` a client of ``cfg`` can reply (partition sizes)."""
    fed = cfg.federation
    parts = load_partitions(section_json(cfg.data), section_json(cfg.partition),
                            fed.num_clients, cfg.run.seed)
    largest = max(len(p) for p in parts)
    if strategy_capabilities(cfg.strategy.name).sends_gradient:  # one batch's gradient
        return min(largest, fed.batch_size)
    if fed.local_steps is not None:
        return min(largest, fed.local_steps * fed.batch_size)
    return largest


def secagg_train(grid: Grid, tap: Any, cfg: ExperimentConfig, run_dir: Path, r: int,
                 arrays: ArrayRecord, extra: Mapping[str, Any]
                 ) -> tuple[ArrayRecord | None, dict[int, tuple[float, float]]]:
    """One training round under SecAgg+ (see module doc): the new global (None if the
    protocol did not complete) and the DP clients' ``client -> (round ε, cumulative ε)``."""
    defense = secagg_defense(cfg)
    messages = list(tap.configure_train(r, arrays, P.config_record(cfg, run_dir, **extra),
                                        grid))
    largest = max_num_examples(cfg)
    if defense.max_weight and defense.max_weight < largest:
        raise FlSimError(f"secagg_plus.max_weight {defense.max_weight:g} is below the "
                         f"{largest} examples a client of this run can send")
    max_weight = defense.max_weight or float(largest)
    shared = fitins_of(messages[0], 0).parameters if messages else None  # the same global
    fitins = {int(m.metadata.dst_node_id): fitins_of(m, derive_seed(
        cfg.run.seed, "round", r, "client", tap.node_to_client[int(m.metadata.dst_node_id)],
        "secagg"), shared) for m in messages}
    results = run_secaggplus(grid, defense, max_weight, r, arrays, fitins) if fitins else []
    done = sorted(tap.node_to_client[n] for n, _ in results)
    tap.log.failed = sorted(set(tap.log.sampled) - set(done))
    for cid in tap.log.failed:
        tap.log.errors[cid] = "did not complete the SecAgg+ protocol"
    eps = {}
    for n, res in results:
        if (e := epsilons_of(dict(res.metrics))) is not None:
            eps[tap.node_to_client[n]] = e
    if not results:
        tap.aggregate_mean(r, None, [])
        return None, eps
    reply = mean_reply(results, tap.global_tensors(), list(fitins.values())[0])
    return tap.aggregate_mean(r, reply, done), eps


#: appended to ``fl_sim.federation.client_mods.TRAIN_MODS`` (outermost first)
SECAGG_MODS = [secagg_mod, secagg_bridge]
