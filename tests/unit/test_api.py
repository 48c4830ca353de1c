"""The Python API's pieces that need no federation (the run itself: tests/integration/
test_python_api.py): configs from dicts, DataFrames and their missing-pandas error, plug-in
parameters shown by ``fl-sim list`` / ``fl-sim validate``, a light ``import fl_sim``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from fl_sim import api, cli
from fl_sim.errors import ConfigError, MissingDependencyError

ROOT = Path(__file__).resolve().parents[2]


def test_config_from_dict_with_overrides_equals_the_toml_file() -> None:
    raw = tomllib.loads((ROOT / "configs" / "default.toml").read_text())
    from_dict = api.load_config(raw, ["federation.num_rounds=3", "attacks.1.restarts=2"])
    from_file = api.load_config(ROOT / "configs" / "default.toml",
                                ["federation.num_rounds=3", "attacks.1.restarts=2"])
    assert from_dict == from_file
    assert from_dict.federation.num_rounds == 3 and from_dict.attacks[1].params["restarts"] == 2
    assert api.load_config(from_dict) is from_dict  # an ExperimentConfig passes through
    with pytest.raises(ConfigError, match="federation.num_rounds"):
        api.load_config(raw, ["federation.num_rounds=0"])


def test_resolved_plugins_include_defaults_never_given() -> None:
    cfg = api.load_config(ROOT / "configs" / "default.toml")
    by_where = {p["where"]: p for p in api.resolved_plugins(cfg)}
    ig = by_where["attacks[1]"]
    assert ig["name"] == "inverting_gradients"
    assert ig["params"]["max_iterations"] == 200           # given in the config
    assert ig["params"]["restarts"] == 1 and ig["params"]["lr"] == 0.1  # defaults
    assert "restarts" not in cfg.attacks[1].params
    assert by_where["model"]["params"] == {"hidden": (256,)}


def test_dataframe_of_records_and_a_clear_error_without_pandas(monkeypatch) -> None:
    pytest.importorskip("pandas")
    records = [{"round": 1, "eval_accuracy": 0.25}, {"round": 2, "eval_accuracy": 0.5}]
    df = api.to_dataframe(records)
    assert list(df["round"]) == [1, 2] and df["eval_accuracy"].tolist() == [0.25, 0.5]
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"fl-sim\[pandas\]"):
        api.to_dataframe(records)


def test_list_attack_shows_parameters_with_types_defaults_and_help(capsys) -> None:
    assert cli.main(["list", "attacks", "inverting_gradients"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines()
             if line.count("│") >= 4 and line.split("│")[1].strip()}
    assert "│ int " in lines["max_iterations"] and "│ 600 " in lines["max_iterations"]
    assert "per restart" in lines["max_iterations"]               # help from the docstring
    assert "│ 0.2 " in lines["tv_weight"] and "│ float " in lines["tv_weight"]
    assert "'cosine' | 'l2'" in lines["distance"] and "'cosine'" in lines["distance"]
    assert cli.main(["list", "attacks", "no_such_attack"]) == 2


def test_list_kind_shows_each_plugins_defaults(capsys) -> None:
    assert cli.main(["list", "defenses"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ratio=0.9" in out and "noise_multiplier=1.0" in out


def test_validate_prints_resolved_plugin_parameters(capsys) -> None:
    assert cli.main(["validate", "configs/default.toml"]) == 0
    err = capsys.readouterr().err
    ig = next(line for line in err.splitlines() if line.strip().startswith("attacks[1]:"))
    assert "inverting_gradients" in ig and "max_iterations=200" in ig and "restarts=1" in ig


def test_import_fl_sim_and_api_stay_light() -> None:
    code = ("import sys, fl_sim, fl_sim.api; fl_sim.run; "
            "print(sorted(m for m in ('flwr', 'ray', 'pandas', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_privacy_table_tells_results_of_one_attack_apart() -> None:
    """Two IG results that differ only in ``restarts``, and one on another client: the
    report's privacy table has client and parameter columns, so no two rows read alike."""
    from fl_sim.attack_runner import resolved_params
    from fl_sim.report import _privacy_utility

    def result(client: int, psnr: float, **given: object) -> dict:
        return {"attack": "inverting_gradients", "view": "server", "round": 1,
                "client": client, "params": resolved_params("inverting_gradients", given),
                "metrics": {"psnr": psnr}, "defenses": []}

    rows = [result(1, 30.0), result(1, 35.0, restarts=4), result(2, 31.0)]
    html = _privacy_utility(rows, [])
    assert "<th>client</th>" in html and "<th>params</th>" in html
    assert html.count("restarts=1") == 2 and html.count("restarts=4") == 1
    assert "max_iterations=" not in html  # the same in every row: not repeated
    body = [r for r in html.split("<tr>")[2:]]
    assert len(body) == 3 and len(set(body)) == 3
