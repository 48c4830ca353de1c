"""Generated bad input (hypothesis): every subcommand answers exit 0, or exit 2 with ONE line.

The listed cases of tests/unit/test_bad_inputs.py are what someone thought of; these draw
``--set`` overrides, grid files and plug-in parameters from the config schema (every section
field, every parameter of the configured plug-ins) and from its edges (wrong types, out of
range, non-finite, huge values, missing files, path tricks), and run ``fl_sim.cli.main``
in-process. For each example: exit 0 (the input was accepted) or exit 2 with exactly one
stderr line ``fl-sim: error: ...`` -- never a traceback, never another status, and never a
file written before the refusal (the directory tree is compared before/after).

Nothing runs a federation or trains: ``run`` stops right after the pre-flight (the first
step after it, ``check_plugins_reach_workers``, is replaced by a sentinel that counts as
accepted), ``train-prior`` right before loading its data, ``train-identity`` right before
training, ``bench`` runs with ``--dry-run``. Examples are derandomized (the same ones every
run, so CI is not flaky) and bounded (see ``_SETTINGS``: ~300 examples, ~60 s on the
2-core runner).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fl_sim import cli  # noqa: E402
from fl_sim.config import ExperimentConfig  # noqa: E402
from fl_sim.registry import ATTACKS, DEFENSES, MODELS, TASKS, params_model  # noqa: E402
from fl_sim.train_prior import TrainingConfig, prior_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "configs" / "default.toml"
PRIOR = ROOT / "configs" / "prior_digits.toml"

#: FL_SIM_FUZZ_SCALE=N: N times the examples, randomized (a deeper local hunt; CI uses 1)
_SCALE = int(os.environ.get("FL_SIM_FUZZ_SCALE", "1"))
_SETTINGS = settings(derandomize=_SCALE == 1, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])


class _Accepted(BaseException):  # noqa: N818 -- a sentinel, not an error (not caught as one)
    """Raised where the real command would start its expensive work: the input passed."""


# -- values: the schema's edges, as TOML literals ---------------------------------------------
_SCALARS = st.one_of(
    st.sampled_from([0, 1, -1, 2, 3, 7, 10**6, 10**12, 2**63 - 1, -(2**63)]),
    st.sampled_from([0.0, -0.0, 0.5, 1.5, -0.5, 1e-300, 1e300, math.nan, math.inf,
                     -math.inf]),
    st.booleans(),
    st.sampled_from(["", "x", "0.5", "1", "cpu", "cuda", "auto", "../../etc", "/nonexistent/f",
                     "a/b", "..", "digits", "mlp", "fedavg", "noop", "dlg", "pruning"]),
)
_VALUES = st.one_of(
    _SCALARS,
    st.lists(_SCALARS, max_size=3),
    st.dictionaries(st.sampled_from(["name", "ratio", "x"]), _SCALARS, max_size=2),
)


def toml(v: Any) -> str:
    """``v`` as a TOML value literal."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {toml(x)}" for k, x in v.items()) + "}"


# -- keys: every field of the schema and every parameter of the configured plug-ins -----------
def _section_keys() -> list[str]:
    keys = []
    for name, field in ExperimentConfig.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += [f"{name}.{f}" for f in ann.model_fields]
            for f, sub in ann.model_fields.items():  # nested sections (client_resources)
                if isinstance(sub.annotation, type) and issubclass(sub.annotation, BaseModel):
                    keys += [f"{name}.{f}.{g}" for g in sub.annotation.model_fields]
    return keys


def _plugin_keys() -> list[str]:
    """Parameters of default.toml's plug-ins, its three attacks and a pruning defense."""
    keys = [f"model.{p}" for p in params_model(MODELS.get("mlp"), skip=3).model_fields]
    keys += [f"task.{p}" for p in params_model(TASKS.get("classifier"), skip=2).model_fields]
    for i, name in enumerate(("idlg", "inverting_gradients", "peer_inversion")):
        keys += [f"attacks.{i}.{p}" for p in params_model(ATTACKS.get(name)).model_fields]
        keys += [f"attacks.{i}.{p}" for p in ("client", "rounds", "view", "bogus")]
    return keys


KEYS = sorted(set(_section_keys() + _plugin_keys() + ["federation.bogus", "bogus.x"]))


def _defaults() -> dict[str, Any]:
    from fl_sim import config
    return config.load(DEFAULT).to_json_dict()


DEFAULTS = _defaults()
PRIOR_DEFAULTS = prior_config(PRIOR).to_json_dict()


def lookup(resolved: Any, key: str) -> Any:
    """The value at dotted ``key`` of a resolved config (None where there is none)."""
    node = resolved
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            node = node.get(part) if isinstance(node, dict) else None
    return node


def edges(key: str, defaults: dict[str, Any] = DEFAULTS) -> st.SearchStrategy[Any]:
    """``key``'s default and its wrong-kind neighbours: the number written as a string, a
    boolean for a number, a number for a string or a list, and far out of range."""
    d = lookup(defaults, key)
    if isinstance(d, bool):
        return st.sampled_from([d, 1, 0, "true"])
    if isinstance(d, int | float):
        return st.sampled_from([d, str(d), str(d + 1), True, -d - 1, d * 10**12,
                                float(d) + 0.5])
    if isinstance(d, str):
        return st.sampled_from([d, 0, [d], d + "x", d.upper()])
    if isinstance(d, list):
        return st.sampled_from([d, d[0] if d else 1, [str(x) for x in d], [*d, *d]])
    return _SCALARS


@st.composite
def overrides(draw: st.DrawFn, keys: list[str] = KEYS, max_size: int = 3,
              defaults: dict[str, Any] = DEFAULTS, plugin_lists: bool = True) -> list[str]:
    """``key=value`` strings: schema keys with edge values, or a whole attacks/defenses list
    naming a registered plug-in with one of its parameters."""
    out = []
    for _ in range(draw(st.sampled_from([1, 1, 1, max_size]))):
        kind = draw(st.sampled_from(["key", "key", "key", "attack", "defense"]
                                    if plugin_lists else ["key"]))
        if kind == "key":
            key = draw(st.sampled_from(keys))
            out.append(f"{key}={toml(draw(st.one_of(edges(key, defaults), _VALUES)))}")
            continue
        registry = ATTACKS if kind == "attack" else DEFENSES
        name = draw(st.sampled_from(registry.names()))
        params = list(params_model(registry.get(name)).model_fields) or ["x"]
        entry = {"name": name, draw(st.sampled_from(params)): draw(_SCALARS)}
        if kind == "attack":
            entry["client"] = 1
        out.append(f"{kind}s=[{toml(entry)}]")
    return out


# -- running one example ----------------------------------------------------------------------
def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if "__pycache__" not in p.parts}


@contextlib.contextmanager
def _sandbox() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        here = Path.cwd()
        os.chdir(d)
        try:
            yield Path(d)
        finally:
            os.chdir(here)


def check(argv: list[str], root: Path, stdout: io.StringIO | None = None) -> int:
    """Run ``fl-sim ARGV``; assert the contract; return the exit status (0: accepted)."""
    before = _tree(root)
    err, out = io.StringIO(), stdout if stdout is not None else io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = cli.main(argv)
        except _Accepted:
            rc = 0
    text = err.getvalue()
    assert "Traceback" not in text, (argv, text)
    assert rc in (0, 2), (argv, rc, text)
    if rc == 2:
        lines = text.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fl-sim: error: "), (argv, text)
        assert _tree(root) == before, (argv, sorted(_tree(root) - before))
    return rc


@pytest.fixture
def stop_before_work(monkeypatch: pytest.MonkeyPatch, no_ray: None, keep_logging: None) -> None:
    """Each command stops at its first expensive step (see the module doc)."""
    import fl_sim.identity
    import fl_sim.plugin_reach
    import fl_sim.train_prior

    def accept(*_: object, **__: object) -> None:
        raise _Accepted

    monkeypatch.setattr(fl_sim.plugin_reach, "check_plugins_reach_workers", accept)
    monkeypatch.setattr(fl_sim.train_prior, "_load_data", accept)
    monkeypatch.setattr(fl_sim.identity, "train_identity", accept)


_RESULTS: dict[str, list[int]] = {}


# -- the properties ---------------------------------------------------------------------------
@settings(_SETTINGS, max_examples=120 * _SCALE)
@given(sets=overrides())
def test_validate_never_crashes(stop_before_work: None, sets: list[str]) -> None:
    with _sandbox() as root:
        args = [a for s in sets for a in ("--set", s)]
        out = io.StringIO()
        rc = check(["validate", str(DEFAULT), *args], root, out)
        _RESULTS.setdefault("validate", []).append(rc)
        if rc == 0:
            assert_values_kept(sets, json.loads(out.getvalue()))


def _kind(v: Any) -> str:
    if v is None or isinstance(v, bool | str | dict):
        return type(v).__name__
    return "number" if isinstance(v, int | float) else "list"


def assert_values_kept(sets: list[str], resolved: dict[str, Any]) -> None:
    """An accepted value is what it claims to be: the resolved config holds it with the kind
    it was written with (no "0.5" stored for a number, no true taken as 1), and a plug-in
    parameter is used by the plug-in with that kind too."""
    import tomllib

    from fl_sim.registry import validate_params
    pairs = [s.split("=", 1) for s in sets]
    for i, (key, raw) in enumerate(pairs):
        if any(k == key or key.startswith(k + ".") for k, _ in pairs[i + 1:]):
            continue  # replaced by a later override
        given = tomllib.loads(f"v = {raw}")["v"]
        node = lookup(resolved, key)
        if node is None or key in ("attacks", "defenses"):
            continue
        assert _kind(given) == _kind(node), (key, given, node)
        parts = key.split(".")
        if parts[0] == "attacks" and len(parts) == 3 and parts[2] not in (
                "name", "view", "client", "rounds"):
            entry = dict(resolved["attacks"][int(parts[1])])
            cls = ATTACKS.get(entry.pop("name"))
            params = {k: v for k, v in entry.items() if k not in ("view", "client", "rounds")}
            used = validate_params(cls, params, where="attack")[parts[2]]
            assert _kind(used) == _kind(node), (key, node, used)


@settings(_SETTINGS, max_examples=60 * _SCALE)
@given(sets=overrides(max_size=2))
def test_run_preflight_never_crashes(stop_before_work: None, sets: list[str]) -> None:
    with _sandbox() as root:
        args = [a for s in ("federation.num_rounds=2", *sets) for a in ("--set", s)]
        _RESULTS.setdefault("run", []).append(check(["run", str(DEFAULT), *args], root))


_PRIOR_KEYS = [f"training.{f}" for f in TrainingConfig.model_fields] + [
    "filter.split", "filter.classes", "filter.groups", "data.image_size", "data.channels",
    "model.preset", "task.num_train_timesteps", "task.beta_schedule", "training.bogus"]


@pytest.mark.parametrize("out", ["prior", "", "file", "file/sub", "run"])
@settings(_SETTINGS, max_examples=12 * _SCALE)
@given(sets=overrides(keys=_PRIOR_KEYS, max_size=2, defaults=PRIOR_DEFAULTS,
                     plugin_lists=False))
def test_train_prior_never_crashes(stop_before_work: None, sets: list[str], out: str) -> None:
    with _sandbox() as root:
        (root / "file").write_text("x")
        (root / "run").mkdir()
        (root / "run" / "run.json").write_text("{}")
        args = [a for s in sets for a in ("--set", s)]
        argv = ["train-prior", str(PRIOR), "--no-progress", *args]
        if out:
            argv += ["--out", str(root / out)]
        _RESULTS.setdefault("train-prior", []).append(check(argv, root))


@settings(_SETTINGS, max_examples=40 * _SCALE)
@given(opts=st.dictionaries(st.sampled_from(["epochs", "lr", "batch_size", "seed", "split",
                                             "bogus"]), _SCALARS, max_size=3),
       data=st.dictionaries(st.sampled_from(["image_size", "channels", "max_train", "seed"]),
                            _SCALARS, max_size=2),
       out=st.sampled_from(["m", "m", "file", "file/sub", "run"]))
def test_train_identity_never_crashes(stop_before_work: None, opts: dict[str, Any],
                                      data: dict[str, Any], out: str) -> None:
    with _sandbox() as root:
        (root / "file").write_text("x")
        (root / "run").mkdir()
        (root / "run" / "run.json").write_text("{}")
        text = "[data]\nname = \"digits\"\n" + "".join(f"{k} = {toml(v)}\n"
                                                      for k, v in data.items())
        text += "[identity]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in opts.items())
        (root / "id.toml").write_text(text)
        _RESULTS.setdefault("train-identity", []).append(
            check(["train-identity", str(root / "id.toml"), "--out", str(root / out)], root))


@settings(_SETTINGS, max_examples=50 * _SCALE)
@given(name=st.one_of(st.sampled_from(["..", "../x", "a/b", ".h", "", " ", "g", "sweep-1"]),
                     st.none(), _SCALARS),
       axes=st.one_of(st.just({}), st.dictionaries(
           st.sampled_from(KEYS + ["attack.max_iterations", "attack.lr", "attack.foo",
                                   "defenses.0.ratio"]), st.lists(_SCALARS, max_size=2),
           max_size=2)),
       attack=st.sampled_from(["inverting_gradients", "idlg", "noop", *ATTACKS.names(),
                               "nope"]),
       out=st.sampled_from(["", "", "file", "file/sub"]))
def test_bench_dry_run_never_crashes(stop_before_work: None, name: Any,
                                     axes: dict[str, list[Any]], attack: str, out: str) -> None:
    with _sandbox() as root:
        (root / "file").write_text("x")
        text = f'[bench]\nbase = "{DEFAULT}"\nset = ["federation.num_rounds=1"]\n'
        if name is not None:
            text += f"name = {toml(name)}\n"
        text += '[[base.defenses]]\nname = "pruning"\n[axes]\n'
        text += "".join(f"{json.dumps(k)} = {toml(v)}\n" for k, v in axes.items())
        text += f'[[attacks]]\nname = "{attack}"\nclient = 1\n'
        (root / "grid.toml").write_text(text)
        before = _tree(root)
        printed = io.StringIO()
        rc = check(["bench", str(root / "grid.toml"), "--dry-run",
                    *(["--out", str(root / out)] if out else [])], root, printed)
        if rc == 0 and not out:  # the default bench/<name> stays inside bench/
            where = printed.getvalue().split("bench directory ", 1)[1].split("; cells")[0]
            assert (root / where).resolve().is_relative_to(root / "bench"), where
        assert _tree(root) == before  # a dry run writes nothing, accepted or not
        _RESULTS.setdefault("bench", []).append(rc)


def test_the_generators_reach_both_outcomes() -> None:
    """Guards the generators themselves: each command saw accepted AND refused inputs (if a
    generator only produced garbage, the properties above would prove little). Runs after
    them in file order; skipped when run alone."""
    if len(_RESULTS) < 5:
        pytest.skip("run with the property tests above")
    for cmd, codes in _RESULTS.items():
        assert 0 in codes and 2 in codes, (cmd, sorted(set(codes)), len(codes))
