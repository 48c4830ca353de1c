"""The task contract: what is trained, as one differentiable function.

A task wraps a model and exposes ``loss(params, buffers, batch, aux)``, computed with
``torch.func.functional_call`` so that every attack can re-compute gradients functionally.
Images enter every task in [0, 1] pixel space (NCHW float32); the task applies its own
normalisation inside ``loss``. Attacks therefore optimise pixels in [0, 1] directly and the
box constraint is simply ``clamp(0, 1)``.

``aux`` holds the per-example private randomness a step used (diffusion: noise ``eps`` and
timestep ``t``; classifier: nothing). It is drawn from an explicit generator by
``sample_aux`` and recorded as ground truth by the federation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Params = Mapping[str, Tensor]


@dataclass(frozen=True)
class Batch:
    """One private batch. ``images``: [B, C, H, W] float32 in [0, 1]; ``labels``: [B] int64."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class StepResult:
    """What one local training step did: its loss and the private randomness it used."""

    loss: float
    aux: dict[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """What the federation and the attacks need from a task (see module docstring)."""

    name: str
    model: nn.Module

    def sample_aux(self, batch: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        """Draw the step's private randomness (``{}`` for a classifier)."""
        ...

    def loss(self, params: Params, buffers: Params, batch: Batch,
             aux: Mapping[str, Tensor]) -> Tensor:
        """Scalar mean loss of the model at ``(params, buffers)`` on ``batch``."""
        ...

    def train_step(self, optimizer: torch.optim.Optimizer, batch: Batch,
                   generator: torch.Generator) -> StepResult:
        """One optimiser step on ``self.model``; returns loss and the aux it drew."""
        ...

    def evaluate(self, images: Tensor, labels: Tensor, *, batch_size: int = 256,
                 generator: torch.Generator | None = None) -> dict[str, float]:
        """Held-out metrics: ``accuracy`` + ``loss`` (classifier) or ``loss`` (diffusion)."""
        ...


@runtime_checkable
class NormalizationLike(Protocol):
    """Per-channel ``mean`` and ``std`` (e.g. ``fl_sim.data.transforms.Normalization``)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


def mean_std(normalization: NormalizationLike | tuple[tuple[float, ...], tuple[float, ...]]
             ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` as float tuples from a Normalization-like object or a ``(mean, std)`` pair.

    Raises ``ValueError`` if the lengths differ or a std is not positive.
    """
    if isinstance(normalization, tuple) and len(normalization) == 2:
        mean, std = normalization
    else:
        mean, std = normalization.mean, normalization.std
    mean_t = tuple(float(m) for m in mean)
    std_t = tuple(float(s) for s in std)
    if len(mean_t) != len(std_t) or not mean_t:
        raise ValueError(f"mean {mean_t} and std {std_t} must be non-empty and of equal length")
    if any(s <= 0 for s in std_t):
        raise ValueError(f"std must be positive, got {std_t}")
    return mean_t, std_t


def module_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(params, buffers)`` of ``model`` as name -> tensor dicts (live, not detached).

    Passing them to a task's ``loss`` gives exactly the module's own loss.
    """
    return dict(model.named_parameters()), dict(model.named_buffers())


def sgd_train_step(task: Task, optimizer: torch.optim.Optimizer, batch: Batch,
                   generator: torch.Generator) -> StepResult:
    """The shared local step of every task: train mode, draw aux, backward the functional
    loss at the module's own tensors, step. Returns the loss and the (detached) aux."""
    task.model.train()
    aux = task.sample_aux(batch, generator)
    optimizer.zero_grad(set_to_none=True)
    params, buffers = module_tensors(task.model)
    loss = task.loss(params, buffers, batch, aux)
    loss.backward()
    optimizer.step()
    return StepResult(float(loss.detach()), {k: v.detach() for k, v in aux.items()})
