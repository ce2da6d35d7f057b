"""Command-line flags from a settings dataclass: the one argparse builder of `grpo_fast.train` and `grpo_fast.sft`.

Every key of `grpo_fast.config.settings(schema)` becomes `--kebab-case` (and `--snake_case`), in the argument group
of its section, with its help text, default and, when given, presets' values. Types are the real annotations:
bool flags take `--x` (true) or `--x false`; `int | None` and `float | None` read "none"; a Literal's values are
the flag's choices. Only the flags typed land in the parsed namespace (argparse.SUPPRESS), so a caller can layer
them over the dataclass defaults, presets and config files. Bad input: one line `error: ... (see --help)`, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, NoReturn

from grpo_fast.config import ConfigError, Setting, choices, convert, settings


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: <message> (see --help)` on stderr and exit code 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _base(kind: Any) -> Any:
    """`kind` without `| None`."""
    if isinstance(kind, types.UnionType):
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _reader(setting: Setting) -> Callable[[str], Any]:
    """An argparse `type=` that converts a flag's string with `grpo_fast.config.convert`."""

    def read(text: str) -> Any:
        try:
            return convert(setting.kind, text, setting.key)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    read.__name__ = getattr(_base(setting.kind), "__name__", "value")  # argparse names the type in some errors
    return read


def _help(setting: Setting, presets: Mapping[str, Mapping[str, Any]]) -> str:
    """The setting's help with its default and presets' values, `%` escaped (argparse %-formats help strings)."""
    notes = [f"default: {setting.default}"]
    notes += [f"{name} preset: {values[setting.key]}" for name, values in presets.items() if setting.key in values]
    return f"{setting.help} [{'; '.join(notes)}]".strip().replace("%", "%%")


def build_parser(
    schema: type, *, prog: str, description: str, presets: Mapping[str, Mapping[str, Any]] | None = None
) -> ArgumentParser:
    """A parser with one flag per key of the dataclass `schema` (nested settings flattened), grouped by section.

    `presets`: name -> {key: value} shown in each flag's help beside the default.
    """
    parser = ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, setting in settings(schema).items():
        section = setting.section or "options"
        if section not in groups:
            groups[section] = parser.add_argument_group(section)
        flags = [f"--{key.replace('_', '-')}"] + ([f"--{key}"] if "_" in key else [])
        kind = _base(setting.kind)
        options: dict[str, Any] = {"dest": key, "type": _reader(setting), "help": _help(setting, presets or {})}
        if kind is bool:  # `--resume` alone means true; `--warm-start false` too
            options |= {"nargs": "?", "const": True, "metavar": "BOOL"}
        elif typing.get_origin(kind) is Literal:
            options["choices"] = choices(kind)
        else:
            options["metavar"] = key.split("_")[-1].upper()
        groups[section].add_argument(*flags, **options)
    return parser
