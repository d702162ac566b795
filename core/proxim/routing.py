"""Routing overrides: each ``name=value`` goes to the one part (or the objective's options) with that field.

``eps_high=0.28`` sets the region's field of that name; ``"region.eps_low"`` (qualified with the axis) or
``"objective.kl_coef"`` says which when two share a name. Parts are rebuilt with `attrs.evolve`, so their
validators run; a bad value is a `ConfigurationError` that names the part and where the value came from.
"""

from __future__ import annotations

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


def construct(cls: type[_P], kind: str, kwargs: Mapping[str, object]) -> _P:
    """``cls(**kwargs)``, a `ConfigurationError` naming the part when its validators refuse a value."""
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{kind} {cls.name!r}: {error_message(exc)}") from exc


def route(parts: Mapping[str, Part], options: Mapping[str, object], overrides: Mapping[str, object], origin: str) -> tuple[dict[str, Part], dict[str, object]]:
    """Send each override to the part (or the options) with that field; return updated parts and options.

    origin: where the overrides come from (``"override"``, ``"preset 'grpo'"``), for the error messages.
    """
    per_axis: dict[str, dict[str, object]] = {kind: {} for kind in parts}
    new_options = dict(options)
    for key, value in overrides.items():
        axis, dot, field = key.rpartition(".")
        if dot:
            target = _qualified_target(axis, field, parts, origin, key)
        else:
            target = _unqualified_target(field, parts, origin)
        if target == "objective":
            new_options[field] = value
        else:
            per_axis[target][field] = value
    updated = {}
    for kind, part in parts.items():
        kwargs = per_axis[kind]
        if not kwargs:
            updated[kind] = part
            continue
        try:
            # cast: mypy's attrs plugin cannot see that every concrete Part is an attrs class.
            updated[kind] = attrs.evolve(cast(Any, part), **kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{kind} {part.name!r} ({origin}): {error_message(exc)}") from exc
    return updated, new_options


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
