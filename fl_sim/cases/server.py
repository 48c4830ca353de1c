"""Server-side cases: a given update recorded in a run directory, read back through the view.

The quality tests and benchmarks of server attacks compute one client's update themselves
(a FedSGD gradient or a FedAvg delta of a chosen batch, see :mod:`fl_sim.cases.records`).
:func:`server_record` records it as the server tap does — the round's global with
:meth:`ObservationStore.write_global`, the update with ``write_update("server_in", ...)`` and
the tap's index row (kind, num examples, local steps, lr, batch size, optimiser, defenses),
the client's private batches with :meth:`TruthStore.write` — and returns what the attack
sees: ``Run(run_dir).view("server", grant=...).record(1, 0)``. The grant is exactly what the
caller declares, so :class:`~fl_sim.views.ServerView`'s threat-model checks apply (only the
ground truth of the same client-round, only knowledge it holds); the tensors come back bit
for bit (safetensors round trip; ``tests/unit/test_server_cases.py``)::

    rec = server_record(grads, spec=spec, global_params=task.model.state_dict(),
                        update_kind="gradient", steps=[TruthStep(0, x, y, torch.arange(n))],
                        grant=("labels",))
    rec.knowledge["labels"]          # y, read from the recorded ground truth

Importing this module does not import flwr or ray.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fl_sim.config import from_dict
from fl_sim.errors import ThreatModelError
from fl_sim.records import (
    LocalOptimizer,
    ModelSpec,
    ObservationRecord,
    TruthStep,
    frozen_tensors,
)
from fl_sim.run_dir import load_run
from fl_sim.stores import ObservationStore, TruthStore

#: the single client and round of a server case
CLIENT, ROUND = 0, 1


def _case_config(spec: ModelSpec, num_clients: int, *, update_kind: str, lr: float,
                 local_steps: int, batch_size: int, data: Mapping[str, Any],
                 name: str) -> dict[str, Any]:
    """A valid one-round config (the public training setup). The config's lr
    must be > 0: a FedSGD case built with ``lr = 0`` (unused) records the row's 0 and keeps
    the config's default."""
    fed: dict[str, Any] = {"num_clients": num_clients, "num_rounds": 1, "fraction_train": 1.0,
                           "local_steps": max(int(local_steps), 1),
                           "batch_size": max(int(batch_size), 1), "optimizer": "sgd"}
    if lr > 0:
        fed["lr"] = float(lr)
    return {"run": {"name": name, "seed": 0}, "data": dict(data),
            "model": {"name": spec.model, **dict(spec.model_params)},
            "task": {"name": spec.task, **dict(spec.task_params)},
            "strategy": {"name": "fedsgd" if update_kind == "gradient" else "fedavg"},
            "federation": fed}


def write_server_case(run_dir: str | Path, update: Mapping[str, Tensor], *, spec: ModelSpec,
                      global_params: Mapping[str, Tensor], update_kind: str,
                      steps: Sequence[TruthStep], num_examples: int, local_steps: int,
                      lr: float, batch_size: int,
                      optimizer: LocalOptimizer | None = None,
                      defenses: Sequence[Mapping[str, Any]] = (), run_id: str = "test",
                      data: Mapping[str, Any] | None = None, client: int = CLIENT) -> Path:
    """Record client ``client``'s ``update`` of round 1 in ``run_dir`` as the server tap does.

    ``update``/``global_params``: ``{name: tensor}`` (the global with its buffers);
    ``update_kind``: ``"gradient"`` (FedSGD) or ``"delta"`` (FedAvg, ``new − global``);
    ``steps``: the client's private batches (images ``[B, C, H, W]`` in [0, 1], labels
    ``[B]``, dataset indices ``[B]``, ``aux`` such as diffusion ``eps``/``t``), one per local
    step, as the client's truth tap writes them. ``data``: the config's ``[data]`` section
    (default ``{"name": "digits"}``; no view reads it, so a case of vendored CIFAR images keeps
    the default instead of the ``cifar10`` source, which needs a path). Returns ``run_dir``. Raises
    :class:`~fl_sim.errors.ConfigError` if the spec does not make a valid config.
    """
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = from_dict(_case_config(spec, client + 1, update_kind=update_kind, lr=lr,
                                 local_steps=local_steps, batch_size=batch_size,
                                 data=data or {"name": "digits"}, name=run_id))
    (out / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=2, sort_keys=True))
    (out / "spec.json").write_text(json.dumps(spec.to_json()))
    obs = ObservationStore(out)
    obs.write_global(ROUND, global_params)
    TruthStore(out).write(ROUND, client, list(steps))
    obs.write_update("server_in", ROUND, client, update, {
        "update_kind": update_kind, "num_examples": int(num_examples),
        "local_steps": int(local_steps), "lr": float(lr), "batch_size": int(batch_size),
        "defenses": [dict(d) for d in defenses],
        "optimizer": (optimizer or LocalOptimizer()).to_json()})
    (out / "run.json").write_text(json.dumps({"run_id": run_id, "status": "complete",
                                              "case": True}))
    return out


def read_server_record(run_dir: str | Path, grant: Sequence[str] = (), *,
                       client: int = CLIENT) -> ObservationRecord:
    """Round 1 of ``client`` in ``run_dir`` through ``Run.view("server", grant=grant)``."""

    return load_run(run_dir).view("server", grant=tuple(grant)).record(ROUND, client)


def check_declared(record: ObservationRecord, declared: Mapping[str, Any]) -> None:
    """Every declared tensor of knowledge equals what the view granted, bit for bit; raises
    :class:`~fl_sim.errors.ThreatModelError` for one the view did not grant or that differs
    (a case that claims knowledge its recorded ground truth does not hold)."""
    for key, value in declared.items():
        if key == "granted":
            continue
        got = record.knowledge.get(key)
        if got is None or not torch.equal(torch.as_tensor(got), torch.as_tensor(value)):
            raise ThreatModelError(f"declared knowledge {key!r} differs from what the server "
                                   "view grants from the recorded ground truth")


def server_record(update: Mapping[str, Tensor], *, spec: ModelSpec,
                  global_params: Mapping[str, Tensor], update_kind: str,
                  steps: Sequence[TruthStep], grant: Sequence[str] = (),
                  declared: Mapping[str, Any] | None = None, num_examples: int | None = None,
                  local_steps: int = 1, lr: float = 0.0, batch_size: int | None = None,
                  optimizer: LocalOptimizer | None = None,
                  defenses: Sequence[Mapping[str, Any]] = (), run_id: str = "test",
                  data: Mapping[str, Any] | None = None, client: int = CLIENT,
                  run_dir: str | Path | None = None) -> ObservationRecord:
    """What the server attack sees of ``update``: written by :func:`write_server_case` (in
    ``run_dir``, else a temporary directory removed afterwards) and read back through the
    server view with exactly ``grant`` (``"labels"``, ``"eps"``, ``"t"``, ...).

    ``num_examples``/``batch_size`` default to the number of distinct examples in ``steps``.
    ``declared``: knowledge the caller states the attacker has (e.g. ``{"labels": y}``);
    each must equal the view's grant (:func:`check_declared`). Raises
    :class:`~fl_sim.errors.ThreatModelError` for a grant the server view refuses.
    """
    n = len({int(i) for s in steps for i in s.indices.tolist()})
    kw = {"spec": spec, "global_params": global_params, "update_kind": update_kind,
          "steps": steps, "num_examples": n if num_examples is None else num_examples,
          "local_steps": local_steps, "lr": lr,
          "batch_size": n if batch_size is None else batch_size, "optimizer": optimizer,
          "defenses": defenses, "run_id": run_id, "data": data, "client": client}
    if run_dir is not None:
        record = read_server_record(write_server_case(run_dir, update, **kw), grant,
                                    client=client)
    else:
        with tempfile.TemporaryDirectory(prefix="fl-sim-case-") as tmp:
            record = read_server_record(write_server_case(tmp, update, **kw), grant,
                                        client=client)
    check_declared(record, declared or {})
    return in_order(record, update, global_params)


def in_order(record: ObservationRecord, update: Mapping[str, Tensor],
             global_params: Mapping[str, Tensor]) -> ObservationRecord:
    """``record`` with its update and global in the key order of the given ones (the model's).

    safetensors stores a file's tensors sorted by name, so a record read from a run directory
    lists them alphabetically; the cases' figures were measured with the model's order (an
    attack's sums run in that order), so the view's tensors are re-listed in it, unchanged."""
    if list(record.update) != list(update) and set(record.update) == set(update):
        record = dataclasses.replace(record, update=frozen_tensors(
            {k: record.update[k] for k in update}))
    if list(record.global_params) != list(global_params) and \
            set(record.global_params) == set(global_params):
        record = dataclasses.replace(record, global_params=frozen_tensors(
            {k: record.global_params[k] for k in global_params}))
    return record


def rerecord(record: ObservationRecord, update: Mapping[str, Tensor], *,
             steps: Sequence[TruthStep], defenses: Sequence[Mapping[str, Any]] = (),
             **fields: Any) -> ObservationRecord:
    """``record``'s case with another ``update`` (e.g. what a client-side defense sends),
    recorded again and read back through the server view with the same grant.

    ``steps``: the client's ground truth (as for :func:`server_record`); ``fields`` override
    ``update_kind``, ``num_examples``, ``local_steps``, ``lr``, ``batch_size``, ``optimizer``
    (what the record states the client used).
    """
    grant = tuple(record.knowledge.get("granted", ()))
    kw: dict[str, Any] = {
        "update_kind": record.update_kind, "num_examples": record.num_examples,
        "local_steps": record.local_steps, "lr": record.lr, "batch_size": record.batch_size,
        "optimizer": record.optimizer, **fields}
    return server_record(update, spec=record.spec, global_params=record.global_params,
                         steps=steps, grant=grant,
                         declared={k: record.knowledge[k] for k in grant},
                         defenses=defenses,
                         run_id=record.run_id, client=int(record.client_id or 0), **kw)
