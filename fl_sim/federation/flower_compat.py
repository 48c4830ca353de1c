"""Everything fl-sim takes from Flower beyond its public Message API, in one module.

**The rule** (checked by ``tests/test_boundaries.py``): Flower's public API is the Message
API that its documentation teaches — the packages ``flwr.app``, ``flwr.clientapp`` and
``flwr.serverapp`` (with their sub-packages: ``flwr.clientapp.mod``,
``flwr.serverapp.strategy``, ``flwr.serverapp.exception``). Any other ``flwr.*`` module
(``flwr.common``, ``flwr.client``, ``flwr.server``, ``flwr.compat``, ``flwr.supercore``,
``flwr.simulation``, ...) is an internal and is imported HERE ONLY, so that a Flower upgrade
(``flwr<1.43`` is pinned in pyproject.toml) is checked against this one file. What is here:

* **patches** of Flower's code, each idempotent and each falling back to Flower's behaviour
  when the patched layout changed: :func:`install_dispatch_patch` (the simulation runtime
  asks only nodes with a pending message, ``benchmarks/scale.py``) and
  :func:`install_zero_norm_fix` (Flower's DP clipping divided by a zero update norm);
* **the legacy SecAgg+ bridge**: SecAgg+ exists only in Flower's legacy stack
  (``SecAggPlusWorkflow`` + ``LegacyContext`` + a legacy strategy on the server,
  ``secaggplus_mod`` on the client, the ``fitins.*`` / ``fitres.*`` layout in between):
  :func:`run_secaggplus` (server), :func:`secagg_mod` and :func:`secagg_bridge` (client);
  what fl-sim does with it (sampling, ``max_weight``, the tap) is in
  :mod:`fl_sim.federation.secagg`;
* **the simulation engine**: :func:`run_simulation`;
* **logging**: :func:`quiet_console` (Flower's console handler), :func:`flower_log`.

**Why the simulation still uses ``run_simulation``** (deprecated since Flower 1.42, which
warns on every call; see ``docs/explanation/flower-compat.md`` for the measurements):
Flower's supported path is ``flwr run`` against a SuperLink whose simulation runtime starts
the ServerApp in a separate ``flwr-simulation`` process and loads both apps by their module
strings. fl-sim's ``fl-sim run`` relies on what only the in-process call gives: the run's
hooks (progress callback, stop event, the error of the server thread) are Python objects
passed to the ServerApp, Ray is started by fl-sim itself in the main thread (signals,
watchdog, :mod:`fl_sim.federation.lifecycle`), and the dispatch patch above must be
installed in the process that runs the simulation runtime. The move takes: (1) a
``flwr-simulation`` entry point that installs the patches before Flower's, (2) progress and
stop over the run directory (events file, stop file) instead of in-process objects,
(3) starting and stopping a local SuperLink per run (the ``flwr run`` CLI leaves it
running), with run-time dependency installation disabled. Speed is not the obstacle: one
run each of a 3-client, 2-round digits config on the loaded 2-core machine (2026-12-07)
took 194 s with ``fl-sim run`` and 181 s with ``flwr run`` (first round 15 vs 26 s).
``flwr run .`` already works with fl-sim's apps
(``tests/integration/test_flwr_run.py``); only ``fl-sim run`` and the Python API use this
function.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Mapping
from queue import Queue
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import update_console_handler
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import differential_privacy as fdp
from flwr.supercore import log
from flwr.supercore.date import now

from fl_sim.errors import FlSimError
from fl_sim.federation import protocol as P

logger = logging.getLogger(__name__)

#: Flower's functions that a patch replaced (to fall back to, and to restore in tests)
_ORIGINAL: dict[str, Callable[..., Any]] = {}


# -- logging ----------------------------------------------------------------------------------
class _RunSimulationDeprecation(logging.Filter):
    """fl-sim drives ``run_simulation`` on purpose (see the module doc); Flower's deprecation
    notice about it says nothing the user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "The `run_simulation` function is deprecated" not in record.getMessage()


def quiet_console(debug: bool) -> None:
    """Flower installs its own console handler at import; align it with ``--debug``."""
    update_console_handler(level=logging.DEBUG if debug else logging.WARNING)
    if not debug:
        logging.getLogger("flwr").addFilter(_RunSimulationDeprecation())


def flower_log(level: int, msg: str, *args: Any) -> None:
    """Log through Flower's logger (as its strategies' ``summary`` does)."""
    log(level, msg, *args)


# -- patches ----------------------------------------------------------------------------------
def pending_destinations(store: Mapping[str, Any]) -> set[int]:
    """Destination node ids of the messages in ``store`` not yet delivered."""
    return {int(m.metadata.dst_node_id) for m in list(store.values())
            if m.metadata.delivered_at == ""}


def due_messages(store: Mapping[str, Any], order: Mapping[int, int]) -> list[str]:
    """Ids of the undelivered messages one sweep hands out: per destination node in
    ``order`` (node id -> position) its oldest one, sorted by that position (what Flower's
    loop of ``get_message_ins(node_id, limit=1)`` over the nodes yields), in one pass."""
    first: dict[int, str] = {}
    for msg_id, m in list(store.items()):
        dst = int(m.metadata.dst_node_id)
        if m.metadata.delivered_at == "" and dst in order and dst not in first:
            first[dst] = msg_id
    return [first[d] for d in sorted(first, key=order.__getitem__)]


def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int],
                          f_stop: threading.Event) -> None:
    """Flower's ``vce_api.add_messages_to_queue`` at a cost linear in the stored messages.

    Flower's (1.41 / 1.42) loop asks the in-memory LinkState, every 0.1 s, for a message for
    EVERY node, and each call scans the stored messages from the start: ``population ×
    messages`` per sweep. Node discovery of 10,000 nodes (10,000 messages) stays quadratic
    even when only the nodes with a pending message are asked (``benchmarks/scale.py``: a
    281 s start, mostly inside ``get_message_ins``). This loop finds each pending node's
    oldest message in one pass over the store (:func:`due_messages`), runs Flower's own
    expiry / federation check on those (``_check_stored_messages``), and marks them
    delivered as ``get_message_ins`` does, in Flower's node order. A LinkState without that
    check is asked node by node, only for nodes with a pending message; other LinkStates
    keep Flower's loop."""
    store = getattr(state, "message_ins_store", None)
    if not isinstance(store, dict):
        _ORIGINAL["add_messages_to_queue"](state, queue, nodes_mapping, f_stop)
        return
    lock = getattr(state, "lock", None) or threading.RLock()
    check = getattr(state, "_check_stored_messages", None)
    order = {int(n): i for i, n in enumerate(nodes_mapping)}
    while not f_stop.is_set():
        out: list[Any] = []
        with lock:
            ids = due_messages(store, order)
            if ids and check is not None:
                check(set(ids))  # Flower's expiry / federation checks (drops invalid ones)
                stamp = now().isoformat()
                for msg_id in ids:
                    msg = store.get(msg_id)
                    if msg is not None and msg.metadata.delivered_at == "":
                        msg.metadata.delivered_at = stamp  # as get_message_ins marks it
                        out.append(msg)
        if ids and check is None:
            for msg_id in ids:
                if (msg := store.get(msg_id)) is not None:
                    out += state.get_message_ins(node_id=int(msg.metadata.dst_node_id), limit=1)
        for msg in out:
            queue.put(msg)
        f_stop.wait(0.1)


def install_dispatch_patch() -> bool:
    """Patch Flower's simulation runtime (idempotent); False if its layout is unknown."""
    try:
        # lazy: Flower's internal layout may change: a missing module skips the patch
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        return False
    current = getattr(vce_api, "add_messages_to_queue", None)
    if current is add_messages_to_queue:
        return True
    if current is None or not hasattr(vce_api, "run_api"):
        logger.warning("Flower's simulation runtime changed; message dispatch left as is")
        return False
    _ORIGINAL["add_messages_to_queue"] = current
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True


def _zero_safe_norm(input_arrays: Any) -> float:
    """Flower's ``get_norm``, never 0: ``clip_inputs_inplace`` divides C by it, so a zero
    update (a client whose ReLUs all died) raised ZeroDivisionError; with the floor the scale
    is ``min(1, C / tiny) = 1`` and the zero update stays zero — the same maths."""
    return max(_ORIGINAL["get_norm"](input_arrays), 1e-300)


def install_zero_norm_fix() -> None:
    """Patch ``flwr.supercore.differential_privacy.get_norm`` (used by every clipping path
    of Flower's DP wrappers and mods) with :func:`_zero_safe_norm`; idempotent."""
    if fdp.get_norm is not _zero_safe_norm:
        _ORIGINAL["get_norm"] = fdp.get_norm
        fdp.get_norm = _zero_safe_norm


# -- simulation -------------------------------------------------------------------------------
def run_simulation(server_app: ServerApp, client_app: Any, num_supernodes: int,
                   backend_config: Mapping[str, Any]) -> None:
    """Flower's (deprecated) in-process ``run_simulation`` on the Ray backend, its
    deprecation warning silenced (see the module doc for why, and what the move takes)."""

    # lazy: flwr.simulation imports Ray, which only a simulation needs
    from flwr.simulation import run_simulation as flower_run_simulation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flower_run_simulation(server_app=server_app, client_app=client_app,
                              num_supernodes=num_supernodes,
                              backend_config=dict(backend_config))  # type: ignore[arg-type]


# -- the legacy SecAgg+ bridge: server side ---------------------------------------------------
#: fitins config key: the state_dict names of the arrays, in the order they travel
KEYS_KEY = "fl-sim-array-keys"
#: fitres metrics key: the names of the arrays the client masked, "\n"-joined (a FedSGD
#: gradient has no buffers; legacy metrics cannot hold lists)
REPLY_KEYS = "fl-sim-reply-keys"
#: fitins config key: the seed of numpy's RNG while the client quantises (per round, client)
SEED_KEY = "fl-sim-secagg-seed"
FITINS_PARAMS, FITINS_CONFIG = "fitins.parameters", "fitins.config"


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


def fitins_of(msg: Message, seed: int, params: Any = None) -> FitIns:
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


def run_secaggplus(grid: Grid, defense: Any, max_weight: float, server_round: int,
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


def mean_reply(results: list[tuple[int, FitRes]], global_state: Mapping[str, torch.Tensor],
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


# -- the legacy SecAgg+ bridge: client side ---------------------------------------------------
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
