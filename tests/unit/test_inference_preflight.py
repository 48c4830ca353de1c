"""Bad membership / property inference parameters are refused before the run starts: one
line on stderr, exit 2, nothing written, Ray never reached (issue 22 item 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_sim import cli

DEFAULT = str(Path(__file__).resolve().parents[2] / "configs" / "default.toml")
BASE = ("federation.num_clients=3", "federation.num_rounds=2", "federation.peer_clients=[0]")

CASES = {
    "no candidates": ('attacks=[{name="mia_gradient", num_members=0}]',
                      "attacks[0] (mia_gradient): mia_gradient.num_members: got 0"),
    "undefined property": ('attacks=[{name="property_inference", property_class=10}]',
                           "property_class = 10 is no class of data 'digits' (classes 0-9)"),
    "shadow models > data": ('attacks=[{name="mia_lira", shadow_size=5000}]',
                             "needs 5200 held-out examples (num_nonmembers 200 + shadow_size "
                             "5000) but at most"),
    "one shadow": ('attacks=[{name="mia_rmia", num_shadows=1}]', "at least 2"),
    "local model under fedsgd": ('attacks=[{name="mia_lira", target="local"}]',
                                 'target = "local" rebuilds a client\'s model from a FedAvg'),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_inference_parameters_exit_2_in_one_line_before_the_run(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], no_ray: None, keep_logging: None) -> None:
    setting, expected = CASES[name]
    monkeypatch.chdir(tmp_path)
    argv = ["run", DEFAULT, *(a for s in (*BASE, setting) for a in ("--set", s))]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # nothing written
