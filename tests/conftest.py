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
from typing import Any

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = _ROOT.parent / "shared" / "data"


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
_PRIOR_FILES = ("test_gidm.py", "test_gidm_plus.py", "test_gidm_quality.py",
                "test_peer_diffusion_prior.py", "test_gias.py", "test_prior_overlap.py",
                "test_gidm_plus_solve.py")
#: Test files outside tests/integration whose tests start Ray (marker ``ray``).
_FEDERATION_FILES = ("tests/unit/test_cli.py",)


def _group(path: str) -> str:
    """The xdist work unit of a test file (``path`` relative to the repository root):
    everything that starts Ray, a SuperLink or subprocesses is ONE unit ("federation", run on
    one worker one test at a time: two Ray clusters on 2 cores would starve each other's
    timeouts); the prior-sharing GIDM files are one unit; any other file is its own unit
    (module fixtures are built once).

    >>> _group("tests/integration/test_demo.py"), _group("tests/unit/test_gidm.py")
    ('federation', 'digits-prior')
    """
    if path.startswith("tests/integration/") or path in _FEDERATION_FILES:
        return "federation"
    if Path(path).name in _PRIOR_FILES:
        return "digits-prior"
    return path


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``make test`` (``-n 2``): xdist's file scheduling with the groups of :func:`_group`.

    (xdist's own ``--dist loadgroup`` cannot be used: it renames items through
    ``item._nodeid``, which pytest 9.2 no longer reads, so its groups are silently ignored.)"""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid.split("::", 1)[0])

    return GroupScheduling(config, log)


def pytest_itemcollected(item: pytest.Item) -> None:
    """A test that starts Ray or a SuperLink must belong to the "federation" unit."""
    if item.get_closest_marker("ray") or item.get_closest_marker("deployment"):
        path = Path(str(item.fspath)).resolve().relative_to(_ROOT).as_posix()
        if _group(path) != "federation":
            raise pytest.UsageError(f"{item.nodeid} starts Ray/a SuperLink: add its file to "
                                    "_FEDERATION_FILES in tests/conftest.py")
