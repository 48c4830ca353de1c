"""A table of bad inputs: each ends with exit 2 and ONE line on stderr, before any work.

Config values, data files, run directories and attack entries, run as a user runs them but
in-process (``fl_sim.cli.main``; one subprocess case checks the real entry point). Every case
asserts: exit status 2, exactly one stderr line starting ``fl-sim: error:``, no traceback, no
run directory created (nothing new under the output directory) and Ray never started
(``run_simulation`` and ``ray.init`` fail the test if reached). The cases themselves are in
``tests/bad_input_table.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bad_input_table import CASES, DEFAULT, ERROR_ROW_CASES, NEEDS_NO_CUDA, make_run

from fl_sim import cli
from fl_sim.run_dir.files import RESULTS_FILE, load_results

#: Seconds the whole table may take in-process (imports included; it never starts Ray).
TABLE_BUDGET_S = 150.0
_elapsed: list[float] = []


def _tree(path: Path) -> set[Path]:
    return set(path.rglob("*"))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_before_any_work(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], no_ray: None, keep_logging: None) -> None:
    make, expected = CASES[name]
    if name in NEEDS_NO_CUDA and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default run.output_dir ("runs") lands here
    argv = make(tmp_path)
    before = _tree(tmp_path)
    t0 = time.perf_counter()
    rc = cli.main(argv)
    _elapsed.append(time.perf_counter() - t0)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("fl-sim: error: "), err
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]
    created = {p for p in _tree(tmp_path) - before if "__pycache__" not in p.parts}
    if name in ERROR_ROW_CASES:  # the refusal is recorded as a result row with the error
        results = {p for p in created if p.name == RESULTS_FILE}
        assert len(results) == 1 and "error" in load_results(results.pop().parent)[0]
        created = {p for p in created if p.name != RESULTS_FILE}
    assert not created, f"{name} created {sorted(map(str, created))}"


def test_table_is_large_and_ran_without_ray_in_bounded_time() -> None:
    assert len(CASES) >= 40
    assert sum(_elapsed) < TABLE_BUDGET_S, (len(_elapsed), sum(_elapsed))


# -- what the refusals leave behind ----------------------------------------------------------
def test_nan_record_refusal_is_recorded_once_as_an_error(tmp_path: Path,
                                                         keep_logging: None) -> None:
    run = make_run(tmp_path, nan_update=True)
    for _ in range(2):
        assert cli.main(["attack", str(run), "--attack", "noop", "--client", "1"]) == 2
    rows = load_results(run)
    assert len(rows) == 1 and "InvalidRecordError" in rows[0]["error"]
    assert "psnr" not in json.dumps(rows[0])
    assert not (run / "report.html").exists()


def test_replaying_the_same_attack_adds_no_duplicate_row(tmp_path: Path,
                                                         keep_logging: None) -> None:
    run = make_run(tmp_path)
    args = ["attack", str(run), "--attack", "noop", "--client", "2"]
    assert cli.main(args) == 0
    first = (run / RESULTS_FILE).read_text()
    assert cli.main(args) == 0
    assert (run / RESULTS_FILE).read_text() == first  # not re-run, not appended
    assert cli.main([*args, "--round", "1", "--set", "view=server"]) == 0  # other params
    assert len(load_results(run)) == 2
    assert cli.main(["attack", str(run), "--attack", "noop", "--client", "0", "--round", "1",
                     "--round", "1"]) == 0  # one new result, run once
    assert len((run / RESULTS_FILE).read_text().splitlines()) == 3


@pytest.mark.slow
def test_the_real_entry_point_exits_2_with_one_line(tmp_path: Path) -> None:
    # clients without data: formerly ~1,200 traceback lines after Ray started
    out = subprocess.run(
        [sys.executable, "-m", "fl_sim.cli", "run", DEFAULT, "--set", "data.max_train=5",
         "--set", "federation.num_clients=8", "--set", "federation.peer_clients=[]",
         "--set", "attacks=[]", "--set", f'run.output_dir="{tmp_path / "runs"}"'],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "fl-sim: error: partition 'iid': clients [5, 6, 7] received no samples (5 samples "
        "over 8 clients); use fewer clients or other partition parameters"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("state", "match"), [
    ({"round": 1, "global": "../config.json", "strategy": "x"}, "refusing"),
    ({"round": 1, "strategy": "x"}, "corrupt checkpoint"),
    ({"round": "one", "global": "a", "strategy": "b"}, "corrupt checkpoint"),
])
def test_checkpoint_state_is_validated_when_loaded(tmp_path: Path, state: dict[str, object],
                                                   match: str) -> None:
    from fl_sim.errors import RunDirError
    from fl_sim.federation.checkpoint import CheckpointStore
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps(state))
    with pytest.raises(RunDirError, match=match):
        CheckpointStore(tmp_path).load()


def test_an_unexpected_error_is_one_internal_error_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        keep_logging: None) -> None:
    """A bug (no FlSimError) in any subcommand: one line and exit 1, not a traceback; the
    traceback stays available with --debug."""
    def broken(args: object) -> int:
        raise ZeroDivisionError("boom\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "list", broken)
    assert cli.main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "fl-sim: internal error: ZeroDivisionError: boom second line (please report it; "
        "`fl-sim --debug ...` shows the traceback)"]
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "list"])
