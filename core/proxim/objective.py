"""Building an objective: `objective` composes a preset and/or named parts with overrides into an
`Objective` (or, for an offline preference loss, a `PreferenceObjective`); `preference_objective` builds
any preference loss, precisely typed.

Names are resolved in a `Registry` once, here; overrides are routed by field name (`proxim.routing`).
The objective that comes out holds its parts and never looks a name up again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, overload

from proxim.composed import Objective, assemble
from proxim.errors import ConfigurationError, UnknownNameError, suggest
from proxim.options import Options
from proxim.parts import AXES, Advantage, Part, check_part_instance
from proxim.preference import PreferenceObjective
from proxim.registry import PartInfo, Registry, default_registry
from proxim.routing import construct, route, route_preference

__all__ = ["Objective", "Options", "PartSpec", "objective", "preference_objective"]

PartSpec = str | Part | None
"""A part given to `objective`: a registered name, an instance, or None for the default."""


# The built-in preference losses (proxim_plugins.dpo) give a PreferenceObjective. mypy calls a Literal
# overload ahead of its str overlapping; it is chosen first, which is what is meant.
@overload
def objective(  # type: ignore[overload-overlap]
    preset: Literal["dpo", "ipo", "hinge"],
    /,
    *,
    baseline: None = None,
    advantage: None = None,
    region: None = None,
    registry: Registry | None = None,
    **overrides: object,
) -> PreferenceObjective: ...


@overload
def objective(
    preset: str | None = None,
    /,
    *,
    baseline: PartSpec = None,
    advantage: PartSpec = None,
    region: PartSpec = None,
    registry: Registry | None = None,
    **overrides: object,
) -> Objective: ...


def objective(
    preset: str | None = None,
    /,
    *,
    baseline: PartSpec = None,
    advantage: PartSpec = None,
    region: PartSpec = None,
    registry: Registry | None = None,
    **overrides: object,
) -> Objective | PreferenceObjective:
    """Compose an objective from a preset and/or named parts, with hyperparameter overrides.

    ``objective("grpo", eps_high=0.28)``; ``objective(advantage="pairwise", region="quadratic")``;
    ``objective(region=MyRegion(tau=2.0), advantage="group_normalized")``. Overrides are routed to the
    one part (or the objective options) that has a field of that name; qualify as ``"region.eps_low"``
    (``**{"region.eps_low": 0.1}``) when two parts share a name. A preset's parts stay unless replaced
    (its settings for a replaced axis are dropped). Without a preset: no baseline means the
    advantage's `default_baseline`, no region means ``clip``.

    A preference loss's name (``objective("dpo", beta=0.1)``) gives a `PreferenceObjective`; type
    checkers see that for the built-in names, and `preference_objective` types it for any name.
    """
    reg = registry or default_registry()
    if preset is not None and preset not in reg.entries["preset"]:
        if preset in reg.entries["preference"]:
            if baseline is not None or advantage is not None or region is not None:
                raise ConfigurationError(f"{preset!r} is an offline preference loss: it takes no baseline, advantage or region.")
            return _preference(reg, preset, overrides)
        known = sorted(reg.entries["preset"])
        preferences = sorted(reg.entries["preference"])
        raise UnknownNameError(
            f"no preset named {preset!r}.{suggest(preset, known + preferences)} Registered presets: {', '.join(known)}. "
            f"Preference losses: {', '.join(preferences) or '(none)'}."
        )
    chosen: dict[str, PartSpec] = {"baseline": baseline, "advantage": advantage, "region": region}
    for kind, spec in chosen.items():
        _check_spec(reg, kind, spec)
    preset_record = reg.get("preset", preset) if preset is not None else None
    if preset_record is None and advantage is None:
        _no_advantage(reg, chosen)
    from_preset = {kind: preset_record is not None and chosen[kind] is None for kind in AXES}
    if preset_record is not None:
        chosen = {kind: spec if spec is not None else getattr(preset_record, kind) for kind, spec in chosen.items()}
    if chosen["region"] is None:
        chosen["region"] = "clip"
    advantage_cls = _advantage_class(reg, chosen["advantage"])
    if chosen["baseline"] is None:
        chosen["baseline"] = advantage_cls.default_baseline

    parts: dict[str, Part] = {}
    sources: dict[str, PartInfo | None] = {}
    for kind in AXES:
        spec = chosen[kind]
        if isinstance(spec, str):
            cls: type[Part] = reg.get(kind, spec)
            parts[kind] = construct(cls, kind, {})
            sources[kind] = reg.info(kind, spec)
        else:
            assert isinstance(spec, AXES[kind])  # _check_spec
            check_part_instance(spec, kind)
            parts[kind] = spec
            sources[kind] = reg.info_of(spec)

    options: dict[str, object] = {}
    if preset_record is not None:
        kept = {k: v for k, v in preset_record.settings.items() if _applies(k, from_preset)}
        parts, options = route(parts, options, kept, origin=f"preset {preset!r}")
    parts, options = route(parts, options, overrides, origin="override")
    return assemble(parts, options, preset, sources)


def preference_objective(name: str, /, *, registry: Registry | None = None, **overrides: object) -> PreferenceObjective:
    """The offline preference loss registered as `name`, with hyperparameter overrides:
    ``preference_objective("dpo", beta=0.1)``, the same as ``objective("dpo", beta=0.1)``.

    The precisely typed way to build any preference loss, third-party ones included: `objective` is typed
    as returning a `PreferenceObjective` only for the built-in names (a plugin's name is just a ``str``).
    Overrides may be qualified as ``"preference.beta"``; an unknown name is an `UnknownNameError`.
    """
    return _preference(registry or default_registry(), name, overrides)


def _preference(reg: Registry, name: str, overrides: Mapping[str, object]) -> PreferenceObjective:
    part = route_preference(construct(reg.get("preference", name), "preference", {}), overrides, origin="override")
    return PreferenceObjective(preference=part, source=reg.info("preference", name))


def _check_spec(reg: Registry, kind: str, spec: PartSpec) -> None:
    """Refuse what `kind=` cannot take: a class (saying which instance or name to pass instead), a part of
    another axis, or anything else that is neither a name nor a part."""
    base = AXES[kind]
    if spec is None or isinstance(spec, (str, base)):
        return
    names = f"a registered {kind} name ({', '.join(sorted(reg.entries[kind]))})"
    if isinstance(spec, type) and issubclass(spec, base):
        name = getattr(spec, "name", None)
        registered = isinstance(name, str) and reg.entries[kind].get(name, (None,))[0] is spec
        by_name = f" or its registered name, {kind}={name!r}" if registered else ""
        raise ConfigurationError(f"{kind}={spec.__qualname__} is a class, but {kind}= takes an instance: pass {kind}={spec.__qualname__}(){by_name}.")
    if isinstance(spec, type) and issubclass(spec, Part):
        what = f"a {spec.kind} class" if isinstance(getattr(spec, "kind", None), str) else "a class of no axis"
        raise ConfigurationError(f"{kind}={spec.__qualname__} is {what}, not {_article(kind)}; pass a proxim.{base.__name__} instance or {names}.")
    if isinstance(spec, Part):
        raise ConfigurationError(f"{kind}={spec.describe()} is a {spec.kind}, not {_article(kind)}; pass a proxim.{base.__name__} instance or {names}.")
    raise ConfigurationError(f"{kind}= takes {names} or a proxim.{base.__name__} instance, got {spec!r} ({type(spec).__name__}).")


def _article(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _no_advantage(reg: Registry, chosen: Mapping[str, PartSpec]) -> None:
    """Raise: no preset and no advantage. Names the parts that were given, and whether each name is registered."""
    listing = f"Presets: {', '.join(sorted(reg.entries['preset']))}. Advantages: {', '.join(sorted(reg.entries['advantage']))}."
    given = {kind: spec for kind, spec in chosen.items() if spec is not None}
    if not given:
        raise ConfigurationError(f"name a preset or an advantage: objective('grpo') or objective(advantage='group_normalized', ...). {listing}")
    spelled = ", ".join(f"{kind}={spec!r}" if isinstance(spec, str) else f"{kind}={spec.describe()}" for kind, spec in given.items())
    example = ", ".join(f"{kind}={spec!r}" if isinstance(spec, str) else f"{kind}=..." for kind, spec in given.items())
    message = (
        f"{spelled} alone does not make an objective: name a preset or an advantage, e.g. objective('grpo', {example}) "
        f"or objective(advantage='group_normalized', {example}). {listing}"
    )
    unknown = False
    for kind, spec in given.items():
        if isinstance(spec, str) and spec in reg.entries[kind]:
            message += f" ({spec!r} is a registered {kind}.)"
        elif isinstance(spec, str):
            unknown, known = True, sorted(reg.entries[kind])
            message += f" And no {kind} is registered as {spec!r}.{suggest(spec, known)} Registered {kind}s: {', '.join(known)}."
    raise (UnknownNameError if unknown else ConfigurationError)(message)


def _applies(key: str, from_preset: Mapping[str, bool]) -> bool:
    """A preset setting qualified with an axis applies only while that axis keeps the preset's part."""
    axis, dot, _ = key.partition(".")
    return not dot or from_preset.get(axis, True)


def _advantage_class(reg: Registry, spec: PartSpec) -> type[Advantage]:
    """The advantage's class, for its `default_baseline`: registered as `spec`, or `spec`'s own."""
    if isinstance(spec, str):
        return reg.get("advantage", spec)
    assert isinstance(spec, Advantage)  # _check_spec refused anything else
    return type(spec)
