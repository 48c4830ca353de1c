"""The documentation site (issue 19 item 7): the plug-in reference is generated from the
registries (docs/hooks.py, run by ``mkdocs build``), so every registered plug-in gets a section
with its parameters; the README stays short and starts with the two commands.

The site itself is built by ``make docs`` (``mkdocs build --strict``) in CI, not here: the
build takes ~10-20 s, and these checks cover what a unit test can see cheaply.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from fl_sim.cli import _positional
from fl_sim.registry import ALL_REGISTRIES, describe_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("fl_sim_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:"):]
    return re.findall(r"(?m)^\s+-\s+(?:[^:\n]+:\s+)?([\w./-]+\.md)\s*$", nav)


@pytest.mark.parametrize("kind", list(ALL_REGISTRIES))
def test_every_registered_plugin_has_a_generated_reference_section(hooks, kind: str) -> None:
    page = hooks.render_kind(kind)
    registry = ALL_REGISTRIES[kind]
    assert registry.names(), kind
    for entry in registry.entries():
        section = page.split(f"\n## `{entry.name}`\n", 1)
        assert len(section) == 2, f"{kind} {entry.name} has no section"
        body = section[1].split("\n## ", 1)[0]
        for p in describe_params(entry.obj, skip=_positional(kind)):
            # each parameter's row carries its default as fl-sim list shows it
            default = "(required)" if p.required else f"`{p.default!r}`"
            assert f"| `{p.name}` |" in body and default.replace("|", "\\|") in body, \
                (kind, entry.name, p.name)
    # the page is reachable: the site's navigation lists it and the index links it
    assert hooks.page_name(kind) in _nav_pages(), kind
    assert hooks.page_name(kind).removeprefix("reference/plugins/") in hooks.render_index()


def test_every_page_of_the_navigation_exists_or_is_generated(hooks) -> None:
    generated = {hooks.page_name(k) for k in ALL_REGISTRIES} | {"reference/plugins/index.md"}
    pages = _nav_pages()
    assert len(pages) >= 40, pages  # the parse found the nav (it lists ~50 pages today)
    missing = [p for p in pages if p not in generated and not (ROOT / "docs" / p).is_file()]
    assert not missing, missing
    assert "docs/hooks.py" in (ROOT / "mkdocs.yml").read_text()


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, len(lines)
    head = "\n".join(lines[:20])
    assert re.search(r"(?m)^make demo\b", head) and re.search(r"(?m)^make test\b", head), head
    # its links into docs/ lead to pages that exist (mkdocs --strict checks the site's own)
    for target in re.findall(r"\]\((docs/[^)#\s]+)", "\n".join(lines)):
        assert (ROOT / target).is_file(), target


def test_the_configuration_reference_lists_every_config_key(hooks) -> None:
    from fl_sim.config import ExperimentConfig, from_dict

    table = hooks.render_config_keys()
    # the resolved default config (what config.json holds) names every key a user can set
    resolved = from_dict({}).to_json_dict()
    assert set(resolved) == set(ExperimentConfig.model_fields)

    def leaves(prefix: str, value: object) -> list[str]:
        if isinstance(value, dict):
            return [k for key, v in value.items() for k in leaves(f"{prefix}{key}.", v)]
        return [prefix[:-1]]

    keys = [k for section, v in resolved.items() if isinstance(v, dict)
            for k in leaves(f"{section}.", v)]
    assert len(keys) >= 30, keys
    # a plug-in section's other keys are the plug-in's parameters (data.seed of digits):
    # the plug-in pages list those
    plugin_params = [k for k in keys if "name" in resolved[k.split(".")[0]]
                     and k.count(".") == 1 and k.split(".")[1]
                     not in type(getattr(from_dict({}), k.split(".")[0])).model_fields]
    missing = [k for k in keys if f"| `{k}` |" not in table and k not in plugin_params]
    assert not missing, missing
    for section in ("attacks", "defenses", "audits"):  # list sections: their fixed keys
        assert f"| `[[{section}]] name` |" in table


def test_the_hooks_doctests_pass(hooks) -> None:
    import doctest
    result = doctest.testmod(hooks, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0, result
