"""Membership inference in the attack runner: the candidate set, the attacker's auxiliary
data, and the ROC scoring (issue 22).

The candidate set is ground truth: members are drawn from the target's training data as the
truth store recorded it (server view: the client's batch of the round; peer view: the other
clients' batches of the round, which the derived update aggregates; the aggregate a SecAgg+
server holds: every aggregated client's batch; final model: every batch the target client
trained on in the run), non-members from the data source's examples that no
client trained on in this run (held out, same distribution; identified by content, so a case
built from test images stays correct). Both are drawn with
``torch_generator(seed, "mia-candidates", ...)`` and shuffled together; images, labels and
membership are written to ``run_dir/truth/candidates/<key>.safetensors`` (the truth store's
directory: metrics only). The attack receives :class:`~attacks.components.inference.Candidates`
(images, labels), never the membership; :func:`score_membership` alone reads it.

The attacker's auxiliary data (shadow / reference models, :mod:`attacks.components.shadow`) is the
rest of the held-out pool, disjoint from the candidates; its content hash keys the shadow cache.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attacks.components.inference import Auxiliary, Candidates
from fl_sim.capabilities import strategy_capabilities
from fl_sim.data import load_data
from fl_sim.errors import ConfigError, FlSimError
from fl_sim.extras import extras_to_json
from fl_sim.metrics import roc_metrics
from fl_sim.registry import ATTACKS
from fl_sim.seeding import torch_generator
from fl_sim.stores import TruthStore, read_tensors, write_tensors
from fl_sim.view_types import view_of

CANDIDATES_DIR = Path("truth") / "candidates"


def _keys(images: Tensor) -> list[bytes]:
    """Per-image content keys (pixels rounded to 1/255: stored truth may be uint8)."""
    q = (images.detach().cpu().double().clamp(0, 1) * 255).round().to(torch.uint8)
    return [hashlib.sha1(row.numpy().tobytes()).digest() for row in q.flatten(1)]


def digest(images: Tensor, labels: Tensor) -> str:
    """Content hash of a labelled image set (order-sensitive)."""
    h = hashlib.sha256()
    for k in _keys(images):
        h.update(k)
    h.update(labels.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def _source(cfg: Any) -> tuple[Tensor, Tensor]:
    """Every example of the run's data source (train then test split)."""
    return _load_source(json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True))


@lru_cache(maxsize=2)
def _load_source(data_json: str) -> tuple[Tensor, Tensor]:
    section = json.loads(data_json)
    splits = load_data(section.pop("name"), **section)
    images = torch.cat([torch.as_tensor(splits.train.images), torch.as_tensor(splits.test.images)])
    labels = torch.cat([torch.as_tensor(splits.train.labels), torch.as_tensor(splits.test.labels)])
    return images.float(), labels.long()


def _member_pool(run: Any, view: str, client: int | None, server_round: int,
                 target_model: str) -> tuple[Tensor, Tensor]:
    if target_model == "final":
        keys = [(r, c) for r, c in _truth_keys(run) if c == client]
    else:  # the view's clients (an aggregate holds every aggregated client's batch)
        keys = [(server_round, c)
                for c in view_of(view).truth_clients(run, server_round, client)]
    truths = [run.truth(r, c) for r, c in keys]
    images = [t.images for t in truths if t.images.numel()]
    if not images:
        raise FlSimError(f"no ground truth of the target ({view} view, round {server_round}, "
                         f"client {client}): no members to draw candidates from (was "
                         "federation.record_truth disabled?)")
    x, y = torch.cat(images).float(), torch.cat([t.labels for t in truths if t.labels.numel()])
    _, first = np.unique(np.array(_keys(x), dtype=object), return_index=True)
    keep = torch.as_tensor(np.sort(first))
    return x[keep], y[keep]


def _truth_keys(run: Any) -> list[tuple[int, int]]:
    return TruthStore(run.path).keys()


def held_out(run: Any) -> tuple[Tensor, Tensor]:
    """The data source's examples no client trained on in this run (any round), in source
    order: the pool of non-member candidates and of the attacker's auxiliary data."""
    x, y = _source(run.config)
    used: set[bytes] = set()
    for r, c in _truth_keys(run):
        used.update(_keys(run.truth(r, c).images))
    keep = torch.as_tensor([k not in used for k in _keys(x)])
    return x[keep], y[keep]


def build_candidates(run: Any, *, view: str, client: int | None, server_round: int,
                     target_model: str, num_members: int, num_nonmembers: int,
                     key: str) -> tuple[Any, Tensor, Any]:
    """``(Candidates, membership [N] bool, Auxiliary)`` for one attack (module doc); writes
    them to the truth store. Raises :class:`~fl_sim.errors.ConfigError` when the run holds
    too few members or held-out examples for the numbers asked."""
    seed = int(run.config.run.seed)
    mx, my = _member_pool(run, view, client, server_round, target_model)
    hx, hy = held_out(run)
    if num_nonmembers > len(hy):
        raise ConfigError(f"num_nonmembers = {num_nonmembers} but the data source holds only "
                          f"{len(hy)} examples no client trained on")
    g = torch_generator(seed, "mia-candidates", view, server_round, client or 0)
    m_idx = torch.randperm(len(my), generator=g)[:num_members]
    h_perm = torch.randperm(len(hy), generator=g)
    n_idx, aux_idx = h_perm[:num_nonmembers], torch.sort(h_perm[num_nonmembers:]).values
    images = torch.cat([mx[m_idx], hx[n_idx]])
    labels = torch.cat([my[m_idx], hy[n_idx]])
    member = torch.cat([torch.ones(len(m_idx), dtype=torch.bool),
                        torch.zeros(len(n_idx), dtype=torch.bool)])
    order = torch.randperm(len(labels), generator=g)
    images, labels, member = images[order], labels[order], member[order]
    write_tensors(Path(run.path) / CANDIDATES_DIR / f"{key}.safetensors",
                  {"images": images, "labels": labels, "membership": member},
                  {"seed": seed, "view": view, "round": server_round, "client": client,
                   "target_model": target_model, "num_members": int(member.sum()),
                   "num_nonmembers": int((~member).sum())})
    ax, ay = hx[aux_idx], hy[aux_idx]
    return (Candidates(images, labels), member,
            Auxiliary(ax, ay, digest(ax, ay)))


def read_membership(run_dir: Path, key: str) -> Tensor:
    """The recorded membership of candidate set ``key`` (scorer only)."""
    return read_tensors(Path(run_dir) / CANDIDATES_DIR / f"{key}.safetensors")[0]["membership"]


def score_membership(run_dir: Path, key: str, scores: Tensor) -> dict[str, Any]:
    """ROC metrics (:func:`fl_sim.metrics.roc_metrics`) of ``scores`` against the recorded
    membership of candidate set ``key``."""
    return roc_metrics(scores, read_membership(run_dir, key))


def run_inference_attack(run_dir: Path, cfg: Any, name: str, attack: Any, record: Any, *,
                         view: str, grant: tuple[str, ...], client: int | None,
                         server_round: int, key: str, run: Any, device: str,
                         head: dict[str, Any]) -> dict[str, Any]:
    """The runner's path for an inference attack (:func:`fl_sim.attack_runner.run_attack`
    builds the view's ``record`` and hands it over): for membership draw and record the
    candidates, run the attack on them without membership and score the ROC; for property
    inference score the round and record whether the target's batch had the property.
    Returns the result row (``head``: the runner's fallback / client / params fields, placed
    after ``round``); the runner adds the threat class and appends it."""
    target = getattr(attack, "target_model", "update")
    candidates, aux = _attack_inputs(run, attack, view=view, server_round=server_round, key=key,
                                     client=record.client_id if record.client_id is not None
                                     else client)
    gen = torch_generator(cfg.run.seed, "attack", name, server_round, record.client_id or 0)
    t0 = time.perf_counter()
    out = attack.infer(record, candidates, auxiliary=aux if attack.needs_auxiliary else None,
                       final_model=run.final_model() if target == "final" else None,
                       generator=gen, device=device)
    seconds = time.perf_counter() - t0
    if candidates is not None:
        metrics = score_membership(run_dir, key, out.scores)
        fields: dict[str, Any] = {"candidates": str(CANDIDATES_DIR / f"{key}.safetensors"),
                                  "scores": [float(s) for s in out.scores]}
    else:
        metrics = score_property(run, view, record.client_id, server_round,
                                 attack.property_class, float(out.scores[0]))
        fields = {"scores": [float(out.scores[0])]}
    return {
        "key": key, "attack": name, "view": view, "round": server_round, **head,
        "update_kind": record.update_kind, "inference": attack.inference,
        "target_model": target,
        "knowledge": {**{k: "granted" for k in grant}, **dict(out.knowledge)},
        "budget": {}, "defenses": list(record.defenses), "seconds": round(seconds, 3),
        "adaptive": False, "adapted_to": [], "iterations": 0, "matching_loss": None,
        "num_images": len(candidates) if candidates is not None else 0, "metrics": metrics,
        "grid": None, **fields,
        "extras": extras_to_json(out.extras, run_dir, f"attacks/{name}_{view}_r"
                                                      f"{server_round}_{key[-6:]}"),
    }


def _attack_inputs(run: Any, attack: Any, *, view: str, client: int | None,
                   server_round: int, key: str) -> tuple[Any, Any]:
    """``(candidates or None, auxiliary)``: membership draws and records the candidate set
    (the membership stays in the truth store); property inference gets the held-out pool."""
    if attack.inference == "membership":
        candidates, _, aux = build_candidates(
            run, view=view, client=client, server_round=server_round,
            target_model=getattr(attack, "target_model", "update"),
            num_members=int(attack.num_members), num_nonmembers=int(attack.num_nonmembers),
            key=key)
        return candidates, aux
    hx, hy = held_out(run)
    return None, Auxiliary(hx, hy, digest(hx, hy))


def score_property(run: Any, view: str, client: int | None, server_round: int,
                   property_class: int, score: float) -> dict[str, Any]:
    """Whether the batch behind the attacked update had the property (truth store: the
    client's labels; a peer's derived update: any other client of the round) and the round's
    score: ``{"property": bool, "score": float, "correct": bool at threshold 1/2}``. The ROC
    over rounds is :func:`property_roc`."""
    clients = view_of(view).truth_clients(run, server_round, client)
    has = any(bool((run.truth(server_round, c).labels == property_class).any())
              for c in clients)
    return {"property": has, "score": score, "correct": (score >= 0.5) == has}


def property_roc(rows: Any) -> dict[str, Any]:
    """ROC metrics (:func:`fl_sim.metrics.roc_metrics`) over property-inference result rows
    (one score per round or case). Raises ``ValueError`` without both outcomes."""
    rows = [r for r in rows if "property" in (r.get("metrics") or {})]
    return roc_metrics(torch.tensor([float(r["metrics"]["score"]) for r in rows]),
                       torch.tensor([bool(r["metrics"]["property"]) for r in rows]))


def check_inference_attacks(cfg: Any) -> None:
    """Pre-flight (before any work): every configured inference attack can be built with its
    parameters (no candidates, a bad shadow recipe: ConfigError), a property names a class
    the data set has, and the examples no client can train on (the data source minus every
    client's partition: an upper bound of the held-out pool) hold the non-member candidates
    plus one shadow model's training set. One-line :class:`~fl_sim.errors.ConfigError`."""
    from fl_sim.federation.client_app import (  # lazy: loads flwr (the Flower client app)
        load_partitions,
        load_splits,
    )
    todo = [(i, a) for i, a in enumerate(cfg.attacks)
            if getattr(ATTACKS.get(a.name), "inference", None)]
    if not todo:
        return
    data_json = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
    splits = load_splits(data_json)
    total = len(splits.train.labels) + len(splits.test.labels)
    parts = load_partitions(data_json, json.dumps(cfg.partition.model_dump(mode="json"),
                                                  sort_keys=True),
                            cfg.federation.num_clients, cfg.run.seed)
    pool = total - sum(len(p) for p in parts)
    classes = int(max(int(torch.as_tensor(splits.train.labels).max()),
                      int(torch.as_tensor(splits.test.labels).max())) + 1)
    for i, a in enumerate(cfg.attacks):
        if (i, a) not in todo:
            continue
        where = f"attacks[{i}] ({a.name})"
        try:
            attack = ATTACKS.create(a.name, _where=f"attacks[{i}]", **dict(a.params))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if getattr(attack, "target_model", None) == "local" \
                and strategy_capabilities(cfg.strategy.name).sends_gradient:
            raise ConfigError(f"{where}: target = \"local\" rebuilds a client's model from a "
                              f"FedAvg delta; strategy {cfg.strategy.name} sends gradients")
        k = getattr(attack, "property_class", None)
        if k is not None and k >= classes:
            raise ConfigError(f"{where}: property_class = {k} is no class of data "
                              f"{cfg.data.name!r} (classes 0-{classes - 1})")
        nonmembers = int(getattr(attack, "num_nonmembers", 0)) \
            if attack.inference == "membership" else 0
        recipe = getattr(attack, "recipe", None)
        need = nonmembers + (recipe.size if recipe is not None and not attack.online else 0)
        if need > pool:
            shadow = f" + shadow_size {recipe.size}" if recipe is not None else ""
            raise ConfigError(f"{where}: needs {need} held-out examples (num_nonmembers "
                              f"{nonmembers}{shadow}) but at most {pool} of data "
                              f"{cfg.data.name!r} are outside the clients' partitions")
