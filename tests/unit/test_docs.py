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
