"""Shared fixtures for attack tests: real CIFAR-10 images and FedSGD observation records.

Builds the reference cases of ``/work/shared/FACTS.md`` ("Reference attack cases"): seeded,
untrained models in eval mode (BatchNorm with fresh running statistics), mean cross-entropy,
one FedSGD gradient over all parameters. Images come from ``tests/data/cifar10_ref.npz``, a
vendored slice of the shared CIFAR-10 file (test images 0-31 and training images 0-127, pixel
for pixel; provenance in ``tests/data/README.md``), so every test runs on a clean clone::

    from attack_cases import cifar_images, cifar_labels, make_record, make_task

    images = cifar_images(8)                      # [8, 3, 32, 32] float32 in [0, 1]
    task, spec = make_task("lenet", seed=0)
    record = make_record(task, spec, images, cifar_labels(8))

Import as ``attack_cases`` (``tests/`` is on ``sys.path`` under pytest's rootdir conftest) or as
``tests.attack_cases`` from the repository root.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fl_sim.records import ModelSpec, ObservationRecord, Tap

#: the vendored reference images (``x_test`` [32], ``x_train`` [128], uint8 NHWC)
CIFAR_FILE = Path(__file__).resolve().parent / "data" / "cifar10_ref.npz"
CIFAR_MEAN = (0.4915, 0.4823, 0.4468)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

#: model params of the reference cases (registry name -> params)
REFERENCE_MODELS: dict[str, dict[str, Any]] = {
    "lenet": {"activation": "sigmoid"},
    "convnet": {"width": 64},
    "resnet18": {},
}


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous number.

    The reference models' batch-1 ops are small: on a loaded 2-core runner a second thread
    made DLG on LeNet ~20x and iDLG on ConvNet ~10x slower (measured), so attack tests use one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def _cifar_test() -> tuple[np.ndarray, np.ndarray]:
    with np.load(CIFAR_FILE) as d:
        return d["x_test"], d["y_test"]


def _check_range(stop: int, available: int) -> None:
    if stop > available:
        raise ValueError(f"asked for CIFAR-10 test images up to index {stop - 1}; "
                         f"{CIFAR_FILE.name} vendors {available} (see tests/data/README.md)")


def cifar_train_images(n: int) -> Tensor:
    """The first ``n`` (<= 128) CIFAR-10 training images, float32 ``[n, 3, 32, 32]``."""
    with np.load(CIFAR_FILE) as d:
        x = d["x_train"]
    _check_range(n, len(x))
    return torch.from_numpy(x[:n]).permute(0, 3, 1, 2).float().div(255.0)


def cifar_images(n: int, start: int = 0) -> Tensor:
    """CIFAR-10 test images ``start .. start+n-1`` as float32 ``[n, 3, 32, 32]`` in [0, 1].

    Raises ``ValueError`` past the 32 vendored test images.
    """
    x, _ = _cifar_test()
    _check_range(start + n, len(x))
    return torch.from_numpy(x[start:start + n]).permute(0, 3, 1, 2).float().div(255.0)


def cifar_labels(n: int, start: int = 0) -> Tensor:
    """CIFAR-10 test labels ``start .. start+n-1`` as int64 ``[n]``."""
    _, y = _cifar_test()
    _check_range(start + n, len(y))
    return torch.from_numpy(y[start:start + n]).long()


def cifar_distinct(n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` test images (in index order) whose labels are pairwise distinct.

    Returns ``(images [n, 3, 32, 32], labels [n])``; ``n`` must be <= 10.
    """
    if not 1 <= n <= 10:
        raise ValueError(f"CIFAR-10 has 10 classes; cannot pick {n} distinct labels")
    _, y = _cifar_test()
    picked: list[int] = []
    seen: set[int] = set()
    for i, label in enumerate(y.tolist()):
        if label not in seen:
            seen.add(label)
            picked.append(i)
            if len(picked) == n:
                break
    x, _ = _cifar_test()
    idx = np.array(picked)
    images = torch.from_numpy(x[idx]).permute(0, 3, 1, 2).float().div(255.0)
    return images, torch.from_numpy(y[idx]).long()


def make_spec(model: str, model_params: Mapping[str, Any] | None = None, *,
              num_classes: int = 10, image_size: int = 32, in_channels: int = 3) -> ModelSpec:
    """The :class:`ModelSpec` of a CIFAR-shaped ``classifier`` task around ``model``."""
    params = REFERENCE_MODELS.get(model, {}) if model_params is None else model_params
    return ModelSpec(model=model, model_params=dict(params), task="classifier", task_params={},
                     in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                     mean=CIFAR_MEAN, std=CIFAR_STD)


def make_task(model: str, model_params: Mapping[str, Any] | None = None, *, seed: int = 0,
              train: bool = False) -> tuple[Any, ModelSpec]:
    """A seeded, untrained task (eval mode unless ``train``) and the spec that rebuilds it."""
    from fl_sim.tasks import build_task

    spec = make_spec(model, model_params)
    task = build_task(spec, seed=seed)
    task.model.train(train)
    return task, spec


def make_record(task: Any, spec: ModelSpec, images: Tensor, labels: Tensor, *,
                tap: Tap = "server_in", knowledge: Mapping[str, Any] | None = None,
                defenses: Sequence[str] = ()) -> ObservationRecord:
    """A FedSGD :class:`ObservationRecord` of ``task``'s model on one private batch.

    ``images`` ``[B, C, H, W]`` in [0, 1], ``labels`` ``[B]`` int64. ``update`` is the mean
    cross-entropy gradient over all parameters (``update_kind="gradient"``), computed with the
    model in its current train/eval mode; ``global_params`` is the full ``state_dict``.
    """
    from fl_sim.tasks.base import Batch

    model = task.model
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    grads = torch.func.grad(lambda p: task.loss(p, buffers, Batch(images, labels), {}))(params)
    return ObservationRecord(
        run_id="test", server_round=1, client_id=0, tap=tap, spec=spec,
        global_params={k: v.detach().clone() for k, v in model.state_dict().items()},
        update={k: v.detach().clone() for k, v in grads.items()}, update_kind="gradient",
        num_examples=int(images.shape[0]), local_steps=1, lr=0.0,
        batch_size=int(images.shape[0]), defenses=tuple(defenses),
        knowledge=dict(knowledge or {}))


def fedavg_delta_record(task, spec, images, labels, *, lr: float, steps: int, batch_size: int,
                 knowledge=None) -> ObservationRecord:
    """A FedAvg record: ``new - global`` after ``steps`` torch.optim.SGD steps (eval mode)."""
    model = copy.deepcopy(task.model).eval()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = images.shape[0]
    for k in range(steps):
        idx = [(k * batch_size + j) % n for j in range(batch_size)]
        opt.zero_grad()
        F.cross_entropy(model(task.normalize(images[idx])), labels[idx]).backward()
        opt.step()
    glob = task.model.state_dict()
    new = model.state_dict()
    return ObservationRecord(
        run_id="test", server_round=1, client_id=0, tap="server_in", spec=spec,
        global_params={k: v.clone() for k, v in glob.items()},
        update={k: (new[k] - glob[k]).clone() for k in glob if glob[k].is_floating_point()},
        update_kind="delta", num_examples=n, local_steps=steps, lr=lr, batch_size=batch_size,
        knowledge=dict(knowledge or {}))
