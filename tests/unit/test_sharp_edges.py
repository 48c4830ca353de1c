"""Sharp edges a new user hits (issue 12 item 8): the attack's own view by default, extras in
attacks.jsonl, a crashed attack's error in report.html, one default run-directory name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import tomllib
import torch

from fl_sim.config import from_dict, save_resolved
from fl_sim.extras import MAX_INLINE, extras_to_json
from fl_sim.report import write_report
from fl_sim.run_dir.files import RESULTS_FILE

ROOT = Path(__file__).resolve().parents[2]


# -- [[attacks]] view ---------------------------------------------------------------------
def test_an_attack_entry_without_view_takes_the_attacks_own_view() -> None:
    cfg = from_dict({"federation": {"num_clients": 3, "peer_clients": [0]},
                     "attacks": [{"name": "peer_inversion"}, {"name": "idlg"},
                                 {"name": "noop", "view": "peer"}]})
    assert [a.view for a in cfg.attacks] == ["peer", "server", "peer"]
    # the resolved view is what config.json holds, and it loads back the same
    dumped = cfg.to_json_dict()
    assert [a["view"] for a in dumped["attacks"]] == ["peer", "server", "peer"]
    assert from_dict(dumped) == cfg


# -- extras ---------------------------------------------------------------------------------
def test_extras_are_strict_json_and_large_tensors_are_saved(tmp_path: Path) -> None:
    phase = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, MAX_INLINE)  # large, not images (values outside [0, 1])
    extras = {"restart_objectives": torch.tensor([0.25, float("inf")]), "survivors": (0, 3),
              "pruning": {"at": [4, 8], "kept": np.int64(2)}, "phase1_images": phase,
              "eps": noise, "note": object()}
    out = extras_to_json(extras, tmp_path, "attacks/ig_server_r1_c0_abc123")
    json.dumps(out, allow_nan=False)  # strict JSON
    assert out["restart_objectives"] == [0.25, None] and out["survivors"] == [0, 3]
    assert out["pruning"] == {"at": [4, 8], "kept": 2}
    img = out["phase1_images"]
    assert img["shape"] == [4, 1, 16, 16] and img["dtype"] == "float32"
    with np.load(tmp_path / img["file"]) as f:
        assert np.array_equal(f["array"], phase.numpy())
    assert (tmp_path / img["png"]).stat().st_size > 0
    assert img["file"].startswith("attacks/ig_server_r1_c0_abc123_phase1_images")
    assert "png" not in out["eps"] and (tmp_path / out["eps"]["file"]).is_file()
    assert out["eps"]["min"] == float(noise.min())
    assert out["note"].startswith("<object object")


# -- report.html ------------------------------------------------------------------------------
def test_a_crashed_attack_shows_its_error_in_the_report(tmp_path: Path) -> None:
    phase = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ok = {"attack": "gidm", "view": "server", "round": 1, "client": 0, "metrics": {"psnr": 20.0},
          "extras": extras_to_json({"phase1_images": phase.repeat(8, 1, 1, 1)}, tmp_path,
                                   "attacks/gidm_server_r1_c0_aaaaaa")}
    bad = {"attack": "dlg", "view": "server", "round": 1, "client": 2,
           "error": "ZeroDivisionError: plug-in bug <here>"}
    (tmp_path / RESULTS_FILE).write_text("\n".join(json.dumps(r) for r in (ok, bad)) + "\n")
    save_resolved(from_dict({}), tmp_path)  # write_report refuses a directory without a run
    page = write_report(tmp_path).read_text()
    assert "This attack failed" in page
    assert "ZeroDivisionError: plug-in bug &lt;here&gt;" in page  # escaped, verbatim
    assert page.count("data:image/png;base64,") == 1  # the phase-1 figure from extras
    assert "phase1_images" in page


def test_the_report_puts_each_attack_beside_the_runs_utility_and_epsilon(tmp_path: Path
                                                                        ) -> None:
    """Issue 9 item 7: a defended run shows the price of the defense next to what it buys."""
    pruned = {"name": "pruning", "ratio": 0.9, "scope": "layer"}
    rows = [{"attack": "inverting_gradients", "view": "server", "round": 1, "client": 0,
             "metrics": {"psnr": 12.5, "ssim": 0.31}, "defenses": [pruned]},
            {"attack": "inverting_gradients", "adaptive": True, "view": "server", "round": 1,
             "client": 0, "metrics": {"psnr": 17.25}, "defenses": [pruned]}]
    (tmp_path / RESULTS_FILE).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in (
        {"round": 1, "eval_accuracy": 0.25, "dp_epsilon": 1.5},
        {"round": 2, "eval_accuracy": 0.625, "dp_epsilon": 2.75})) + "\n")
    save_resolved(from_dict({}), tmp_path)
    page = write_report(tmp_path).read_text()
    table = page[page.index("Privacy and utility"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 3  # header + one row per attack
    for cell in ("12.5", "17.25", "0.625", "2.75", "pruning(ratio=0.9, scope=layer)",
                 "inverting_gradients (adaptive)"):
        assert cell in table, cell
    assert "0.25" not in table  # the LAST round's utility, not the first


# -- run-directory name -----------------------------------------------------------------------
def test_the_default_run_directory_name_is_the_documented_one(tmp_path: Path) -> None:
    from fl_sim.federation.server_app import default_run_dir
    cfg = from_dict({"run": {"name": "demo", "output_dir": str(tmp_path)}})
    made = default_run_dir(cfg)
    assert made.parent == tmp_path and re.fullmatch(r"demo-\d{8}-\d{6}", made.name), made
    documented = "name>-<YYYYmmdd-HHMMSS>"  # docs: <name>-…, pyproject: <run.name>-…
    assert documented in (ROOT / "docs" / "reference" / "run-directory.md").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert documented in pyproject and "<name>-<seed>" not in pyproject
    assert tomllib.loads(pyproject)["tool"]["flwr"]["app"]["config"]["run-dir"] == ""
