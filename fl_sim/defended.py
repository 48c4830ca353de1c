"""From ``[[defenses]]`` to defense objects, and the client-side application of them.

:func:`build_defenses` instantiates the configured defenses (validated by the registry, in
config order); :func:`defend_reply` applies the ``"update"``-stage ones to what a client is
about to send. Flower-specific adaptations (strategy wrappers, SecAgg+) live in
:mod:`fl_sim.federation`; this module imports no flwr.

What is defended: the floating-point PARAMETERS of the update (``named_parameters`` keys).
Buffers (BatchNorm running statistics, counters) travel as they are — as in Opacus and
Flower's DP mods; they too carry information about the data, which the report does not hide.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from torch import Tensor

from defenses.base import UpdateContext
from fl_sim.errors import ConfigError
from fl_sim.records import TruthStep
from fl_sim.registry import DEFENSES
from fl_sim.seeding import torch_generator


def build_defenses(cfg: Any) -> tuple[Any, ...]:
    """The defenses of experiment ``cfg`` (an ``ExperimentConfig``), in config order."""
    return _build(json.dumps([d.model_dump(mode="json") for d in cfg.defenses],
                             sort_keys=True))


@lru_cache(maxsize=8)
def _build(sections_json: str) -> tuple[Any, ...]:
    out = []
    for i, d in enumerate(json.loads(sections_json)):
        params = {k: v for k, v in d.items() if k != "name"}  # TOML keys beside the name
        out.append(DEFENSES.create(d["name"], _where=f"defenses[{i}]", **params))
    return tuple(out)


def defenses_in_force(cfg: Any) -> list[dict[str, Any]]:
    """``describe()`` of every configured defense: what records and results carry."""
    return [d.describe() for d in build_defenses(cfg)]


def of_stage(defenses: Sequence[Any], stage: str) -> list[Any]:
    return [d for d in defenses if d.stage == stage]


def check_defenses(cfg: Any) -> None:
    """Raise one-line :class:`ConfigError` if a defense cannot run in ``cfg`` (pre-flight)."""
    names = [d.name for d in build_defenses(cfg)]
    for name in set(names):
        if names.count(name) > 1:
            raise ConfigError(f"defenses: {name!r} is configured {names.count(name)} times")
    for i, d in enumerate(build_defenses(cfg)):
        problem = d.problem(cfg)
        if problem:
            raise ConfigError(f"defenses[{i}] ({d.name}): {problem}")


def defend_reply(cfg: Any, update: Mapping[str, Tensor], *, kind: str,
                 global_state: Mapping[str, Tensor], task: Any,
                 steps: tuple[TruthStep, ...], num_examples: int, server_round: int,
                 client_id: int) -> dict[str, Tensor]:
    """Apply the ``"update"`` defenses of ``cfg`` to a client's reply.

    ``update`` is what local training produced: the new ``state_dict`` (``kind="weights"``)
    or the gradient (``kind="gradient"``). The defenses see the parameters' delta
    (``new − global``) or gradient, in config order; the reply keeps its kind (new weights =
    global + defended delta). Without update defenses ``update`` is returned unchanged.
    """
    defenses = of_stage(build_defenses(cfg), "update")
    if not defenses:
        return dict(update)
    params = dict(task.model.named_parameters())
    keys = [k for k in update if k in params and update[k].is_floating_point()]
    if kind == "weights":
        vec = {k: update[k] - global_state[k] for k in keys}
    else:
        vec = {k: update[k] for k in keys}
    for i, d in enumerate(defenses):
        ctx = UpdateContext(kind="delta" if kind == "weights" else "gradient",
                            global_state=global_state, task=task, steps=steps,
                            lr=float(cfg.federation.lr), num_examples=num_examples,
                            server_round=server_round, client_id=client_id,
                            generator=torch_generator(cfg.run.seed, "round", server_round,
                                                      "client", client_id, "defense", i))
        vec = _checked(d, vec, d.apply(vec, ctx))
    out = dict(update)
    for k in keys:
        out[k] = (global_state[k] + vec[k]) if kind == "weights" else vec[k]
    return out


def _checked(d: Any, before: Mapping[str, Tensor], after: Mapping[str, Tensor]
             ) -> dict[str, Tensor]:
    """A defense must keep keys, shapes and dtypes (a bug otherwise, not a user error)."""
    if set(after) != set(before):
        raise RuntimeError(f"defense {d.name} changed the update's keys")
    for k, v in after.items():
        if v.shape != before[k].shape or v.dtype != before[k].dtype:
            raise RuntimeError(f"defense {d.name} changed {k}: {tuple(before[k].shape)} "
                               f"{before[k].dtype} -> {tuple(v.shape)} {v.dtype}")
    return dict(after)
