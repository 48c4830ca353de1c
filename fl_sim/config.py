"""Experiment configuration: TOML files validated into typed, frozen objects.

Sections (defined in :mod:`fl_sim.config_sections`, re-exported here): ``run``, ``data``,
``partition``, ``model``, ``task``, ``federation``, ``strategy`` and the lists ``attacks`` /
``defenses`` / ``audits``. Unknown keys are rejected everywhere.
Plug-in sections (``data``, ``partition``, ``model``, ``task``, ``strategy``, each attack,
defense and audit) name a registered plug-in and carry its parameters beside the name;
those parameters are validated against the plug-in's own signature, so an error names the
field, the bad value and what is allowed.

``--set a.b=value`` overrides are applied to the raw TOML dict before validation; the value is
parsed as a TOML value (``3``, ``0.1``, ``true``, ``"text"``, ``[1, 2]``) and falls back to a
plain string.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import tomllib
from pydantic import BaseModel, model_validator

from fl_sim.config_overrides import apply_overrides, parse_override  # noqa: F401 (re-export)
from fl_sim.config_sections import (  # noqa: F401 (re-exported: the sections' home for users)
    AttackConfig,
    AuditConfig,
    ClientResources,
    DataConfig,
    DefenseConfig,
    FederationConfig,
    MetricsConfig,
    ModelConfig,
    PartitionConfig,
    RunConfig,
    SamplesConfig,
    StrategyConfig,
    TaskConfig,
    _PluginSection,
    _Section,
    declared_view,
)
from fl_sim.errors import ConfigError, PluginError
from fl_sim.registry import (
    ATTACKS,
    AUDITS,
    DATA_SOURCES,
    DEFENSES,
    MODELS,
    PARTITIONERS,
    STRATEGIES,
    TASKS,
    Registry,
    format_validation_error,
    validate_params,
)
from fl_sim.view_types import VIEWS

_M = TypeVar("_M", bound=BaseModel)


class ExperimentConfig(_Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    federation: FederationConfig = FederationConfig()
    strategy: StrategyConfig = StrategyConfig()
    metrics: MetricsConfig = MetricsConfig()
    samples: SamplesConfig = SamplesConfig()
    attacks: tuple[AttackConfig, ...] = ()
    defenses: tuple[DefenseConfig, ...] = ()
    audits: tuple[AuditConfig, ...] = ()

    @model_validator(mode="after")
    def _attacks_can_run(self) -> ExperimentConfig:
        for i, a in enumerate(self.attacks):
            problem = attack_problem(a, self.federation)
            if problem:
                raise ValueError(f"attacks[{i}] ({a.name}): {problem}")
        return self

    def to_json_dict(self) -> dict[str, Any]:
        """The fully resolved config as plain JSON data (round-trips through ``from_dict``)."""
        return json.loads(self.model_dump_json())


def retention_problem(a: AttackConfig, fed: FederationConfig) -> str | None:
    """Why attack ``a`` would find nothing recorded under ``federation.record_rounds`` /
    ``record_clients`` (None if its rounds and client are recorded)."""
    rounds = a.rounds or (1,)
    if fed.record_rounds is not None:
        missing = [r for r in rounds if r not in fed.record_rounds]
        if missing:
            return (f"round(s) {missing} not recorded (federation.record_rounds = "
                    f"{list(fed.record_rounds)})")
    if fed.record_clients is None:
        return None
    kept = list(fed.record_clients)
    if not VIEWS[a.view].server_side:
        return ("a peer attack is scored against every other client's ground truth; "
                f"federation.record_clients = {kept} records only those (omit it)")
    if a.client is None:
        return f"name its client: federation.record_clients = {kept} records only those"
    if a.client not in fed.record_clients:
        return f"client {a.client} not recorded (federation.record_clients = {kept})"
    return None


def attack_problem(a: AttackConfig, fed: FederationConfig) -> str | None:
    """Why attack entry ``a`` cannot run in federation ``fed`` (None if it can).

    Checked when the config is validated, so an impossible entry fails before training
    instead of after it: a client outside ``0..num_clients-1``, a peer attack without
    ``peer_clients`` or on a client that is not a peer, rounds outside ``1..num_rounds``,
    or nothing recorded to attack (``taps``) or to score against (``record_truth``).
    """
    n = fed.num_clients
    if a.client is not None and not 0 <= a.client < n:
        return f"client {a.client} outside 0..{n - 1} (federation.num_clients = {n})"
    bad = [r for r in a.rounds or () if not 1 <= r <= fed.num_rounds]
    if bad:
        return (f"rounds {bad} do not exist (federation.num_rounds = {fed.num_rounds}; "
                "rounds count from 1)")
    if a.rounds is not None and not a.rounds:
        return "rounds = [] schedules nothing; omit it for round 1"
    if not fed.taps:
        return "federation.taps = false records nothing to attack"
    if not fed.record_truth:
        return "federation.record_truth = false leaves nothing to score the attack against"
    if (problem := retention_problem(a, fed)) is not None:
        return problem
    if not VIEWS[a.view].server_side:  # a peer's view: recorded for peer_clients only
        if not fed.peer_clients:
            return "a peer attack needs federation.peer_clients (none recorded)"
        if fed.num_clients < 2:
            return "a peer attack needs at least 2 clients (the others' update)"
        if a.client is not None and a.client not in fed.peer_clients:
            return (f"client {a.client} is not a peer; federation.peer_clients = "
                    f"{list(fed.peer_clients)}")
    if VIEWS[a.view].holds_sum and _needs_client_update(a.name):
        return "needs one client's update; view = \"aggregate\" holds the sum of several clients"
    return None


def _needs_client_update(attack: Any) -> bool:
    try:
        return bool(getattr(ATTACKS.get(str(attack)), "needs_client_update", False))
    except PluginError:
        return False


# Params injected by the framework rather than written by the user, per plug-in kind.
# partitioners: fn(labels, num_clients, *, rng, ...) -- all three come from the framework.
_SKIP_POSITIONAL = {"model": 3, "task": 2, "partition": 3}


def server_lr(cfg: ExperimentConfig) -> float:
    """The server learning rate of a strategy that has one (FedSGD's eta): the strategy's
    ``server_lr``, or ``federation.lr`` when unset. Training and the peer view both use it."""
    lr = cfg.strategy.params.get("server_lr")
    return float(cfg.federation.lr if lr is None else lr)

def _check_plugin(section: _PluginSection, registry: Registry[Any], where: str,
                  *, skip: int = 0) -> None:
    obj = _get(registry, section.name, where)
    validate_params(obj, section.params, where=where, skip=skip)


def _get(registry: Registry[Any], name: str, where: str) -> Any:
    try:
        return registry.get(name)
    except PluginError as exc:
        raise ConfigError(f"{where}.name: {exc}") from None


def validate_plugins(cfg: ExperimentConfig) -> None:
    """Check that every named plug-in exists and accepts its params."""
    _check_plugin(cfg.data, DATA_SOURCES, "data")
    _check_plugin(cfg.partition, PARTITIONERS, "partition", skip=_SKIP_POSITIONAL["partition"])
    _check_plugin(cfg.model, MODELS, "model", skip=_SKIP_POSITIONAL["model"])
    _check_plugin(cfg.task, TASKS, "task", skip=_SKIP_POSITIONAL["task"])
    _check_plugin(cfg.strategy, STRATEGIES, "strategy")
    for i, a in enumerate(cfg.attacks):
        _check_plugin(a, ATTACKS, f"attacks[{i}]")
    for i, d in enumerate(cfg.defenses):
        _check_plugin(d, DEFENSES, f"defenses[{i}]")
    for i in range(len(cfg.audits)):
        check_audit(cfg, i)


def check_audit(cfg: ExperimentConfig, i: int) -> Any:
    """Build ``[[audits]]`` entry ``i`` (params validated from its signature) and refuse it
    (one-line :class:`ConfigError`) if it cannot run in ``cfg``'s federation: e.g. more
    canary clients than clients, or per-client updates under ``secagg_plus``."""
    a = cfg.audits[i]
    where = f"audits[{i}]"
    obj = _get(AUDITS, a.name, where)
    audit = obj(**validate_params(obj, a.params, where=where))
    problem = audit.problem(num_clients=cfg.federation.num_clients,
                            num_rounds=cfg.federation.num_rounds,
                            defense_names=tuple(d.name for d in cfg.defenses),
                            strategy=cfg.strategy.name)
    if problem:
        raise ConfigError(f"{where} ({a.name}): {problem}")
    return audit


def data_seed_from_run_seed(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with ``data.seed = run.seed`` when the data source takes a ``seed`` (its
    train/test split: ``digits``, ``npz``, ``image_folder``) and ``data.seed`` is not set.

    ``run.seed`` thus drives every random number, the split included; an explicit
    ``data.seed`` keeps one split fixed while ``run.seed`` varies. The resolved value is
    written to ``config.json``. (Run directories written before this rule have no
    ``data.seed`` there; their split used 0, see ``simulation._check_same_config``.)

    >>> data_seed_from_run_seed({"run": {"seed": 3}})["data"]
    {'name': 'digits', 'seed': 3}
    >>> data_seed_from_run_seed({"run": {"seed": 3}, "data": {"seed": 0}})["data"]
    {'seed': 0}
    """
    out = dict(raw)
    data, run = out.get("data", {}), out.get("run", {})
    if not isinstance(data, Mapping) or not isinstance(run, Mapping) or "seed" in data:
        return out
    seed = run.get("seed", RunConfig.model_fields["seed"].default)
    name = data.get("name", DataConfig.model_fields["name"].default)
    if not isinstance(seed, int) or isinstance(seed, bool) or not isinstance(name, str):
        return out  # the validation error names the bad value
    try:
        takes_seed = "seed" in inspect.signature(DATA_SOURCES.get(name)).parameters
    except (PluginError, TypeError, ValueError):
        return out  # an unknown source is reported by validate_plugins
    if takes_seed:
        out["data"] = {**data, "name": name, "seed": seed}
    return out


def from_dict(raw: Mapping[str, Any], *, check_plugins: bool = True) -> ExperimentConfig:
    """Validate a raw dict into an :class:`ExperimentConfig` or raise one-line ConfigError.

    ``data.seed`` (the train/test split of a source that splits) defaults to ``run.seed``
    (:func:`data_seed_from_run_seed`)."""
    try:
        cfg = ExperimentConfig.model_validate(data_seed_from_run_seed(raw))
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "", _model_for(exc))) from None
    if check_plugins:
        validate_plugins(cfg)
    return cfg


def validate_section(model: type[_M], raw: Any, where: str) -> _M:
    """``raw`` validated as ``model`` (a config section), or a one-line ConfigError whose
    fields are named under ``where`` (e.g. ``identity.epochs``)."""
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, model)) from None


def _model_for(exc: pydantic.ValidationError) -> type[BaseModel] | None:
    """The section model whose fields an extra-key error should list as allowed."""
    sections: dict[str, type[BaseModel]] = {
        "run": RunConfig, "federation": FederationConfig, "client_resources": ClientResources,
        "metrics": MetricsConfig, "samples": SamplesConfig,
    }
    for err in exc.errors():
        if err["type"] == "extra_forbidden":
            loc = [str(x) for x in err["loc"][:-1]]
            if not loc:
                return ExperimentConfig
            return sections.get(loc[-1])
    return None


def load(path: str | Path, overrides: Iterable[str] = (), *,
         check_plugins: bool = True) -> ExperimentConfig:
    """Read a TOML (or resolved JSON) config file, apply overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: unreadable config file ({exc})") from None
    try:
        raw = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'TOML'}: "
                          f"{exc}") from None
    return from_dict(apply_overrides(raw, overrides), check_plugins=check_plugins)


def save_resolved(cfg: ExperimentConfig, run_dir: str | Path) -> Path:
    """Write ``config.json`` (the fully resolved config) into ``run_dir``."""
    out = Path(run_dir) / "config.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cfg.to_json_dict(), indent=2, sort_keys=True) + "\n")
    return out
