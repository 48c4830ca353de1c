"""A synthetic image-classification source of any size, for population-scale runs.

``[data] name = "synthetic"``: no files at all. Each class has a smooth random prototype
(a ``4 x 4`` pattern per channel from ``numpy_rng(seed, "data", "synthetic", "prototypes")``,
upsampled bilinearly to ``image_size``); a sample is its class prototype plus Gaussian pixel
noise of standard deviation ``noise``, clipped to [0, 1]. Labels cycle through the classes in
a seeded random order, so every class has ``num_train / num_classes`` samples (+- 1). It is
learnable (the classes differ in their prototypes) but says nothing about real images: use it
to measure speed and memory with many clients (``benchmarks/scale.py``), not privacy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fl_sim.data.sources import _check_params, _finish, _Split
from fl_sim.data.types import DataSplits
from fl_sim.errors import ConfigError
from fl_sim.registry import DATA_SOURCES
from fl_sim.seeding import numpy_rng


def _samples(prototypes: np.ndarray, n: int, noise: float, rng: np.random.Generator
             ) -> _Split:
    k = prototypes.shape[0]
    labels = rng.permutation(np.arange(n) % k).astype(np.int64)
    x = prototypes[labels] + noise * rng.standard_normal((n, *prototypes.shape[1:]),
                                                         dtype=np.float32)
    return _Split(np.clip(x, 0.0, 1.0, out=x), labels)


@DATA_SOURCES.register("synthetic")
def synthetic(*, num_train: int = 60_000, num_test: int = 10_000, num_classes: int = 10,
              image_size: int = 16, channels: int = 1, noise: float = 0.3, seed: int = 0,
              max_train: int | None = None, max_test: int | None = None) -> DataSplits:
    """``num_train`` + ``num_test`` seeded synthetic images [C, S, S] in ``num_classes`` classes.

    Raises:
        ConfigError: a count or size below 1, fewer train samples than classes, or a
        negative ``noise``.
    """
    _check_params(image_size=image_size, channels=channels, max_train=max_train,
                  max_test=max_test)
    for key, value in (("num_train", num_train), ("num_test", num_test),
                       ("num_classes", num_classes)):
        if value < 1:
            raise ConfigError(f"data.{key}: must be >= 1 (got {value})")
    if num_train < num_classes:
        raise ConfigError(f"data.num_train: {num_train} samples for {num_classes} classes; "
                          "need at least one per class")
    if not noise >= 0:
        raise ConfigError(f"data.noise: must be >= 0 (got {noise})")
    small = numpy_rng(seed, "data", "synthetic", "prototypes").random(
        (num_classes, channels, 4, 4), dtype=np.float32)
    prototypes = F.interpolate(torch.from_numpy(small), size=(image_size, image_size),
                               mode="bilinear", align_corners=False).numpy()
    train = _samples(prototypes, num_train, noise, numpy_rng(seed, "data", "synthetic", "train"))
    test = _samples(prototypes, num_test, noise, numpy_rng(seed, "data", "synthetic", "test"))
    return _finish("synthetic", train, test, where="synthetic", image_size=None,
                   channels=None, max_train=max_train, max_test=max_test)
