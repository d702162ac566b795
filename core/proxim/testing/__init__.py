"""proxim.testing: the conformance kit that plugin authors run against their own parts.

It holds hypothesis strategies for valid inputs of each kind of part (`rollouts`, `region_inputs`),
the named checks of the contract every part keeps (`CHECKS`), the properties a part may claim and
have checked (`PROPERTIES`), and `parametrize_with_checks`, which turns all of that into one pytest
test per part and check::

    from proxim.testing import parametrize_with_checks
    from proxim_hello import TruncatedIS

    @parametrize_with_checks([TruncatedIS, TruncatedIS(cap=2.0)])
    def test_conformance(part, check):
        check(part)

It is also an opt-in pytest plugin, never loaded on its own: ``pytest -p proxim.testing`` or
``pytest_plugins = ["proxim.testing"]`` in a test module adds the ``--proxim-max-examples`` option
(also ``PROXIM_TESTING_MAX_EXAMPLES``), ``--proxim-device`` (also ``PROXIM_TESTING_DEVICE``), and a
``proxim_registry`` fixture. It needs the ``test``
extra (``pip install 'proxim[test]'``: pytest and hypothesis); ``import proxim`` never imports it.
``proxim check`` runs the same checks on every installed part.

PYTEST_DONT_REWRITE (the checks raise `CheckFailure` themselves and need no assertion rewriting).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

import pytest

from proxim.parts import Part
from proxim.registry import Registry, build_registry
from proxim.testing import settings as _settings
from proxim.testing.check import Check, CheckFailure, as_instance, short_name
from proxim.testing.checks import CHECKS, CheckResult, checks_for, run_checks
from proxim.testing.properties import PROPERTIES, Property
from proxim.testing.settings import DEFAULT_MAX_EXAMPLES
from proxim.testing.strategies import DTYPES, RegionInputs, region_inputs, rollouts

__all__ = [
    "CHECKS",
    "DEFAULT_MAX_EXAMPLES",
    "DTYPES",
    "PROPERTIES",
    "Check",
    "CheckFailure",
    "CheckResult",
    "Property",
    "RegionInputs",
    "check_id",
    "checks_for",
    "parametrize_with_checks",
    "region_inputs",
    "rollouts",
    "run_checks",
]


def check_id(part: Part | type[Part], check: Check) -> str:
    """The test id of `check` on `part`: ``region:clip-masked_positions_ignored``, or with changed
    hyperparameters ``region:clip(dual_clip=3.0)-masked_positions_ignored``."""
    instance = as_instance(part)
    return f"{instance.kind}:{short_name(instance)}-{check.name}"


def parametrize_with_checks(
    parts: Iterable[Part | type[Part]],
    *,
    expected_failures: Mapping[str, str] | None = None,
    max_examples: int | None = None,
    registry: Registry | None = None,
    device: str | None = None,
) -> pytest.MarkDecorator:
    """A ``pytest.mark.parametrize`` over ``(part, check)`` for every applicable check of every part.

    parts:             part instances, or classes (built with their defaults).
    expected_failures: test id -> reason, for known failures; each becomes a strict xfail, so the
                       test fails again once the part is fixed (remove the entry then). Unknown ids
                       are an error.
    max_examples:      hypothesis examples per check (default: ``--proxim-max-examples``, then the
                       ``PROXIM_TESTING_MAX_EXAMPLES`` environment variable, then 25).
    registry:          where an advantage's ``default_baseline`` is looked up (default: the installed plugins).
    device:            where the parts are called, e.g. "cuda" (default: ``--proxim-device``, then the
                       ``PROXIM_TESTING_DEVICE`` environment variable, then "cpu").

    The decorated test takes the arguments ``part`` and ``check`` and calls ``check(part)``.
    """
    expected = dict(expected_failures or {})
    params = []
    seen = set()
    for part in parts:
        instance = as_instance(part)
        for check in checks_for(instance):
            test_id = check_id(instance, check)
            seen.add(test_id)
            marks = []
            if test_id in expected:
                marks.append(pytest.mark.xfail(reason=expected[test_id], strict=True, raises=CheckFailure))
            configured = check.configured(max_examples=max_examples, registry=registry, device=device)
            params.append(pytest.param(instance, configured, id=test_id, marks=marks))
    unknown = sorted(set(expected) - seen)
    if unknown:
        hints = "; ".join(f"{u!r}{_close(u, seen)}" for u in unknown)
        raise ValueError(f"expected_failures names tests that do not exist: {hints}. Ids look like 'region:clip-finite_outputs'.")
    return pytest.mark.parametrize(("part", "check"), params)


def _close(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- the pytest plugin ------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("proxim", "proxim conformance kit")
    group.addoption(
        "--proxim-max-examples",
        type=int,
        default=None,
        metavar="N",
        help=f"hypothesis examples per conformance check (default: $PROXIM_TESTING_MAX_EXAMPLES or {DEFAULT_MAX_EXAMPLES}).",
    )
    group.addoption(
        "--proxim-device",
        default=None,
        metavar="DEVICE",
        help="the device conformance checks call parts on, e.g. cuda (default: $PROXIM_TESTING_DEVICE or cpu).",
    )


_OPTION_SET = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "proxim_conformance: a conformance-kit test (proxim.testing)")
    chosen = config.getoption("proxim_max_examples", default=None)
    device = config.getoption("proxim_device", default=None)
    config.stash[_OPTION_SET] = chosen is not None or device is not None
    if chosen is not None:
        _settings.set_default_max_examples(chosen)
    if device is not None:
        _settings.set_default_device(device)


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(_OPTION_SET, False):
        _settings.set_default_max_examples(None)
        _settings.set_default_device(None)


def pytest_report_header(config: pytest.Config) -> str:
    return f"proxim.testing: {_settings.resolve_max_examples()} hypothesis examples per conformance check, on {_settings.resolve_device()}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and isinstance(callspec.params.get("check"), Check):
            item.add_marker(pytest.mark.proxim_conformance)


@pytest.fixture
def proxim_registry() -> Registry:
    """A registry built for this test from the installed plugins (honours PROXIM_* switches)."""
    return build_registry()
