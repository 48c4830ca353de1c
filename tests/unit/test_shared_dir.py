"""The run-directory check every client runs at node discovery (multi-node Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_sim.errors import FlSimError
from fl_sim.federation.shared_dir import MARKER, TOKEN_KEY, check_probe, write_probe


def test_a_node_that_sees_the_run_directory_passes(tmp_path: Path) -> None:
    probe = write_probe(tmp_path)
    check_probe(probe, where="client 3's node (here)")        # same path, same token
    assert (tmp_path / MARKER).read_text() == probe[TOKEN_KEY]
    assert not list(tmp_path.glob(".tmp-*"))
    check_probe({}, where="a query without a probe")          # nothing to check


def test_a_node_without_the_run_directory_fails_with_one_line(tmp_path: Path) -> None:
    probe = write_probe(tmp_path)
    elsewhere = {**probe, "fl-sim-run-dir": str(tmp_path / "not-shared")}
    with pytest.raises(FlSimError, match="not reachable from client 3's node .* has no "
                       "marker there.*same path on a shared file system") as info:
        check_probe(elsewhere, where="client 3's node (n2)")
    assert "\n" not in str(info.value)
    write_probe(tmp_path)                                    # a later run, same path
    with pytest.raises(FlSimError, match="holds another run's marker"):
        check_probe(probe, where="client 0's node (n1)")
