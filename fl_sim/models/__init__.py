"""Model factories, registered in :data:`fl_sim.registry.MODELS`.

Every factory has the signature ``fn(in_channels, num_classes, image_size, *, **own_params)``;
the first three come from the data. :func:`build_model` seeds the initialisation from the run
seed without touching the caller's global RNG state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fl_sim.models import convnet, lenet, mlp, resnet, unet  # noqa: F401  (register)
from fl_sim.registry import MODELS
from fl_sim.seeding import derive_seed

__all__ = ["build_model"]


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, *,
                seed: int, params: Mapping[str, Any] | None = None,
                where: str = "model") -> nn.Module:
    """Build registered model ``name`` with a deterministic init derived from ``seed``.

    The global torch RNG is forked, seeded with ``derive_seed(seed, "model_init")`` and
    restored afterwards, so the caller's RNG state is untouched. Raises
    :class:`~fl_sim.errors.PluginError` for an unknown name and
    :class:`~fl_sim.errors.ConfigError` for bad params.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model_init"))
        return MODELS.create(name, in_channels, num_classes, image_size, _where=where,
                             **dict(params or {}))
