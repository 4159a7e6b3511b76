"""Command-line options made from a settings dataclass: each option and default is written once, there.

Used by `python -m profiling` (the benchmarks' settings, profiling/settings.py) and `python -m train`
(evaluate's and calibrate's options).

A field `batch_size: int = setting(64, help=...)` becomes `--batch-size N`
(default 64, its help); a tuple field takes a comma-separated list; a bool
field --flag / --no-flag; a field without a default is a required option.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from planktonio.declared import field_types


def _parser_of(kind):
    """The argparse type for a field's type (Optional unwrapped; tuples: comma-separated)."""
    args = typing.get_args(kind)
    if type(None) in args:
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return lambda text: tuple(item(part) for part in text.split(",") if part)
    return kind


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help") or None
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if types[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(flag, dest=f.name, type=_parser_of(types[f.name]), default=default, required=required,
                            choices=f.metadata.get("choices"),
                            help=(f"{help_text + '; ' if help_text else ''}default {shown}"
                                  if not required and default is not None else help_text))


def settings_from(cls, args: argparse.Namespace):
    """The dataclass, from parsed arguments."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
