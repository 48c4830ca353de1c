"""Tasks (what is trained), registered in :data:`fl_sim.registry.TASKS`, and their builders.

A task class has the signature ``Cls(model, normalization, *, **own_params)``; the first two
are injected by the framework. :func:`build_task` rebuilds a task from a
:class:`~fl_sim.records.ModelSpec`; :func:`task_from_config` builds one from config sections
and returns the spec that rebuilds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fl_sim.data.transforms import Normalization
from fl_sim.models import build_model
from fl_sim.records import ModelSpec
from fl_sim.registry import MODELS, TASKS, validate_params
from fl_sim.tasks import classifier, diffusion  # noqa: F401  (register)
from fl_sim.tasks.base import Batch, StepResult, Task

__all__ = ["Batch", "StepResult", "Task", "build_task", "task_from_config"]


def build_task(spec: ModelSpec, *, device: str | torch.device = "cpu", seed: int = 0) -> Task:
    """A fresh task around a freshly built model on ``device`` (init derived from ``seed``).

    Raises :class:`~fl_sim.errors.PluginError` for unknown model/task names and
    :class:`~fl_sim.errors.ConfigError` for bad params.
    """
    model = build_model(spec.model, spec.in_channels, spec.num_classes, spec.image_size,
                        seed=seed, params=spec.model_params).to(device)
    return TASKS.create(spec.task, model, Normalization(tuple(spec.mean), tuple(spec.std)),
                        _where="task", **dict(spec.task_params))


def task_from_config(cfg_model: Any, cfg_task: Any, in_channels: int, num_classes: int,
                     image_size: int, mean: Sequence[float], std: Sequence[float], *,
                     seed: int, device: str | torch.device = "cpu",
                     pretrained: bool = False) -> tuple[Task, ModelSpec]:
    """Build the task of config sections ``model`` and ``task`` (``.name`` + ``.params``).

    The returned spec holds the resolved params (defaults filled in), so it rebuilds the same
    architecture even if a default later changes. With ``pretrained=True`` and
    ``cfg_model.pretrained`` set, the model starts from those weights (see
    :func:`fl_sim.tasks.pretrained.load_pretrained`; clients need not: they receive the
    global model).
    """
    model_params = _resolved(MODELS.get(cfg_model.name), _params(cfg_model), "model", skip=3)
    task_params = _resolved(TASKS.get(cfg_task.name), _params(cfg_task), "task", skip=2)
    spec = ModelSpec(model=cfg_model.name, model_params=model_params, task=cfg_task.name,
                     task_params=task_params, in_channels=int(in_channels),
                     num_classes=int(num_classes), image_size=int(image_size),
                     mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
    task = build_task(spec, device=device, seed=seed)
    path = getattr(cfg_model, "pretrained", None)
    if pretrained and path is not None:
        from fl_sim.tasks.pretrained import load_pretrained
        load_pretrained(task.model, path)
    return task, spec


def _params(section: Any) -> Mapping[str, Any]:
    params = getattr(section, "params", None)
    return dict(params) if params is not None else {}


def _resolved(obj: Any, params: Mapping[str, Any], where: str, *, skip: int) -> dict[str, Any]:
    return validate_params(obj, params, where=where, skip=skip)
