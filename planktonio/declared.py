"""Settings declared once, as dataclasses: built from a mapping (YAML, --set, a command line), checked there.

The training config's sections (train/config.py), a loader backend's own
options (planktonio/loaders/backend.py) and the benchmarks' settings
(profiling) are dataclasses whose fields carry their type, default, help
text and allowed choices. `build` makes one from a mapping: an unknown key,
a value of the wrong type or a choice outside the allowed ones is a problem
naming the key; the dataclass's own `problems()` adds the checks that span a
value's range or several fields. Every problem is collected, with its key, so
that the caller can say where each value came from (a config file's line, a
--set) and report them all at once.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, fields
from typing import Any

from .errors import PlanktonioError


@dataclass(frozen=True)
class Problem:
    key: str       # dotted, e.g. "loader.batch_size"
    message: str   # what is wrong, naming the key


class SettingsError(PlanktonioError):
    """One or more problems with declared settings, each with the key it concerns."""

    def __init__(self, problems: list[Problem], prefix: str = "bad config"):
        self.problems = problems
        super().__init__(f"{prefix}: " + "; ".join(p.message for p in problems))


class Bytes(int):
    """A setting's type: a size in bytes, written as a number of bytes or with a unit (512MiB, 2GB, 1.5GiB;
    K, M, G and their B and iB forms are all powers of 1024, as memory is counted)."""


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str, what: str = "size") -> int:
    """'256MB' -> bytes; a plain number is bytes. A PlanktonioError names `what` and shows the forms."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT]?)(?:I?B)?)?\s*", str(text).upper())
    if not match:
        raise PlanktonioError(f"{what} {text!r}: expected a size such as 256MB, 1.5GiB or 1048576 (bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def shown_size(nbytes: float) -> str:
    """Bytes as a person reads them, in the units parse_size takes: 512 B, 12.0 KiB, 310.5 MiB, 2.0 GiB
    (never "0.0 MiB" for a small store)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def setting(default: Any = dataclasses.MISSING, *, help: str = "", choices: tuple | None = None,
            default_factory: Any = dataclasses.MISSING, resumable: bool = False):
    """A dataclass field with its help text and allowed choices (read by `build` and by command lines).
    resumable: a training setting a resumed run may change (train/config.py)."""
    metadata = {"help": help, "choices": choices, "resumable": resumable}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def field_types(cls) -> dict[str, Any]:
    """Each field's type, resolved (the modules use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def _check(key: str, value: Any, kind: Any) -> tuple[Any, str | None]:
    """(value, None) converted to the field's type, or (None, why it does not fit)."""
    args = typing.get_args(kind)
    if type(None) in args:  # Optional[X]
        if value is None:
            return None, None
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    if value is None:
        return None, f"{key}: a value is required"
    origin = typing.get_origin(kind)
    if kind is Bytes:
        if _is_number(value) and math.isfinite(value) and value >= 0:
            return int(value), None  # a plain int: configs are written back as YAML
        if isinstance(value, str):
            try:
                return parse_size(value, key), None
            except PlanktonioError as error:
                return None, str(error)
        return None, f"{key}: expected a size in bytes (a number, or text such as 512MiB), got {value!r}"
    if kind is bool:
        return (value, None) if isinstance(value, bool) else (None, f"{key}: expected true or false, got {value!r}")
    if kind is int:
        ok = _is_number(value) and not isinstance(value, float)
        return (value, None) if ok else (None, f"{key}: expected an integer, got {value!r}")
    if kind is float:
        if _is_number(value) and math.isfinite(value):
            return float(value), None
        return None, f"{key}: expected a finite number, got {value!r}"
    if kind is str:
        return (value, None) if isinstance(value, str) else (None, f"{key}: expected a string, got {value!r}")
    if origin is dict:
        return (dict(value), None) if isinstance(value, dict) else (None, f"{key}: expected a mapping, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return None, f"{key}: expected a list, got {value!r}"
        item = args[0] if args else Any
        converted = []
        for i, v in enumerate(value):
            c, why = _check(f"{key}[{i}]", v, item) if item is not Any else (v, None)
            if why:
                return None, why
            converted.append(c)
        return tuple(converted), None
    return value, None


def build(cls, values: Any, section: str = ""):
    """An instance of dataclass `cls` from a mapping; raises SettingsError naming every bad key."""
    prefix = f"{section}." if section else ""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise SettingsError([Problem(section, f"{section or 'settings'}: expected a mapping, got {values!r}")])
    declared = {f.name: f for f in fields(cls)}
    types = field_types(cls)
    # repr: any key, even one with a line break in it, prints on one line
    problems = [Problem(f"{prefix}{k}", f"unknown key {f'{prefix}{k}'!r}; {section or cls.__name__} has: "
                                        f"{', '.join(declared)}") for k in values if k not in declared]
    kwargs = {}
    for name, value in values.items():
        if name not in declared:
            continue
        key = f"{prefix}{name}"
        converted, why = _check(key, value, types[name])
        choices = declared[name].metadata.get("choices")
        if why is None and choices is not None and converted is not None and converted not in choices:
            why = f"{key} must be one of {', '.join(map(str, choices))}, not {converted!r}"
        if why:
            problems.append(Problem(key, why))
        else:
            kwargs[name] = converted
    if problems:
        raise SettingsError(problems)
    instance = cls(**kwargs)
    own = getattr(instance, "problems", None)
    found = [Problem(f"{prefix}{k}", f"{prefix}{m}") for k, m in own()] if own else []
    if found:
        raise SettingsError(found)
    return instance
