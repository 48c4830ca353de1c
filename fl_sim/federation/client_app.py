"""fl-sim's Flower ClientApp (Message API): local training, evaluation, ground truth, peer tap.

Everything a client needs arrives in the message (resolved config JSON + run directory, see
:mod:`fl_sim.federation.protocol`) or in ``context.node_config["partition-id"]``; data loading
and partitioning are cached per process, so the app works the same under the Ray simulation,
``flwr run .`` and the Deployment Engine (where each message may start a fresh process).

``train``: optionally fail (``federation.client_failure_rate``, decided by
``numpy_rng(seed, "round", r, "client", c, "failure")``), load the global model, run
:func:`~fl_sim.federation.local.local_train` (or :func:`~fl_sim.federation.local.one_gradient`
when the strategy asks for a gradient), write the ground truth of every step and, for a
client listed in ``federation.peer_clients``, the global it received and its own update into
``run_dir/peer/c{k}``. A ``train`` or ``evaluate`` that raises answers with an error reply
(:func:`~fl_sim.federation.failures.failures_as_replies`): one log line per failure on the
server, no traceback crossing Ray.
"""

from __future__ import annotations

import json
import logging
import math
import socket
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from fl_sim.config import ExperimentConfig, from_dict
from fl_sim.data.partition import evaluation_share
from fl_sim.defended import build_defenses, defend_reply, defenses_in_force, of_stage
from fl_sim.errors import FlSimError
from fl_sim.federation import protocol as P
from fl_sim.federation.canary_data import canaries_of_client
from fl_sim.federation.client_mods import TRAIN_MODS
from fl_sim.federation.dp_epsilon import client_epsilons, dp_train_defense
from fl_sim.federation.failures import failures_as_replies
from fl_sim.federation.local import LocalResult, local_train, one_gradient
from fl_sim.federation.partitions import load_partitions, load_splits, section_json
from fl_sim.federation.resources import apply_determinism, client_device
from fl_sim.federation.retention import Retention
from fl_sim.federation.shared_dir import check_probe
from fl_sim.federation.taps import arrays_to_tensors
from fl_sim.records import LocalOptimizer, ModelSpec
from fl_sim.seeding import numpy_rng, torch_generator
from fl_sim.stores import PeerStore, TruthStore
from fl_sim.tasks import task_from_config
from strategies.fedsgd import step_reply

logger = logging.getLogger(__name__)

app = ClientApp()

#: Test-set examples a client evaluates on (its share of the test split, capped).
MAX_EVAL_EXAMPLES = 512


class InjectedClientFailure(FlSimError, RuntimeError):
    """Raised on purpose by a client selected to fail (``client_failure_rate``)."""


@dataclass(frozen=True)
class ClientData:
    """A client's partition: images [N, C, H, W] in [0, 1], labels [N], dataset indices [N]."""

    images: Tensor
    labels: Tensor
    indices: Tensor
    test_images: Tensor
    test_labels: Tensor


def client_data(cfg: ExperimentConfig, client_id: int) -> ClientData:
    """The private partition of ``client_id`` and its share of the test split."""
    data_json = section_json(cfg.data)
    splits = load_splits(data_json)
    parts = load_partitions(data_json, section_json(cfg.partition),
                            cfg.federation.num_clients, cfg.run.seed)
    idx = torch.as_tensor(parts[client_id], dtype=torch.int64)
    test_idx = torch.from_numpy(evaluation_share(len(splits.test), cfg.federation.num_clients,
                                                 client_id, cap=MAX_EVAL_EXAMPLES))
    images, labels = splits.train.images[idx], splits.train.labels[idx]
    if cfg.audits:  # canary examples this client trains on (fl_sim.federation.canary_data)
        if (extra := canaries_of_client(cfg, client_id)) is not None:
            images, labels = torch.cat([images, extra[0]]), torch.cat([labels, extra[1]])
            idx = torch.cat([idx, extra[2]])
    return ClientData(images=images, labels=labels, indices=idx,
                      test_images=splits.test.images[test_idx],
                      test_labels=splits.test.labels[test_idx])


@lru_cache(maxsize=2)
def _task_and_spec(cfg_json: str, device: str) -> tuple[Any, ModelSpec]:
    cfg = from_dict(json.loads(cfg_json))
    splits = load_splits(section_json(cfg.data))
    return task_from_config(cfg.model, cfg.task, splits.in_channels, splits.num_classes,
                            splits.image_size, splits.mean, splits.std, seed=cfg.run.seed,
                            device=device)


def task_with_global(cfg: ExperimentConfig, arrays: ArrayRecord) -> Any:
    """The (per-process cached) task, its model loaded with the global state in ``arrays``."""
    device = str(client_device(cfg))
    task, _ = _task_and_spec(json.dumps(cfg.to_json_dict(), sort_keys=True), device)
    state = arrays_to_tensors(arrays)
    task.model.load_state_dict(state, strict=True)
    return task


def partition_id(context: Context) -> int:
    try:
        return int(context.node_config[P.PARTITION_ID])
    except KeyError:
        raise FlSimError("node_config has no 'partition-id' (start the SuperNode with "
                         "--node-config \"partition-id=K num-partitions=N\")") from None


def should_fail(cfg: ExperimentConfig, server_round: int, client_id: int) -> bool:
    """Whether this client fails this round (derived rng per (round, client))."""
    rate = cfg.federation.client_failure_rate
    if rate <= 0:
        return False
    return bool(numpy_rng(cfg.run.seed, "round", server_round, "client", client_id,
                          "failure").random() < rate)


def _arrays(msg: Message) -> ArrayRecord:
    return next(iter(msg.content.array_records.values()))


def _config(msg: Message) -> ConfigRecord:
    return next(iter(msg.content.config_records.values()))


@app.query("partition")
@failures_as_replies
def query_partition(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random), after checking
    that this node sees the run directory (:mod:`fl_sim.federation.shared_dir`)."""
    check_probe(_config(msg), where=f"client {partition_id(context)}'s node "
                f"({socket.gethostname()})")
    reply = RecordDict({P.META: ConfigRecord({P.PARTITION_ID: partition_id(context)})})
    return Message(reply, reply_to=msg)


@app.query("final_model")
def query_final_model(msg: Message, context: Context) -> Message:
    """Receive the final global model; a curious peer keeps it (its last peer-view global)."""
    cfg, run_dir = P.read_config(_config(msg))
    cid = partition_id(context)
    config = _config(msg)
    r = int(config[P.ROUND_KEY])  # type: ignore[arg-type]
    if cid in cfg.federation.peer_clients and cfg.federation.taps and \
            Retention.of(cfg.federation).peer_global(r):
        PeerStore(run_dir, cid).write_global(r, arrays_to_tensors(_arrays(msg)),
                                             _published(config))
    return Message(RecordDict({P.META: ConfigRecord({P.PARTITION_ID: cid})}), reply_to=msg)


def _published(config: ConfigRecord) -> dict[str, Any]:
    keys = (P.AGG_ROUND_KEY, P.AGG_NUM_EXAMPLES_KEY, P.AGG_NUM_CLIENTS_KEY)
    return {k.replace("-", "_"): config[k] for k in keys if k in config}


@app.train(mods=TRAIN_MODS)
@failures_as_replies
def train(msg: Message, context: Context) -> Message:
    """One round of local work; replies with new weights or a gradient (see module doc)."""
    config = _config(msg)
    cfg, run_dir = P.read_config(config)
    fed = cfg.federation
    cid = partition_id(context)
    r = int(config[P.ROUND_KEY])  # type: ignore[arg-type]
    if should_fail(cfg, r, cid):
        raise InjectedClientFailure(f"injected (client_failure_rate="
                                    f"{fed.client_failure_rate})")
    apply_determinism(cfg)
    data = client_data(cfg, cid)
    task = task_with_global(cfg, _arrays(msg))
    device = client_device(cfg)
    global_state = None
    defended = bool(of_stage(build_defenses(cfg), "update"))
    if (cid in fed.peer_clients and fed.taps) or defended:
        global_state = {k: v.detach().cpu().clone() for k, v in task.model.state_dict().items()}
    common = {"seed": cfg.run.seed, "server_round": r, "client_id": cid,
              "batch_size": fed.batch_size, "device": device, "dp": dp_train_defense(cfg)}
    sgd_step = config.get(P.UPDATE_KIND_KEY) == P.SGD_STEP  # FedSGD under central DP
    if config.get(P.UPDATE_KIND_KEY) == P.GRADIENT or sgd_step:
        res = one_gradient(task, data.images, data.labels, data.indices, **common)
    else:
        mu = float(config.get(P.PROXIMAL_MU_KEY, 0.0))  # type: ignore[arg-type]
        res = local_train(task, data.images, data.labels, data.indices,
                          local_steps=fed.local_steps, local_epochs=fed.local_epochs,
                          optimizer=fed.local_optimizer(), lr=fed.lr, proximal_mu=mu,
                          **common)
    update = res.update
    if defended:  # before anything leaves the client: server tap and peer record see it
        update = defend_reply(cfg, update, kind=res.kind, global_state=global_state,
                              task=task, steps=res.steps, num_examples=res.num_examples,
                              server_round=r, client_id=cid)
    if cid in _poisoned(config):
        update = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v
                  for k, v in update.items()}
    keep = Retention.of(fed)
    if fed.record_truth and keep.client_round(r, cid):
        TruthStore(run_dir).write(r, cid, res.steps)
    if cid in fed.peer_clients and fed.taps and global_state is not None:
        _record_peer(run_dir, cid, r, global_state, res, update, config,
                     lr=fed.lr, batch_size=fed.batch_size, keep=keep,
                     defenses=defenses_in_force(cfg), optimizer=fed.local_optimizer())
    lr, kind, optimizer = float(fed.lr), res.kind, fed.local_optimizer()
    if sgd_step:  # one-step weights global − η·g, recorded as a delta with lr η (fedsgd.py)
        lr, kind = float(config[P.SERVER_LR_KEY]), P.SGD_STEP  # type: ignore[arg-type]
        optimizer = LocalOptimizer("sgd")  # the server's step, not the client's optimiser
        update = step_reply(arrays_to_tensors(_arrays(msg)), update, lr)
    meta = ConfigRecord({P.PARTITION_ID: cid, P.UPDATE_KIND_KEY: kind,
                         "local-steps": len(res.steps), "batch-size": fed.batch_size,
                         "lr": lr, "optimizer": json.dumps(optimizer.to_json()),
                         **client_epsilons(cfg, cid, r, partition_size=len(data.labels),
                                           steps=len(res.steps))})
    loss = res.loss if math.isfinite(res.loss) else 0.0
    reply = RecordDict({P.ARRAYS: ArrayRecord(update),
                        P.METRICS: MetricRecord({P.NUM_EXAMPLES: res.num_examples,
                                                 "train-loss": loss}),
                        P.META: meta})
    return Message(reply, reply_to=msg)


def _poisoned(config: ConfigRecord) -> set[int]:
    raw = config.get(P.POISON_KEY)
    return {int(x) for x in raw} if isinstance(raw, list) else set()  # type: ignore[union-attr]


def _record_peer(run_dir: Any, cid: int, r: int, global_state: dict[str, Tensor],
                 res: LocalResult, update: dict[str, Tensor], config: ConfigRecord, *,
                 lr: float, batch_size: int, keep: Retention,
                 defenses: list[dict[str, Any]], optimizer: LocalOptimizer) -> None:
    """Peer tap: the global received this round + the client's own update (delta/gradient),
    as far as ``keep`` retains them."""
    store = PeerStore(run_dir, cid)
    if keep.peer_global(r):
        store.write_global(r, global_state, _published(config))
    if not keep.round(r):
        return
    if res.kind == "weights":
        own = {k: v - global_state[k] for k, v in update.items()}
        kind = "delta"
    else:
        own, kind = dict(update), "gradient"
    store.write_update(r, own, {"update_kind": kind, "num_examples": res.num_examples,
                                "local_steps": len(res.steps), "lr": float(lr),
                                "batch_size": int(batch_size), "defenses": defenses,
                                "optimizer": optimizer.to_json()})


@app.evaluate()
@failures_as_replies
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this client's share of the test split."""
    config = _config(msg)
    cfg, _ = P.read_config(config)
    cid = partition_id(context)
    r = int(config.get(P.ROUND_KEY, 0))  # type: ignore[arg-type]
    data = client_data(cfg, cid)
    task = task_with_global(cfg, _arrays(msg))
    gen = torch_generator(cfg.run.seed, "round", r, "client", cid, "evaluate")
    metrics = task.evaluate(data.test_images, data.test_labels, generator=gen)
    record = MetricRecord({P.NUM_EXAMPLES: int(len(data.test_labels)),
                           **{f"eval-{k}": float(v) for k, v in metrics.items()}})
    return Message(RecordDict({P.METRICS: record,
                               P.META: ConfigRecord({P.PARTITION_ID: cid})}), reply_to=msg)
