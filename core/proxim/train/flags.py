"""The command line from the declarations: one flag per setting, in its ``--help`` group, and the values given.

Each setting is a flag of the same name with dashes (``prompts_per_step`` -> ``--prompts-per-step``);
booleans also have a ``--no-`` form; list settings take several values (``--rewards task mymod:brevity``);
table settings take ``KEY=VALUE`` and repeat (``--set kl_coef=0.01 --set region.eps_high=0.28``); on an
optional setting, ``none`` empties it. A flag that is not given is absent from the namespace, so a TOML
file's value (``--config``) stands.
"""

from __future__ import annotations

import argparse
import ast
import json
from collections.abc import Callable, Iterable
from typing import Any

from proxim.errors import ConfigurationError
from proxim.train.settings import GROUPS, Settings, declaration, flag_name


def add_flags(parser: argparse.ArgumentParser, cls: type[Settings]) -> None:
    """One flag per setting of `cls`, in its ``--help`` group; flags not given stay absent from the namespace."""
    used = {declaration(a).group for a in cls.fields()}
    by_group = {g: parser.add_argument_group(f"{g} settings") for g in GROUPS if g in used}
    for a in sorted(cls.fields(), key=lambda f: GROUPS.index(declaration(f).group)):
        d = declaration(a)
        default = cls.default(a.name)
        shown = "none" if default is None else json.dumps(default) if isinstance(default, (list, dict)) else default
        kwargs: dict[str, Any] = {"dest": a.name, "default": argparse.SUPPRESS, "help": f"{d.help} (default: {shown})".replace("%", "%%")}
        if d.metavar:
            kwargs["metavar"] = d.metavar
        group, flag = by_group[d.group], flag_name(a.name)
        if d.kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif d.kind == "dict":
            group.add_argument(flag, action="append", **kwargs)
        elif d.kind.startswith("list"):
            group.add_argument(flag, nargs="*", type=float if d.kind == "list[float]" else str, **kwargs)
        else:
            parse: Callable[[str], Any] = {"str": str, "int": int, "float": float}[d.kind]
            if d.choices:
                kwargs["choices"] = d.choices
            group.add_argument(flag, type=_nullable(parse) if d.nullable and d.none_word else parse, **kwargs)


def _nullable(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.strip().lower() == "none" else parse(text)

    convert.__name__ = parse.__name__
    return convert


def flag_values(args: argparse.Namespace, cls: type[Settings]) -> dict[str, Any]:
    """The settings of `cls` given as flags (``--set``-style tables parsed to dicts)."""
    values = {n: getattr(args, n) for n in cls.names() if hasattr(args, n)}
    for a in cls.fields():
        if declaration(a).kind == "dict" and a.name in values:
            values[a.name] = parse_assignments(values[a.name], flag_name(a.name))
    return values


def parse_value(text: str) -> Any:
    """A ``--set`` value: a Python/TOML literal (1e-3, true, none, "x", [1, 2]) or else the bare string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_assignments(items: Iterable[str], flag: str = "--set") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"{flag} {item!r}: write KEY=VALUE, e.g. --set kl_coef=0.01.")
        out[key.strip()] = parse_value(value)
    return out
