"""``--set key.path=value`` overrides, applied to the raw TOML dict before validation.

The value is parsed as a TOML value (``3``, ``0.1``, ``true``, ``"text"``, ``[1, 2]``) and
falls back to a plain string; a numeric path element indexes a list.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import tomllib

from fl_sim.errors import ConfigError

__all__ = ["apply_overrides", "parse_override"]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3). Values parse as TOML, else as a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A new dict with each ``key.path=value`` applied (the input is not mutated).

    A numeric path element indexes a list (``attacks.0.max_iterations=10``).
    """
    data: dict[str, Any] = copy.deepcopy(dict(raw))  # TOML dates are not JSON
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = _list_item(node, part, text)
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise ConfigError(f"--set {text!r}: '{'.'.join(path[:i + 1])}' is not a "
                                  "section")
        last = path[-1]
        if isinstance(node, list):
            idx = _list_index(node, last, text)
            node[idx] = value
        else:
            node[last] = value
    return data


def _list_index(node: list[Any], part: str, text: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {text!r}: '{part}' is not an index of a list of "
                          f"{len(node)} entries")
    return int(part)


def _list_item(node: list[Any], part: str, text: str) -> Any:
    return node[_list_index(node, part, text)]
