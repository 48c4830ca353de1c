"""Plain-data containers for image datasets: :class:`ImageData` and :class:`DataSplits`.

These types import only torch, so attacks and metrics may use them without pulling in flwr.
Images are always float32 NCHW in [0, 1]; normalisation happens in one place,
:class:`fl_sim.data.transforms.Normalization`, inside each task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fl_sim.data.transforms import Normalization
from fl_sim.errors import DataError

Indices = Sequence[int] | np.ndarray | Tensor


@dataclass(frozen=True)
class ImageData:
    """One split of an image-classification dataset.

    ``images``: [N, C, H, W] float32 in [0, 1]; ``labels``: [N] int64 in ``0..num_classes-1``;
    ``groups``: optional [N] int64 group id per sample (e.g. the person in a face dataset),
    used by the ``by_identity`` partitioner; ``attributes``: optional [N, A] int64 binary
    attributes per sample (CelebA's 40; names in :attr:`DataSplits.attribute_names`).

    Raises:
        DataError: if shapes, dtypes or counts are inconsistent.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    groups: Tensor | None = None
    attributes: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.float32:
            raise DataError(f"ImageData.images must be float32 [N, C, H, W]; got "
                            f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or self.labels.dtype != torch.int64:
            raise DataError(f"ImageData.labels must be int64 [N]; got "
                            f"{self.labels.dtype} {tuple(self.labels.shape)}")
        n = self.images.shape[0]
        if self.labels.shape[0] != n:
            raise DataError(f"ImageData: {n} images but {self.labels.shape[0]} labels")
        if self.groups is not None and tuple(self.groups.shape) != (n,):
            raise DataError(f"ImageData: {n} images but groups of shape "
                            f"{tuple(self.groups.shape)}")
        if self.attributes is not None and (self.attributes.dim() != 2
                                            or self.attributes.shape[0] != n):
            raise DataError(f"ImageData: {n} images but attributes of shape "
                            f"{tuple(self.attributes.shape)}; expected [{n}, A]")
        if self.num_classes < 1:
            raise DataError(f"ImageData.num_classes must be >= 1; got {self.num_classes}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Indices) -> ImageData:
        """The samples at ``indices`` (any int sequence / array / tensor), same ``num_classes``."""
        if not isinstance(indices, Tensor):
            indices = torch.from_numpy(np.asarray(indices, dtype=np.int64).reshape(-1))
        idx = indices.to(torch.int64)
        groups = self.groups[idx] if self.groups is not None else None
        attributes = self.attributes[idx] if self.attributes is not None else None
        return ImageData(self.images[idx], self.labels[idx], self.num_classes, groups,
                         attributes)


@dataclass(frozen=True)
class DataSplits:
    """A dataset's train and test splits plus its per-channel normalisation statistics.

    ``mean``/``std`` have one entry per channel. Published constants are used for MNIST and
    CIFAR-10 loaded by their own sources; every other source computes them from its train
    split (see :func:`fl_sim.data.sources.channel_stats`). ``class_names`` (label k ->
    name) and ``attribute_names`` (column a of ``attributes`` -> name) are empty when the
    source has none.
    """

    train: ImageData
    test: ImageData
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    class_names: tuple[str, ...] = ()
    attribute_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        shape_train = tuple(self.train.images.shape[1:])
        shape_test = tuple(self.test.images.shape[1:])
        if shape_train != shape_test:
            raise DataError(f"{self.name}: train images {shape_train} but test images "
                            f"{shape_test}")
        for part in (self.train, self.test):
            width = 0 if part.attributes is None else int(part.attributes.shape[1])
            if width != len(self.attribute_names):
                raise DataError(f"{self.name}: {len(self.attribute_names)} attribute names "
                                f"but attributes of width {width}")
        if not len(self.mean) == len(self.std) == self.in_channels:
            raise DataError(f"{self.name}: {self.in_channels} channels but mean/std of length "
                            f"{len(self.mean)}/{len(self.std)}")

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        """Side length of the (square) images."""
        return int(self.train.images.shape[-1])

    @property
    def num_classes(self) -> int:
        return max(self.train.num_classes, self.test.num_classes)

    @property
    def normalization(self) -> Normalization:
        return Normalization(self.mean, self.std)
