"""A training round under Flower's SecAgg+ (``defenses/secagg_plus.py``), both sides.

Flower has SecAgg+ only in its legacy stack (``SecAggPlusWorkflow`` driven by a
``LegacyContext`` and a legacy strategy; ``secaggplus_mod`` on the client, which hands the
inner app the legacy ``fitins.*`` layout and expects ``fitres.*`` back). fl-sim keeps its own
round loop, sampling and Message-API strategies:

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

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from fl_sim.config import ExperimentConfig
from fl_sim.defended import build_defenses
from fl_sim.errors import FlSimError
from fl_sim.federation import protocol as P
from fl_sim.federation.dp_epsilon import epsilons_of
from fl_sim.seeding import derive_seed

logger = logging.getLogger(__name__)

#: fitins config key: the state_dict names of the arrays, in the order they travel
KEYS_KEY = "fl-sim-array-keys"
#: fitres metrics key: the names of the arrays the client masked, "\n"-joined (a FedSGD
#: gradient has no buffers; legacy metrics cannot hold lists)
REPLY_KEYS = "fl-sim-reply-keys"
#: fitins config key: the seed of numpy's RNG while the client quantises (per round, client)
SEED_KEY = "fl-sim-secagg-seed"
FITINS_PARAMS, FITINS_CONFIG = "fitins.parameters", "fitins.config"


def secagg_defense(cfg: ExperimentConfig) -> Any | None:
    """The configured ``secagg_plus`` defense, or None."""
    return next((d for d in build_defenses(cfg) if d.name == "secagg_plus"), None)


def max_num_examples(cfg: ExperimentConfig) -> int:
    """The largest ``num-examples`` a client of ``cfg`` can reply (partition sizes)."""
    from fl_sim.federation.client_app import _section_json, load_partitions
    fed = cfg.federation
    parts = load_partitions(_section_json(cfg.data), _section_json(cfg.partition),
                            fed.num_clients, cfg.run.seed)
    largest = max(len(p) for p in parts)
    if cfg.strategy.name == "fedsgd":
        return min(largest, fed.batch_size)
    if fed.local_steps is not None:
        return min(largest, fed.local_steps * fed.batch_size)
    return largest


class _Proxy:
    """What the workflow needs of a legacy ClientProxy: its node id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _Relay:
    """Legacy strategy: hands the workflow prepared FitIns, keeps what it unmasks."""

    def __init__(self, fitins: Mapping[int, FitIns]) -> None:
        self.fitins = dict(fitins)
        self.results: list[tuple[Any, FitRes]] = []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any
                      ) -> list[tuple[_Proxy, FitIns]]:
        return [(_Proxy(n), ins) for n, ins in self.fitins.items()]

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]],
                      failures: list[Any]) -> tuple[Any, dict[str, Any]]:
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}


def _fitins(msg: Message, seed: int, params: Any = None) -> FitIns:
    """The legacy FitIns of a train message (``params``: its arrays already serialised)."""
    arrays = next(iter(msg.content.array_records.values()))
    config = dict(next(iter(msg.content.config_records.values())))
    keys = list(arrays.keys())
    config[KEYS_KEY] = keys
    config[SEED_KEY] = seed
    if params is None:
        params = ndarrays_to_parameters([arrays[k].numpy() for k in keys])
    return FitIns(params, config)


def _workflow(defense: Any, max_weight: float) -> SecAggPlusWorkflow:
    return SecAggPlusWorkflow(defense.num_shares, defense.reconstruction_threshold,
                              max_weight=max_weight, clipping_range=defense.clipping_range,
                              quantization_range=defense.quantization_range,
                              modulus_range=defense.modulus_range,
                              timeout=defense.timeout or None)


def run_protocol(grid: Grid, defense: Any, max_weight: float, server_round: int,
                 arrays: ArrayRecord, fitins: Mapping[int, FitIns]
                 ) -> list[tuple[int, FitRes]]:
    """Run the four SecAgg+ stages; ``(node id, FitRes)`` of each client that completed,
    every FitRes carrying the unmasked weighted mean as its parameters."""
    relay = _Relay(fitins)
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round})
    state.array_records[MAIN_PARAMS_RECORD] = arrays
    ctx = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state,
                                run_config={}), strategy=relay,  # type: ignore[arg-type]
                        client_manager=SimpleClientManager())
    _workflow(defense, max_weight)(grid, ctx)
    return [(int(p.node_id), res) for p, res in relay.results]


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
    shared = _fitins(messages[0], 0).parameters if messages else None  # the same global
    fitins = {int(m.metadata.dst_node_id): _fitins(m, derive_seed(
        cfg.run.seed, "round", r, "client", tap.node_to_client[int(m.metadata.dst_node_id)],
        "secagg"), shared) for m in messages}
    results = run_protocol(grid, defense, max_weight, r, arrays, fitins) if fitins else []
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
    reply = _mean_reply(results, tap.global_tensors(), list(fitins.values())[0])
    return tap.aggregate_mean(r, reply, done), eps


def _mean_reply(results: list[tuple[int, FitRes]], global_state: Mapping[str, torch.Tensor],
                fitins: FitIns) -> Message:
    """One Message-API reply carrying the unmasked mean: ``global + mean`` (weights) or the
    mean gradient, with the round's total ``num-examples`` and weighted ``train-loss``."""
    keys = str(results[0][1].metrics[REPLY_KEYS]).split("\n")
    if any(res.metrics.get(REPLY_KEYS) != results[0][1].metrics[REPLY_KEYS]
           for _, res in results):
        raise FlSimError("SecAgg+ clients masked different arrays (mixed update kinds?)")
    mean = parameters_to_ndarrays(results[0][1].parameters)
    total = sum(int(res.num_examples) for _, res in results)
    loss = sum(float(res.metrics.get("train-loss", 0.0)) * res.num_examples  # type: ignore
               for _, res in results) / max(total, 1)
    gradient = fitins.config.get(P.UPDATE_KIND_KEY) == P.GRADIENT
    out = {}
    for k, m in zip(keys, mean, strict=True):
        ref = global_state[k].numpy()
        m = np.asarray(m).reshape(ref.shape)  # 0-dim arrays travelled as shape (1,)
        x = m if gradient else ref.astype(np.float64) + m
        x = np.rint(x) if np.issubdtype(ref.dtype, np.integer) else x
        out[k] = Array(np.asarray(x.astype(ref.dtype), order="C"))
    content = RecordDict({
        P.ARRAYS: ArrayRecord(out),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: total, "train-loss": loss}),
        P.META: ConfigRecord({P.UPDATE_KIND_KEY: P.GRADIENT if gradient else "delta"})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


# -- client side ----------------------------------------------------------------------------
def _is_secagg(msg: Message) -> bool:
    return (msg.metadata.message_type == MessageType.TRAIN and not msg.has_error()
            and RECORD_KEY_CONFIGS in msg.content.config_records)


def secagg_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages (numpy's RNG seeded per round and
    client while it quantises, then restored); a no-op for every other message."""
    if not _is_secagg(msg):
        return call_next(msg, ctxt)
    stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
    if stage != Stage.COLLECT_MASKED_VECTORS:
        return secaggplus_mod(msg, ctxt, call_next)
    seed = int(msg.content.config_records[FITINS_CONFIG][SEED_KEY])  # type: ignore[arg-type]
    failed: list[Message] = []

    def train_or_drop(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if reply.has_error():  # the client drops out; the protocol recovers its masks
            failed.append(reply)
            raise _DroppedOut
        return reply

    saved = np.random.get_state()
    np.random.seed(seed % 2 ** 32)
    try:
        return secaggplus_mod(msg, ctxt, train_or_drop)
    except _DroppedOut:
        return failed[0]  # its error reply, as from any failing client (no traceback)
    finally:
        np.random.set_state(saved)


class _DroppedOut(Exception):
    """(internal) ``train`` answered with an error reply inside ``secaggplus_mod``."""


def secagg_bridge(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Legacy ``fitins.*`` -> fl-sim's ``arrays``/``config`` for ``train``; its reply ->
    ``fitres.*`` with the UPDATE as parameters. A no-op for other messages."""
    if msg.metadata.message_type != MessageType.TRAIN or msg.has_error() or \
            FITINS_PARAMS not in msg.content.array_records:
        return call_next(msg, ctxt)
    config = dict(msg.content.config_records[FITINS_CONFIG])  # lists are not legacy Scalars
    keys = [str(k) for k in config.pop(KEYS_KEY)]  # type: ignore[union-attr]
    config.pop(SEED_KEY, None)
    params = compat.arrayrecord_to_parameters(msg.content.array_records[FITINS_PARAMS],
                                              keep_input=True)
    global_nd = dict(zip(keys, parameters_to_ndarrays(params), strict=True))
    msg.content = RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in global_nd.items()}),
                              "config": ConfigRecord(config)})  # type: ignore[arg-type]
    reply = call_next(msg, ctxt)
    if reply.has_error():  # secagg_mod turns it into this client's drop-out
        return reply
    return Message(_fitres_content(reply, global_nd), reply_to=msg)


def _fitres_content(reply: Message, global_nd: Mapping[str, np.ndarray]) -> RecordDict:
    """``fitres.*`` of ``reply``: its update (gradient, or ``reply − global``) as float64
    arrays, num-examples, and plaintext metadata (train-loss, DP ε, the array names)."""
    arrays = reply.content.array_records[P.ARRAYS]
    keys = list(arrays.keys())
    meta = dict(reply.content.config_records.get(P.META, ConfigRecord({})))
    metrics = reply.content.metric_records[P.METRICS]
    gradient = meta.get(P.UPDATE_KIND_KEY) == P.GRADIENT
    # 0-dim arrays travel as shape (1,): Flower's unmasking offsets/rescales its arrays in
    # place, which a 0-dim array (a numpy scalar after arithmetic) silently ignores
    update = [np.atleast_1d(arrays[k].numpy().astype(np.float64)
                            - (0 if gradient else global_nd[k])) for k in keys]
    plain = {k: v for k, v in meta.items() if k.startswith("epsilon") or k.startswith("dp-")}
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update),
                 int(metrics[P.NUM_EXAMPLES]),  # type: ignore[arg-type]
                 {"train-loss": float(metrics.get("train-loss", 0.0)),  # type: ignore[dict-item]
                  REPLY_KEYS: "\n".join(keys), **plain})
    return compat.fitres_to_recorddict(res, keep_input=True)


#: appended to ``fl_sim.federation.client_mods.TRAIN_MODS`` (outermost first)
SECAGG_MODS = [secagg_mod, secagg_bridge]
