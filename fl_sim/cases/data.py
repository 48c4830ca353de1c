"""The images, models and prior of the reference cases (tests and benchmarks share them).

* CIFAR-10: the vendored slice ``tests/data/cifar10_ref.npz`` (test images 0-31, training
  images 0-127, uint8 NHWC; provenance in ``tests/data/README.md``), or any npz with the same
  keys (e.g. one cut from ``../shared/data``), given as ``path`` — the library ships no data;
* digits: scikit-learn's bundled set (the ``digits`` source, grey 16x16), TEST split for
  victims (never seen by the prior), TRAIN split for the prior;
* the digits prior: :data:`~fl_sim.cases.federation.DIGITS_PRIOR_CONFIG`, trained by
  :func:`train_digits_prior`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fl_sim.cases.federation import DIGITS_PRIOR_CONFIG
from fl_sim.priors import load_unet
from fl_sim.records import ModelSpec
from fl_sim.registry import DATA_SOURCES
from fl_sim.tasks import build_task
from fl_sim.train_prior import train_prior

CIFAR_MEAN = (0.4915, 0.4823, 0.4468)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
#: model params of the reference cases (registry name -> params)
REFERENCE_MODELS: dict[str, dict[str, Any]] = {
    "lenet": {"activation": "sigmoid"},
    "convnet": {"width": 64},
    "resnet18": {},
}
IMAGE_SIZE = 16
NUM_TRAIN_TIMESTEPS = 1000


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


# -- CIFAR-10 (a vendored npz given by path) -------------------------------------------------
@functools.lru_cache(maxsize=4)
def _npz(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as d:
        return d[f"x_{split}"], d[f"y_{split}"]


def _check_range(path: Path, stop: int, available: int) -> None:
    if stop > available:
        raise ValueError(f"asked for CIFAR-10 images up to index {stop - 1}; {path.name} "
                         f"holds {available}")


def _to_tensor(x: np.ndarray) -> Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255.0)


def cifar_train_images(path: Path, n: int) -> Tensor:
    """The first ``n`` training images of the npz ``path``, float32 ``[n, 3, 32, 32]``."""
    x, _ = _npz(str(path), "train")
    _check_range(Path(path), n, len(x))
    return _to_tensor(x[:n])


def cifar_images(path: Path, n: int, start: int = 0) -> Tensor:
    """Test images ``start .. start+n-1`` of ``path`` as float32 ``[n, 3, 32, 32]`` in [0, 1].

    Raises ``ValueError`` past the images the file holds.
    """
    x, _ = _npz(str(path), "test")
    _check_range(Path(path), start + n, len(x))
    return _to_tensor(x[start:start + n])


def cifar_labels(path: Path, n: int, start: int = 0) -> Tensor:
    """Test labels ``start .. start+n-1`` of ``path`` as int64 ``[n]``."""
    _, y = _npz(str(path), "test")
    _check_range(Path(path), start + n, len(y))
    return torch.from_numpy(y[start:start + n]).long()


def cifar_distinct(path: Path, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` test images (index order) whose labels are pairwise distinct:
    ``(images [n, 3, 32, 32], labels [n])``; ``n`` must be <= 10 (else ``ValueError``)."""
    if not 1 <= n <= 10:
        raise ValueError(f"CIFAR-10 has 10 classes; cannot pick {n} distinct labels")
    x, y = _npz(str(path), "test")
    picked: list[int] = []
    seen: set[int] = set()
    for i, label in enumerate(y.tolist()):
        if label not in seen:
            seen.add(label)
            picked.append(i)
            if len(picked) == n:
                break
    idx = np.array(picked)
    return _to_tensor(x[idx]), torch.from_numpy(y[idx]).long()


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

    spec = make_spec(model, model_params)
    task = build_task(spec, seed=seed)
    task.model.train(train)
    return task, spec


# -- digits and the digits prior --------------------------------------------------------------
def train_digits_prior(out_dir: Path, *, steps: int | None = None) -> Path:
    """Train the digits prior of :data:`DIGITS_PRIOR_CONFIG` into ``out_dir`` (one thread);
    returns the prior's path. Resumes/returns at once if ``out_dir`` already holds it."""

    cfg = {k: dict(v) for k, v in DIGITS_PRIOR_CONFIG.items()}
    if steps is not None:
        cfg["training"]["steps"] = cfg["training"]["checkpoint_every"] = steps
    with torch_threads(1):
        return Path(train_prior(cfg, out_dir))


@functools.lru_cache(maxsize=1)
def _digits_test() -> Tensor:

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

    spec = diffusion_spec()
    task = build_task(spec, seed=seed)
    if prior is not None:
        task.model.load_state_dict(load_unet(Path(prior) / "unet").state_dict())
    task.model.train()
    return task, spec
