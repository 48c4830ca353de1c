"""What a client does with its private data in one round (pure torch; no flwr).

Every random choice derives from the run seed: the batches of client ``c`` in round ``r`` come
from ``torch_generator(seed, "round", r, "client", c, "batches")`` and the task's private
randomness (diffusion eps/t) from ``torch_generator(seed, "round", r, "client", c, "aux")``,
so the same seed gives the same batches and the same updates in every run and after a resume.

Each step's exact batch is returned as a :class:`~fl_sim.records.TruthStep` (dataset indices,
images, labels, aux) for the ground-truth store.

**What ``num_examples`` means** (the reply's ``num-examples``, the observation record's
``num_examples``): the number of DISTINCT images the update was computed from this round —
``local_steps × batch_size`` when the client holds that many (steps walk one shuffled pass,
so no image repeats before the pass ends), the whole partition for ``local_epochs``, the batch
for FedSGD. It is also FedAvg's aggregation weight. Flower's examples weight by the partition
size; with ``local_epochs`` the two coincide, and with ``local_steps`` every client does the
same amount of work, so weighting by data it never touched would skew the mean and make the
records lie about what the update contains (attacks reconstruct ``num_examples`` images, and
a curious peer's derivation divides by the published total). One number keeps the server
records, the aggregate, the peer view and the ground truth consistent.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fl_sim.records import LocalOptimizer, TruthStep
from fl_sim.seeding import derive_seed, torch_generator
from fl_sim.tasks.base import Batch, StepResult, Task, module_tensors


@dataclass(frozen=True)
class LocalResult:
    """One client-round: the update to send, its loss, and the private steps it took.

    ``update`` is the new ``state_dict`` (``kind="weights"``) or the gradient of the
    parameters (``kind="gradient"``). ``num_examples`` is the number of distinct images in
    ``steps`` (what the update was computed from; also the FedAvg weight, see module doc).
    """

    update: dict[str, Tensor]
    kind: str
    loss: float
    num_examples: int
    steps: tuple[TruthStep, ...]


@contextmanager
def seeded_global_rng(seed: int, server_round: int, client_id: int,
                      device: torch.device) -> Iterator[None]:
    """Fork and seed torch's global RNG for the client-round: layers we cannot hand a
    generator (dropout) draw from it, so they too depend only on (seed, round, client)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, "round", server_round, "client", client_id,
                                      "torch"))
        yield


def batch_plan(num_examples: int, *, batch_size: int, local_steps: int | None,
               local_epochs: int | None, generator: torch.Generator) -> list[Tensor]:
    """Local example positions [B] for each step.

    ``local_epochs``: each epoch is a fresh permutation cut into ``ceil(n / batch_size)``
    batches (the last one may be smaller). ``local_steps``: consecutive batches of
    ``batch_size`` (``n`` if the client holds fewer) from one permutation — sampling without
    replacement, so ``local_steps × batch_size ≤ n`` distinct images are used — and a fresh
    permutation once fewer than ``batch_size`` unused examples remain. Step 0 is the first
    ``batch_size`` of the first permutation (FedSGD's batch).

    >>> g = torch.Generator().manual_seed(0)
    >>> [len(b) for b in batch_plan(5, batch_size=2, local_steps=None, local_epochs=1,
    ...                              generator=g)]
    [2, 2, 1]
    >>> plan = batch_plan(6, batch_size=2, local_steps=3, local_epochs=None, generator=g)
    >>> sorted(torch.cat(plan).tolist())  # three steps, six distinct images
    [0, 1, 2, 3, 4, 5]

    Raises ``ValueError`` for an empty client or when neither steps nor epochs are set.
    """
    if num_examples < 1:
        raise ValueError("client holds no examples")
    bs = min(batch_size, num_examples)
    if local_epochs is not None:
        plan: list[Tensor] = []
        for _ in range(local_epochs):
            perm = torch.randperm(num_examples, generator=generator)
            plan += list(perm.split(batch_size))
        return plan
    if local_steps is None:
        raise ValueError("one of local_steps / local_epochs must be set")
    steps: list[Tensor] = []
    perm, pos = torch.randperm(num_examples, generator=generator), 0
    for _ in range(local_steps):
        if pos + bs > num_examples:
            perm, pos = torch.randperm(num_examples, generator=generator), 0
        steps.append(perm[pos:pos + bs])
        pos += bs
    return steps


def distinct_examples(steps: tuple[TruthStep, ...] | list[TruthStep]) -> int:
    """How many distinct dataset images the steps used (the record's ``num_examples``)."""
    return len({int(i) for s in steps for i in s.indices.tolist()})


def make_optimizer(spec: str | LocalOptimizer, params: Iterator[torch.nn.Parameter],
                   lr: float) -> torch.optim.Optimizer:
    """The client's optimiser over ``params``, built fresh each round (so Adam's moments
    and SGD's momentum buffer start at zero every round, as
    :mod:`attacks.components.local_optimizers`
    models them). ``spec``: a :class:`~fl_sim.records.LocalOptimizer` or a bare name
    (``"sgd"``/``"adam"`` with torch's defaults). Raises ``ValueError`` for an unknown name.
    """
    opt = LocalOptimizer(spec) if isinstance(spec, str) else spec  # type: ignore[arg-type]
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=opt.momentum,
                               weight_decay=opt.weight_decay)
    return torch.optim.Adam(params, lr=lr, betas=opt.betas, eps=opt.eps,
                            weight_decay=opt.weight_decay)


def _batch(images: Tensor, labels: Tensor, pos: Tensor, device: torch.device) -> Batch:
    return Batch(images[pos].to(device), labels[pos].to(device))


def _truth_step(step: int, images: Tensor, labels: Tensor, dataset_indices: Tensor,
                pos: Tensor, aux: Mapping[str, Tensor]) -> TruthStep:
    return TruthStep(step=step, images=images[pos].detach().cpu().clone(),
                     labels=labels[pos].detach().cpu().clone(),
                     indices=dataset_indices[pos].detach().cpu().clone(),
                     aux={k: v.detach().cpu().clone() for k, v in aux.items()})


def local_train(task: Task, images: Tensor, labels: Tensor, dataset_indices: Tensor, *,
                seed: int, server_round: int, client_id: int, batch_size: int,
                local_steps: int | None, local_epochs: int | None,
                optimizer: str | LocalOptimizer, lr: float,
                proximal_mu: float = 0.0, device: torch.device | str = "cpu",
                dp: Any = None) -> LocalResult:
    """Train ``task.model`` (already holding the global weights) on the client's data.

    ``images`` [N, C, H, W] in [0, 1], ``labels`` [N] and ``dataset_indices`` [N] (positions
    in the dataset's train split) are the client's partition. FedProx's proximal term
    ``(mu/2)·||w − w_global||²`` enters as a gradient hook ``+ mu·(w − w_global)`` so the
    task's own ``train_step`` is used unchanged. Returns the new ``state_dict``.

    ``dp``: a ``"train"``-stage defense (:class:`defenses.dp_sgd.DPSGD`): each step's gradient
    is its ``private_gradient`` (noise from ``(seed, "round", r, "client", c, "dp")``), the
    proximal term added after it (it is data-independent), then the optimiser step.
    """
    device = torch.device(device)
    gen = torch_generator(seed, "round", server_round, "client", client_id, "batches")
    aux_gen = torch_generator(seed, "round", server_round, "client", client_id, "aux")
    plan = batch_plan(len(labels), batch_size=batch_size, local_steps=local_steps,
                      local_epochs=local_epochs, generator=gen)
    model = task.model
    hooks = []
    dp_gen = torch_generator(seed, "round", server_round, "client", client_id, "dp")
    anchors = {k: p.detach().clone() for k, p in model.named_parameters()} \
        if dp is not None and proximal_mu > 0 else {}
    if proximal_mu > 0 and dp is None:
        for p in model.parameters():
            anchor = p.detach().clone()
            hooks.append(p.register_hook(
                lambda g, p=p, a=anchor: g + proximal_mu * (p.detach() - a)))
    opt = make_optimizer(optimizer, model.parameters(), lr)
    steps, losses = [], []
    try:
        with seeded_global_rng(seed, server_round, client_id, device):
            for i, pos in enumerate(plan):
                batch = _batch(images, labels, pos, device)
                res = (task.train_step(opt, batch, aux_gen) if dp is None else
                       _dp_step(task, opt, batch, aux_gen, dp, dp_gen, proximal_mu, anchors))
                losses.append(res.loss)
                steps.append(_truth_step(i, images, labels, dataset_indices, pos, res.aux))
    finally:
        for h in hooks:
            h.remove()
    new = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return LocalResult(update=new, kind="weights", loss=_mean(losses),
                       num_examples=distinct_examples(steps), steps=tuple(steps))


def one_gradient(task: Task, images: Tensor, labels: Tensor, dataset_indices: Tensor, *,
                 seed: int, server_round: int, client_id: int, batch_size: int,
                 device: torch.device | str = "cpu", dp: Any = None) -> LocalResult:
    """FedSGD: the gradient of the mean loss on ONE batch w.r.t. every parameter.

    The batch is the first step of :func:`batch_plan` with the same derived generator as
    :func:`local_train`; the model is in train mode (as during training) and unchanged.
    With ``dp`` (DP-SGD) the reply is its private gradient of that batch (see local_train).
    """
    device = torch.device(device)
    gen = torch_generator(seed, "round", server_round, "client", client_id, "batches")
    aux_gen = torch_generator(seed, "round", server_round, "client", client_id, "aux")
    pos = batch_plan(len(labels), batch_size=batch_size, local_steps=1, local_epochs=None,
                     generator=gen)[0]
    batch = _batch(images, labels, pos, device)
    task.model.train()
    with seeded_global_rng(seed, server_round, client_id, device):
        aux = task.sample_aux(batch, aux_gen)
        if dp is None:
            params, buffers = module_tensors(task.model)
            loss = task.loss(params, buffers, batch, aux)
            grads = torch.autograd.grad(loss, list(params.values()))
            update = {k: g.detach().cpu().clone() for k, g in zip(params, grads, strict=True)}
        else:
            dp_gen = torch_generator(seed, "round", server_round, "client", client_id, "dp")
            loss_f, private = dp.private_gradient(task, batch, aux, dp_gen)
            loss = torch.tensor(loss_f)
            update = {k: g.detach().cpu().clone() for k, g in private.items()}
    step = _truth_step(0, images, labels, dataset_indices, pos, aux)
    return LocalResult(update=update, kind="gradient", loss=float(loss.detach()),
                       num_examples=int(len(pos)), steps=(step,))


def _dp_step(task: Task, opt: torch.optim.Optimizer, batch: Batch, aux_gen: torch.Generator,
             dp: Any, dp_gen: torch.Generator, proximal_mu: float,
             anchors: Mapping[str, Tensor]) -> StepResult:
    """One DP-SGD step: the defense's private gradient (+ the proximal term), then step."""
    task.model.train()
    aux = task.sample_aux(batch, aux_gen)
    opt.zero_grad(set_to_none=True)
    loss, grads = dp.private_gradient(task, batch, aux, dp_gen)
    for k, p in task.model.named_parameters():
        g = grads[k]
        if proximal_mu > 0:
            g = g + proximal_mu * (p.detach() - anchors[k])
        p.grad = g.to(dtype=p.dtype)
    opt.step()
    return StepResult(loss, {k: v.detach() for k, v in aux.items()})


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan
