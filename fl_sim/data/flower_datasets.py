"""Flower's data layer (``flwr-datasets``) over LOCAL files: FederatedDataset and partitioners.

A Flower user's data setup, e.g.::

    fds = FederatedDataset(dataset="parquet", data_files={"train": "train.parquet",
                                                          "test": "test.parquet"},
                           partitioners={"train": DirichletPartitioner(
                               num_partitions=10, partition_by="label", alpha=0.5)})

runs unchanged in fl-sim as::

    [data]
    name = "flwr_datasets"
    dataset = "parquet"
    data_files = {train = "train.parquet", test = "test.parquet"}
    [partition]
    name = "flwr_datasets"
    partitioner = "DirichletPartitioner"
    options = {partition_by = "label", alpha = 0.5}

The source loads the splits through ``FederatedDataset`` (same shuffle, same seed = 42 by
default, so a split's order is the one the user's code sees); the partitioner instantiates the
named class of ``flwr_datasets.partitioner`` with ``num_partitions = num_clients`` and asks it
for every partition. Or, from Python, :func:`from_federated_dataset` takes the user's own
``FederatedDataset`` object and its partitioner. Only local builders (``parquet``, ``arrow``,
``csv``, ``json``, ``imagefolder``) and existing local files are accepted, with the Hugging
Face libraries forced offline: nothing is downloaded. Needs the ``flwr-datasets`` extra.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fl_sim.data import readers
from fl_sim.data.sources import _check_params, _finish, _Split, _split
from fl_sim.data.types import DataSplits
from fl_sim.errors import ConfigError, DataError
from fl_sim.registry import DATA_SOURCES, PARTITIONERS

LOCAL_BUILDERS = ("parquet", "arrow", "csv", "json", "imagefolder")
_INDEX = "__fl_sim_index__"


def _offline() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _require_flwr_datasets() -> Any:
    _offline()
    try:
        import flwr_datasets  # lazy: keeps flwr-datasets out of this module's import
    except ImportError:
        raise ConfigError("data 'flwr_datasets' needs the flwr-datasets package: pip install "
                          "'fl-sim[flwr-datasets]'") from None
    return flwr_datasets


def _local_files(data_files: str | list[str] | Mapping[str, Any]) -> dict[str, list[str]]:
    """``data_files`` as split -> list of existing local paths; DataError naming a missing one."""
    if isinstance(data_files, str | Path):
        data_files = {"train": [data_files]}
    elif isinstance(data_files, list):
        data_files = {"train": data_files}
    out: dict[str, list[str]] = {}
    for split, files in dict(data_files).items():
        files = [files] if isinstance(files, str | Path) else list(files)
        for f in files:
            if "://" in str(f):
                raise ConfigError(f"data.data_files.{split}: {f} is not a local path; fl-sim "
                                  "never downloads")
            if not Path(f).exists():
                raise DataError(f"{f}: file not found (data.data_files.{split})")
        out[str(split)] = [str(f) for f in files]
    if not out:
        raise ConfigError("data.data_files: empty; give {train = \"...\", test = \"...\"}")
    return out


def _to_numpy_images(column: list[Any], where: str) -> np.ndarray:
    """A column of PIL images / arrays / nested lists -> uint8 [N, H, W, C] or float NCHW."""

    first = column[0]
    if hasattr(first, "convert"):  # PIL (datasets' Image feature)
        mode = "L" if all(im.mode in ("1", "L") for im in column) else "RGB"
        x = np.stack([np.asarray(im.convert(mode), np.uint8) for im in column])
    else:
        x = np.asarray(column)
        if x.dtype.kind in "iu" and x.size and x.min() >= 0 and x.max() <= 255:
            x = x.astype(np.uint8)
    return readers.check_images(x, where)


def dataset_to_split(ds: Any, *, image_column: str, label_column: str,
                     group_column: str | None, where: str) -> _Split:
    """A ``datasets.Dataset`` -> validated numpy arrays (images, labels, optional groups)."""

    missing = [c for c in (image_column, label_column, group_column)
               if c is not None and c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: no column {missing[0]!r}; columns: {ds.column_names}")
    x = _to_numpy_images(ds[image_column], f"{where} [{image_column}]")
    y = readers.check_labels(np.asarray(ds[label_column]), f"{where} [{label_column}]")
    readers.check_pair(x, y, where)
    groups = None
    if group_column is not None:
        raw = np.asarray(ds[group_column])
        groups = np.unique(raw, return_inverse=True)[1].astype(np.int64)  # any id -> 0..G-1
    return _Split(x, y, groups)


@DATA_SOURCES.register("flwr_datasets")
def flwr_datasets(*, data_files: Any, dataset: str = "parquet", image_column: str = "img",
                  label_column: str = "label", group_column: str | None = None,
                  train_split: str = "train", test_split: str = "test",
                  test_fraction: float = 0.2, shuffle: bool = True, shuffle_seed: int = 42,
                  seed: int = 0, cache_dir: Path | None = None, image_size: int | None = None,
                  channels: int | None = None, max_train: int | None = None,
                  max_test: int | None = None) -> DataSplits:
    """Splits of a local data set read through ``flwr_datasets.FederatedDataset`` (module doc).

    ``data_files``: a path, a list of paths (one ``train`` split) or ``{split: path(s)}``.
    Without a ``test_split`` in the files, the train split is split by ``test_fraction``
    (seeded by ``seed``). ``shuffle`` / ``shuffle_seed`` are FederatedDataset's ``shuffle`` /
    ``seed`` (Flower's default 42, so the order is the user's). ``group_column`` (e.g. a
    writer id) becomes the groups (``by_identity``, ``NaturalIdPartitioner``).

    Raises:
        ConfigError: a non-local builder or URL, flwr-datasets not installed.
        DataError: a missing file or column, naming it.
    """
    _check_params(image_size=image_size, channels=channels, max_train=max_train,
                  max_test=max_test, test_fraction=test_fraction)
    if dataset not in LOCAL_BUILDERS:
        raise ConfigError(f"data.dataset: got {dataset!r}; only local builders are allowed: "
                          f"{', '.join(LOCAL_BUILDERS)} (fl-sim never downloads)")
    files = _local_files(data_files)
    if train_split not in files:
        raise ConfigError(f"data.train_split: {train_split!r} not in data_files "
                          f"({sorted(files)})")
    fd = _require_flwr_datasets()
    kw: dict[str, Any] = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    fds = fd.FederatedDataset(dataset=dataset, partitioners={train_split: 1}, shuffle=shuffle,
                              seed=shuffle_seed, data_files=files, **kw)
    cols = {"image_column": image_column, "label_column": label_column,
            "group_column": group_column}
    where = f"{files[train_split][0]}"
    try:
        train = dataset_to_split(fds.load_split(train_split), where=where, **cols)
        if test_split in files:
            test = dataset_to_split(fds.load_split(test_split),
                                    where=files[test_split][0], **cols)
        else:
            train, test = _split(train, test_fraction=test_fraction, seed=seed, where=where)
    except (ValueError, OSError) as exc:  # datasets' own errors for unreadable files
        raise DataError(f"{where}: unreadable through flwr-datasets ({exc})") from None
    return _finish(Path(where).stem, train, test, where=where, image_size=image_size,
                   channels=channels, max_train=max_train, max_test=max_test)


def partition_indices(partitioner: Any, labels: np.ndarray,
                      groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Every partition of a ``flwr_datasets`` partitioner over ``labels`` (column ``label``)
    and ``groups`` (column ``group``) as sorted int64 index arrays.

    The partitioner sees a ``datasets.Dataset`` of those columns plus a row index, and
    returns its partitions as rows; the indices are read back from them.
    """
    import datasets  # lazy: keeps datasets out of this module's import

    cols: dict[str, Any] = {"label": labels.tolist(), _INDEX: list(range(len(labels)))}
    if groups is not None:
        cols["group"] = np.asarray(groups).tolist()
    partitioner.dataset = datasets.Dataset.from_dict(cols)
    return [np.sort(np.asarray(partitioner.load_partition(i)[_INDEX], np.int64))
            for i in range(partitioner.num_partitions)]


@PARTITIONERS.register("flwr_datasets")
def flwr_partitioner(labels: np.ndarray, num_clients: int, *, rng: np.random.Generator,
                     partitioner: str = "IidPartitioner", options: dict[str, Any] | None = None,
                     groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Partition with ``flwr_datasets.partitioner.<partitioner>(num_partitions=num_clients,
    **options)``; ``partition_by`` may be ``"label"`` or ``"group"`` (the source's groups).
    A partitioner that takes ``seed`` gets one drawn from ``rng`` unless ``options`` sets it.

    Raises:
        ConfigError: an unknown partitioner (lists them), options it refuses, an unknown
        ``partition_by`` column.
    """

    _require_flwr_datasets()
    # lazy: keeps flwr-datasets out of this module's import
    from flwr_datasets import partitioner as module

    known = sorted(n for n in dir(module) if n.endswith("Partitioner") and n != "Partitioner")
    cls = getattr(module, partitioner, None)
    if partitioner not in known or cls is None:
        raise ConfigError(f"partition.partitioner: got {partitioner!r}; known: "
                          f"{', '.join(known)}")
    opts = dict(options or {})
    by = opts.get("partition_by")
    if by is not None and by not in ("label", "group"):
        raise ConfigError(f"partition.options.partition_by: got {by!r}; fl-sim hands the "
                          "partitioner the columns 'label' and 'group' (the source's groups)")
    if by == "group" and groups is None:
        raise ConfigError("partition.options.partition_by: 'group' but the data source has "
                          "no groups (set data.group_column)")
    params = inspect.signature(cls).parameters
    if "seed" in params and "seed" not in opts:
        opts["seed"] = int(rng.integers(2**31))
    if "num_partitions" in params:  # NaturalIdPartitioner: one partition per id instead
        opts["num_partitions"] = num_clients
    try:
        obj = cls(**opts)
        parts = partition_indices(obj, labels, groups)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"partition: {partitioner}({', '.join(opts)}): {exc}") from None
    if len(parts) != num_clients:
        raise ConfigError(f"partition: {partitioner} made {len(parts)} partitions for "
                          f"{num_clients} clients; set federation.num_clients = {len(parts)}")
    return parts


def from_federated_dataset(fds: Any, *, image_column: str = "img", label_column: str = "label",
                           train_split: str = "train", test_split: str = "test",
                           group_column: str | None = None) -> tuple[DataSplits, list[np.ndarray]]:
    """The user's own ``FederatedDataset`` (local files) -> fl-sim splits and one index array
    per partition of its ``train_split`` partitioner.

    Client ``i`` gets exactly the rows of ``fds.load_partition(i, train_split)`` (every column
    was visible to the partitioner, as in the user's code): the train split is their
    concatenation in partition order, so partition ``i`` is one contiguous index range (rows
    that no partition holds are left out). Raises DataError for a missing split or column.
    """
    import datasets  # lazy: keeps datasets out of this module's import

    _offline()
    try:
        num = fds.partitioners[train_split].num_partitions
        rows = [fds.load_partition(i, train_split) for i in range(num)]
        test_ds = fds.load_split(test_split)
    except (KeyError, ValueError) as exc:
        raise DataError(f"FederatedDataset: {exc}") from None
    cols = {"image_column": image_column, "label_column": label_column,
            "group_column": group_column}
    train = dataset_to_split(datasets.concatenate_datasets(rows),
                             where=f"FederatedDataset[{train_split}]", **cols)
    test = dataset_to_split(test_ds, where=f"FederatedDataset[{test_split}]", **cols)
    ends = np.cumsum([len(r) for r in rows])
    parts = [np.arange(e - len(r), e, dtype=np.int64) for r, e in zip(rows, ends, strict=True)]
    splits = _finish(f"federated-{train_split}", train, test, where="FederatedDataset",
                     image_size=None, channels=None, max_train=None, max_test=None)
    return splits, parts


__all__ = ["flwr_datasets", "flwr_partitioner", "from_federated_dataset",
           "partition_indices"]
