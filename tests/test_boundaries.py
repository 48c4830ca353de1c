"""Layer boundaries: attack/defense plug-ins and fl-sim's plain-data modules never load flwr
or ray (checked in a fresh interpreter, since the test process may have imported them).

Importing them all in ONE interpreter and finding neither flwr nor ray proves it for each
module on its own, too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

PLAIN_MODULES = ["attacks", "defenses", "fl_sim", "fl_sim.records", "fl_sim.metrics",
                 "fl_sim.config", "fl_sim.registry", "fl_sim.stores", "fl_sim.views",
                 "fl_sim.run_dir", "fl_sim.audits", "fl_sim.audit_report", "fl_sim.cases"]


def test_plain_modules_and_attack_registry_do_not_load_flwr_or_ray() -> None:
    code = ("import importlib, json, sys\n"
            f"for m in {PLAIN_MODULES!r}: importlib.import_module(m)\n"
            "from fl_sim.registry import ATTACKS, DEFENSES\n"
            "ATTACKS.names(); DEFENSES.names()\n"
            "import fl_sim; fl_sim.load_run\n"
            "print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('flwr', 'ray'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_federation_engine_does_load_flwr() -> None:
    """The check above is not vacuous: the engine itself imports flwr."""
    code = ("import json, sys; import fl_sim.federation.server_app; "
            "print(json.dumps('flwr' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) is True


def test_benchmarks_take_cases_from_the_library_not_from_tests() -> None:
    """Issue 18 item 2: a benchmark's cases come from :mod:`fl_sim.cases` (read through the
    views), never from the tests' helpers, and no benchmark edits ``sys.path`` (which is how
    one would reach them). Reading ``tests/data`` files by path is fine."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    pattern = re.compile(r"sys\.path|attack_cases|diffusion_cases|from test_|import test_")
    files = sorted(bench.glob("*.py"))
    assert files
    bad = [f.name for f in files if pattern.search(f.read_text())]
    assert bad == [], f"benchmarks that import tests/ or edit sys.path: {bad}"


#: Flower's public Message API (with sub-packages); any other ``flwr.*`` module is internal
FLOWER_PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp")
FLOWER_COMPAT = "fl_sim/federation/flower_compat.py"


def _flower_imports(path: Path) -> set[str]:
    """Every ``flwr`` module ``path`` imports, at any depth (function bodies included)."""
    import ast
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "flwr")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "flwr":
            out.add(node.module)
    return out


def test_only_the_compatibility_module_imports_flower_internals() -> None:
    """Issue 19 item 4: a Flower upgrade touches one file. Library code (fl_sim, strategies,
    attacks, defenses, benchmarks) imports only Flower's public Message API
    (:data:`FLOWER_PUBLIC`); everything else of Flower is reached through
    ``fl_sim/federation/flower_compat.py`` — and that module really does import internals
    (the legacy SecAgg+ stack, the simulation runtime), so the check is not vacuous."""
    root = Path(__file__).resolve().parents[1]
    internal: dict[str, list[str]] = {}
    for pkg in ("fl_sim", "strategies", "attacks", "defenses", "benchmarks"):
        for f in sorted((root / pkg).rglob("*.py")):
            bad = sorted(m for m in _flower_imports(f)
                         if not any(m == p or m.startswith(p + ".") for p in FLOWER_PUBLIC))
            if bad:
                internal[f.relative_to(root).as_posix()] = bad
    assert set(internal) == {FLOWER_COMPAT}, internal
    assert "flwr.server.workflow.secure_aggregation.secaggplus_workflow" in \
        internal[FLOWER_COMPAT]


#: Import circles allowed for now, each named (sorted module names) with the reason; empty
#: when the tree has none. Kept explicit so that a new circle fails and an old one is seen.
ALLOWED_CIRCLES: dict[tuple[str, ...], str] = {}


def _module_graph(root: Path) -> dict[str, set[str]]:
    """``module -> project modules it imports`` over fl_sim, attacks, defenses and strategies,
    counting every import in a file (function bodies and ``TYPE_CHECKING`` blocks too). A
    package's ``__init__`` is a module of the package's name, except a top-level package's
    (its public surface: ``from fl_sim import cli`` names the submodule, and ``attacks``
    re-exports its plug-ins). Stricter than ``shared/tools/import_cycles.py``, which also
    skips the ``__init__`` of a sub-package that defines nothing."""
    import ast
    mods: dict[str, Path] = {}
    for pkg in ("fl_sim", "attacks", "defenses", "strategies"):
        for f in sorted((root / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(root).with_suffix("").parts)
            if f.name == "__init__.py":
                if f.parent.parent == root:
                    continue
                name = name.removesuffix(".__init__")
            mods[name] = f

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            else:
                continue
            graph[m].update(r for t in targets if (r := resolve(t)) and r != m)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_circles() -> None:
    """Issue 19 item 2: no import circles among the project's modules, imports inside
    functions included (a lazy import hides a circle, it does not remove it). The detector
    is checked on a circle built on purpose, so it is not vacuous."""
    root = Path(__file__).resolve().parents[1]
    graph = _module_graph(root)
    assert len(graph) > 100 and graph["fl_sim.report"]  # the whole tree was read
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    found = _circles(graph)
    assert [c for c in found if c not in ALLOWED_CIRCLES] == [], found
