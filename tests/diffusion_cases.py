"""Shared fixtures for attacks on federated diffusion models: a trained prior and records.

The realistic setting of issue 8: a tiny DDPM (``unet`` preset ``tiny``) trained centrally by
:func:`fl_sim.train_prior.train_prior` on scikit-learn's bundled digits (grey, 16x16, the
``digits`` source's TRAIN split) is the global model; the victims are digits of the TEST
split, disjoint from everything the prior saw. Records are built without Ray, exactly as a
client computes them (:mod:`fl_sim.federation.local`): the mean diffusion loss of one batch
with per-example ``eps``/``t`` (FedSGD gradient), or ``new - global`` after plain SGD steps
(FedAvg delta; step ``k`` on images ``k*B .. k*B+B-1`` with its own eps/t rows)::

    from diffusion_cases import digits_prior, digits_victims, global_task, diffusion_record

    def test_x(digits_prior):                    # session-scoped, trained once (~1 min)
        task, spec = global_task(digits_prior)
        record = diffusion_record(task, spec, digits_victims(2), t=[50, 120])

Import as ``diffusion_cases`` (``tests/`` is on ``sys.path`` under pytest) or as
``tests.diffusion_cases`` from the repository root (benchmarks do).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from fl_sim.cases import DIGITS_PRIOR_CONFIG
from fl_sim.records import ModelSpec, ObservationRecord

IMAGE_SIZE = 16
NUM_TRAIN_TIMESTEPS = 1000
#: the prior of the quality tests (the library's, so benchmarks train the very same one)
PRIOR_CONFIG: dict[str, Any] = DIGITS_PRIOR_CONFIG


def train_digits_prior(out_dir: Path, *, steps: int | None = None) -> Path:
    """Train the digits prior of :data:`PRIOR_CONFIG` into ``out_dir`` (one thread); returns
    the prior's path. Training resumes/returns at once if ``out_dir`` already holds it."""
    from fl_sim.train_prior import train_prior

    cfg = {k: dict(v) for k, v in PRIOR_CONFIG.items()}
    if steps is not None:
        cfg["training"]["steps"] = cfg["training"]["checkpoint_every"] = steps
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Path(train_prior(cfg, out_dir))
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_prior(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the digits prior, trained once per test session."""
    return train_digits_prior(tmp_path_factory.mktemp("digits_prior"))


@functools.lru_cache(maxsize=1)
def _digits_test() -> Tensor:
    from fl_sim.registry import DATA_SOURCES

    splits = DATA_SOURCES.get("digits")(image_size=IMAGE_SIZE)
    return torch.as_tensor(splits.test.images).float()


def digits_victims(n: int, start: int = 0) -> Tensor:
    """Digits of the TEST split (never seen by the prior): ``[n, 1, 16, 16]`` in [0, 1]."""
    return _digits_test()[start:start + n].clone()


def diffusion_spec() -> ModelSpec:
    """The :class:`ModelSpec` of the tiny-UNet DDPM on grey 16x16 digits."""
    return ModelSpec(model="unet", model_params={"preset": "tiny"}, task="diffusion",
                     task_params={"num_train_timesteps": NUM_TRAIN_TIMESTEPS}, in_channels=1,
                     num_classes=10, image_size=IMAGE_SIZE, mean=(0.5,), std=(0.5,))


def global_task(prior: Path | None = None, *, seed: int = 0) -> tuple[Any, ModelSpec]:
    """The global model as a task: the prior's weights, or a seeded untrained UNet."""
    from fl_sim.tasks import build_task

    spec = diffusion_spec()
    task = build_task(spec, seed=seed)
    if prior is not None:
        from fl_sim.priors import load_unet
        task.model.load_state_dict(load_unet(Path(prior) / "unet").state_dict())
    task.model.train()
    return task, spec


def _params(task: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return ({k: v.detach() for k, v in task.model.named_parameters()},
            {k: v.detach() for k, v in task.model.named_buffers()})


def draw_aux(n: int, *, t: Sequence[int] | None = None, seed: int = 0,
             t_range: tuple[int, int] = (0, NUM_TRAIN_TIMESTEPS)) -> dict[str, Tensor]:
    """Seeded ``{"eps": [n, 1, 16, 16], "t": [n]}``; ``t`` given or uniform in ``t_range``."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    tt = (torch.as_tensor(list(t), dtype=torch.int64) if t is not None
          else torch.randint(t_range[0], t_range[1], (n,), generator=g))
    return {"eps": eps, "t": tt}


def diffusion_record(task: Any, spec: ModelSpec, images: Tensor, *,
                     t: Sequence[int] | None = None, seed: int = 0, grant: bool = True,
                     aux: Mapping[str, Tensor] | None = None) -> ObservationRecord:
    """A FedSGD record: the gradient of the mean DDPM loss of ``images`` ``[B, 1, 16, 16]``.

    eps/t are drawn by :func:`draw_aux` (or given as ``aux``) and granted (knowledge ``eps``,
    ``t``) unless ``grant=False``.
    """
    from fl_sim.tasks.base import Batch

    aux = dict(aux) if aux is not None else draw_aux(len(images), t=t, seed=seed)
    params, buffers = _params(task)
    labels = torch.zeros(len(images), dtype=torch.int64)
    grads = torch.func.grad(lambda p: task.loss(p, buffers, Batch(images, labels), aux))(params)
    return _record(task, spec, {k: v.clone() for k, v in grads.items()}, "gradient",
                   len(images), 1, 0.0, len(images), aux if grant else None)


def diffusion_delta_record(task: Any, spec: ModelSpec, images: Tensor, *, lr: float,
                           steps: int, batch_size: int, seed: int = 0,
                           grant: bool = True) -> ObservationRecord:
    """A FedAvg record: ``new - global`` after ``steps`` plain SGD steps, step ``k`` on images
    ``k*B .. k*B+B-1`` (modulo n) with its own eps/t (granted concatenated over steps)."""
    from fl_sim.tasks.base import Batch

    n = len(images)
    aux = draw_aux(steps * batch_size, seed=seed)
    params, buffers = _params(task)
    p = dict(params)
    for k in range(steps):
        idx = [(k * batch_size + j) % n for j in range(batch_size)]
        rows = {key: v[k * batch_size:(k + 1) * batch_size] for key, v in aux.items()}
        batch = Batch(images[idx], torch.zeros(batch_size, dtype=torch.int64))
        g = torch.func.grad(lambda q, b=batch, r=rows: task.loss(q, buffers, b, r))(p)
        p = {name: p[name] - lr * g[name] for name in p}
    delta = {name: (p[name] - params[name]).detach().clone() for name in params}
    return _record(task, spec, delta, "delta", n, steps, lr, batch_size,
                   aux if grant else None)


def _record(task: Any, spec: ModelSpec, update: dict[str, Tensor], kind: str, n: int,
            steps: int, lr: float, batch_size: int,
            aux: Mapping[str, Tensor] | None) -> ObservationRecord:
    knowledge: dict[str, Any] = {"granted": ()}
    if aux is not None:
        knowledge = {"granted": ("eps", "t"), **{k: v.clone() for k, v in aux.items()}}
    return ObservationRecord(
        run_id="test", server_round=1, client_id=0, tap="server_in", spec=spec,
        global_params={k: v.detach().clone() for k, v in task.model.state_dict().items()},
        update=update, update_kind=kind,  # type: ignore[arg-type]
        num_examples=n, local_steps=steps, lr=lr, batch_size=batch_size, knowledge=knowledge)
