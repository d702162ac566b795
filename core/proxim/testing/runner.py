"""``proxim check``: the conformance kit against every installed part, with a report and an exit code."""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Iterable, Mapping
from typing import NamedTuple, TextIO

from proxim.errors import ConfigurationError, UnknownNameError, suggest
from proxim.parts import PART_KINDS, Part
from proxim.registry import PartInfo, Registry, report_registry
from proxim.routing import construct
from proxim.testing.check import short_name
from proxim.testing.checks import CheckResult, run_checks
from proxim.testing.settings import resolve_device, resolve_max_examples

_NOT_LOADED = {"blocked": "blocked by PROXIM_BLOCK_PLUGINS", "disabled": "disabled by PROXIM_DISABLE_PLUGIN_AUTOLOAD=1"}


class _Subject(NamedTuple):
    """One part to check: its class (at its defaults) or an instance (at ``--set`` values)."""

    kind: str
    name: str
    part: type[Part] | Part
    info: PartInfo


def check_installed(
    names: Iterable[str] = (),
    kinds: Iterable[str] | None = None,
    *,
    settings: Mapping[str, object] | None = None,
    max_examples: int | None = None,
    device: str | None = None,
    verbose: bool = False,
    registry: Registry | None = None,
    out: TextIO | None = None,
) -> int:
    """Run every applicable check on each installed part (or those named); print a report.

    settings: hyperparameter values, routed by field name to the one part being checked that has the
              field (``{"eps_low": 0.1}``), or qualified with a kind or a part name (``"region.eps_low"``,
              ``"clip.eps_low"``); those parts are checked at these values instead of their defaults.

    Returns 0 when every check passes and no plugin is broken (blocked and disabled plugins are listed,
    and are no failure), 1 otherwise (each failing part and check, each unavailable part and each broken
    plugin is named in the last lines), 2 for a name that matches no part or a setting no part takes.
    """
    out = out or sys.stdout
    registry = registry or report_registry()
    wanted = set(names)
    chosen_kinds = tuple(kinds) if kinds else tuple(PART_KINDS)
    subjects = [
        _Subject(kind, name, cls, info) for kind in chosen_kinds for name, (cls, info) in sorted(registry.entries[kind].items()) if not wanted or name in wanted
    ]
    unavailable = [why for kind in chosen_kinds for name, why in registry.unavailable()[kind].items() if name in wanted]
    known = {name for kind in chosen_kinds for name in registry.entries[kind]} | {why.name for why in unavailable}
    missing = sorted(wanted - known)
    if missing:
        for name in missing:
            what = " or ".join(chosen_kinds) if kinds else "part"
            print(f"proxim check: no {what} named {name!r}.{suggest(name, known)}", file=out)
        return 2
    try:
        subjects = _with_settings(subjects, settings or {})
    except (UnknownNameError, ConfigurationError) as exc:
        print(f"proxim check: {exc}", file=out)
        return 2

    examples = resolve_max_examples(max_examples)
    on = resolve_device(device)
    suffix = "" if on.type == "cpu" else f", on {on}"
    print(f"proxim check: {len(subjects)} part{'' if len(subjects) == 1 else 's'}, {examples} hypothesis examples per check{suffix}", file=out)
    failures: list[str] = []
    total = 0
    for kind, name, part, info in subjects:
        start = time.perf_counter()
        label = f"{kind} {name if isinstance(part, type) else short_name(part)}"
        where = f"({info.plugin}: {info.distribution} {info.version})"
        try:
            results = run_checks(part, max_examples=examples, registry=registry, device=device)
        except Exception as exc:
            print(f"{label} {where}  ERROR {type(exc).__name__}: {exc}", file=out)
            failures.append(f"{label}: could not be checked")
            continue
        total += len(results)
        bad = [r for r in results if not r.passed]
        seconds = time.perf_counter() - start
        if not bad:
            print(f"{label} {where}  ok, {len(results)} checks ({seconds:.1f}s)", file=out)
        else:
            print(f"{label} {where}  FAILED {', '.join(r.check.name for r in bad)}", file=out)
            for result in bad:
                _explain(result, out)
            failures.extend(f"{label}: {r.check.name}" for r in bad)
        if verbose:
            for result in results:
                print(f"    {'PASS' if result.passed else 'FAIL'} {result.check.name}: {result.check.summary}", file=out)
    for why in unavailable:
        print(f"{why.kind} {why.name} ({why.info.plugin}: {why.info.distribution} {why.info.version})  UNAVAILABLE {why.reason}", file=out)
        failures.append(f"{why.kind} {why.name}: unavailable")
    for record in registry.plugins:
        if record.status == "broken":
            print(f"plugin {record.name} ({record.distribution} {record.version})  BROKEN, its parts were not checked: {record.error}", file=out)
            failures.append(f"plugin {record.name}: failed to load")
        elif record.status in _NOT_LOADED:
            print(f"plugin {record.name} ({record.distribution} {record.version})  not checked: {_NOT_LOADED[record.status]}", file=out)
    print("", file=out)
    if failures:
        print(f"{len(failures)} failed ({total} checks run):", file=out)
        for failure in failures:
            print(f"  {failure}", file=out)
        return 1
    print(f"all {total} checks passed on {len(subjects)} part{'' if len(subjects) == 1 else 's'}.", file=out)
    return 0


def _with_settings(subjects: list[_Subject], settings: Mapping[str, object]) -> list[_Subject]:
    """`subjects` with each setting applied to the one subject it names (by field, ``kind.field`` or
    ``name.field``), as `proxim.objective` routes overrides; `UnknownNameError` or `ConfigurationError`
    for a setting that fits no subject, or several."""
    values: list[dict[str, object]] = [{} for _ in subjects]
    for key, value in settings.items():
        qualifier, dot, field = key.rpartition(".")
        candidates = [i for i, s in enumerate(subjects) if not dot or qualifier in (s.kind, s.name)]
        if not candidates:
            checked = ", ".join(f"{s.kind} {s.name!r}" for s in subjects) or "(none)"
            raise UnknownNameError(f"--set {key!r}: {qualifier!r} is neither the kind nor the name of a part being checked. Checked: {checked}.")
        owners = [i for i in candidates if field in _fields(subjects[i])]
        if not owners:
            listing = "; ".join(f"{subjects[i].kind} {subjects[i].name!r}: {', '.join(_fields(subjects[i])) or '(none)'}" for i in candidates)
            every = [f for i in candidates for f in _fields(subjects[i])]
            raise UnknownNameError(f"--set {key!r}: no part being checked has a hyperparameter {field!r}.{suggest(field, every)} Hyperparameters — {listing}.")
        if len(owners) > 1:
            spelled = ", ".join(f"'{subjects[i].name}.{field}'" for i in owners)
            raise ConfigurationError(f"--set {key!r} is ambiguous: {len(owners)} parts being checked have {field!r}; write one of {spelled}.")
        values[owners[0]][field] = value
    return [_configured(s, v) if v else s for s, v in zip(subjects, values)]


def _configured(subject: _Subject, values: Mapping[str, object]) -> _Subject:
    try:
        return subject._replace(part=construct(_cls(subject), subject.kind, values))
    except ConfigurationError as exc:
        raise ConfigurationError(f"--set {' '.join(f'{k}={v!r}' for k, v in values.items())}: {exc}") from exc


def _cls(subject: _Subject) -> type[Part]:
    return subject.part if isinstance(subject.part, type) else type(subject.part)


def _fields(subject: _Subject) -> tuple[str, ...]:
    return _cls(subject).hyperparameters()


def _explain(result: CheckResult, out: TextIO) -> None:
    error = result.error
    assert error is not None
    print(textwrap.indent(str(error), "    "), file=out)
    for note in getattr(error, "__notes__", ()):
        print(textwrap.indent(note, "      "), file=out)
