"""The tests' diffusion cases: the library's (:mod:`fl_sim.cases`) plus the session fixture.

The realistic setting of issue 8: a tiny DDPM (``unet`` preset ``tiny``) trained centrally by
:func:`fl_sim.train_prior.train_prior` on scikit-learn's bundled digits (TRAIN split) is the
global model; the victims are digits of the TEST split. Every record (FedSGD gradient or
FedAvg delta with per-example ``eps``/``t``) is recorded in a run directory and read back
through the server view, eps/t granted unless ``grant=False``::

    from diffusion_cases import digits_prior, digits_victims, global_task, diffusion_record

    def test_x(digits_prior):                    # session-scoped, trained once (~1 min)
        task, spec = global_task(digits_prior)
        record = diffusion_record(task, spec, digits_victims(2), t=[50, 120])

Import as ``diffusion_cases`` (``tests/`` is on ``sys.path`` under pytest). Benchmarks import
:mod:`fl_sim.cases`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_sim.cases import (  # noqa: F401  (re-exported for the tests)
    DIGITS_PRIOR_CONFIG,
    IMAGE_SIZE,
    NUM_TRAIN_TIMESTEPS,
    diffusion_delta_record,
    diffusion_record,
    diffusion_spec,
    digits_victims,
    draw_aux,
    global_task,
    train_digits_prior,
)

#: the prior of the quality tests (the library's, so benchmarks train the very same one)
PRIOR_CONFIG = DIGITS_PRIOR_CONFIG


@pytest.fixture(scope="session")
def digits_prior(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the digits prior, trained once per test session."""
    return train_digits_prior(tmp_path_factory.mktemp("digits_prior"))
