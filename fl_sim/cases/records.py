"""One client's update on a chosen batch, as the server's attack sees it (through the view).

Each builder computes the update exactly as before (the tensors the quality tests' figures
were measured on) and hands it to :func:`fl_sim.cases.server.server_record`, which records it
in a run directory with its ground truth and reads it back through the server view with the
grant the caller declares:

* :func:`make_record` — FedSGD: the mean cross-entropy gradient of one batch (``torch.func``,
  the model in its current train/eval mode); ``knowledge={"labels": y}`` grants labels;
* :func:`fedavg_delta_record` — FedAvg: ``new − global`` after ``steps`` ``torch.optim.SGD``
  steps (eval mode), step ``k`` on images ``k*B .. k*B+B-1`` modulo ``n``;
* :func:`diffusion_record` / :func:`diffusion_delta_record` — the same for the DDPM loss with
  per-example ``eps``/``t`` (granted unless ``grant=False``; concatenated over steps).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fl_sim.cases.data import IMAGE_SIZE, NUM_TRAIN_TIMESTEPS
from fl_sim.cases.server import rerecord, server_record
from fl_sim.records import ModelSpec, ObservationRecord, Tap, TruthStep
from fl_sim.tasks.base import Batch


def _declared(knowledge: Mapping[str, Any] | None) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``(grant, declared)`` of a test's ``knowledge`` (``{"labels": y}``)."""
    declared = {k: v for k, v in dict(knowledge or {}).items() if k != "granted"}
    return tuple(declared), declared


def _step_rows(k: int, batch_size: int, n: int) -> list[int]:
    return [(k * batch_size + j) % n for j in range(batch_size)]


def make_record(task: Any, spec: ModelSpec, images: Tensor, labels: Tensor, *,
                knowledge: Mapping[str, Any] | None = None,
                defenses: Sequence[Mapping[str, Any]] = (),
                tap: Tap = "server_in") -> ObservationRecord:
    """A FedSGD record of ``task``'s model on one private batch, through the server view.

    ``images`` ``[B, C, H, W]`` in [0, 1], ``labels`` ``[B]`` int64; the update is the mean
    cross-entropy gradient over all parameters (``update_kind="gradient"``); ``knowledge``:
    what is granted (``{"labels": labels}``), checked against the recorded ground truth.
    ``tap``: another tap relabels the view's record, for tests that an attack refuses it
    (e.g. ``"peer_view"`` for a server attack; it carries no grant, as a peer's cannot).
    """

    model = task.model
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    grads = torch.func.grad(lambda p: task.loss(p, buffers, Batch(images, labels), {}))(params)
    grant, declared = _declared(knowledge)
    n = int(images.shape[0])
    record = server_record(
        {k: v.detach().clone() for k, v in grads.items()}, spec=spec,
        global_params={k: v.detach().clone() for k, v in model.state_dict().items()},
        update_kind="gradient", steps=[TruthStep(0, images, labels, torch.arange(n))],
        grant=grant, declared=declared, num_examples=n, local_steps=1, lr=0.0,
        batch_size=n, defenses=defenses)
    return record if tap == "server_in" else dataclasses.replace(record, tap=tap)


def with_update(record: ObservationRecord, update: Mapping[str, Tensor], images: Tensor,
                labels: Tensor, *, defenses: Sequence[Mapping[str, Any]] = ()
                ) -> ObservationRecord:
    """A :func:`make_record` case (``images``, ``labels``) whose client sent ``update``
    instead (e.g. after a defense, described in ``defenses``), through the server view with
    the same grant."""
    n = int(images.shape[0])
    return rerecord(record, update, steps=[TruthStep(0, images, labels, torch.arange(n))],
                    defenses=defenses)


def fedavg_delta_record(task: Any, spec: ModelSpec, images: Tensor, labels: Tensor, *,
                        lr: float, steps: int, batch_size: int,
                        knowledge: Mapping[str, Any] | None = None) -> ObservationRecord:
    """A FedAvg record: ``new − global`` after ``steps`` torch.optim.SGD steps (eval mode),
    through the server view."""
    model = copy.deepcopy(task.model).eval()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = images.shape[0]
    truth = []
    for k in range(steps):
        idx = _step_rows(k, batch_size, n)
        truth.append(TruthStep(k, images[idx], labels[idx], torch.tensor(idx)))
        opt.zero_grad()
        F.cross_entropy(model(task.normalize(images[idx])), labels[idx]).backward()
        opt.step()
    glob = task.model.state_dict()
    new = model.state_dict()
    grant, declared = _declared(knowledge)
    return server_record(
        {k: (new[k] - glob[k]).clone() for k in glob if glob[k].is_floating_point()},
        spec=spec, global_params={k: v.clone() for k, v in glob.items()},
        update_kind="delta", steps=truth, grant=grant, declared=declared, num_examples=n,
        local_steps=steps, lr=lr, batch_size=batch_size)


def draw_aux(n: int, *, t: Sequence[int] | None = None, seed: int = 0,
             t_range: tuple[int, int] = (0, NUM_TRAIN_TIMESTEPS)) -> dict[str, Tensor]:
    """Seeded ``{"eps": [n, 1, 16, 16], "t": [n]}``; ``t`` given or uniform in ``t_range``."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    tt = (torch.as_tensor(list(t), dtype=torch.int64) if t is not None
          else torch.randint(t_range[0], t_range[1], (n,), generator=g))
    return {"eps": eps, "t": tt}


def _params(task: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return ({k: v.detach() for k, v in task.model.named_parameters()},
            {k: v.detach() for k, v in task.model.named_buffers()})


def _diffusion_view(task: Any, spec: ModelSpec, update: dict[str, Tensor], kind: str,
                    truth: list[TruthStep], n: int, steps: int, lr: float, batch_size: int,
                    aux: Mapping[str, Tensor] | None) -> ObservationRecord:
    declared = {k: v for k, v in aux.items()} if aux is not None else {}
    return server_record(
        update, spec=spec,
        global_params={k: v.detach().clone() for k, v in task.model.state_dict().items()},
        update_kind=kind, steps=truth, grant=("eps", "t") if aux is not None else (),
        declared=declared, num_examples=n, local_steps=steps, lr=lr, batch_size=batch_size)


def diffusion_record(task: Any, spec: ModelSpec, images: Tensor, *,
                     t: Sequence[int] | None = None, seed: int = 0, grant: bool = True,
                     aux: Mapping[str, Tensor] | None = None) -> ObservationRecord:
    """A FedSGD record: the gradient of the mean DDPM loss of ``images`` ``[B, 1, 16, 16]``,
    through the server view. eps/t are drawn by :func:`draw_aux` (or given as ``aux``) and
    granted (``eps``, ``t``) unless ``grant=False``."""

    aux = dict(aux) if aux is not None else draw_aux(len(images), t=t, seed=seed)
    params, buffers = _params(task)
    labels = torch.zeros(len(images), dtype=torch.int64)
    grads = torch.func.grad(lambda p: task.loss(p, buffers, Batch(images, labels), aux))(params)
    n = len(images)
    truth = [TruthStep(0, images, labels, torch.arange(n), aux)]
    return _diffusion_view(task, spec, {k: v.clone() for k, v in grads.items()}, "gradient",
                           truth, n, 1, 0.0, n, aux if grant else None)


def diffusion_delta_record(task: Any, spec: ModelSpec, images: Tensor, *, lr: float,
                           steps: int, batch_size: int, seed: int = 0,
                           grant: bool = True) -> ObservationRecord:
    """A FedAvg record: ``new − global`` after ``steps`` plain SGD steps, step ``k`` on images
    ``k*B .. k*B+B-1`` (modulo n) with its own eps/t (granted concatenated over steps),
    through the server view."""

    n = len(images)
    aux = draw_aux(steps * batch_size, seed=seed)
    params, buffers = _params(task)
    p = dict(params)
    truth = []
    for k in range(steps):
        idx = _step_rows(k, batch_size, n)
        rows = {key: v[k * batch_size:(k + 1) * batch_size] for key, v in aux.items()}
        zeros = torch.zeros(batch_size, dtype=torch.int64)
        truth.append(TruthStep(k, images[idx], zeros, torch.tensor(idx), rows))
        batch = Batch(images[idx], zeros)
        g = torch.func.grad(lambda q, b=batch, r=rows: task.loss(q, buffers, b, r))(p)
        p = {name: p[name] - lr * g[name] for name in p}
    delta = {name: (p[name] - params[name]).detach().clone() for name in params}
    return _diffusion_view(task, spec, delta, "delta", truth, n, steps, lr, batch_size,
                           aux if grant else None)
