"""Registered partitioners: split a dataset's sample indices over federated clients.

Every partitioner is a pure function
``fn(labels: np.ndarray, num_clients: int, *, rng: np.random.Generator, **own_params)
-> list[np.ndarray]`` returning one sorted int64 index array per client; arrays are
disjoint. All randomness comes from ``rng`` (:func:`partition_dataset` derives it from the
run seed), so the same seed gives the same partition. Names: ``iid``, ``dirichlet``,
``pathological``, ``by_identity``.

The framework passes ``labels``, ``num_clients`` and ``rng``; config sections carry only the
partitioner's own parameters (plus ``max_samples_per_client``, applied by
:func:`partition_dataset`).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np

from fl_sim.data.types import ImageData
from fl_sim.errors import ConfigError
from fl_sim.registry import PARTITIONERS
from fl_sim.seeding import numpy_rng

logger = logging.getLogger(__name__)

#: Leading parameters of every partitioner that the framework supplies (not the config).
FRAMEWORK_PARAMS = ("labels", "num_clients", "rng")


def partition_dataset(data: ImageData, name: str, num_clients: int, *, seed: int,
                      max_samples_per_client: int | None = None, **params: Any
                      ) -> list[np.ndarray]:
    """Partition ``data`` over ``num_clients`` clients with partitioner ``name``.

    The generator is ``numpy_rng(seed, "partition")``. ``data.groups`` is handed to
    partitioners that take ``groups`` (unless given in ``params``). Clients holding more than
    ``max_samples_per_client`` samples keep a random subset of that size (same generator).

    Returns:
        one sorted int64 index array into ``data`` per client, disjoint.

    Raises:
        PluginError: unknown partitioner. ConfigError: bad parameter, or a client left empty.
    """
    if num_clients < 1:
        raise ConfigError(f"federation.num_clients: must be >= 1 (got {num_clients})")
    if max_samples_per_client is not None and max_samples_per_client < 1:
        raise ConfigError("partition.max_samples_per_client: must be >= 1 "
                          f"(got {max_samples_per_client})")
    fn = PARTITIONERS.get(name)
    if ("groups" in inspect.signature(fn).parameters and "groups" not in params
            and data.groups is not None):
        params["groups"] = data.groups.numpy()
    rng = numpy_rng(seed, "partition")
    labels = data.labels.numpy()
    parts = PARTITIONERS.create(name, labels, num_clients, rng=rng, _where="partition",
                                **params)
    if max_samples_per_client is not None:
        parts = [np.sort(rng.choice(p, max_samples_per_client, replace=False))
                 if len(p) > max_samples_per_client else p for p in parts]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(f"partition '{name}': clients {empty} received no samples "
                          f"({len(labels)} samples over {num_clients} clients); use fewer "
                          "clients or other partition parameters")
    logger.debug("partition %s: client sizes %s", name, [len(p) for p in parts])
    return parts


def evaluation_share(num_test: int, num_clients: int, client_id: int, *, cap: int
                     ) -> np.ndarray:
    """Indices of the test split that ``client_id`` evaluates on (federated evaluation).

    Every ``num_clients``-th test example starting at ``client_id`` (disjoint shares), at
    most ``cap``. When clients outnumber the test examples the share starts at ``client_id
    mod num_test`` instead, so every client evaluates on one example (shared with others)
    rather than on none. Empty only for an empty test split.

    >>> evaluation_share(10, 3, 1, cap=100).tolist()
    [1, 4, 7]
    >>> evaluation_share(4, 1000, 999, cap=100).tolist()    # 999 mod 4
    [3]
    """
    if num_test <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(client_id % num_test, num_test, num_clients, dtype=np.int64)[:cap]


def _check_num_clients(labels: np.ndarray, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"federation.num_clients: must be >= 1 (got {num_clients})")
    if labels.ndim != 1:
        raise ConfigError(f"partition: labels must be [N]; got shape {labels.shape}")


def _sorted(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_clients: int, *, rng: np.random.Generator
        ) -> list[np.ndarray]:
    """Uniformly random split into ``num_clients`` parts whose sizes differ by at most one."""
    _check_num_clients(labels, num_clients)
    return _sorted(np.array_split(rng.permutation(len(labels)), num_clients))


@PARTITIONERS.register("dirichlet")
def dirichlet(labels: np.ndarray, num_clients: int, *, rng: np.random.Generator,
              alpha: float = 0.5, min_size: int = 1, max_retries: int = 100
              ) -> list[np.ndarray]:
    """Label-skewed split: each class spread over clients by proportions ~ Dir(alpha).

    As in Hsu et al. 2019 ("Measuring the effects of non-identical data distribution"):
    small ``alpha`` (0.1) gives few classes per client, large ``alpha`` (1000) is nearly IID.
    The whole draw is repeated (up to ``max_retries`` times) until every client holds at
    least ``min_size`` samples.

    Raises:
        ConfigError: ``alpha <= 0``, or ``min_size`` not reached within ``max_retries``.
    """
    _check_num_clients(labels, num_clients)
    if not alpha > 0:
        raise ConfigError(f"partition.alpha: must be > 0 (got {alpha})")
    if min_size * num_clients > len(labels):
        raise ConfigError(f"partition.min_size: {min_size} x {num_clients} clients exceeds "
                          f"the {len(labels)} samples")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for attempt in range(max(1, max_retries)):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            logger.debug("dirichlet(alpha=%s): min_size reached after %d draws", alpha,
                         attempt + 1)
            return _sorted(merged)
    raise ConfigError(f"partition: dirichlet(alpha={alpha}) left a client with fewer than "
                      f"min_size={min_size} samples after {max_retries} draws; raise alpha or "
                      "lower min_size / num_clients")


@PARTITIONERS.register("pathological")
def pathological(labels: np.ndarray, num_clients: int, *, rng: np.random.Generator,
                 classes_per_client: int = 2) -> list[np.ndarray]:
    """Each client gets ``classes_per_client`` single-class shards (McMahan et al. 2017).

    The data is cut into ``num_clients * classes_per_client`` shards that never straddle a
    class (each class gets shards in proportion to its size, at least one), and the shards are
    dealt out at random, so a client holds at most ``classes_per_client`` classes. When there
    are fewer shards than classes, randomly chosen classes are left out (logged).

    Raises:
        ConfigError: ``classes_per_client < 1``.
    """
    _check_num_clients(labels, num_clients)
    if classes_per_client < 1:
        raise ConfigError(f"partition.classes_per_client: must be >= 1 "
                          f"(got {classes_per_client})")
    classes = np.unique(labels)
    num_shards = num_clients * classes_per_client
    if num_shards < len(classes):
        kept = np.sort(rng.choice(classes, num_shards, replace=False))
        logger.warning("pathological: %d shards for %d classes; classes %s are not used",
                       num_shards, len(classes), sorted(set(classes.tolist()) - set(kept)))
        classes = kept
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    counts = _shard_counts(np.array([len(i) for i in by_class]), num_shards)
    shards = [s for idx, k in zip(by_class, counts, strict=True)
              for s in np.array_split(idx, k)]
    order = rng.permutation(len(shards))  # fewer than num_shards when a class is small
    return _sorted([np.concatenate([shards[j] for j in order[c::num_clients]])
                    for c in range(num_clients)])


def _shard_counts(sizes: np.ndarray, num_shards: int) -> np.ndarray:
    """Shards per class: one each, the rest by largest remainder of size-proportional shares."""
    counts = np.ones(len(sizes), dtype=np.int64)
    extra = num_shards - len(sizes)
    if extra > 0:
        share = sizes / sizes.sum() * extra
        counts += np.floor(share).astype(np.int64)
        rest = extra - int(np.floor(share).sum())
        counts[np.argsort(-(share - np.floor(share)), kind="stable")[:rest]] += 1
    return np.minimum(counts, np.maximum(sizes, 1))


@PARTITIONERS.register("by_identity")
def by_identity(labels: np.ndarray, num_clients: int, *, rng: np.random.Generator,
                groups: np.ndarray | None = None) -> list[np.ndarray]:
    """One identity (group, e.g. a person; the label when ``groups`` is None) per client.

    Identities are taken in sorted order; with more identities than clients they are dealt
    round-robin (client ``k`` gets identities ``k, k + n, ...``). ``rng`` is unused: the
    assignment is deterministic so that client ``k`` is always the same person.

    Raises:
        ConfigError: fewer identities than clients, or ``groups`` not of shape [N].
    """
    _check_num_clients(labels, num_clients)
    ids = labels if groups is None else np.asarray(groups)
    if ids.shape != labels.shape:
        raise ConfigError(f"partition.groups: shape {ids.shape} does not match the "
                          f"{labels.shape[0]} samples")
    unique, position = np.unique(ids, return_inverse=True)
    if len(unique) < num_clients:
        raise ConfigError(f"partition 'by_identity': {len(unique)} identities for "
                          f"{num_clients} clients; need at least one identity per client")
    # one stable sort instead of one scan per client (10,000 clients: 21 s -> 0.01 s)
    client = position.reshape(-1) % num_clients
    order = np.argsort(client, kind="stable")
    return np.split(order.astype(np.int64),
                    np.cumsum(np.bincount(client, minlength=num_clients))[:-1])
