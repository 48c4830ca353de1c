"""Every random number in a run derives from the one run seed.

``derive_seed(seed, "client", 3, "round", 2, "batches")`` hashes the seed with a purpose path,
so streams for different (round, client, purpose) never collide and do not depend on the order
in which they are created. Nothing uses the global RNGs.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *path: str | int) -> int:
    """A 63-bit seed for ``path`` under run seed ``seed``.

    >>> derive_seed(0, "client", 1) == derive_seed(0, "client", 1)
    True
    >>> derive_seed(0, "client", 1) != derive_seed(0, "client", 2)
    True
    """
    text = "/".join([str(int(seed)), *map(str, path)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def torch_generator(seed: int, *path: str | int, device: str | torch.device = "cpu"
                    ) -> torch.Generator:
    """A fresh ``torch.Generator`` seeded from ``derive_seed(seed, *path)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *path))
    return g


def numpy_rng(seed: int, *path: str | int) -> np.random.Generator:
    """A fresh ``numpy.random.Generator`` seeded from ``derive_seed(seed, *path)``."""
    return np.random.default_rng(derive_seed(seed, *path))
