"""Registries: duplicates refused, unknown names list the known ones, entry-point plug-ins."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fl_sim.errors import ConfigError, PluginError
from fl_sim.registry import ATTACKS, MODELS, Registry


def test_duplicate_names_are_refused() -> None:
    reg: Registry[object] = Registry("gadget")

    @reg.register("a")
    def first() -> None:
        """First gadget."""

    with pytest.raises(PluginError, match="duplicate gadget 'a': already registered by .*first"):
        @reg.register("a")
        def second() -> None: ...
    assert reg.get("a") is first
    assert [e.description for e in reg.entries()] == ["First gadget."]


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(PluginError) as info:
        MODELS.get("alexnet")
    assert str(info.value) == "unknown model 'alexnet'; known: convnet, lenet, mlp, resnet18, unet"


def test_create_validates_params_from_the_signature() -> None:
    with pytest.raises(ConfigError, match=r"model\.width: Input should be a valid integer"):
        MODELS.create("convnet", 3, 10, 32, _where="model", width=[4])
    # a number written as a string is refused, not converted (lax mode took "4" as 4)
    with pytest.raises(ConfigError, match=r"model\.width: a string where a number is expected"):
        MODELS.create("convnet", 3, 10, 32, _where="model", width="4")
    with pytest.raises(ConfigError, match=r"model\.depth: unknown key; allowed: width"):
        MODELS.create("convnet", 3, 10, 32, _where="model", depth=3)
    net = MODELS.create("convnet", 3, 10, 32, width=4)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_every_builtin_attack_is_described() -> None:
    for entry in ATTACKS.entries():
        assert entry.description, entry.name


def test_third_party_plugin_via_entry_point(tmp_path: Path) -> None:
    """A package exposing ``fl_sim.attacks`` entry points shows up in `fl-sim list`."""
    pkg = tmp_path / "site"
    (pkg / "myattack").mkdir(parents=True)
    (pkg / "myattack" / "__init__.py").write_text(textwrap.dedent('''
        from attacks.noop import Noop
        from fl_sim.registry import ATTACKS

        @ATTACKS.register("third_party_probe")
        class Probe(Noop):
            """A third-party attack registered through an entry point."""
    '''))
    dist = pkg / "myattack-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myattack\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fl_sim.attacks]\nprobe = myattack\n")
    out = subprocess.run([sys.executable, "-m", "fl_sim.cli", "list", "attack"],
                         capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(pkg), "PATH": "/usr/bin:/bin",
                              "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "third_party_probe" in out.stdout
    assert "A third-party attack registered through an entry point." in out.stdout
