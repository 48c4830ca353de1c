"""The base of every validated settings model: finite numbers only, no booleans for numbers.

Both the config sections (:mod:`fl_sim.config`) and the plug-in parameter models built from
signatures (:func:`fl_sim.registry.params_model`) derive from :class:`StrictNumbers`, so one
rule covers every float and int a user can write:

* ``inf`` / ``nan`` are refused for every float field (pydantic's ``allow_inf_nan=False``);
  a non-finite learning rate would make every client fail and the run unresumable;
* ``true`` / ``false`` are refused where a number is expected (pydantic's lax mode would take
  ``num_clients = true`` as 1), also inside lists (``peer_clients = [true]``);
* a string is refused where only a number is expected (lax mode would store
  ``ratio = "0.5"`` as 0.5 and a plug-in's ``Any``-typed copy as the string), also inside
  lists; a number or a string is refused where only a boolean is expected (lax mode took
  ``adaptive = 0`` as false and ``"yes"`` as true).

Everything else stays in pydantic's lax mode (TOML ``lr = 1`` is the float 1.0).
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

_NUMBERS = (int, float)


def _leaves(ann: Any) -> list[Any]:
    """The plain types an annotation admits (through Optional/Union/Annotated)."""
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _leaves(typing.get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        return [leaf for a in typing.get_args(ann) for leaf in _leaves(a)]
    return [ann]


def bool_for_number(ann: Any, value: Any) -> bool:
    """True if ``value`` is (or holds) a bool where ``ann`` wants an int or float.

    >>> bool_for_number(int, True), bool_for_number(int | None, False), bool_for_number(bool, 1)
    (True, True, False)
    >>> bool_for_number(tuple[int, ...], [0, True])
    True
    """
    leaves = _leaves(ann)
    if any(leaf is Any or leaf is bool for leaf in leaves):
        return False
    if isinstance(value, bool):
        return any(leaf in _NUMBERS for leaf in leaves)
    if isinstance(value, list | tuple):
        for leaf in leaves:
            if typing.get_origin(leaf) in (tuple, list):
                items = [a for a in typing.get_args(leaf) if a is not Ellipsis]
                if items and any(bool_for_number(items[min(i, len(items) - 1)], v)
                                 for i, v in enumerate(value)):
                    return True
    return False


def str_for_number(ann: Any, value: Any) -> bool:
    """True if ``value`` is (or holds) a string where ``ann`` admits only numbers.

    >>> str_for_number(float, "0.5"), str_for_number(float | None, "1"), str_for_number(
    ...     float | str, "1"), str_for_number(tuple[int, ...], [1, "2"])
    (True, True, False, True)
    """
    leaves = [leaf for leaf in _leaves(ann) if leaf is not type(None)]
    if isinstance(value, str):
        return bool(leaves) and all(leaf in _NUMBERS for leaf in leaves)
    if isinstance(value, list | tuple):
        for leaf in leaves:
            if typing.get_origin(leaf) in (tuple, list):
                items = [a for a in typing.get_args(leaf) if a is not Ellipsis]
                if items and any(str_for_number(items[min(i, len(items) - 1)], v)
                                 for i, v in enumerate(value)):
                    return True
    return False


def not_bool_for_bool(ann: Any, value: Any) -> bool:
    """True if ``value`` is a number or string where ``ann`` admits only booleans.

    >>> not_bool_for_bool(bool, 0), not_bool_for_bool(bool | None, "yes"), not_bool_for_bool(
    ...     bool, True), not_bool_for_bool(bool | int, 0)
    (True, True, False, False)
    """
    leaves = [leaf for leaf in _leaves(ann) if leaf is not type(None)]
    return (bool(leaves) and all(leaf is bool for leaf in leaves)
            and isinstance(value, int | float | str) and not isinstance(value, bool))


class StrictNumbers(BaseModel):
    """Refuses non-finite floats and booleans given for numbers (see module doc)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and bool_for_number(field.annotation, value):
            raise PydanticCustomError("bool_for_number",
                                      "a boolean where a number is expected")
        if field is not None and str_for_number(field.annotation, value):
            raise PydanticCustomError("str_for_number", "a string where a number is expected")
        if field is not None and not_bool_for_bool(field.annotation, value):
            raise PydanticCustomError("not_bool_for_bool",
                                      "a number or string where true or false is expected")
        return value
