"""Attack cases as small recorded federations, written without Ray (cf. breaching's
``construct_case``).

A benchmark or a quality test that measures an attack must obtain its record the way a real
attacker does: from a run directory, through :class:`~fl_sim.run_dir.Run` and its threat-model
views (:class:`~fl_sim.views.ServerView`, :class:`~fl_sim.views.PeerView`, the aggregate), so
that the views' checks (a peer is granted no ground truth, it sees only its own store) apply to
the figures too. :func:`build_case` writes such a directory for explicit per-client data::

    from fl_sim.cases import CaseClient, build_case
    from fl_sim.run_dir import load_run

    path = build_case(tmp / "case", spec=spec, global_state=task.model.state_dict(),
                      clients=[CaseClient(x[i:i + 1], y[i:i + 1], idx[i:i + 1])
                               for i in range(4)],
                      strategy="fedsgd", num_rounds=1, peer_clients=(0,))
    run = load_run(path)
    record = run.view("peer", client=0).record(1)      # what client 0 derives
    truth = torch.cat([run.truth(1, c).images for c in (1, 2, 3)])   # metrics only

**Why without Ray, and why that is faithful.** A Ray federation costs ~15 s of start-up per
case and far more on a loaded 2-core runner; the quality tests and benchmarks need many cases.
Every number a real run records is computed here by the SAME code a real run executes:

* each client's work is :func:`fl_sim.federation.local.one_gradient` (FedSGD) or
  :func:`~fl_sim.federation.local.local_train` (FedAvg) with the run seed's derived
  generators, on a task rebuilt from ``spec`` holding the round's global (train mode, as in
  :mod:`fl_sim.federation.client_app`);
* every record is written by the stores' own writers with the rows the taps write:
  :meth:`ObservationStore.write_global` / ``write_update`` (``server_in``, ``aggregate``, as
  :class:`fl_sim.federation.taps.TapStrategy`), :meth:`TruthStore.write`, and the peer tap's
  :meth:`PeerStore.write_global` / ``write_update`` (with the totals the server publishes with
  the next global, and the final model broadcast as round ``num_rounds + 1``);
* aggregation is Flower's weighted mean of the replies' arrays by ``num-examples`` (the
  arithmetic of ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords``, in the same
  order), then FedSGD's server step ``global − η·mean`` (``strategies.fedsgd.fedsgd_step``),
  cast back to the global's dtypes as the tap does. It is re-stated in numpy here so that this
  module loads neither flwr nor ray (attacks' benchmarks import it);
  ``tests/integration/test_cases_faithful.py`` checks it against a real Ray run.

What differs from a real run: the clients' data are given explicitly (the images a test wants
attacked, e.g. a test split the prior never saw) instead of a partition of ``data``; every
client is sampled every round (``fraction_train = 1``); no defenses, failures or evaluation.
``config.json`` holds a valid config naming ``data`` (the source the images come from) and
``run.json`` says the directory is a case (``"case": true``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fl_sim.config import from_dict
from fl_sim.errors import ConfigError
from fl_sim.records import ModelSpec
from fl_sim.registry import DATA_SOURCES
from fl_sim.stores import ObservationStore, PeerStore, TruthStore, append_jsonl, write_tensors
from fl_sim.tasks import build_task
from fl_sim.views import aggregate_training_row

Strategy = Literal["fedsgd", "fedavg"]

#: names of the files a real run writes (fl_sim.federation.server_app; not imported: flwr)
RUN_FILE, SPEC_FILE, FINAL_MODEL, METRICS_FILE = ("run.json", "spec.json",
                                                  "final_model.safetensors", "metrics.jsonl")


@dataclass(frozen=True)
class CaseClient:
    """One client's private data: ``images [n, C, H, W]`` in [0, 1], ``labels [n]`` int64,
    ``indices [n]`` their positions in the data source (what the ground truth records)."""

    images: Tensor
    labels: Tensor
    indices: Tensor


def _config(spec: ModelSpec, strategy: Strategy, num_clients: int, *, num_rounds: int,
            lr: float, server_lr: float | None, local_steps: int, batch_size: int,
            peer_clients: Sequence[int], seed: int, data: Mapping[str, Any],
            name: str) -> dict[str, Any]:
    strat: dict[str, Any] = {"name": strategy}
    if strategy == "fedsgd" and server_lr is not None:
        strat["server_lr"] = float(server_lr)
    return {"run": {"name": name, "seed": seed}, "data": dict(data),
            "model": {"name": spec.model, **dict(spec.model_params)},
            "task": {"name": spec.task, **dict(spec.task_params)},
            "strategy": strat,
            "federation": {"num_clients": num_clients, "num_rounds": num_rounds,
                           "fraction_train": 1.0, "local_steps": local_steps,
                           "batch_size": batch_size, "lr": lr, "optimizer": "sgd",
                           "peer_clients": list(peer_clients)}}


def _mean_by_examples(replies: Sequence[tuple[Mapping[str, np.ndarray], float]]
                      ) -> dict[str, np.ndarray]:
    """Flower's weighted mean (``aggregate_arrayrecords``): ``Σ value · (w / Σ w)``, in reply
    order, accumulated in place as Flower does."""
    total = sum(w for _, w in replies)
    out: dict[str, np.ndarray] = {}
    for arrays, w in replies:
        factor = w / total
        for k, v in arrays.items():
            if k not in out:
                out[k] = v * factor
            else:
                out[k] += v * factor
    return out


def _cast_like(new: Mapping[str, np.ndarray], ref: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tap's cast of the new global to the old one's dtypes (integers rounded)."""
    out = {}
    for k, x in new.items():
        target = ref[k].numpy().dtype
        if x.dtype != target:
            x = np.rint(x).astype(target) if np.issubdtype(target, np.integer) \
                else x.astype(target)
        out[k] = torch.from_numpy(np.ascontiguousarray(x))
    return out


def _client_round(task: Any, data: CaseClient, glob: Mapping[str, Tensor], *, strategy: str,
                  seed: int, server_round: int, client_id: int, batch_size: int,
                  local_steps: int, lr: float, optimizer: Any
                  ) -> tuple[Any, dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """One client's work as :mod:`fl_sim.federation.client_app` does it: ``(result, what it
    sends, what the taps record, the record row)``; ``task`` holds the global."""
    # lazy: tests patch fl_sim.federation.local.one_gradient at call time (DP cases)
    from fl_sim.federation.local import local_train, one_gradient

    common = {"seed": seed, "server_round": server_round, "client_id": client_id,
              "batch_size": batch_size}
    if strategy == "fedsgd":
        res = one_gradient(task, data.images, data.labels, data.indices, **common)
        sent, kind = res.update, "gradient"
        recorded = {k: v.clone() for k, v in sent.items()}
    else:
        res = local_train(task, data.images, data.labels, data.indices,
                          local_steps=local_steps, local_epochs=None, optimizer=optimizer,
                          lr=lr, **common)
        sent, kind = res.update, "delta"
        recorded = {k: v - glob[k] for k, v in sent.items()}
    meta = {"update_kind": kind, "num_examples": int(res.num_examples),
            "local_steps": len(res.steps), "lr": float(lr), "batch_size": batch_size,
            "defenses": [], "optimizer": optimizer.to_json()}
    return res, sent, recorded, meta


def _server_step(glob: Mapping[str, Tensor], mean: Mapping[str, np.ndarray], strategy: str,
                 eta: float) -> dict[str, Tensor]:
    """The new global: FedAvg's mean, or FedSGD's ``global − η·mean``
    (``strategies.fedsgd.fedsgd_step``), cast like the old global (the tap's cast)."""
    if strategy == "fedsgd":
        new_np = {k: (np.asarray(g.numpy() - eta * mean[k], dtype=g.numpy().dtype)
                      if k in mean else g.numpy().copy()) for k, g in glob.items()}
    else:
        new_np = dict(mean)
    return _cast_like(new_np, glob)


def build_case(run_dir: str | Path, *, spec: ModelSpec, global_state: Mapping[str, Tensor],
               clients: Sequence[CaseClient], strategy: Strategy = "fedsgd",
               num_rounds: int = 1, lr: float = 0.1, server_lr: float | None = None,
               local_steps: int = 1, batch_size: int | None = None,
               peer_clients: Sequence[int] = (0,), seed: int = 0,
               data: Mapping[str, Any] | None = None, name: str = "case") -> Path:
    """Run ``num_rounds`` rounds of ``strategy`` over ``clients`` and record them in
    ``run_dir`` exactly as a real run records them (see the module doc); returns ``run_dir``.

    ``global_state``: the round-1 global (``state_dict`` of ``spec``'s model, parameters and
    buffers). ``batch_size`` defaults to the first client's number of images (FedSGD: one
    gradient of all of them). ``lr``: the clients' learning rate (FedSGD's server η unless
    ``server_lr``). ``data``: the ``[data]`` section naming the images' source (default
    ``{"name": "digits"}``). Raises :class:`~fl_sim.errors.ConfigError` for an unknown
    strategy, no clients, or a config the project would not accept (``from_dict``).
    """
    if strategy not in ("fedsgd", "fedavg"):
        raise ConfigError(f"build_case.strategy: got {strategy!r}; allowed: fedsgd, fedavg")
    if not clients:
        raise ConfigError("build_case.clients: no clients")
    bs = int(batch_size or len(clients[0].labels))
    cfg = from_dict(_config(spec, strategy, len(clients), num_rounds=num_rounds, lr=lr,
                            server_lr=server_lr, local_steps=local_steps, batch_size=bs,
                            peer_clients=peer_clients, seed=seed,
                            data=data or {"name": "digits"}, name=name))
    eta = float(server_lr if server_lr is not None else lr)
    optimizer = cfg.federation.local_optimizer()  # plain SGD: what the records say
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=2, sort_keys=True))
    (out / SPEC_FILE).write_text(json.dumps(spec.to_json()))
    obs, truth = ObservationStore(out), TruthStore(out)
    peers = {c: PeerStore(out, c) for c in cfg.federation.peer_clients}
    task = spec.build_task()
    glob = {k: v.detach().cpu().clone() for k, v in global_state.items()}
    published: dict[str, Any] = {}
    for r in range(1, num_rounds + 1):
        obs.write_global(r, glob)
        replies, losses = [], []
        for cid, data_c in enumerate(clients):
            task.model.load_state_dict(glob, strict=True)
            res, sent, recorded, meta = _client_round(
                task, data_c, glob, strategy=strategy, seed=seed, server_round=r,
                client_id=cid, batch_size=bs, local_steps=local_steps, lr=lr,
                optimizer=optimizer)
            truth.write(r, cid, res.steps)
            if cid in peers:
                peers[cid].write_global(r, glob, published)
                peers[cid].write_update(r, recorded, meta)
            obs.write_update("server_in", r, cid, recorded, meta)
            replies.append(({k: v.numpy() for k, v in sent.items()}, float(res.num_examples)))
            losses.append((res.loss, float(res.num_examples)))
        new = _server_step(glob, _mean_by_examples(replies), strategy, eta)
        total = int(sum(w for _, w in replies))
        obs.write_update("aggregate", r, None, {k: new[k] - glob[k] for k in new}, {
            "update_kind": "delta", "num_examples": total,
            "num_clients_aggregated": len(clients), "clients": list(range(len(clients))),
            "defenses": [], "training": aggregate_training_row(cfg)})  # as the server tap
        published = {"aggregated_round": r, "aggregated_num_examples": total,
                     "aggregated_num_clients": len(clients)}
        append_jsonl(out / METRICS_FILE, {
            "round": r, "num_examples": total, "aggregated": True,
            "clients_sampled": list(range(len(clients))), "clients_failed": [],
            "clients_rejected": [],
            "train_loss": sum(loss * w for loss, w in losses) / total})
        glob = new
    for store in peers.values():  # the final model broadcast to the peers
        store.write_global(num_rounds + 1, glob, published)
    write_tensors(out / FINAL_MODEL, glob, {"round": num_rounds})
    (out / RUN_FILE).write_text(json.dumps({"run_id": out.name, "status": "complete",
                                            "case": True}))
    return out


def others_truth(run: Any, server_round: int, client: int) -> tuple[Tensor, Tensor]:
    """``(images [N, C, H, W], labels [N])`` of every client aggregated in ``server_round``
    except ``client``, in client order: what a curious peer's reconstruction is scored
    against (as :mod:`fl_sim.attack_runner` scores it). For metrics only, never an attack."""
    truths = [run.truth(server_round, c) for c in run.clients_in_round(server_round)
              if c != client]
    return torch.cat([t.images for t in truths]), torch.cat([t.labels for t in truths])


# -- the digits reference case of the curious-peer figures ------------------------------------
#: grey 16x16 digits (scikit-learn's bundled set, the ``digits`` source, split seed 0)
DIGITS = {"name": "digits", "image_size": 16, "seed": 0}
#: the digits prior of the quality tests and benchmarks (``fl-sim train-prior`` config): 400
#: Adam steps of batch 16 on the TRAIN split (~60 s on one thread); its samples look like
#: rough digits, which is all a prior of this scale needs to be
DIGITS_PRIOR_CONFIG: dict[str, Any] = {
    "data": {"name": "digits", "image_size": 16},
    "filter": {"split": "train"},
    "model": {"name": "unet", "preset": "tiny"},
    "task": {"name": "diffusion", "num_train_timesteps": 1000},
    "training": {"steps": 400, "batch_size": 16, "lr": 2e-3, "seed": 0,
                 "checkpoint_every": 400, "eval_examples": 64, "sample_images": 4,
                 "sample_steps": 10},
}


def digits_splits() -> Any:
    """The ``digits`` source of :data:`DIGITS` (train / test splits, mean / std)."""
    params = {k: v for k, v in DIGITS.items() if k != "name"}
    return DATA_SOURCES.get("digits")(**params)


def digits_spec(model: str = "lenet") -> ModelSpec:
    """A classifier on grey 16x16 digits, normalised with the source's statistics."""
    d = digits_splits()
    return ModelSpec(model=model, model_params={}, task="classifier", task_params={},
                     in_channels=1, num_classes=10, image_size=int(DIGITS["image_size"]),
                     mean=tuple(d.mean), std=tuple(d.std))


def digits_peer_case(run_dir: str | Path, others: int, *, start: int = 0,
                     model: str = "lenet", seed: int = 0, **case: Any) -> Path:
    """The curious-peer digits case as a recorded run: ``others + 1`` clients, client ``k``
    holding TEST digit ``start + k`` (one each; the digits prior saw only TRAIN digits), the
    peer is client 0, a seeded untrained ``model`` on 16x16 grey digits, FedSGD unless
    ``case`` says otherwise (keywords of :func:`build_case`). Returns the run's path."""

    test = digits_splits().test
    spec = digits_spec(model)
    task = build_task(spec, seed=seed)
    x = torch.as_tensor(test.images[start:start + others + 1]).float()
    y = torch.as_tensor(test.labels[start:start + others + 1]).long()
    clients = [CaseClient(x[k:k + 1], y[k:k + 1], torch.tensor([start + k]))
               for k in range(others + 1)]
    return build_case(run_dir, spec=spec, global_state=task.model.state_dict(),
                      clients=clients, data=DIGITS, seed=seed, **case)
