"""Plug-ins registered only in the driver (a notebook cell, a script) are refused before a
run starts, in one line saying how to install them; a user's package called ``attacks`` or
``defenses`` cannot silently hide fl-sim's built-ins; a defense's name is declared once."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from defenses.base import UpdateDefense
from fl_sim import api
from fl_sim.errors import PluginError
from fl_sim.plugin_reach import check_plugins_reach_workers
from fl_sim.registry import ATTACKS, DEFENSES, Registry

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def notebook_plugins():
    """A defense and an attack registered the way a notebook does: decorator only."""

    @dataclass(frozen=True)
    class HalveUpdate(UpdateDefense):
        """Halve every entry of the update."""

        def apply(self, update, ctx):  # pragma: no cover - never reaches a client
            return {k: v / 2 for k, v in update.items()}

    from attacks.noop import Noop

    class NotebookAttack(Noop):
        """An attack defined in a notebook."""

    DEFENSES.register("notebook_halve")(HalveUpdate)
    ATTACKS.register("notebook_attack")(NotebookAttack)
    yield
    DEFENSES._entries.pop("notebook_halve")
    ATTACKS._entries.pop("notebook_attack")


def _cfg(**extra):
    return api.load_config(ROOT / "configs" / "default.toml", [
        "federation.num_rounds=1", *(f"{k}={v}" for k, v in extra.items())])


def test_notebook_defense_is_refused_with_how_to_install(notebook_plugins) -> None:
    cfg = _cfg(defenses='[{name = "notebook_halve"}]')  # the driver's config check passes
    with pytest.raises(PluginError) as exc:
        check_plugins_reach_workers(cfg, engine="simulation")
    msg = str(exc.value)
    assert "\n" not in msg and "defense 'notebook_halve'" in msg
    assert '[project.entry-points."fl_sim.defenses"] notebook_halve = ' in msg
    assert "docs/PLUGINS.md" in msg
    check_plugins_reach_workers(_cfg(defenses='[{name = "pruning"}]'))  # built-in: fine


def test_notebook_attack_runs_in_the_driver_but_not_on_supernodes(notebook_plugins) -> None:
    cfg = _cfg(attacks='[{name = "notebook_attack", view = "server", rounds = [1]}]')
    check_plugins_reach_workers(cfg, engine="simulation")  # the ServerApp is in-process
    with pytest.raises(PluginError, match="attack 'notebook_attack'.*fl_sim.attacks"):
        check_plugins_reach_workers(cfg, engine="deployment")


def test_defense_name_is_declared_once_in_the_decorator() -> None:
    reg: Registry = Registry("defense", name_attribute="name")

    @dataclass(frozen=True)
    class Clip(UpdateDefense):
        def apply(self, update, ctx):  # pragma: no cover
            return update

    reg.register("clip")(Clip)
    assert Clip.name == "clip" and Clip().describe()["name"] == "clip"
    assert DEFENSES.get("pruning").name == "pruning"  # built-ins declare it once too

    @dataclass(frozen=True)
    class Other(UpdateDefense):
        name = "something_else"

        def apply(self, update, ctx):  # pragma: no cover
            return update

    with pytest.raises(PluginError, match="declares name = 'something_else'"):
        reg.register("other")(Other)


def test_a_users_attacks_package_cannot_hide_the_builtins(tmp_path: Path) -> None:
    (tmp_path / "attacks").mkdir()
    (tmp_path / "attacks" / "__init__.py").write_text('"""My own attacks."""\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "fl_sim.cli", "list", "attacks"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"'attacks' was imported from {tmp_path / 'attacks'}" in lines[0]
    assert "hides fl-sim's built-in attacks" in lines[0]


def test_notebook_attack_refused_for_bench_cells_on_ray(notebook_plugins, tmp_path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(f'[bench]\nname = "g"\nbase = "{ROOT / "configs" / "default.toml"}"\n'
                    '[[attacks]]\nname = "notebook_attack"\nclient = 1\n')
    with pytest.raises(PluginError, match="attack 'notebook_attack'.*Ray tasks"):
        api.bench(grid, out=tmp_path / "bench", workers=2)
    assert not (tmp_path / "bench").exists()  # refused before anything was written
