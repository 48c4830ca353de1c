"""How to rebuild a model + task from registry names: :class:`ModelSpec` and :func:`build_task`.

A spec is public knowledge in FL (the server ships the architecture), so it travels with every
observation record (:mod:`fl_sim.records` re-exports it) and every run directory
(``spec.json``). It lives here, beside the builder, so that records depend on tasks and not
the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fl_sim.data.transforms import Normalization
from fl_sim.models import build_model
from fl_sim.registry import TASKS

if TYPE_CHECKING:  # pragma: no cover
    from fl_sim.tasks.base import Task

__all__ = ["ModelSpec", "build_task"]


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild the model + task: registry names, their params and the data shape."""

    model: str
    model_params: Mapping[str, Any]
    task: str
    task_params: Mapping[str, Any]
    in_channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def build_task(self, *, device: str | torch.device = "cpu") -> Any:
        """A fresh task around a freshly built model (weights still to be loaded)."""
        return build_task(self, device=device)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "model_params": dict(self.model_params),
                "task": self.task, "task_params": dict(self.task_params),
                "in_channels": self.in_channels, "num_classes": self.num_classes,
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelSpec:
        return cls(model=d["model"], model_params=dict(d["model_params"]), task=d["task"],
                   task_params=dict(d["task_params"]), in_channels=int(d["in_channels"]),
                   num_classes=int(d["num_classes"]), image_size=int(d["image_size"]),
                   mean=tuple(d["mean"]), std=tuple(d["std"]))


def build_task(spec: ModelSpec, *, device: str | torch.device = "cpu", seed: int = 0) -> Task:
    """A fresh task around a freshly built model on ``device`` (init derived from ``seed``).

    Raises :class:`~fl_sim.errors.PluginError` for unknown model/task names and
    :class:`~fl_sim.errors.ConfigError` for bad params.
    """
    model = build_model(spec.model, spec.in_channels, spec.num_classes, spec.image_size,
                        seed=seed, params=spec.model_params).to(device)
    return TASKS.create(spec.task, model, Normalization(tuple(spec.mean), tuple(spec.std)),
                        _where="task", **dict(spec.task_params))
