"""Shared pytest configuration.

This file's presence puts ``tests/`` on ``sys.path`` (pytest's rootdir-conftest rule), so test
modules import the shared fixtures as ``from attack_cases import ...``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data`` (real test images, never in the repo); skip if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread avoids OpenMP oversubscription on 2-core runners."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
