"""Declaring settings: one attrs field per setting, from which validation, flags, ``--help`` and TOML follow.

A section is a small frozen class of related settings; a recipe's configuration inherits the sections it
uses, so its fields stay flat (``config.lr``, ``--lr``, ``lr = 1e-4`` in TOML) and a recipe that reads a
setting it does not have is a type error::

    @section("optimisation")
    class LearningRate(Settings):
        lr: float = setting(1e-4, "policy learning rate (AdamW)", min=0.0)

The annotation is the setting's type (``str``, ``int``, ``float``, ``bool``, ``list[str]``,
``list[float]``, ``dict[str, Any]``, each optionally ``| None``). From it and the `setting` call come:
checks on construction (type, range, choices; `ConfigurationError` naming the setting), the conversions
TOML and flags need (an integer where a number belongs, ``"none"`` for an empty optional setting whose
default is not empty, since TOML has no null), the flags (`proxim.train.flags`), and TOML text (`Settings.to_toml`,
written with tomli-w).
"""

from __future__ import annotations

import math
import os
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import attrs

from proxim.errors import ConfigurationError, suggest

METADATA_KEY = "proxim.setting"
#: ``--help`` groups, in the order they are shown (and TOML is written).
GROUPS = ("objective", "task and rewards", "model", "warm start", "sampling", "optimisation", "run")

_S = TypeVar("_S", bound="Settings")
_C = TypeVar("_C", bound=type)


@attrs.frozen
class Declaration:
    """What a `setting` call declares, plus the type read from its annotation (`kind`, `nullable`)."""

    help: str
    group: str = ""
    kind: str = ""
    nullable: bool = False
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    min_open: bool = False
    max: float | None = None
    metavar: str | None = None
    resumable: bool = False
    none_word: bool = True
    runs_code: Callable[[Any], bool] | None = None


KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list[str]": "a list of strings",
    "list[float]": "a list of numbers",
    "dict": "a table of key = value",
}


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    min: float | None = None,
    min_open: bool = False,
    max: float | None = None,
    metavar: str | None = None,
    resumable: bool = False,
    none_word: bool = True,
    runs_code: Callable[[Any], bool] | None = None,
    group: str = "",
) -> Any:
    """Declare one setting: its default, its ``--help`` text and its bounds (the type is the annotation).

    resumable: the setting may change when a run continues with ``--resume`` (the others would make it a
    different run). none_word: on the command line, ``none`` empties an optional setting (False: the word is
    kept as a value). runs_code: which values make a run execute code from outside proxim (a reward module,
    a model's own code); ``--resume`` never takes such a value from a run folder alone. group: the ``--help``
    group, when not the section's.
    """
    declaration = Declaration(
        help=help,
        group=group,
        choices=tuple(choices) if choices else None,
        min=min,
        min_open=min_open,
        max=max,
        metavar=metavar,
        resumable=resumable,
        none_word=none_word,
        runs_code=runs_code,
    )
    metadata = {METADATA_KEY: declaration}
    if isinstance(default, (list, dict)):
        copy = type(default)(default)
        return attrs.field(factory=lambda: type(copy)(copy), metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


def declaration(field: attrs.Attribute[Any]) -> Declaration:
    """The `Declaration` of a settings field."""
    found: Declaration = field.metadata[METADATA_KEY]
    return found


class Settings:
    """Base of every section and configuration: construction from values, TOML, and checks."""

    group: ClassVar[str] = ""
    """The ``--help`` group of a section's settings (set by `section`)."""
    command: ClassVar[str] = ""
    """The command a configuration belongs to, for the header of its TOML."""

    def __new__(cls: type[_S], *args: Any, **values: Any) -> _S:
        # attrs writes only ``__init__``; the names passed are recorded here, before it runs, so that
        # settings left to their defaults can take a preset's training regime (`given`).
        instance = super().__new__(cls)
        object.__setattr__(instance, "_given", frozenset(values))
        return instance

    def given(self) -> frozenset[str]:
        """The names of the settings passed when this configuration was built; the others hold their defaults.

        A TOML file and flags pass only what they hold, so a setting is given exactly when the user wrote
        it, even with its default value. A copy made from every value (``cls(**c.to_dict())``) gives all."""
        given: frozenset[str] = self.__dict__.get("_given", frozenset(self.names()))
        return given

    def given_values(self) -> dict[str, Any]:
        """The settings that were given (`given`), with their values."""
        return {n: getattr(self, n) for n in self.names() if n in self.given()}

    @classmethod
    def fields(cls) -> tuple[attrs.Attribute[Any], ...]:
        """The settings in the order their sections are listed (the class's MRO), each once; a setting a
        subclass redeclares (to change its default) keeps its place in the section that first declared it."""
        by_name = attrs.fields_dict(cls)  # type: ignore[arg-type]
        place: dict[str, tuple[int, int]] = {}
        for depth, klass in enumerate(cls.__mro__):
            if attrs.has(klass):
                own = [a.name for a in attrs.fields(klass) if not getattr(a, "inherited", False)]
                place.update({name: (depth, i) for i, name in enumerate(own)})  # the deepest declaration wins
        return tuple(by_name[n] for n in sorted(place, key=place.__getitem__))

    @classmethod
    def names(cls) -> list[str]:
        return [a.name for a in cls.fields()]

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of setting `name` (a fresh copy for lists and tables)."""
        raw: Any = attrs.fields_dict(cls)[name].default  # type: ignore[arg-type]
        return raw.factory() if isinstance(raw, typing.cast("type[Any]", attrs.Factory)) else raw

    @classmethod
    def from_dict(cls: type[_S], values: Mapping[str, Any], origin: str = "config") -> _S:
        """Build from setting values (TOML, JSON, flags); an unknown name is an error naming the closest one."""
        names = cls.names()
        unknown = [k for k in values if k not in names]
        if unknown:
            k = unknown[0]
            raise ConfigurationError(f"{origin}: unknown setting {k!r}.{suggest(k, names)} Settings: {', '.join(names)}.")
        return cls(**dict(values))

    @classmethod
    def of(cls: type[_S], settings: Settings) -> _S:
        """This section's settings taken from a configuration that includes it (e.g. the optimiser's of an `SFTConfig`)."""
        return cls(**{n: getattr(settings, n) for n in cls.names()})

    @classmethod
    def from_toml(cls: type[_S], path: str | os.PathLike[str], **overrides: Any) -> _S:
        data = read_toml(path)
        data.update(overrides)
        return cls.from_dict(data, origin=str(path))

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)  # type: ignore[arg-type]

    def to_toml(self) -> str:
        """TOML that `from_toml` reads back into an equal configuration, one commented block per ``--help`` group.

        An empty (None) setting whose default is empty is shown as a comment with its help; one whose
        default is not empty is written ``"none"``. A None inside a table (TOML has no null) is kept as a comment.
        """
        import tomli_w

        lines = [f"# proxim {self.command} configuration (resolved). Run again with: proxim {self.command} --config THIS_FILE", ""]
        tables: dict[str, Any] = {}
        for group in GROUPS:
            block: dict[str, Any] = {}
            comments = []
            for a in self.fields():
                d = declaration(a)
                value = getattr(self, a.name)
                if d.group != group:
                    continue
                if isinstance(value, dict):
                    tables[a.name] = {k: v for k, v in value.items() if v is not None}
                    comments += [f"# [{a.name}] {k} = none   (TOML has no null: pass {flag_name(a.name)} {k}=none)" for k, v in value.items() if v is None]
                elif value is None and self.default(a.name) is None:
                    comments.append(f"# {a.name} = (default)   # {d.help}")
                else:
                    block[a.name] = "none" if value is None else value
            if block or comments:
                lines += [f"# -- {group}", tomli_w.dumps(block).rstrip("\n"), *comments, ""]
        if tables:
            lines.append(tomli_w.dumps(tables))
        return "\n".join(line for line in lines if line is not None) + "\n"

    def changed(self) -> list[str]:
        """The settings whose value differs from their default."""
        return [n for n in self.names() if getattr(self, n) != self.default(n)]


def section(group: str) -> Callable[[_C], _C]:
    """Make a class a frozen, keyword-only settings section whose fields belong to the ``--help`` `group`."""

    if group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {GROUPS}")

    def decorate(cls: _C) -> _C:
        cls.group = group  # type: ignore[attr-defined]
        return attrs.frozen(kw_only=True, slots=False, field_transformer=_typed_fields)(cls)

    return decorate


def config(cls: _C) -> _C:
    """Make a class that inherits sections a frozen configuration (its own fields are declared in sections)."""
    return attrs.frozen(kw_only=True, slots=False, field_transformer=_typed_fields)(cls)


# -- types from annotations ------------------------------------------------------------------------


def _typed_fields(cls: type, fields: list[attrs.Attribute[Any]]) -> list[attrs.Attribute[Any]]:
    """attrs field transformer: read each new field's type from its annotation, attach its check and conversion."""
    out = []
    namespace = {**vars(sys.modules[cls.__module__]), **vars(typing)}
    for a in fields:
        if getattr(a, "inherited", False):
            out.append(a)
            continue
        if METADATA_KEY not in a.metadata:
            raise TypeError(f"{cls.__qualname__}.{a.name}: declare settings with proxim.train.settings.setting(...)")
        annotation = eval(a.type, namespace) if isinstance(a.type, str) else a.type
        kind, nullable = _kind(annotation, f"{cls.__qualname__}.{a.name}")
        d = attrs.evolve(declaration(a), kind=kind, nullable=nullable, group=declaration(a).group or getattr(cls, "group", ""))
        default = a.default.factory() if isinstance(a.default, typing.cast("type[Any]", attrs.Factory)) else a.default
        _validate_declaration(cls, a.name, d, default)
        out.append(
            a.evolve(
                type=annotation,
                metadata={METADATA_KEY: d},
                validator=_check,
                converter=attrs.Converter(_convert, takes_field=True),
            )
        )
    return out


def _kind(annotation: Any, where: str) -> tuple[str, bool]:
    args = typing.get_args(annotation)
    nullable = type(None) in args
    if nullable:
        rest = [t for t in args if t is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{where}: a setting has one type (optionally | None), got {annotation!r}")
        annotation = rest[0]
    origin = typing.get_origin(annotation)
    if annotation in (str, int, float, bool):
        return annotation.__name__, nullable
    if origin is list and typing.get_args(annotation) in ((str,), (float,)):
        return f"list[{typing.get_args(annotation)[0].__name__}]", nullable
    if origin is dict:
        return "dict", nullable
    raise TypeError(f"{where}: unsupported setting type {annotation!r}")


def _validate_declaration(cls: type, name: str, d: Declaration, default: Any) -> None:
    if not d.group:
        raise TypeError(f"{cls.__qualname__}.{name}: a setting needs a --help group (declare it in a @section)")
    if len(d.help) < 10:
        raise TypeError(f"{cls.__qualname__}.{name}: write a help text for the setting")
    if default is None and not d.nullable:
        raise TypeError(f"{cls.__qualname__}.{name}: the default is None, so the type must admit None")


def _convert(value: Any, field: attrs.Attribute[Any]) -> Any:
    d = declaration(field)
    if d.nullable and field.default is not None and isinstance(value, str) and value.strip().lower() == "none":
        return None  # TOML has no null: an optional setting whose default is not empty is emptied with "none"
    if d.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if d.kind.startswith("list") and isinstance(value, tuple):
        value = list(value)
    if d.kind == "list[float]" and isinstance(value, list):
        return [float(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in value]
    return value


def _check(instance: Any, field: attrs.Attribute[Any], value: Any) -> None:
    d, name = declaration(field), field.name
    if value is None:
        if not d.nullable:
            raise ConfigurationError(f"{name} may not be empty (None).")
        return
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, float),
        "bool": isinstance(value, bool),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "list[float]": isinstance(value, list) and all(isinstance(v, float) for v in value),
        "dict": isinstance(value, dict) and all(isinstance(k, str) for k in value),
    }[d.kind]
    if not ok:
        raise ConfigurationError(f"{name} must be {KIND_WORDS[d.kind]}, got {value!r}.")
    if d.kind == "float" and not math.isfinite(value):
        raise ConfigurationError(f"{name} must be finite, got {value!r}.")
    if d.choices and value not in d.choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(map(repr, d.choices))}, got {value!r}.{suggest(str(value), map(str, d.choices))}")
    if d.min is not None and (value < d.min or (d.min_open and value == d.min)):
        raise ConfigurationError(f"{name} must be {'>' if d.min_open else '>='} {d.min}, got {value!r}.")
    if d.max is not None and value > d.max:
        raise ConfigurationError(f"{name} must be <= {d.max}, got {value!r}.")


def resumable(cls: type[Settings]) -> list[str]:
    """The settings of `cls` that may change when a run continues."""
    return [a.name for a in cls.fields() if declaration(a).resumable]


def code_settings(values: Mapping[str, Any], cls: type[Settings]) -> dict[str, Any]:
    """The settings among `values` whose value would run code from outside proxim (their `runs_code`)."""
    found = {}
    for a in cls.fields():
        runs = declaration(a).runs_code
        if runs is not None and a.name in values and runs(values[a.name]):
            found[a.name] = values[a.name]
    return found


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


# -- values ----------------------------------------------------------------------------------------


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    p = Path(path)
    if not p.is_file():
        raise ConfigurationError(f"config file {str(path)!r} does not exist.")
    try:
        with p.open("rb") as fh:
            return dict(tomllib.load(fh))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: invalid TOML: {exc}") from exc
