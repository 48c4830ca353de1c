"""Registered data sources: each loads one dataset from local disk into :class:`DataSplits`.

Names (``[data] name = ...``): ``digits`` (default; scikit-learn's bundled 8x8 digits, no files
needed), ``npz``, ``image_folder``, ``mnist`` (idx files) and ``cifar10`` (python batches).
Nothing is ever downloaded. Every source takes keyword-only parameters, including
``max_train`` / ``max_test`` caps (the first N samples of each split, deterministic), and
raises :class:`~fl_sim.errors.DataError` naming the file and the problem for bad input, or
:class:`~fl_sim.errors.ConfigError` for a bad parameter.

Normalisation statistics (``DataSplits.mean``/``std``): ``mnist`` and ``cifar10`` use the
published constants (with ``stats="published"``, when the channel count is unchanged); every
other case computes per-channel mean/std from the final (capped, resized) train split.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fl_sim.data import readers
from fl_sim.data.transforms import convert_channels, resize, to_float01
from fl_sim.data.types import DataSplits, ImageData
from fl_sim.errors import ConfigError, DataError
from fl_sim.registry import DATA_SOURCES
from fl_sim.seeding import numpy_rng

logger = logging.getLogger(__name__)

MNIST_STATS = ((0.1307,), (0.3081,))
CIFAR10_STATS = ((0.4915, 0.4823, 0.4468), (0.2470, 0.2435, 0.2616))
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
Stats = Literal["published", "computed"]


@dataclass(frozen=True)
class _Split:
    """Validated arrays of one split: images uint8 NHWC or float32 NCHW, int64 labels."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None
    attributes: np.ndarray | None = None  # [N, A] binary, e.g. CelebA's 40

    def head(self, n: int | None) -> _Split:
        return self if n is None else self.take(slice(0, n))

    def take(self, idx: np.ndarray | slice) -> _Split:
        g = self.groups[idx] if self.groups is not None else None
        a = self.attributes[idx] if self.attributes is not None else None
        return _Split(self.x[idx], self.y[idx], g, a)


def load_data(name: str, **params: Any) -> DataSplits:
    """Load data source ``name`` with ``params`` validated against its signature.

    Raises:
        PluginError: unknown source. ConfigError: bad parameter. DataError: bad file.
    """
    return DATA_SOURCES.create(name, _where="data", **params)


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of [N, C, H, W] images, rounded to 4 digits; std 0 -> 1."""
    x = images.to(torch.float64).transpose(0, 1).reshape(images.shape[1], -1)
    mean = tuple(round(float(m), 4) for m in x.mean(dim=1))
    std = tuple(r if r > 0 else 1.0  # rounded first: a std of 3e-5 must not become 0.0
                for r in (round(float(s), 4) for s in x.std(dim=1, correction=0)))
    return mean, std


# -- parameter checks and the shared finishing pipeline -------------------------------------
def _check_params(*, image_size: int | None = None, channels: int | None = None,
                  max_train: int | None = None, max_test: int | None = None,
                  test_fraction: float | None = None) -> None:
    if image_size is not None and image_size < 1:
        raise ConfigError(f"data.image_size: must be >= 1 (got {image_size})")
    if channels is not None and channels not in (1, 3):
        raise ConfigError(f"data.channels: must be 1 or 3 (got {channels})")
    for key, cap in (("max_train", max_train), ("max_test", max_test)):
        if cap is not None and cap < 1:
            raise ConfigError(f"data.{key}: must be >= 1 (got {cap})")
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction: must be in (0, 1) (got {test_fraction})")


def _split(data: _Split, *, test_fraction: float, seed: int, where: str
           ) -> tuple[_Split, _Split]:
    """Random train/test split of one array set, from ``numpy_rng(seed, "data", "split")``."""
    n = data.y.shape[0]
    n_test = int(round(n * test_fraction))
    if not 0 < n_test < n:
        raise DataError(f"{where}: {n} samples cannot be split with test_fraction "
                        f"{test_fraction}")
    perm = numpy_rng(seed, "data", "split").permutation(n)
    return data.take(np.sort(perm[n_test:])), data.take(np.sort(perm[:n_test]))


def _to_tensor(x: np.ndarray) -> Tensor:
    return to_float01(x) if x.dtype == np.uint8 else torch.from_numpy(np.array(x, np.float32))


def _image_data(s: _Split, num_classes: int, *, image_size: int | None,
                channels: int | None, where: str) -> ImageData:
    images = _to_tensor(s.x)
    if channels is not None:
        try:
            images = convert_channels(images, channels)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
    if image_size is not None or images.shape[-1] != images.shape[-2]:
        images = resize(images, image_size or min(images.shape[-2:]))
    groups = torch.from_numpy(s.groups.astype(np.int64)) if s.groups is not None else None
    attributes = (torch.from_numpy(s.attributes.astype(np.int64))
                  if s.attributes is not None else None)
    return ImageData(images.contiguous(), torch.from_numpy(np.array(s.y, np.int64)),
                     num_classes, groups, attributes)


def _check_memory(train: _Split, test: _Split, *, image_size: int | None,
                  channels: int | None, where: str) -> None:
    """ConfigError if the float32 [N, C, S, S] images would need more than half of this
    machine's memory (every client process holds its own copy): e.g. ``image_size = 100000``
    fails here in one line instead of being killed while resizing."""
    x = train.x
    c = channels or (x.shape[-1] if x.dtype == np.uint8 else x.shape[1])
    side = image_size or min(x.shape[-3:-1] if x.dtype == np.uint8 else x.shape[-2:])
    need = (len(train.y) + len(test.y)) * c * side * side * 4
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound
        return
    if need > have // 2:
        raise ConfigError(f"{where}: {len(train.y) + len(test.y)} images of {c}x{side}x{side} "
                          f"need {need / 2**30:.1f} GiB as float32, more than half of this "
                          f"machine's {have / 2**30:.0f} GiB; lower data.image_size or cap "
                          "max_train / max_test")


def _finish(name: str, train: _Split, test: _Split, *, where: str, image_size: int | None,
            channels: int | None, max_train: int | None, max_test: int | None,
            published: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
            num_classes: int | None = None, class_names: tuple[str, ...] = (),
            attribute_names: tuple[str, ...] = ()) -> DataSplits:
    """Cap, convert to [0, 1] NCHW tensors, set channels/size, attach normalisation stats.

    ``num_classes`` defaults to the largest label + 1 (a source with a fixed label set, e.g.
    CIFAR-100, passes it so that a capped split keeps every class)."""
    train, test = train.head(max_train), test.head(max_test)
    num_classes = num_classes or int(max(train.y.max(), test.y.max())) + 1
    _check_memory(train, test, image_size=image_size, channels=channels, where=where)
    kw: dict[str, Any] = {"image_size": image_size, "channels": channels, "where": where}
    tr, te = _image_data(train, num_classes, **kw), _image_data(test, num_classes, **kw)
    if published is not None and len(published[0]) == tr.images.shape[1]:
        mean, std = published
    else:
        mean, std = channel_stats(tr.images)
    logger.debug("%s: %d train / %d test images %s, %d classes", name, len(tr), len(te),
                 tuple(tr.images.shape[1:]), num_classes)
    return DataSplits(tr, te, tuple(mean), tuple(std), name, class_names, attribute_names)


# -- sources --------------------------------------------------------------------------------
@DATA_SOURCES.register("digits")
def digits(*, image_size: int = 32, channels: int = 1, test_fraction: float = 0.2,
           seed: int = 0, max_train: int | None = None, max_test: int | None = None
           ) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), upsampled.

    Pixel values 0..16 are scaled to [0, 1] and resized bilinearly to ``image_size``;
    ``channels=3`` repeats the gray channel. Split by ``test_fraction`` with ``seed``.
    """
    _check_params(image_size=image_size, channels=channels, max_train=max_train,
                  max_test=max_test, test_fraction=test_fraction)
    from sklearn.datasets import load_digits  # lazy: keeps scikit-learn out of this module's import

    x, y = load_digits(return_X_y=True)
    images = (x.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    data = _Split(images, y.astype(np.int64))
    train, test = _split(data, test_fraction=test_fraction, seed=seed, where="digits")
    return _finish("digits", train, test, where="digits", image_size=image_size,
                   channels=channels, max_train=max_train, max_test=max_test)


_NPZ_PAIRS = (("x_train", "y_train"), ("x_test", "y_test"), ("x", "y"))


def _npz_split(arrays: dict[str, np.ndarray], xk: str, yk: str, groups_key: str | None,
               path: Path) -> _Split:
    x = readers.check_images(arrays[xk], f"{path} [{xk}]")
    y = readers.check_labels(arrays[yk], f"{path} [{yk}]")
    readers.check_pair(x, y, f"{path} [{xk}, {yk}]")
    groups = None
    if groups_key is not None:
        gk = groups_key + xk[1:]  # "x_train" -> "<groups_key>_train"
        if gk not in arrays:
            raise DataError(f"{path}: groups key '{gk}' missing; keys: {sorted(arrays)}")
        groups = readers.check_labels(arrays[gk], f"{path} [{gk}]")
        readers.check_pair(x, groups, f"{path} [{xk}, {gk}]")
    return _Split(x, y, groups)


@DATA_SOURCES.register("npz")
def npz(*, path: Path, image_size: int | None = None, channels: int | None = None,
        test_fraction: float = 0.2, seed: int = 0, groups_key: str | None = None,
        max_train: int | None = None, max_test: int | None = None) -> DataSplits:
    """Images and labels from a local ``.npz`` file (loaded without pickle).

    Keys: ``x_train``/``y_train`` + ``x_test``/``y_test``, or a single pair (``x``/``y``, or
    only the train or only the test pair) which is split by ``test_fraction`` with ``seed``.
    Images: uint8 [N, H, W, C] or [N, H, W], or float [N, C, H, W] in [0, 1]; labels: int [N].
    ``groups_key`` names per-sample group ids (``"y"`` for Olivetti faces: the person), read
    from ``<groups_key>``, ``<groups_key>_train``, ``<groups_key>_test`` like the labels.
    """
    _check_params(image_size=image_size, channels=channels, max_train=max_train,
                  max_test=max_test, test_fraction=test_fraction)
    path = Path(path)
    arrays = readers.read_npz(path)
    present = [(xk, yk) for xk, yk in _NPZ_PAIRS if xk in arrays and yk in arrays]
    if not present:
        raise DataError(f"{path}: wrong keys {sorted(arrays)}; expected x/y or "
                        "x_train/y_train/x_test/y_test")
    if present[:2] == list(_NPZ_PAIRS[:2]):
        train = _npz_split(arrays, "x_train", "y_train", groups_key, path)
        test = _npz_split(arrays, "x_test", "y_test", groups_key, path)
        if train.x.shape[1:] != test.x.shape[1:] or train.x.dtype != test.x.dtype:
            raise DataError(f"{path}: x_train {train.x.dtype} {train.x.shape[1:]} and x_test "
                            f"{test.x.dtype} {test.x.shape[1:]} differ")
    else:
        xk, yk = present[0]
        train, test = _split(_npz_split(arrays, xk, yk, groups_key, path),
                             test_fraction=test_fraction, seed=seed, where=str(path))
    return _finish(path.stem, train, test, where=str(path), image_size=image_size,
                   channels=channels, max_train=max_train, max_test=max_test)


@DATA_SOURCES.register("image_folder")
def image_folder(*, path: Path, image_size: int | None = None, channels: int | None = None,
                 test_fraction: float = 0.2, seed: int = 0, max_train: int | None = None,
                 max_test: int | None = None) -> DataSplits:
    """PNG/JPEG images in one sub-directory per class (sorted names -> labels 0, 1, ...).

    Either ``path/<class>/*`` (split by ``test_fraction`` with ``seed``) or
    ``path/train/<class>/*`` + ``path/test/<class>/*``. Images are centre-cropped to squares;
    ``image_size`` resizes them (required when sizes differ); ``channels=None`` keeps gray
    when every image is gray, else RGB.
    """
    _check_params(image_size=image_size, channels=channels, max_train=max_train,
                  max_test=max_test, test_fraction=test_fraction)
    root = Path(path)
    dirs = readers.class_dirs(root)
    kw: dict[str, Any] = {"channels": channels, "image_size": image_size}
    if [d.name for d in dirs] == ["test", "train"]:
        classes = [d.name for d in readers.class_dirs(root / "train")]
        unknown = sorted({d.name for d in readers.class_dirs(root / "test")} - set(classes))
        if unknown:
            raise DataError(f"{root / 'test'}: classes {unknown} not in {root / 'train'}")
        train = _Split(*readers.read_image_folder(root / "train", classes, **kw))
        test = _Split(*readers.read_image_folder(root / "test", classes, **kw))
        if train.x.shape[1:] != test.x.shape[1:]:
            raise DataError(f"{root}: train images {train.x.shape[1:]} but test images "
                            f"{test.x.shape[1:]}; set image_size and channels")
    else:
        classes = [d.name for d in dirs]
        data = _Split(*readers.read_image_folder(root, classes, **kw))
        train, test = _split(data, test_fraction=test_fraction, seed=seed, where=str(root))
    return _finish(root.name, train, test, where=str(root), image_size=image_size,
                   channels=channels, max_train=max_train, max_test=max_test)


@DATA_SOURCES.register("mnist")
def mnist(*, path: Path, image_size: int | None = None, channels: int | None = None,
          stats: Stats = "published", max_train: int | None = None,
          max_test: int | None = None) -> DataSplits:
    """MNIST (or Fashion-MNIST) from a local directory of the standard idx files.

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
    ``stats="published"`` uses MNIST's (0.1307,)/(0.3081,); use ``"computed"`` for
    Fashion-MNIST or other idx data.
    """
    _check_params(image_size=image_size, channels=channels, max_train=max_train,
                  max_test=max_test)
    root = readers.require_dir(Path(path))
    splits = []
    for split, cap in (("train", max_train), ("test", max_test)):
        img_file, lab_file = (readers.find_idx(root, stem) for stem in MNIST_FILES[split])
        x = readers.check_images(readers.read_idx(img_file, ndim=3), str(img_file))
        y = readers.check_labels(readers.read_idx(lab_file, ndim=1), str(lab_file))
        readers.check_pair(x, y, f"{img_file}, {lab_file}")
        splits.append(_Split(x, y).head(cap))
    return _finish("mnist", splits[0], splits[1], where=str(root), image_size=image_size,
                   channels=channels, max_train=max_train, max_test=max_test,
                   published=MNIST_STATS if stats == "published" else None)


@DATA_SOURCES.register("cifar10")
def cifar10(*, path: Path, image_size: int | None = None, channels: int | None = None,
            stats: Stats = "published", max_train: int | None = None,
            max_test: int | None = None) -> DataSplits:
    """CIFAR-10 from a local copy of the python batches (``cifar-10-batches-py``).

    ``path`` is that directory or its parent; it must hold ``data_batch_1`` .. ``data_batch_5``
    and ``test_batch`` (batches past ``max_train`` are not read). The batches are pickles
    (the published format): they are read with a numpy-only unpickler and only from here.
    """
    _check_params(image_size=image_size, channels=channels, max_train=max_train,
                  max_test=max_test)
    root = readers.find_cifar_dir(Path(path))
    xs, ys = [], []
    for i in range(1, 6):
        if max_train is not None and sum(len(y) for y in ys) >= max_train:
            break
        x, y = readers.read_cifar_batch(root / f"data_batch_{i}")
        xs.append(x)
        ys.append(y)
    train = _Split(np.concatenate(xs), np.concatenate(ys))
    test = _Split(*readers.read_cifar_batch(root / "test_batch"))
    return _finish("cifar10", train, test, where=str(root), image_size=image_size,
                   channels=channels, max_train=max_train, max_test=max_test,
                   published=CIFAR10_STATS if stats == "published" else None)
