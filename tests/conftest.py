"""Shared pytest configuration.

This file's presence puts ``tests/`` on ``sys.path`` (pytest's rootdir-conftest rule), so test
modules import the shared fixtures as ``from attack_cases import ...``.

Every test ``make test`` runs works on a clean clone alone: the real images the quality tests
need are vendored in ``tests/data/`` (provenance there) and reader tests build their own tiny
files. ``../shared/data`` is for benchmarks; a test that still asks for it through
:func:`shared_data` FAILS under ``CI=true`` instead of skipping.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data`` (benchmark data, never in the repo): skip if absent, but fail
    under ``CI=true`` (a skipped test proves nothing)."""
    if not SHARED_DATA.is_dir():
        msg = f"shared test data not found at {SHARED_DATA}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " (CI=true: a test that needs it must not skip)")
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _one_thread_in_slow_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """Slow (reference-quality) tests run with one torch thread: on a loaded 2-core runner two
    threads made them 3-4x slower, and their results do not depend on it."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread avoids OpenMP oversubscription on 2-core runners."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reaching Ray at all fails the test: a bad input must fail before it."""
    import flwr.simulation
    import ray

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("Ray was started for a bad input")

    monkeypatch.setattr(flwr.simulation, "run_simulation", refuse)
    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """cli.main configures the root logger; give pytest its handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def flower_task_identity() -> Iterator[None]:
    """Flower's ``Message()`` needs the process' task identity (set by its runtimes); tests
    that build messages by hand set one and restore it. flwr is imported only here, so test
    modules that never ask for it do not load it."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


#: Test files that share the session-trained digits prior (tests/diffusion_cases.py): one
#: xdist worker runs them all, so the prior is trained once.
_PRIOR_FILES = ("test_gidm.py", "test_gidm_plus.py", "test_gidm_quality.py")


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist (``make test``: two workers on two cores) each worker uses one torch
    thread, so the two never oversubscribe the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups for ``pytest -n 2 --dist loadgroup`` (``make test``): every test that starts
    Ray, a SuperLink or subprocesses (tests/integration, markers ray/deployment) runs on ONE
    worker, one at a time (two Ray clusters on 2 cores would starve each other's timeouts);
    the tests of one file stay together (module fixtures are built once); the prior-sharing
    files form one group. The other worker meanwhile runs the single-threaded unit tests."""
    for item in items:
        path = Path(str(item.fspath))
        if "integration" in path.parts or item.get_closest_marker("ray") or \
                item.get_closest_marker("deployment"):
            group = "federation"
        elif path.name in _PRIOR_FILES:
            group = "digits-prior"
        else:
            group = str(path)
        item.add_marker(pytest.mark.xdist_group(group))
