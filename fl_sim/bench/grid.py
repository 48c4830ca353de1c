"""Grid files of ``fl-sim bench``: parse, expand into simulations and attack cells.

A grid (TOML) names a base experiment and the axes to sweep::

    [bench]
    name = "dp_sweep"
    base = "../default.toml"            # experiment config, relative to this file (optional)
    set = ["federation.num_rounds=3"]   # fixed --set overrides of the base (optional)

    [base]                              # inline config tables, merged over the base file
    [[base.defenses]]
    name = "dp_sgd"

    [axes]                              # any config key, dotted as with --set
    "defenses.0.noise_multiplier" = [0.0, 0.1, 1.0]
    "attack.max_iterations" = [50, 200] # "attack.*": a parameter of every attack cell

    [[attacks]]                         # attack cells, each replayed on every simulation
    name = "inverting_gradients"
    view = "server"                     # optional: the attack's own view
    client = 1                          # optional
    rounds = [1]                        # optional: round 1; one cell per round
    params = { tv_weight = 0.0 }        # or the parameters as plain keys beside name

Axes whose key starts with ``attack.`` vary only the attacks: every simulation is run once
and its recorded observations are attacked with each value (record once, attack many). All
other axes change the federation: one simulation per distinct resolved config. A ``params``
path element after a plug-in section (``defenses.0.params.noise_multiplier``) is accepted
and dropped: plug-in parameters sit beside ``name`` in an experiment config. The base's own
``[[attacks]]`` are removed from the simulations (the grid's attack cells replace them).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from fl_sim.config import AttackConfig, ExperimentConfig, apply_overrides, from_dict
from fl_sim.errors import ConfigError
from fl_sim.registry import ATTACKS, validate_params

__all__ = ["AttackSpec", "Cell", "Plan", "Simulation", "expand", "load_grid"]

ATTACK_AXIS = "attack."
_ATTACK_KEYS = {"name", "view", "client", "rounds", "params"}


@dataclass(frozen=True)
class AttackSpec:
    """One ``[[attacks]]`` entry of a grid (before attack axes are applied)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    view: str | None = None
    client: int | None = None
    rounds: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class Simulation:
    """One federation to run: its resolved config, the axis values that made it, its key
    (hash of the resolved config) and its run directory name under ``BENCH_DIR/sims``."""

    key: str
    config: ExperimentConfig
    axes: Mapping[str, Any]

    @property
    def dirname(self) -> str:
        return f"sim-{self.key}"


@dataclass(frozen=True)
class Cell:
    """One attack on one simulation's record: the unit of work and of ``results.csv``."""

    key: str
    sim: Simulation
    attack: str
    params: Mapping[str, Any]
    view: str | None
    client: int | None
    round: int
    axes: Mapping[str, Any]  # every axis value (federation and attack axes)


@dataclass(frozen=True)
class Plan:
    name: str
    source: Path
    axes: Mapping[str, Sequence[Any]]
    simulations: tuple[Simulation, ...]
    cells: tuple[Cell, ...]

    @property
    def axis_names(self) -> list[str]:
        return list(self.axes)


def _hash(obj: Any, n: int = 10) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:n]


def load_grid(path: str | Path) -> Plan:
    """Read grid file ``path`` and expand it; one-line :class:`ConfigError` on any problem
    (unreadable file, unknown section, an axis value the config rejects)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"grid file not found: {p}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: not a readable TOML grid ({exc})") from None
    return expand(raw, source=p)


def expand(raw: Mapping[str, Any], *, source: Path = Path("grid.toml")) -> Plan:
    """Expand a parsed grid into simulations and cells (deterministic order: axes in file
    order, values in list order, attacks in list order, rounds ascending)."""
    unknown = set(raw) - {"bench", "base", "axes", "attacks"}
    if unknown:
        raise ConfigError(f"{source}: unknown grid section(s) {sorted(unknown)}; allowed: "
                          "bench, base, axes, attacks")
    bench = dict(raw.get("bench", {}))
    bad = set(bench) - {"name", "base", "set"}
    if bad:
        raise ConfigError(f"{source}: unknown [bench] key(s) {sorted(bad)}; allowed: name, "
                          "base, set")
    base = _base_dict(bench, raw.get("base", {}), source)
    axes = dict(raw.get("axes", {}))
    for k, v in axes.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{source}: axis {k!r} must be a non-empty list of values")
    attacks = [_attack_spec(a, i, source) for i, a in enumerate(raw.get("attacks", []))]
    if not attacks:
        raise ConfigError(f"{source}: a grid needs at least one [[attacks]] entry")
    fed_axes = {k: v for k, v in axes.items() if not k.startswith(ATTACK_AXIS)}
    att_axes = {k: v for k, v in axes.items() if k.startswith(ATTACK_AXIS)}
    for k in att_axes:
        if not any(_accepts(spec.name, k[len(ATTACK_AXIS):]) for spec in attacks):
            raise ConfigError(f"{source}: axis {k!r}: no attack of the grid takes a parameter "
                              f"{k[len(ATTACK_AXIS):]!r} ({', '.join(a.name for a in attacks)})")
    name = _bench_name(bench.get("name"), source)
    sims: dict[str, Simulation] = {}
    cells: list[Cell] = []
    for combo in itertools.product(*fed_axes.values()):
        values = dict(zip(fed_axes, combo, strict=True))
        sim = _simulation(base, values, source)
        sim = sims.setdefault(sim.key, sim)  # two combos, one federation: one simulation
        for spec in attacks:
            for acombo in itertools.product(*att_axes.values()):
                avalues = dict(zip(att_axes, acombo, strict=True))
                avalues = {k: v for k, v in avalues.items()
                           if _accepts(spec.name, k[len(ATTACK_AXIS):])}
                params = {**spec.params,
                          **{k[len(ATTACK_AXIS):]: v for k, v in avalues.items()}}
                _check_attack_params(spec.name, params, avalues, source)
                for r in sorted(set(spec.rounds)):
                    key = _hash([sim.key, spec.name, spec.view, spec.client, r, params], 12)
                    cells.append(Cell(key=key, sim=sim, attack=spec.name, params=params,
                                      view=spec.view, client=spec.client, round=r,
                                      axes={**values, **avalues}))
    seen: set[str] = set()
    unique = [c for c in cells if not (c.key in seen or seen.add(c.key))]
    return Plan(name=name, source=source, axes=axes, simulations=tuple(sims.values()),
                cells=tuple(unique))


def _base_dict(bench: Mapping[str, Any], inline: Mapping[str, Any], source: Path
               ) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if bench.get("base"):
        bp = (source.parent / str(bench["base"])) if not Path(bench["base"]).is_absolute() \
            else Path(bench["base"])
        try:
            data = tomllib.loads(bp.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{source}: base config {bp}: {exc}") from None
    data = _merge(data, inline)
    sets = bench.get("set", [])
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        raise ConfigError(f"{source}: [bench] set must be a list of 'key.path=value' strings")
    return apply_overrides(data, sets)


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(a))
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(
            out.get(k), Mapping) else copy.deepcopy(v)
    return out


def _attack_spec(a: Any, i: int, source: Path) -> AttackSpec:
    if not isinstance(a, Mapping) or not isinstance(a.get("name"), str):
        raise ConfigError(f"{source}: attacks[{i}] needs a name")
    params = {**{k: v for k, v in a.items() if k not in _ATTACK_KEYS},
              **dict(a.get("params", {}))}
    rounds = a.get("rounds") or [1]
    if not isinstance(rounds, list) or not all(isinstance(r, int) and r >= 1 for r in rounds):
        raise ConfigError(f"{source}: attacks[{i}].rounds must be a list of rounds >= 1")
    try:
        ATTACKS.get(a["name"])
    except Exception as exc:  # noqa: BLE001 -- the registry's one-line message
        raise ConfigError(f"{source}: attacks[{i}]: {exc}") from None
    return AttackSpec(name=a["name"], params=params, view=a.get("view"),
                      client=a.get("client"), rounds=tuple(rounds))


def check_cells(plan: Plan) -> None:
    """Each attack cell against its simulation's federation, as the pre-flight of ``fl-sim
    run`` checks configured attacks (:func:`fl_sim.preflight.check_attack_fit`: the task,
    and the images per recorded update against the attack's declared limit). Loads each
    simulation's data (cached). Raises a one-line ConfigError naming the cell."""
    from fl_sim.preflight import check_attack_fit  # lazy: keeps torch out of this module's import
    for c in plan.cells:
        entry = {"name": c.attack, "view": c.view, "client": c.client, "rounds": [c.round],
                 **c.params}
        try:
            attack = AttackConfig.model_validate(entry)
            check_attack_fit(c.sim.config.model_copy(update={"attacks": (attack,)}))
        except (ConfigError, ValueError) as exc:
            axes = ", ".join(f"{k}={v!r}" for k, v in c.axes.items()) or "base"
            msg = str(exc).replace("attacks[0] ", "")
            raise ConfigError(f"{plan.source} ({axes}): cell {c.attack} r{c.round}: "
                              f"{' '.join(msg.split())}") from None


def _bench_name(name: Any, source: Path) -> str:
    """``[bench] name`` (default: the grid file's stem): the default bench directory is
    ``bench/<name>``, so a name must be one plain path component -- no separator, no
    ``..``, not hidden."""
    if name is None or name == "":
        name = source.stem
    if not isinstance(name, str) or "/" in name or "\\" in name or ".." in name \
            or name.startswith(".") or "\0" in name or not name.strip():
        raise ConfigError(f"{source}: [bench] name {name!r}: must be a plain directory name "
                          "(no path separator, no '..', not starting with '.')")
    return name


def _check_attack_params(attack: str, params: Mapping[str, Any], avalues: Mapping[str, Any],
                         source: Path) -> None:
    """The cell's parameters as the attack's signature types them (a string where a number
    is expected, an unknown key, a non-finite value: one line, before any simulation)."""
    where = ", ".join(f"{k}={v!r}" for k, v in avalues.items())
    try:
        validate_params(ATTACKS.get(attack), params, where=attack)
    except ConfigError as exc:
        raise ConfigError(f"{source}{f' ({where})' if where else ''}: {exc}") from None


def _accepts(attack: str, param: str) -> bool:
    """Whether attack ``attack`` takes keyword ``param`` (an ``attack.*`` axis applies only
    to the attacks that have that parameter; the others get one cell, not one per value)."""

    try:
        sig = inspect.signature(ATTACKS.get(attack))
    except (TypeError, ValueError):
        return True
    return param in sig.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in the raw config dict (numeric parts index lists; a ``params``
    part that the dict does not have is skipped, see the module doc)."""
    parts = [p for p in key.split(".") if p]
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "params" and isinstance(node, dict) and "params" not in node and not last:
            continue
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"axis {key!r}: '{part}' is not an index of a list of "
                                  f"{len(node)} entries (add the entry in [base] or set)")
            if last:
                node[int(part)] = copy.deepcopy(value)
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = copy.deepcopy(value)
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"axis {key!r}: '{'.'.join(parts[:i])}' is not a section")


def _simulation(base: Mapping[str, Any], values: Mapping[str, Any], source: Path
                ) -> Simulation:
    data = copy.deepcopy(dict(base))
    for k, v in values.items():
        set_path(data, k, v)
    data["attacks"] = []  # the grid's cells replay the attacks on the recorded run
    try:
        cfg = from_dict(data)
    except ConfigError as exc:
        where = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "base"
        raise ConfigError(f"{source} ({where}): {exc}") from None
    resolved = cfg.to_json_dict()
    resolved.get("run", {}).pop("name", None)
    resolved.get("run", {}).pop("output_dir", None)
    resolved.get("federation", {}).pop("ray_address", None)
    return Simulation(key=_hash(resolved), config=cfg, axes=dict(values))
