"""Checks that run before any work starts: no Ray, no run directory, one line on failure.

:func:`check_before_start` is what :func:`fl_sim.federation.simulation.run_experiment` calls
before it creates the run directory or starts Ray (~15 s): the config itself was already
validated (types, finite numbers, attack entries: :mod:`fl_sim.config`), so what is left is
what needs the disk:

* the run directory: a fresh run needs a path that is not a file and holds no run; a resume
  needs a readable ``config.json`` and checkpoint state naming files that exist;
* the data: the dataset is loaded (in-process cache, the ServerApp reuses it) and partitioned
  exactly as the clients will, so a malformed file or a client left without samples fails
  here instead of in every Ray actor;
* the attack schedule: each attack's client is sampled in its rounds (sampling is seeded);
* the model: built as the server will build it, so it must fit the data, and ``[model]
  pretrained`` weights must exist (safetensors) and have the configured architecture;
* the attacks' parameters against the federation: each attack declares the tasks it inverts
  (``tasks``) and, for its parameters, the most images one attacked update may hold
  (``max_images_per_update``); the images in each recorded update follow from the config
  (:func:`images_per_update`), so iDLG's one-image label rule on a 4-image update fails here;
* the metrics: ``metrics.identity_model`` must load.

Everything raises a :class:`~fl_sim.errors.FlSimError` subclass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fl_sim.capabilities import strategy_capabilities
from fl_sim.config import ExperimentConfig
from fl_sim.defended import check_defenses
from fl_sim.errors import ConfigError, FlSimError, MissingResourceError, RunDirError
from fl_sim.identity import load_identity
from fl_sim.registry import ATTACKS, validate_params
from fl_sim.run_dir import read_json_object
from fl_sim.store_guard import resolve_inside
from fl_sim.view_types import VIEWS


def check_before_start(cfg: ExperimentConfig, *, run_dir: Path, resume: bool) -> None:
    """Raise before anything is created if ``cfg`` cannot run into ``run_dir``."""
    if resume:
        check_resumable(run_dir)
    else:
        check_fresh_run_dir(run_dir)
    check_attack_schedule(cfg)
    check_defenses(cfg)
    check_data(cfg)
    check_audit_data(cfg)
    check_attack_fit(cfg)
    check_attack_paths(cfg)
    # lazy: keeps scipy out of this module's import
    from fl_sim.inference import check_inference_attacks  # membership / property (issue 22)
    check_inference_attacks(cfg)
    check_model(cfg)
    check_metrics(cfg)


#: attack parameters that name a local directory (a prior or a diffusers checkpoint)
PATH_PARAMS = ("prior",)


def check_attack_paths(cfg: ExperimentConfig) -> None:
    """MissingResourceError, before Ray starts, for an attack whose ``prior`` names a local
    directory that does not exist (e.g. a reproduction config's ``/PATH/TO/...`` placeholder):
    otherwise the federation would run for minutes and the attack fail at its end. Whether
    the directory holds a usable prior is checked where the attack opens it."""
    for i, a in enumerate(cfg.attacks):
        for key in PATH_PARAMS:
            value = a.params.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_dir():
                raise MissingResourceError(
                    f"attacks[{i}] ({a.name}).{key}: {value}: no such directory (nothing is "
                    "downloaded; give a local prior or diffusers checkpoint)")


def check_fresh_run_dir(run_dir: Path) -> None:
    """A new run may go to ``run_dir``: no file on its way, and no run already there."""
    for p in (run_dir, *run_dir.parents):
        if p.exists():
            if not p.is_dir():
                what = "--run-dir" if p == run_dir else "its parent"
                raise RunDirError(f"{run_dir}: {what} {p} is a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise RunDirError(f"{run_dir}: cannot write into {p} (permission denied)")
            break
    if (run_dir / "run.json").exists():
        raise RunDirError(f"{run_dir} already holds a run; resume it with --resume or choose "
                          "another --run-dir")


def check_resumable(run_dir: Path) -> None:
    """``run_dir`` holds a run whose JSON files and checkpoint state are readable."""
    if not run_dir.is_dir():
        raise RunDirError(f"resume: {run_dir} is not a directory")
    if not (run_dir / "config.json").is_file():
        raise RunDirError(f"resume: {run_dir} is not a run directory (no config.json)")
    read_json_object(run_dir / "config.json")
    # run.json is not required: a kill while it was written leaves it torn, and the resume
    # rewrites it
    state = run_dir / "checkpoint" / "state.json"
    if state.is_file():
        check_checkpoint_state(read_json_object(state), state.parent)


def check_checkpoint_state(state: dict[str, Any], root: Path) -> None:
    """``checkpoint/state.json`` names a round and two files inside ``root`` that exist."""
    r = state.get("round")
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise RunDirError(f"{root / 'state.json'}: corrupt (round {r!r})")
    for key in ("global", "strategy"):
        rel = state.get(key)
        if not isinstance(rel, str):
            raise RunDirError(f"{root / 'state.json'}: corrupt (no '{key}' file)")
        if not resolve_inside(root, rel).is_file():
            raise RunDirError(f"{root / 'state.json'}: names a missing file {rel}")


def check_model(cfg: ExperimentConfig) -> None:
    """The server's initial model is built here exactly as the ServerApp will build it (after
    :func:`check_data`: the dataset is cached): a model that cannot take the data (ConvNet on
    4-pixel images) is a one-line ConfigError, and ``[model] pretrained`` weights that are
    missing or of another architecture a one-line MissingResourceError / DataError /
    ConfigError naming each difference."""
    # lazy: keeps flwr, scipy out of this module's import
    from fl_sim.federation.server_app import server_task
    try:
        server_task(cfg)
    except FlSimError:
        raise
    except ValueError as exc:  # a model's own argument check
        raise ConfigError(f"model ({cfg.model.name}): {exc}") from None


def check_attack_schedule(cfg: ExperimentConfig) -> None:
    """ConfigError for an attack whose client is never sampled when it is scheduled.

    Client sampling is a pure function of (run.seed, round, fraction_train), so it is known
    now: a server attack on client k in round r needs k sampled in r; a peer attack on round
    r needs the peer sampled in r with at least one other client, and the peer sampled again
    in r + 1 (the next global; the last round's comes with the final broadcast). Injected
    client failures are random per run and not predicted.
    """
    # lazy: keeps flwr out of this module's import
    from fl_sim.federation.taps import sample_clients
    fed = cfg.federation
    clients = list(range(fed.num_clients))

    def sampled(r: int) -> list[int]:
        return sample_clients(cfg.run.seed, r, clients, fed.fraction_train)

    for i, a in enumerate(cfg.attacks):
        peer = not VIEWS[a.view].server_side  # derived: needs round r + 1, another client
        client = a.client if a.client is not None or not peer \
            else (fed.peer_clients or (None,))[0]
        if client is None:
            continue
        for r in a.rounds or (1,):
            now = sampled(r)
            missing = (client not in now or (peer and (
                len(now) < 2 or (r < fed.num_rounds and client not in sampled(r + 1)))))
            if missing:
                need = (f"sampled in rounds {r} and {r + 1} with another client"
                        if peer else f"sampled in round {r}")
                raise ConfigError(
                    f"attacks[{i}] ({a.name}): client {client} is not {need} "
                    f"(fraction_train = {fed.fraction_train}, run.seed = {cfg.run.seed}: "
                    f"round {r} samples {now}); pick a sampled client or other rounds")


def images_per_update(cfg: ExperimentConfig, partition_size: int) -> tuple[int, str]:
    """``(images, how)``: the distinct images one client's recorded update is computed from,
    for a client holding ``partition_size`` examples (what the record's ``num_examples``
    will say, :mod:`fl_sim.federation.local`), and how that number arises.

    A strategy that asks for ONE batch's gradient declares it (``client_update =
    "gradient"`` in its :class:`~fl_sim.capabilities.StrategyCapabilities`, e.g. FedSGD);
    otherwise clients train locally.
    """
    fed = cfg.federation
    n = partition_size
    if strategy_capabilities(cfg.strategy.name).sends_gradient:
        return min(fed.batch_size, n), f"one batch of batch_size = {fed.batch_size}"
    if fed.local_epochs is not None:
        return n, f"local_epochs = {fed.local_epochs} over the client's {n} examples"
    steps = fed.local_steps or 1
    return (min(steps * fed.batch_size, n),
            f"local_steps x batch_size = {steps} x {fed.batch_size}")


def check_attack_fit(cfg: ExperimentConfig) -> None:
    """ConfigError for an attack whose declared limits the configured federation breaks:
    a task it does not invert (``Attack.tasks``), or more images in the update it would
    attack than its parameters can handle (``Attack.max_images_per_update(params)``). The
    peer view's update is the other sampled clients' aggregate, the aggregate view's the
    sum of every sampled client's. Needs the partitions (:func:`check_data` first)."""
    # lazy: keeps flwr, scipy out of this module's import
    from fl_sim.federation.client_app import load_partitions

    # lazy: keeps flwr out of this module's import
    from fl_sim.federation.taps import sample_clients
    fed = cfg.federation
    parts = load_partitions(json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True),
                            json.dumps(cfg.partition.model_dump(mode="json"), sort_keys=True),
                            fed.num_clients, cfg.run.seed)
    for i, a in enumerate(cfg.attacks):
        attack = ATTACKS.get(a.name)
        tasks = getattr(attack, "tasks", None)
        if tasks is not None and cfg.task.name not in tasks:
            raise ConfigError(f"attacks[{i}] ({a.name}): inverts {' / '.join(tasks)} updates; "
                              f"task.name = {cfg.task.name!r}")
        declared = getattr(attack, "max_images_per_update", None)
        limit = declared(validate_params(attack, a.params, where=f"attacks[{i}]")) \
            if declared is not None else None
        if limit is None:
            continue
        most, why = limit
        for r in a.rounds or (1,):
            sampled = sample_clients(cfg.run.seed, r, list(range(fed.num_clients)),
                                     fed.fraction_train)
            view = VIEWS[a.view]
            peer = a.client if a.client is not None else (fed.peer_clients or (0,))[0]
            if view.per_client:  # each candidate client's own update
                groups = [[c] for c in ([a.client] if a.client is not None else sampled)]
            elif not view.server_side:  # the peer's: the others' derived update
                groups = [[c for c in sampled if c != peer]]
            else:  # the sum of every sampled client
                groups = [sampled]
            for group in groups:
                sizes = [images_per_update(cfg, len(parts[c])) for c in group]
                n = sum(k for k, _ in sizes)
                if n > most:
                    whose = (f"client {group[0]}'s update" if view.per_client else
                             f"the {a.view} view's update ({len(group)} clients)")
                    raise ConfigError(
                        f"attacks[{i}] ({a.name}): {why}, but {whose} in round {r} holds "
                        f"{n} images ({sizes[0][1]}); change the attack's parameters or "
                        "the federation")


def check_metrics(cfg: ExperimentConfig) -> None:
    """``metrics.identity_model`` is loaded now (safetensors only), not after training: a
    directory that is not an identity model, or holds a pickle, is a one-line DataError."""
    if cfg.metrics.identity_model is not None:
        load_identity(cfg.metrics.identity_model)


def check_data(cfg: ExperimentConfig) -> None:
    """Load and partition the data as the clients will (DataError / ConfigError if not)."""
    # lazy: keeps flwr, scipy out of this module's import
    from fl_sim.federation.client_app import load_partitions, load_splits
    data_json = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
    partition_json = json.dumps(cfg.partition.model_dump(mode="json"), sort_keys=True)
    load_splits(data_json)
    load_partitions(data_json, partition_json, cfg.federation.num_clients, cfg.run.seed)


def check_audit_data(cfg: ExperimentConfig) -> None:
    """Draw the canary examples as the clients will: more canaries than the test split
    holds is a one-line ConfigError here, not a failure in every client."""
    if any(a.name == "canary_examples" for a in cfg.audits):
        # lazy: keeps scipy out of this module's import
        from fl_sim.federation.canary_data import canary_examples
        canary_examples(cfg)
