"""mkdocs hook: the plug-in reference pages, generated from fl-sim's registries at build time.

Why at build time and not a script whose output is committed: a committed copy can go stale
the moment someone adds a parameter, and a test comparing it with the registries would fail
in someone else's commit. Generated during ``mkdocs build`` (``make docs``, run by CI), the
pages are always the registries as they are; ``tests/unit/test_docs.py`` calls
:func:`render_kind` directly to check that every registered plug-in gets its section.

One page per registry kind (``fl_sim.registry.ALL_REGISTRIES``): each plug-in's name, its
one-line description, where it lives, and its parameters with type, default and help -- the
same :func:`fl_sim.registry.describe_params` that ``fl-sim list KIND NAME`` prints.
"""

from __future__ import annotations

import inspect
from typing import Any

#: the folder of the generated pages, relative to docs/
PLUGIN_DIR = "reference/plugins"


def page_name(kind: str) -> str:
    """The generated page of registry ``kind``, relative to docs/.

    >>> page_name("data source"), page_name("strategy")
    ('reference/plugins/data_sources.md', 'reference/plugins/strategies.md')
    """
    from fl_sim.registry import entry_point_group
    return f"{PLUGIN_DIR}/{entry_point_group(kind).removeprefix('fl_sim.')}.md"


def type_name(ann: Any) -> str:
    """A parameter's type as a reader writes it: ``int | None``, ``'a' | 'b'``; the
    constraints of ``Annotated[int, Field(ge=1)]`` are dropped (the help text states them).

    >>> from typing import Annotated, Literal, Optional
    >>> type_name(Optional[Annotated[int, "ge 1"]]), type_name(Literal["a", "b"])
    ('int | None', "'a' | 'b'")
    """
    import types
    import typing
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if ann is type(None):
        return "None"
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else str(origin)
    if ann is Ellipsis:
        return "..."
    return getattr(ann, "__name__", str(ann).replace("typing.", ""))


def tidy_help(text: str) -> str:
    """A parameter's help as ``fl-sim list`` finds it in the docstring, without the stray
    parenthesis its clause extraction can leave (````prior```` (REQUIRED): path ...).

    >>> tidy_help("REQUIRED): path of a prior"), tidy_help("100) Adam steps (lr 0.1")
    ('path of a prior', 'Adam steps (lr 0.1)')
    """
    import re
    text = re.sub(r"^[^()]*\)\s*:?\s*", "", text) if re.match(r"^[^()]*\)", text) else text
    text = text.lstrip(" ,;:")
    if text.count("(") > text.count(")") and not text.endswith("…"):
        text += ")"
    return text


def _cell(value: Any) -> str:
    return str(value).replace("``", "`").replace("|", "\\|").replace("\n", " ")


def _summary(obj: Any) -> str:
    """The docstring's first paragraph (the one-line description may be cut short)."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def render_kind(kind: str) -> str:
    """The markdown page of every plug-in registered under ``kind``, one ``##`` section each."""
    from fl_sim.cli import _positional
    from fl_sim.registry import ALL_REGISTRIES, describe_params, entry_point_group, params_model

    registry = ALL_REGISTRIES[kind]
    title = entry_point_group(kind).removeprefix("fl_sim.").replace("_", " ").capitalize()
    out = [f"# {title}", "",
           f"Generated from the `{kind}` registry when the site is built (`docs/hooks.py`), "
           f"so it lists exactly what `fl-sim list {entry_point_group(kind)[7:]}` lists. "
           f"Outside packages add to it through the entry-point group "
           f"`{entry_point_group(kind)}` ([write an attack](../../tutorials/write-an-attack.md)).",
           ""]
    entries = list(registry.entries())
    if not entries:
        out += ["No plug-in of this kind is registered.", ""]
    for e in entries:
        where = f"{getattr(e.obj, '__module__', '?')}.{getattr(e.obj, '__qualname__', '?')}"
        out += [f"## `{e.name}`", "", _summary(e.obj) or e.description, "",
                f"Defined in `{where}`.", ""]
        params = describe_params(e.obj, skip=_positional(kind))
        fields = params_model(e.obj, skip=_positional(kind)).model_fields
        if not params:
            out += ["No parameters.", ""]
            continue
        out += ["| parameter | type | default | help |", "|---|---|---|---|"]
        for p in params:
            default = "(required)" if p.required else f"`{p.default!r}`"
            kind_of = type_name(fields[p.name].annotation)
            help_ = tidy_help(p.help)
            out.append(f"| `{p.name}` | {_cell(kind_of)} | {_cell(default)} | {_cell(help_)} |")
        out.append("")
    return "\n".join(out)


def render_index() -> str:
    """The index of the generated pages: kinds, counts and names."""
    from fl_sim.registry import ALL_REGISTRIES, entry_point_group
    out = ["# Plug-ins", "",
           "One registry per kind (`fl_sim/registry.py`), filled by a decorator; duplicates are "
           "refused and an unknown name lists the known ones. These pages are generated from "
           "the registries when the site is built, so they list every registered plug-in with "
           "its parameters and defaults (`fl-sim list KIND NAME` prints the same).", "",
           "| kind | entry-point group | plug-ins |", "|---|---|---|"]
    for kind, registry in ALL_REGISTRIES.items():
        link = page_name(kind).removeprefix(PLUGIN_DIR + "/")
        names = ", ".join(f"`{n}`" for n in registry.names()) or "(none)"
        out.append(f"| [{kind}]({link}) | `{entry_point_group(kind)}` | {names} |")
    out.append("")
    return "\n".join(out)


#: the page that gets the generated table of every config key (:func:`render_config_keys`)
CONFIG_PAGE = "reference/configuration.md"


def _constraints(field: Any) -> str:
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    out = []
    for m in field.metadata:
        for attr, sym in symbols.items():
            if getattr(m, attr, None) is not None:
                out.append(f"{sym} {getattr(m, attr)}")
    return ", ".join(out)


def _doc_clause(doc: str, name: str) -> str:
    """The clause a docstring gives key ``name`` as ````name````: text (up to ``;`` or the
    sentence's end); ``""`` when it has none.

    >>> _doc_clause("``a``: the first; ``b`` (3) is not a clause.", "a")
    'the first'
    >>> _doc_clause("``a``: the first; ``b`` (3) is not a clause.", "b")
    ''
    """
    import re
    flat = " ".join(doc.split())
    m = re.search(rf"``{re.escape(name)}``:\s*(.+?)(?:;|\.\s|\.$|$)", flat)
    return m.group(1).strip() if m else ""


def render_config_keys() -> str:
    """Every key of every config section (``fl_sim.config.ExperimentConfig``): type, default,
    constraints and the ``#:`` / docstring help, so the table is the validator itself."""
    import pydantic

    from fl_sim.config import ExperimentConfig
    from fl_sim.registry import _attribute_comments

    out = ["## Every key (generated)", "",
           "Generated from `fl_sim/config.py`'s pydantic models when the site is built "
           "(`docs/hooks.py`). Sections that name a plug-in (`name = ...`) also take that "
           "plug-in's parameters: see the [plug-in reference](plugins/index.md).", "",
           "| key | type | default | allowed | help |", "|---|---|---|---|---|"]

    def walk(prefix: str, model: type[pydantic.BaseModel]) -> None:
        comments = _attribute_comments(model)
        doc = inspect.getdoc(model) or ""
        for name, field in model.model_fields.items():
            ann = field.annotation
            inner = [a for a in (getattr(ann, "__args__", None) or (ann,))
                     if inspect.isclass(a) and issubclass(a, pydantic.BaseModel)]
            if inner and not prefix.startswith("[["):
                walk(f"{prefix}{name}.", inner[0])
                continue
            default = "(required)" if field.is_required() else f"`{field.default!r}`"
            help_ = comments.get(name) or _doc_clause(doc, name)
            out.append(f"| `{prefix}{name}` | {_cell(type_name(ann))} | {_cell(default)} | "
                       f"{_cell(_constraints(field))} | {_cell(help_)} |")

    for section, field in ExperimentConfig.model_fields.items():
        ann = field.annotation
        model = getattr(ann, "__args__", (ann,))[0] if section in ("attacks", "defenses",
                                                                   "audits") else ann
        walk(f"[[{section}]] " if model is not ann else f"{section}.", model)
    out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs event: append the generated key table to the configuration reference."""
    if page.file.src_uri == CONFIG_PAGE:
        return markdown.rstrip() + "\n\n" + render_config_keys()
    return markdown


def sphinx_roles_to_code(html: str) -> str:
    """fl-sim's docstrings cross-reference in Sphinx style (``:class:`~fl_sim.errors.X```,
    a ``::`` line before a code block); mkdocstrings renders them as Markdown, so the roles
    come out as text. Keep the code, drop the role (``~`` shows the last name, as Sphinx).

    >>> sphinx_roles_to_code(':class:<code>~fl_sim.errors.FlSimError</code> and <p>::</p>')
    '<code>FlSimError</code> and '
    """
    import re

    def code(m: re.Match[str]) -> str:
        name = m.group(2)
        return f"<code>{name.rsplit('.', 1)[-1] if m.group(1) else name}</code>"

    html = re.sub(r":(?:class|func|mod|meth|attr|exc|data|obj|const):<code>(~?)([^<]*)</code>",
                  code, html)
    return html.replace("<p>::</p>", "")


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs event: tidy the Sphinx roles of the docstrings on the API reference pages."""
    if page.file.src_uri.startswith("reference/"):
        return sphinx_roles_to_code(html)
    return html


def on_files(files: Any, config: Any) -> Any:
    """mkdocs event: add the generated pages to the site's files."""
    from mkdocs.structure.files import File

    from fl_sim.registry import ALL_REGISTRIES
    pages = {f"{PLUGIN_DIR}/index.md": render_index()}
    pages.update({page_name(kind): render_kind(kind) for kind in ALL_REGISTRIES})
    for src_uri, content in pages.items():
        if files.get_file_from_path(src_uri) is not None:
            files.remove(files.get_file_from_path(src_uri))
        files.append(File.generated(config, src_uri, content=content))
    return files
