"""Functional gradients of a task: what every gradient-matching attack recomputes.

The attack never touches the live ``task.model`` weights: it splits a record's ``state_dict``
into the ``(params, buffers)`` dicts of :func:`torch.func.functional_call` and differentiates
``task.loss(params, buffers, batch, aux)`` with :mod:`torch.func`. Because ``torch.func.grad``
composes with ordinary autograd, the returned gradients stay differentiable with respect to
candidate images that require grad (the double back-propagation of DLG, Zhu et al. 2019, and
Inverting Gradients, Geiping et al. 2020).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fl_sim.errors import ConfigError, InvalidRecordError
from fl_sim.records import ObservationRecord

Params = dict[str, Tensor]


def parameter_names(task: Any) -> list[str]:
    """Names of the trainable parameters of ``task.model``, in module order."""
    return [n for n, _ in task.model.named_parameters()]


def split_state(task: Any, state: Mapping[str, Tensor], *,
                device: str | torch.device | None = None) -> tuple[Params, Params]:
    """Split a full ``state_dict`` into ``(params, buffers)`` for ``functional_call``.

    ``params`` holds the entries named by ``task.model.named_parameters()`` (float32, detached,
    no grad), ``buffers`` those of ``named_buffers()`` (e.g. BatchNorm running statistics).
    Extra keys in ``state`` are ignored. Raises :class:`~fl_sim.errors.InvalidRecordError`
    naming the first parameter or buffer missing from ``state`` or of another shape (a
    recorded state that does not belong to the model: one line at the CLI, not a traceback).
    """
    def pick(named: Any) -> Params:
        out: Params = {}
        for name, ref in named:
            if name not in state:
                raise InvalidRecordError(f"the recorded state has no entry {name!r} of model "
                                         f"{type(task.model).__name__} (spec.json's model)")
            t = state[name].detach()
            if t.shape != ref.shape:
                raise InvalidRecordError(f"recorded state entry {name!r} has shape "
                                         f"{tuple(t.shape)}, the model expects "
                                         f"{tuple(ref.shape)}")
            out[name] = t.to(device=device or ref.device,
                             dtype=ref.dtype if t.is_floating_point() else t.dtype)
        return out

    return pick(task.model.named_parameters()), pick(task.model.named_buffers())


def parameter_gradients(task: Any, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                        batch: Any, aux: Mapping[str, Tensor] | None = None, *,
                        create_graph: bool = False) -> Params:
    """Gradient of ``task.loss`` with respect to every parameter, keyed like ``params``.

    ``batch`` is a :class:`fl_sim.tasks.base.Batch` (images ``[B, C, H, W]`` in [0, 1]).
    With ``create_graph=True`` the result stays connected to whatever in ``batch`` requires
    grad (double back-propagation); otherwise it is detached. Computed with
    :func:`torch.func.grad`, so it may itself be wrapped in :func:`torch.func.vmap`.
    """
    aux = {} if aux is None else aux

    def loss_of(p: Mapping[str, Tensor]) -> Tensor:
        return task.loss(p, buffers, batch, aux)

    grads = torch.func.grad(loss_of)(dict(params))
    if not create_graph:
        grads = {k: v.detach() for k, v in grads.items()}
    return grads


def target_from_record(record: ObservationRecord, task: Any | None = None) -> Params:
    """The observed update restricted to the model's trainable parameters, in model order.

    A ``"gradient"`` record (FedSGD) holds the gradient itself; a ``"delta"`` record holds
    ``new - global`` after local training (approximately ``-lr * sum of gradients``): it is
    returned as observed, the objective decides how to match it. Non-parameter entries
    (e.g. BatchNorm running statistics in a delta) are dropped. ``task`` defaults to
    ``record.spec.build_task()``. Raises :class:`~fl_sim.errors.InvalidRecordError` if a
    parameter has no update entry.
    """
    task = record.spec.build_task() if task is None else task
    out: Params = {}
    for name in parameter_names(task):
        if name not in record.update:
            raise InvalidRecordError(f"the recorded update has no entry for parameter "
                                     f"{name!r} of the model in spec.json")
        out[name] = record.update[name].detach().to(torch.float32)
    return out


def delta_scale(record: ObservationRecord) -> float:
    """The factor that reads a FedAvg ``"delta"`` as a mean batch gradient (1 otherwise).

    Plain SGD: ``-1 / (lr * local_steps)``. SGD with momentum ``mu`` (buffer fresh each
    round, torch's form ``b_k = mu b_{k-1} + g_k``): step ``j``'s gradient enters the delta
    with weight ``(1 - mu^(S-j)) / (1 - mu)``, so ``local_steps`` becomes the sum of those
    weights (exact when every step's gradient is the same, as for plain SGD). Raises
    :class:`~fl_sim.errors.ConfigError` (one line) for a delta recorded without a positive
    lr, and for Adam: its per-coordinate normalisation leaves no gradient to rescale.
    """
    if record.update_kind != "delta":
        return 1.0
    if record.lr <= 0:
        raise ConfigError(f"a 'delta' record needs lr > 0 to be read as a gradient, got "
                          f"{record.lr}")
    opt = record.optimizer
    if opt.name == "adam":
        raise ConfigError(f"the client trained with Adam ({record.local_steps} local steps): "
                          "its delta is not a scaled gradient; use an attack that unrolls "
                          "local training (inverting_gradients or gidm, multi_step = "
                          "\"unroll\")")
    steps = max(record.local_steps, 1)
    mu = opt.momentum
    weight = float(steps) if mu == 0 else sum((1 - mu ** (steps - j)) / (1 - mu)
                                               for j in range(steps))
    return -1.0 / (record.lr * weight)


def mean_gradient_target(record: ObservationRecord, task: Any | None = None) -> Params:
    """:func:`target_from_record` read as a mean batch gradient, per trainable parameter.

    A FedSGD ``"gradient"`` is returned as is; a FedAvg ``"delta"`` is rescaled by
    :func:`delta_scale` (``-1 / (lr * local_steps)`` for plain SGD), and SGD's weight decay
    ``wd * global`` (part of every step's direction) is taken off. Raises
    :class:`~fl_sim.errors.ConfigError` where :func:`delta_scale` does (no lr; Adam).
    """
    target = target_from_record(record, task)
    if record.update_kind != "delta":
        return target
    scale = delta_scale(record)
    wd = record.optimizer.weight_decay
    return {k: v * scale - (wd * record.global_params[k].to(torch.float32) if wd else 0)
            for k, v in target.items()}


def attack_task(record: ObservationRecord, model_mode: str = "eval", *,
                device: str | torch.device = "cpu") -> Any:
    """A fresh task of the record's model spec on ``device``, with the model in ``model_mode``.

    ``"train"`` means the client's forward pass used BATCH statistics in BatchNorm: the
    layers are made to stop tracking running statistics
    (:func:`torch.func.replace_all_batch_norm_modules_`), so a functional call neither
    mutates the record's buffers nor breaks inside :mod:`torch.func` transforms.
    """
    task = record.spec.build_task(device=device)
    task.model.train(model_mode == "train")
    if model_mode == "train":
        torch.func.replace_all_batch_norm_modules_(task.model)
    return task
