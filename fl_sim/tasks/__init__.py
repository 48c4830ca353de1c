"""Tasks (what is trained), registered in :data:`fl_sim.registry.TASKS`, and their builders.

A task class has the signature ``Cls(model, normalization, *, **own_params)``; the first two
are injected by the framework. :func:`build_task` rebuilds a task from a
:class:`~fl_sim.tasks.spec.ModelSpec`; :func:`task_from_config` builds one from config sections
and returns the spec that rebuilds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fl_sim.registry import MODELS, TASKS, validate_params
from fl_sim.tasks import classifier, diffusion  # noqa: F401  (register)
from fl_sim.tasks.base import Batch, StepResult, Task
from fl_sim.tasks.spec import ModelSpec, build_task

__all__ = ["Batch", "ModelSpec", "StepResult", "Task", "build_task", "task_from_config"]


def task_from_config(cfg_model: Any, cfg_task: Any, in_channels: int, num_classes: int,
                     image_size: int, mean: Sequence[float], std: Sequence[float], *,
                     seed: int, device: str | torch.device = "cpu",
                     pretrained: bool = False) -> tuple[Task, ModelSpec]:
    """Build the task of config sections ``model`` and ``task`` (``.name`` + ``.params``).

    The returned spec holds the resolved params (defaults filled in), so it rebuilds the same
    architecture even if a default later changes. With ``pretrained=True`` and
    ``cfg_model.pretrained`` set, the model starts from those weights (see
    :func:`fl_sim.tasks.pretrained.load_pretrained`; clients need not: they receive the
    global model). Whenever ``cfg_model.pretrained`` is set (server and clients alike), its
    configs decide the architecture (without a ``preset``) and the diffusion schedule
    (:func:`fl_sim.tasks.pretrained.checkpoint_params`).
    """
    user_model, user_task = _params(cfg_model), _params(cfg_task)
    path = getattr(cfg_model, "pretrained", None)
    if path is not None:
        # pretrained imports fl_sim.priors, which imports submodules of this package:
        # lazy: a package-init circle at load time (tasks/__init__ -> pretrained -> priors)
        from fl_sim.tasks.pretrained import checkpoint_params
        user_model, user_task = checkpoint_params(path, cfg_model.name, cfg_task.name,
                                                  user_model, user_task,
                                                  in_channels=int(in_channels),
                                                  image_size=int(image_size))
    model_params = _resolved(MODELS.get(cfg_model.name), user_model, "model", skip=3)
    task_params = _resolved(TASKS.get(cfg_task.name), user_task, "task", skip=2)
    # the checkpoint-only params stay out of the spec while unset: the specs of runs without a
    # checkpoint are what they were before these params existed
    for resolved, key in ((model_params, "config"), (task_params, "scheduler_config")):
        if key in resolved and resolved[key] is None:
            del resolved[key]
    spec = ModelSpec(model=cfg_model.name, model_params=model_params, task=cfg_task.name,
                     task_params=task_params, in_channels=int(in_channels),
                     num_classes=int(num_classes), image_size=int(image_size),
                     mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
    task = build_task(spec, device=device, seed=seed)
    if pretrained and path is not None:
        # lazy: see checkpoint_params above (package-init circle with fl_sim.priors)
        from fl_sim.tasks.pretrained import load_pretrained
        load_pretrained(task.model, path)
    return task, spec


def _params(section: Any) -> Mapping[str, Any]:
    params = getattr(section, "params", None)
    return dict(params) if params is not None else {}


def _resolved(obj: Any, params: Mapping[str, Any], where: str, *, skip: int) -> dict[str, Any]:
    return validate_params(obj, params, where=where, skip=skip)
