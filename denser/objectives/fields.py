"""Dataclass fields as typed options: one type check for objective hyper-parameters and run flags.

An objective's fields and ``TrainConfig``'s fields are checked by the same function,
:func:`check_value`, so a value from Python, a config file or the command line meets one rule:
an int for ``int`` (never a bool), a number for ``float`` (converted), ``true``/``false`` for
``bool``, a member of a ``Literal``, and ``None`` only where the annotation allows it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

_UNION_TYPES = (typing.Union, types.UnionType)



def help_field(default, help: str, **metadata):
    """A dataclass field whose ``help`` is its flag's help text (``denser.cli.flags.add_dataclass_flags``
    makes every such field a flag); a list default is copied for each instance."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def is_union(annotation) -> bool:
    """``X | Y`` or ``typing.Union[X, Y]`` (``Optional[X]`` included)."""
    return typing.get_origin(annotation) in _UNION_TYPES


def check_value(where: str, annotation, value):
    """``value`` checked against ``annotation`` (int converted to float where the field is a float).

    Raises ``ValueError("<where> must be ..., got <value> (<type>)")``; ``where`` names the option
    for the user, e.g. ``"--steps"`` or ``"objective 'grpo' field 'clip_low'"``.
    """
    if annotation is Any:
        return value
    if typing.get_origin(annotation) is Literal:
        args = typing.get_args(annotation)
        if value not in args:
            raise ValueError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if is_union(annotation):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(where, arg, value)
            except ValueError:
                pass
        raise ValueError(f"{where} got {value!r} of type {type(value).__name__}; expected {annotation}")
    kind = f"({type(value).__name__})"
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a float, got {value!r} {kind}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an int, got {value!r} {kind}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be a bool (true/false), got {value!r} {kind}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r} {kind}")
        return value
    return value


def type_problems(obj, where: typing.Callable[[str], str]) -> list[str]:
    """Check every field of the dataclass instance ``obj`` in place (ints of float fields become
    floats); the problems found, one message per field, each naming the field as ``where(name)``."""
    problems = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        try:
            setattr(obj, f.name, check_value(where(f.name), hints.get(f.name, Any), getattr(obj, f.name)))
        except ValueError as e:
            problems.append(str(e))
    return problems


def type_name(annotation) -> str:
    """``Literal['a', 'b']`` -> ``'a' | 'b'``; ``float | None`` -> ``float | None`` (for docs)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in args)
    if args and is_union(annotation):
        return " | ".join(type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))

