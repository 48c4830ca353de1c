"""The tests' CIFAR-10 reference cases: the library's (:mod:`fl_sim.cases`) bound to the
vendored slice ``tests/data/cifar10_ref.npz`` (test images 0-31 and training images 0-127 of
the shared CIFAR-10 file, pixel for pixel; provenance in ``tests/data/README.md``), so every
test runs on a clean clone. Every record (:func:`make_record`, :func:`fedavg_delta_record`) is
recorded in a run directory and read back through the server view with the declared grant::

    from attack_cases import cifar_images, cifar_labels, make_record, make_task

    images = cifar_images(8)                      # [8, 3, 32, 32] float32 in [0, 1]
    task, spec = make_task("lenet", seed=0)
    record = make_record(task, spec, images, cifar_labels(8), knowledge={"labels": y})

Import as ``attack_cases`` (``tests/`` is on ``sys.path`` under pytest's rootdir conftest).
Benchmarks import :mod:`fl_sim.cases` and pass the file's path themselves.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from fl_sim import cases
from fl_sim.cases import (  # noqa: F401  (re-exported for the tests)
    CIFAR_MEAN,
    CIFAR_STD,
    REFERENCE_MODELS,
    fedavg_delta_record,
    make_record,
    make_spec,
    make_task,
    torch_threads,
)

#: the vendored reference images (``x_test`` [32], ``x_train`` [128], uint8 NHWC)
CIFAR_FILE = Path(__file__).resolve().parent / "data" / "cifar10_ref.npz"


def cifar_train_images(n: int) -> Tensor:
    """The first ``n`` (<= 128) vendored CIFAR-10 training images, ``[n, 3, 32, 32]``."""
    return cases.cifar_train_images(CIFAR_FILE, n)


def cifar_images(n: int, start: int = 0) -> Tensor:
    """Vendored CIFAR-10 test images ``start .. start+n-1``, ``[n, 3, 32, 32]`` in [0, 1]."""
    return cases.cifar_images(CIFAR_FILE, n, start)


def cifar_labels(n: int, start: int = 0) -> Tensor:
    """Vendored CIFAR-10 test labels ``start .. start+n-1`` as int64 ``[n]``."""
    return cases.cifar_labels(CIFAR_FILE, n, start)


def cifar_distinct(n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` vendored test images whose labels are pairwise distinct."""
    return cases.cifar_distinct(CIFAR_FILE, n)
