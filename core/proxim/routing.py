"""Routing overrides: each ``name=value`` goes to the one part (or the objective's options) with that field.

``eps_high=0.28`` sets the region's field of that name; ``"region.eps_low"`` (qualified with the axis) or
``"objective.kl_coef"`` says which when two share a name; one field may be given only once per call.
Values are checked against the field's annotated type (a string where a float belongs is refused with
the part, field, type and value named), then parts are rebuilt with `attrs.evolve`, so their validators
run; a bad value is a `ConfigurationError` that names the part and where the value came from.
"""

from __future__ import annotations

import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, cast

import attrs

from proxim.errors import ConfigurationError, UnknownNameError, suggest
from proxim.options import OPTION_NAMES
from proxim.parts import Part

_P = TypeVar("_P", bound=Part)


def error_message(exc: Exception) -> str:
    """An exception's own sentence (attrs validators put extra context after it in ``args``)."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)


def construct(cls: type[_P], kind: str, kwargs: Mapping[str, object], origin: str | None = None) -> _P:
    """``cls(**kwargs)``, a `ConfigurationError` naming the part when a value has the wrong type or its
    validators refuse it."""
    return cast(_P, _build(cls, kind, kwargs, origin, lambda: cls(**kwargs)))


def evolve(part: _P, kind: str, kwargs: Mapping[str, object], origin: str) -> _P:
    """`part` with fields changed (``attrs.evolve``), checked like `construct`."""
    # cast: mypy's attrs plugin cannot see that every concrete Part is an attrs class.
    return cast(_P, _build(type(part), kind, kwargs, origin, lambda: attrs.evolve(cast(Any, part), **kwargs)))


def _build(cls: type[Part], kind: str, kwargs: Mapping[str, object], origin: str | None, make: typing.Callable[[], object]) -> object:
    who = f"{kind} {cls.name!r}" + (f" ({origin})" if origin else "")
    types_ = _field_types(cls)
    for field, value in kwargs.items():
        expected = types_.get(field)
        if expected is not None and _accepts(expected, value) is False:
            raise ConfigurationError(f"{who}: {field!r} must be {_describe(expected)}, got {value!r} ({type(value).__name__}).{_hint(field, value)}")
    try:
        return make()
    except ValueError as exc:
        raise ConfigurationError(f"{who}: {error_message(exc)}") from exc
    except TypeError as exc:  # a validator that cannot compare a value of an unexpected type
        given = ", ".join(f"{k}={v!r} ({type(v).__name__})" for k, v in kwargs.items()) or "its defaults"
        raise ConfigurationError(f"{who}: {given} refused: {error_message(exc)}. Pass values of the types its hyperparameters take.") from exc


def _field_types(cls: type) -> dict[str, object]:
    """Each attrs field's annotated type, resolved (``float | None``); none when an annotation cannot be
    resolved (a name local to a function), and then nothing is type-checked before the validators."""
    if not attrs.has(cls):
        return {}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        return {}
    return {a.name: hints[a.name] for a in attrs.fields(cls) if a.name in hints}


def _accepts(tp: object, value: object) -> bool | None:
    """Whether `value` is of type `tp`, for the types hyperparameters use (None: cannot tell). A bool is
    not a number here, and an int is a float."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        verdicts = [_accepts(arg, value) for arg in typing.get_args(tp)]
        return True if True in verdicts else (None if None in verdicts else False)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        return isinstance(value, numbers.Integral if tp is int else numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and tp is not object:
        return isinstance(value, tp)
    return None


def _describe(tp: object) -> str:
    """A type as a message names it: ``a float or None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(tp))
    names = {type(None): "None", bool: "True or False", int: "an int", float: "a float (a number)", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", repr(tp))) if isinstance(tp, type) else repr(tp)


def _hint(field: str, value: object) -> str:
    """A fix for a number written as a string (``'0.1'``)."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return ""
        return f" Write {field}={number!r}, a number, not a string."
    return ""


def route(parts: Mapping[str, Part], options: Mapping[str, object], overrides: Mapping[str, object], origin: str) -> tuple[dict[str, Part], dict[str, object]]:
    """Send each override to the part (or the options) with that field; return updated parts and options.

    origin: where the overrides come from (``"override"``, ``"preset 'grpo'"``), for the error messages.
    """
    per_axis: dict[str, dict[str, object]] = {kind: {} for kind in parts}
    new_options = dict(options)
    spelled: dict[tuple[str, str], str] = {}  # (target, field) -> the key that set it
    for key, value in overrides.items():
        axis, dot, field = key.rpartition(".")
        if dot:
            target = _qualified_target(axis, field, parts, origin, key)
        else:
            target = _unqualified_target(field, parts, origin)
        _once(spelled, target, field, key, overrides, origin, "the objective's options" if target == "objective" else f"{target} {parts[target].name!r}")
        if target == "objective":
            new_options[field] = value
        else:
            per_axis[target][field] = value
    updated = {kind: evolve(part, kind, per_axis[kind], origin) if per_axis[kind] else part for kind, part in parts.items()}
    return updated, new_options


def _once(spelled: dict[tuple[str, str], str], target: str, field: str, key: str, overrides: Mapping[str, object], origin: str, owner: str) -> None:
    """Refuse a second spelling (plain and qualified) of a field already set in this call; `owner` names
    whose field it is (``"region 'clip'"``)."""
    first = spelled.setdefault((target, field), key)
    if first != key:
        raise ConfigurationError(
            f"{origin} {first!r}={overrides[first]!r} and {key!r}={overrides[key]!r} both set {field!r} of {owner}; pass only one of them."
        )


def route_preference(part: _P, overrides: Mapping[str, object], origin: str) -> _P:
    """`part` (a preference loss) with `overrides` applied: plain field names or ``"preference.<field>"``,
    each field once; an unknown name is an `UnknownNameError` listing the hyperparameters."""
    fields = part.hyperparameters()
    kwargs: dict[str, object] = {}
    spelled: dict[tuple[str, str], str] = {}
    for key, value in overrides.items():
        field = key.removeprefix("preference.")
        if field not in fields:
            raise UnknownNameError(
                f"{origin} {key!r}: preference loss {part.name!r} has no hyperparameter {field!r}.{suggest(field, fields)} "
                f"Its hyperparameters: {', '.join(fields) or '(none)'}."
            )
        _once(spelled, "preference", field, key, overrides, origin, f"preference {part.name!r}")
        kwargs[field] = value
    return evolve(part, "preference", kwargs, origin) if kwargs else part


def _qualified_target(axis: str, field: str, parts: Mapping[str, Part], origin: str, key: str) -> str:
    if axis == "objective":
        if field not in OPTION_NAMES:
            raise UnknownNameError(f"{origin} {key!r}: objective options are {', '.join(OPTION_NAMES)}.{suggest(field, OPTION_NAMES)}")
        return "objective"
    if axis not in parts:
        raise UnknownNameError(f"{origin} {key!r}: {axis!r} is not an axis; qualify with baseline., advantage., region. or objective.")
    names = parts[axis].hyperparameters()
    if field not in names:
        raise UnknownNameError(
            f"{origin} {key!r}: {axis} {parts[axis].name!r} has no hyperparameter {field!r}."
            f"{suggest(field, names)} Its hyperparameters: {', '.join(names) or '(none)'}."
        )
    return axis


def _unqualified_target(field: str, parts: Mapping[str, Part], origin: str) -> str:
    owners = [kind for kind, part in parts.items() if field in part.hyperparameters()]
    if field in OPTION_NAMES:
        owners.append("objective")
    if len(owners) == 1:
        return owners[0]
    if owners:
        spelled = ", ".join(f"'{o}.{field}'" for o in owners)
        raise ConfigurationError(f"{origin} {field!r} is ambiguous: {' and '.join(owners)} all have it; write one of {spelled}.")
    everything = {f"{kind} {part.name!r}": part.hyperparameters() for kind, part in parts.items()}
    listing = "; ".join(f"{who}: {', '.join(names) or '(none)'}" for who, names in everything.items())
    all_names = [n for names in everything.values() for n in names] + list(OPTION_NAMES)
    raise UnknownNameError(
        f"{origin} {field!r} matches no hyperparameter of this objective.{suggest(field, all_names)} "
        f"Hyperparameters — {listing}; objective options: {', '.join(OPTION_NAMES)}."
    )
