"""Decorator-filled plug-in registries, one per kind.

Design after Opacus' accountant registry: a dict behind a ``register`` decorator that refuses
duplicates; lookups of unknown names list the known ones. Third-party packages plug in through
the entry-point group of :func:`entry_point_group` (e.g. ``fl_sim.attacks``), whose entries
are imported lazily the first time a registry is read.

Plug-in parameters are validated from the plug-in's own signature: :meth:`Registry.create`
builds a pydantic model from the annotated keyword parameters, so a config error names the
field, the bad value and what is allowed.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, TypeVar

import pydantic

from fl_sim.errors import ConfigError, PluginError
from fl_sim.strict import StrictNumbers

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Modules that register the built-in plug-ins. Imported by `load_builtin_plugins`; kept as
# strings so that importing the registry never imports flwr (strategies) or diffusers (unet).
BUILTIN_PLUGIN_MODULES: dict[str, tuple[str, ...]] = {
    "data source": ("fl_sim.data.sources", "fl_sim.data.synthetic", "fl_sim.data.celeba",
                    "fl_sim.data.cifar100", "fl_sim.data.flower_datasets"),
    "partitioner": ("fl_sim.data.partition", "fl_sim.data.flower_datasets"),
    "model": ("fl_sim.models",),
    "task": ("fl_sim.tasks",),
    "attack": ("attacks",),
    "defense": ("defenses",),
    "strategy": ("strategies",),
    "audit": ("fl_sim.audits",),
}


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered plug-in."""

    name: str
    obj: T
    description: str


def entry_point_group(kind: str) -> str:
    """The entry-point group third-party plug-ins of ``kind`` register under.

    >>> entry_point_group("attack"), entry_point_group("strategy"), entry_point_group("data source")
    ('fl_sim.attacks', 'fl_sim.strategies', 'fl_sim.data_sources')
    """
    name = kind.replace(" ", "_")
    return "fl_sim." + (name[:-1] + "ies" if name.endswith("y") else name + "s")


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry(Generic[T]):
    """A name -> plug-in mapping of one kind, filled by :meth:`register`."""

    def __init__(self, kind: str, *, name_attribute: str | None = None) -> None:
        self.kind = kind
        # a class attribute that carries the registered name (defenses' ``name``): set by
        # :meth:`register`, so a plug-in declares its name once, in the decorator
        self.name_attribute = name_attribute
        self._entries: dict[str, Entry[T]] = {}
        self._entry_points_loaded = False
        self._ep_packages: set[str] = set()  # top-level packages of installed entry points

    # -- filling -------------------------------------------------------------------------
    def register(self, name: str, *, description: str | None = None) -> Callable[[T], T]:
        """Class/function decorator registering ``obj`` under ``name``; duplicates refused."""

        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name].obj is not obj:
                raise PluginError(f"duplicate {self.kind} '{name}': already registered by "
                                  f"{_qualname(self._entries[name].obj)}")
            if self.name_attribute and inspect.isclass(obj):
                declared = obj.__dict__.get(self.name_attribute)
                if declared not in (None, "", name):
                    raise PluginError(f"{self.kind} '{name}': {_qualname(obj)} declares "
                                      f"{self.name_attribute} = {declared!r}; the name is "
                                      "given once, in the decorator")
                setattr(obj, self.name_attribute, name)
            self._entries[name] = Entry(name, obj, description or _first_doc_line(obj))
            return obj

        return decorator

    # -- reading -------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if not self._entry_points_loaded:
            self._entry_points_loaded = True
            for module in BUILTIN_PLUGIN_MODULES.get(self.kind, ()):
                check_not_shadowed(importlib.import_module(module))
            group = entry_point_group(self.kind)
            for ep in metadata.entry_points(group=group):
                self._ep_packages.add(ep.value.split(":")[0].split(".")[0].strip())
                if ep.name not in self._entries:
                    logger.debug("loading %s plug-in %s from %s", self.kind, ep.name, ep.value)
                    ep.load()

    def get(self, name: str) -> T:
        """The plug-in called ``name``; an unknown name lists the known ones."""
        self._ensure_loaded()
        try:
            return self._entries[name].obj
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise PluginError(f"unknown {self.kind} '{name}'; known: {known}") from None

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry[T]]:
        self._ensure_loaded()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def installed(self, name: str) -> bool:
        """Whether plug-in ``name`` lives in a package every process imports when it reads
        this registry: fl-sim's own packages or one that declares entry points of this kind.
        A plug-in registered only by running its decorator (a notebook cell, a script, a
        module nobody installed) is not: Ray's client actors and SuperNodes never see it."""
        obj = self.get(name)
        top = str(getattr(obj, "__module__", "") or "").split(".")[0]
        return top in BUILTIN_PACKAGES or top in self._ep_packages

    def create(self, name: str, /, *args: Any, _where: str | None = None,
               **params: Any) -> Any:
        """Call plug-in ``name`` with ``params`` validated against its keyword parameters.

        Positional ``args`` are passed through unvalidated (run-time objects such as a model).
        ``_where`` is the config path used in error messages (e.g. ``"model"``).
        """
        obj = self.get(name)
        validated = validate_params(obj, params, where=_where or self.kind, skip=len(args))
        return obj(*args, **validated)


#: fl-sim's top-level packages (pyproject's packages.find); their plug-ins reach every process
BUILTIN_PACKAGES = ("fl_sim", "attacks", "defenses", "strategies")


def check_not_shadowed(module: Any) -> None:
    """Raise :class:`PluginError` (one line) if ``module`` (one of fl-sim's top-level plug-in
    packages, e.g. ``attacks``) was imported from somewhere else than fl-sim itself: a user's
    package of the same name earlier on ``sys.path`` would hide every built-in plug-in."""
    top = module.__name__.split(".")[0]
    if top not in BUILTIN_PACKAGES or top == "fl_sim":
        return
    home = Path(__file__).resolve().parent.parent  # the directory holding fl_sim/
    where = getattr(module, "__file__", None)
    if where is None or Path(where).resolve().parent.parent != home:
        found = Path(where).parent if where else "a namespace package"
        raise PluginError(
            f"the package '{top}' was imported from {found}, not from fl-sim ({home / top}): "
            f"a package of the same name earlier on sys.path hides fl-sim's built-in "
            f"{top}; rename yours (plug-ins go in your own package, see docs/PLUGINS.md)")


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def params_model(obj: Callable[..., Any], *, skip: int = 0) -> type[pydantic.BaseModel]:
    """A pydantic model of ``obj``'s keyword parameters (after the first ``skip``)."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(target)
    params = [p for p in sig.parameters.values() if p.name != "self"
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    fields: dict[str, Any] = {}
    for p in params[skip:]:
        ann = p.annotation if p.annotation is not inspect.Parameter.empty else Any
        if isinstance(ann, str):  # `from __future__ import annotations`
            ann = _resolve_annotation(target, p.name, ann)
        default = p.default if p.default is not inspect.Parameter.empty else ...
        fields[p.name] = (ann, default)
    return pydantic.create_model(  # type: ignore[call-overload]
        f"{getattr(obj, '__name__', 'Plugin')}Params", __base__=_ParamsBase, **fields)


class _ParamsBase(StrictNumbers):
    """Plug-in parameters: finite floats, no booleans for numbers (see fl_sim.strict)."""

    model_config = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True,
                                       strict=False, allow_inf_nan=False)


def _resolve_annotation(target: Callable[..., Any], name: str, ann: str) -> Any:
    try:
        return typing.get_type_hints(target, include_extras=True).get(name, Any)
    except Exception:  # pragma: no cover - exotic annotations
        return Any


def validate_params(obj: Callable[..., Any], params: Mapping[str, Any], *, where: str,
                    skip: int = 0) -> dict[str, Any]:
    """Validate ``params`` for ``obj``; raise one-line :class:`ConfigError` naming the field."""
    model = params_model(obj, skip=skip)
    try:
        validated = model.model_validate(dict(params))
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, model)) from None
    return {k: getattr(validated, k) for k in model.model_fields}


def format_validation_error(exc: pydantic.ValidationError, where: str,
                            model: type[pydantic.BaseModel] | None = None) -> str:
    """One line per problem: ``where.field: message (got value); allowed: ...``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in (where, *err["loc"]) if x != "")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(model.model_fields)) if model is not None else "?"
            parts.append(f"{loc}: unknown key; allowed: {allowed or '(none)'}")
        elif err["type"] == "missing":
            parts.append(f"{loc}: required value missing")
        elif err["type"] == "value_error" and isinstance(err.get("input"), Mapping):
            # a model-level check: its message names the fields; the input is a whole section
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        else:
            parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


@dataclass(frozen=True)
class ParamInfo:
    """One keyword parameter of a plug-in, as ``fl-sim list KIND NAME`` shows it."""

    name: str
    type: str
    default: Any
    required: bool
    help: str


def describe_params(obj: Callable[..., Any], *, skip: int = 0) -> list[ParamInfo]:
    """The keyword parameters of ``obj`` (after the first ``skip``): type and default from
    its signature, a one-line help from its docstring (:func:`param_help`).

    >>> from typing import Literal
    >>> def f(*, steps: int = 3, mode: Literal["a", "b"] = "a") -> None:
    ...     \"\"\"Demo. ``steps``: how many steps; ``mode`` picks the flavour.\"\"\"
    >>> [(p.name, p.type, p.default, p.help) for p in describe_params(f)]
    [('steps', 'int', 3, 'how many steps'), ('mode', "'a' | 'b'", 'a', 'picks the flavour')]
    """
    model = params_model(obj, skip=skip)
    doc = inspect.getdoc(obj.__init__ if inspect.isclass(obj) else obj) or ""
    doc = "\n".join(x for x in (inspect.getdoc(obj) or "", doc if inspect.isclass(obj) else "")
                    if x)
    comments = _attribute_comments(obj) if inspect.isclass(obj) else {}
    out = []
    for name, field in model.model_fields.items():
        required = field.is_required()
        out.append(ParamInfo(name, _type_name(field.annotation), None if required else
                             field.default, required,
                             comments.get(name) or param_help(doc, name)))
    return out


def _attribute_comments(cls: type) -> dict[str, str]:
    """``#: text`` comments above a dataclass' fields (the defenses' convention), by field."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        pending: list[str] = []
        for line in lines:
            if m := re.match(r"\s+#:\s?(.*)$", line):
                pending.append(m.group(1).strip())
            elif m := re.match(r"\s+(\w+)\s*:", line):
                if pending:
                    out[m.group(1)] = " ".join(pending)
                pending = []
            else:
                pending = []
    return out


def _type_name(ann: Any) -> str:
    if typing.get_origin(ann) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(ann))
    if getattr(ann, "__module__", None) == "builtins" and hasattr(ann, "__name__"):
        return str(ann.__name__)
    return str(ann).replace("typing.", "")


def param_help(doc: str, name: str, *, width: int = 90) -> str:
    """One line about parameter ``name`` from a docstring: an ``Args:``-style line
    ``name (...): text`` or ``name: text``, else the clause after the first ````name````
    (up to ``;`` or the end of the sentence); ``""`` if the docstring never names it."""
    flat = " ".join(doc.split())
    m = re.search(rf"(?m)^\s*{re.escape(name)}\s*(?:\([^)]*\))?\s*:\s*(\S.*)$", doc)
    if m:
        text = m.group(1)
    else:
        # prefer a clause that starts with the name (``name``: ...; ``name`` is ...)
        lead = re.search(rf"(?:^|[;.:]\s|Hyper-parameters:\s)``{re.escape(name)}``", flat)
        i = lead.end() if lead else flat.find(f"``{name}``") + len(name) + 4
        if i < len(name) + 4:
            return ""
        text = flat[i:]
        text = re.split(r";|\.\s|\.$", text, maxsplit=1)[0]
        text = text.lstrip(" :,(").rstrip(" )")
    text = " ".join(text.replace("``", "").split())
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


DATA_SOURCES: Registry[Callable[..., Any]] = Registry("data source")
PARTITIONERS: Registry[Callable[..., Any]] = Registry("partitioner")
MODELS: Registry[Callable[..., Any]] = Registry("model")
TASKS: Registry[Callable[..., Any]] = Registry("task")
ATTACKS: Registry[Callable[..., Any]] = Registry("attack")
DEFENSES: Registry[Callable[..., Any]] = Registry("defense", name_attribute="name")
STRATEGIES: Registry[Callable[..., Any]] = Registry("strategy")
AUDITS: Registry[Callable[..., Any]] = Registry("audit", name_attribute="name")

ALL_REGISTRIES: dict[str, Registry[Any]] = {
    r.kind: r for r in (DATA_SOURCES, PARTITIONERS, MODELS, TASKS, STRATEGIES, ATTACKS, DEFENSES,
                        AUDITS)
}
