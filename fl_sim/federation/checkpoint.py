"""Per-round checkpoints: global model, strategy state, round number (safetensors + JSON).

After every completed round the server writes ``checkpoint/r{round}.global.safetensors``,
``checkpoint/r{round}.strategy.safetensors`` and then, atomically, ``checkpoint/state.json``
pointing at them; older files are removed afterwards. A crash at any point leaves
``state.json`` naming a complete pair. No pickle anywhere.

Strategy state is captured generically from the strategy object (and any wrapped
``Strategy`` it holds, e.g. a DP wrapper around FedAdam): array-valued attributes
(``ArrayRecord``, ``dict[str, ndarray]``, ``list[ndarray]`` — FedOpt's ``m_t``/``v_t``/
``current_arrays``, FedAvgM's ``momentum_vector``) go to safetensors; scalar attributes
(adaptive clipping norms, counters) to JSON. Sampling needs no state: it derives from
``(seed, round)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from fl_sim.errors import RunDirError
from fl_sim.stores import read_tensors, resolve_inside, write_tensors

STATE = "state.json"
_SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the last complete round and what continues from it."""

    server_round: int
    global_state: dict[str, Tensor]
    strategy_tensors: dict[str, Tensor]
    strategy_scalars: dict[str, Any]
    extra: dict[str, Any]


def _strategies(obj: Strategy, prefix: str = "") -> list[tuple[str, Strategy]]:
    out = [(prefix, obj)]
    for name, value in sorted(vars(obj).items()):
        if isinstance(value, Strategy):
            out += _strategies(value, f"{prefix}{name}.")
    return out


def strategy_state(strategy: Strategy) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, scalars)`` describing the mutable state of ``strategy`` (see module doc)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for prefix, obj in _strategies(strategy):
        for name, value in sorted(vars(obj).items()):
            key = f"{prefix}{name}"
            if isinstance(value, ArrayRecord):
                for k, a in value.items():
                    tensors[f"{key}|ar|{k}"] = torch.from_numpy(np.array(a.numpy()))
                scalars[key] = {"kind": "ar", "keys": list(value.keys())}
            elif isinstance(value, dict) and value and all(
                    isinstance(v, np.ndarray) for v in value.values()):
                for k, a in value.items():
                    tensors[f"{key}|dict|{k}"] = torch.from_numpy(np.array(a))
                scalars[key] = {"kind": "dict", "keys": list(value.keys())}
            elif isinstance(value, list) and value and all(
                    isinstance(v, np.ndarray) for v in value):
                for i, a in enumerate(value):
                    tensors[f"{key}|list|{i}"] = torch.from_numpy(np.array(a))
                scalars[key] = {"kind": "list", "len": len(value)}
            elif isinstance(value, _SCALARS):
                scalars[key] = {"kind": "scalar", "value": value}
    return tensors, scalars


def load_strategy_state(strategy: Strategy, tensors: Mapping[str, Tensor],
                        scalars: Mapping[str, Any]) -> None:
    """Restore what :func:`strategy_state` captured into a freshly built ``strategy``."""
    objs = dict(_strategies(strategy))
    for key, spec in scalars.items():
        prefix, _, name = key.rpartition(".")
        obj = objs.get(f"{prefix}." if prefix else "")
        if obj is None:
            raise RunDirError(f"checkpoint strategy state names unknown strategy {prefix!r}")
        kind = spec["kind"]
        if kind == "scalar":
            value: Any = spec["value"]
        elif kind == "ar":
            value = ArrayRecord({k: Array(tensors[f"{key}|ar|{k}"].numpy()) for k in spec["keys"]})
        elif kind == "dict":
            value = {k: tensors[f"{key}|dict|{k}"].numpy() for k in spec["keys"]}
        else:
            value = [tensors[f"{key}|list|{i}"].numpy() for i in range(spec["len"])]
        setattr(obj, name, value)


class CheckpointStore:
    """``run_dir/checkpoint``: save after each round, load the last complete one."""

    def __init__(self, run_dir: Path | str) -> None:
        self.root = Path(run_dir) / "checkpoint"

    def save(self, server_round: int, global_state: Mapping[str, Tensor], strategy: Strategy,
             extra: Mapping[str, Any]) -> None:
        tensors, scalars = strategy_state(strategy)
        g_rel, s_rel = f"r{server_round:04d}.global.safetensors", \
            f"r{server_round:04d}.strategy.safetensors"
        write_tensors(self.root / g_rel, global_state, {"round": server_round})
        write_tensors(self.root / s_rel, tensors, {"scalars": scalars})
        state = {"round": server_round, "global": g_rel, "strategy": s_rel,
                 "extra": dict(extra)}
        tmp = self.root / f".tmp-{STATE}"
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, self.root / STATE)
        for p in self.root.glob("r*.safetensors"):
            if p.name not in (g_rel, s_rel):
                p.unlink(missing_ok=True)

    def load(self) -> Checkpoint | None:
        p = self.root / STATE
        if not p.is_file():
            return None
        try:
            state = json.loads(p.read_text())
            g_rel, s_rel, server_round = state["global"], state["strategy"], int(state["round"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise RunDirError(f"corrupt checkpoint {p}: {type(exc).__name__}: {exc}") from None
        # only files inside checkpoint/ (a state.json naming ../truth/... is refused)
        g, _ = read_tensors(resolve_inside(self.root, g_rel))
        s, meta = read_tensors(resolve_inside(self.root, s_rel))
        return Checkpoint(server_round=server_round, global_state=g,
                          strategy_tensors=s, strategy_scalars=dict(meta.get("scalars", {})),
                          extra=dict(state.get("extra", {})))
