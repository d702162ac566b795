"""``proxim check``: the conformance kit against every installed part, with a report and an exit code."""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Iterable
from typing import TextIO

from proxim.errors import suggest
from proxim.parts import PART_KINDS
from proxim.registry import Registry, build_registry
from proxim.testing.checks import CheckResult, run_checks
from proxim.testing.settings import resolve_device, resolve_max_examples


def check_installed(
    names: Iterable[str] = (),
    kinds: Iterable[str] | None = None,
    *,
    max_examples: int | None = None,
    device: str | None = None,
    verbose: bool = False,
    registry: Registry | None = None,
    out: TextIO | None = None,
) -> int:
    """Run every applicable check on each installed part (or those named); print a report.

    Returns 0 when every check passes and every plugin loads, 1 otherwise (each failing part and check
    is named in the last lines), 2 for a name that matches no part.
    """
    out = out or sys.stdout
    registry = registry or build_registry(strict=False)
    wanted = set(names)
    chosen_kinds = tuple(kinds) if kinds else tuple(PART_KINDS)
    parts = [(kind, name, cls, info) for kind in chosen_kinds for name, (cls, info) in sorted(registry.entries[kind].items()) if not wanted or name in wanted]
    known = {name for kind in chosen_kinds for name in registry.entries[kind]}
    missing = sorted(wanted - known)
    if missing:
        for name in missing:
            what = " or ".join(chosen_kinds) if kinds else "part"
            print(f"proxim check: no {what} named {name!r}.{suggest(name, known)}", file=out)
        return 2

    examples = resolve_max_examples(max_examples)
    broken = [r for r in registry.plugins if r.error]
    on = resolve_device(device)
    suffix = "" if on.type == "cpu" else f", on {on}"
    print(f"proxim check: {len(parts)} part{'' if len(parts) == 1 else 's'}, {examples} hypothesis examples per check{suffix}", file=out)
    failures: list[str] = []
    total = 0
    for kind, name, cls, info in parts:
        start = time.perf_counter()
        try:
            results = run_checks(cls, max_examples=examples, registry=registry, device=device)
        except Exception as exc:
            print(f"{kind} {name} ({info.plugin}: {info.distribution} {info.version})  ERROR {type(exc).__name__}: {exc}", file=out)
            failures.append(f"{kind} {name}: could not be checked")
            continue
        total += len(results)
        bad = [r for r in results if not r.passed]
        seconds = time.perf_counter() - start
        where = f"({info.plugin}: {info.distribution} {info.version})"
        if not bad:
            print(f"{kind} {name} {where}  ok, {len(results)} checks ({seconds:.1f}s)", file=out)
        else:
            print(f"{kind} {name} {where}  FAILED {', '.join(r.check.name for r in bad)}", file=out)
            for result in bad:
                _explain(result, out)
            failures.extend(f"{kind} {name}: {r.check.name}" for r in bad)
        if verbose:
            for result in results:
                print(f"    {'PASS' if result.passed else 'FAIL'} {result.check.name}: {result.check.summary}", file=out)
    for record in broken:
        print(f"plugin {record.name} ({record.distribution} {record.version})  BROKEN, its parts were not checked: {record.error}", file=out)
        failures.append(f"plugin {record.name}: failed to load")
    print("", file=out)
    if failures:
        print(f"{len(failures)} failed ({total} checks run):", file=out)
        for failure in failures:
            print(f"  {failure}", file=out)
        return 1
    print(f"all {total} checks passed on {len(parts)} part{'' if len(parts) == 1 else 's'}.", file=out)
    return 0


def _explain(result: CheckResult, out: TextIO) -> None:
    error = result.error
    assert error is not None
    print(textwrap.indent(str(error), "    "), file=out)
    for note in getattr(error, "__notes__", ()):
        print(textwrap.indent(note, "      "), file=out)
