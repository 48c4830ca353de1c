"""CIFAR-100 (Krizhevsky 2009) from a local copy of its python pickles.

``[data] name = "cifar100"``, ``path`` = ``cifar-100-python/`` or its parent, holding
``train`` (50,000 images), ``test`` (10,000) and ``meta`` (label names). ``label = "fine"``
(100 classes, default) or ``"coarse"`` (20 superclasses); ``DataSplits.class_names`` holds
the names from ``meta``. The pickles are read with the same numpy-only unpickler as
CIFAR-10's batches, from the user's path only. Nothing is downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fl_sim.data import readers
from fl_sim.data.sources import Stats, _check_params, _finish, _Split
from fl_sim.data.types import DataSplits
from fl_sim.errors import DataError
from fl_sim.registry import DATA_SOURCES

#: Per-channel mean / std of the 50,000 training images (the values used with CIFAR-100
#: throughout the literature, e.g. the Inverting Gradients code).
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
NUM_CLASSES = {"fine": 100, "coarse": 20}


def _unpickle(path: Path) -> dict[bytes, Any]:
    readers.require_file(path)
    try:
        with path.open("rb") as f:
            obj = readers._NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a CIFAR-100 python pickle ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict; got {type(obj).__name__}")
    return obj


def read_cifar100(path: Path, label: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-100 pickle (``train`` or ``test``) -> (uint8 [N, 32, 32, 3], int64 [N]).

    Raises :class:`DataError` for a missing key (naming the keys present) or a bad shape.
    """
    obj = _unpickle(path)
    key = f"{label}_labels".encode()
    if b"data" not in obj or key not in obj:
        raise DataError(f"{path}: expected b'data' and {key!r}; got {sorted(obj)}")
    data = np.asarray(obj[b"data"])
    labels = readers.check_labels(np.asarray(obj[key]), f"{path} [{key.decode()}]")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' is {data.dtype} {data.shape}; expected uint8 "
                        "[N, 3072]")
    readers.check_pair(data, labels, str(path))
    if int(labels.max()) >= NUM_CLASSES[label]:
        raise DataError(f"{path}: {label} label {int(labels.max())} >= {NUM_CLASSES[label]}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_label_names(path: Path, label: str) -> tuple[str, ...]:
    """``meta``'s ``fine_label_names`` / ``coarse_label_names`` as strings."""
    key = f"{label}_label_names".encode()
    obj = _unpickle(path)
    names = obj.get(key)
    if not isinstance(names, list) or len(names) != NUM_CLASSES[label]:
        raise DataError(f"{path}: {key!r} missing or not {NUM_CLASSES[label]} names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def find_cifar100_dir(path: Path) -> Path:
    """``path`` itself or ``path/cifar-100-python``, whichever holds ``test``."""
    readers.require_dir(path)
    for candidate in (path, path / "cifar-100-python"):
        if (candidate / "test").is_file() and (candidate / "train").is_file():
            return candidate
    raise DataError(f"{path}: no CIFAR-100 python pickles (train, test, meta) here or in "
                    "cifar-100-python/")


@DATA_SOURCES.register("cifar100")
def cifar100(*, path: Path, label: Literal["fine", "coarse"] = "fine",
             image_size: int | None = None, channels: int | None = None,
             stats: Stats = "published", max_train: int | None = None,
             max_test: int | None = None) -> DataSplits:
    """CIFAR-100 train/test with fine (100) or coarse (20) labels and their names.

    ``stats="published"`` uses :data:`CIFAR100_STATS` (3 channels), else computed.

    Raises:
        ConfigError: bad sizes or caps. DataError: missing / malformed pickle, naming it.
    """
    _check_params(image_size=image_size, channels=channels, max_train=max_train,
                  max_test=max_test)
    root = find_cifar100_dir(Path(path))
    train = _Split(*read_cifar100(root / "train", label))
    test = _Split(*read_cifar100(root / "test", label))
    names = read_label_names(root / "meta", label)
    kw: dict[str, Any] = {"image_size": image_size, "channels": channels}
    return _finish(f"cifar100-{label}", train, test, where=str(root), max_train=max_train,
                   max_test=max_test, published=CIFAR100_STATS if stats == "published" else None,
                   num_classes=NUM_CLASSES[label], class_names=names, **kw)
