"""Command-line flags from a benchmark's settings dataclass: one flag per field.

A field `test_chunks: int = 24` becomes `--test-chunks N`; a field without a default, a required
flag; `bool` fields are switches (default False), `tuple[int, ...]` fields take one or more values, `X | None` fields default to None. Help
text and choices come from the field's metadata (`flag(...)`), so the settings class is the one
place a benchmark's options are written down.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def flag(default: Any, help: str, *, choices: tuple[str, ...] | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A settings field with its `--help` text (and, optionally, allowed values and other flag names).
    `default=dataclasses.MISSING` makes the flag required."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})


def _value_type(hint: Any) -> tuple[Any, bool]:
    """The type a flag's values parse to, and whether it takes several (a tuple field)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
        args = list(typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return args[0], True
    return hint, False


def _help(text: str, default: Any) -> str:
    """The field's help, with its default unless there is none to show or the text names it."""
    if default in (None, False, dataclasses.MISSING) or "default" in text:
        return text
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})"


def build_parser(settings_type: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser whose options are `settings_type`'s fields."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(settings_type)
    for field in dataclasses.fields(settings_type):
        meta = field.metadata
        names = [f"--{field.name.replace('_', '-')}", *meta.get("aliases", ())]
        kwargs: dict[str, Any] = {"dest": field.name, "help": _help(meta.get("help", ""), field.default)}
        if field.default is dataclasses.MISSING:  # a field without a default: a required flag
            kwargs["required"] = True
        else:
            kwargs["default"] = field.default
        kind, several = _value_type(hints[field.name])
        if kind is bool:
            parser.add_argument(*names, action="store_true", **kwargs)
            continue
        if several:
            kwargs["nargs"] = "+"
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        parser.add_argument(*names, type=kind, **kwargs)
    return parser


def parse_settings(settings_type: type, argv: list[str], prog: str, description: str) -> Any:
    """`settings_type` filled from command-line flags (argparse exits on --help or a bad flag)."""
    args = build_parser(settings_type, prog, description).parse_args(argv)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()}
    return settings_type(**values)
