"""A `Check`: one named, callable test of one part, and what it runs with (`Context`).

Calling a check runs its test on hypothesis examples on the configured device and raises `CheckFailure`
(an ``AssertionError``) with a sentence saying what broke, hypothesis's shrunk falsifying example
attached as a note.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import attrs
import hypothesis
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException

from proxim.parts import Part
from proxim.registry import Registry, default_registry
from proxim.testing.devices import on_device
from proxim.testing.settings import resolve_device, resolve_max_examples

_T = TypeVar("_T")


class CheckFailure(AssertionError):
    """A part broke the contract a check states."""


@attrs.frozen
class Check:
    """One named check. Call it with a part (an instance, or a class built with its defaults).

    property: True for a check that runs only on parts declaring the property of the same name.
    max_examples / registry: settings; `configured` returns a copy with them changed.
    """

    name: str
    kinds: frozenset[str]
    summary: str
    property: bool
    _run: Runner = attrs.field(repr=False, alias="run")
    max_examples: int | None = None
    registry: Registry | None = attrs.field(default=None, repr=False)
    device: str | None = None

    def configured(self, *, max_examples: int | None = None, registry: Registry | None = None, device: str | None = None) -> Check:
        return attrs.evolve(self, max_examples=max_examples or self.max_examples, registry=registry or self.registry, device=device or self.device)

    def applies_to(self, part: Part | type[Part]) -> bool:
        part = as_instance(part)
        if part.kind not in self.kinds:
            return False
        return not self.property or self.name in _declared(part)

    def __call__(self, part: Part | type[Part]) -> None:
        part = as_instance(part)
        if part.kind not in self.kinds:
            raise ValueError(f"check {self.name!r} applies to {', '.join(sorted(self.kinds))} parts, not to the {part.kind} {part.name!r}.")
        ctx = Context(max_examples=resolve_max_examples(self.max_examples), registry_=self.registry)
        try:
            with on_device(resolve_device(self.device)):
                self._run(part, ctx)
        except CheckFailure as exc:
            failure = CheckFailure(f"{label(part)} fails {self.name}: {exc}")
            notes = list(getattr(exc, "__notes__", ()))  # hypothesis's falsifying example
            if notes:
                failure.__notes__ = notes  # what add_note() does (Python 3.11+), spelled for 3.10 too
            raise failure from exc.__cause__

    def __repr__(self) -> str:
        return f"<check {self.name}>"


def as_instance(part: Part | type[Part]) -> Part:
    """`part` itself, or its class built with default hyperparameters."""
    if isinstance(part, type):
        if not issubclass(part, Part):
            raise TypeError(f"the conformance kit checks proxim parts, got the class {part.__qualname__}.")
        return part()
    if not isinstance(part, Part):
        raise TypeError(f"the conformance kit checks proxim parts (Baseline, Advantage, TrustRegion), got {part!r}.")
    return part


def label(part: Part) -> str:
    """``region 'clip'``, or ``region 'clip(dual_clip=3.0)'`` when hyperparameters differ from the defaults."""
    return f"{part.kind} {short_name(part)!r}"


def short_name(part: Part) -> str:
    """The part's name, with the hyperparameters that differ from its defaults."""
    try:
        defaults = type(part)().settings()
    except Exception:
        defaults = {}
    changed = {k: v for k, v in part.settings().items() if k not in defaults or defaults[k] != v}
    if not changed:
        return part.name
    return f"{part.name}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


def _declared(part: Part) -> frozenset[str]:
    declared = part.declared_properties()
    return frozenset(declared) if isinstance(declared, (set, frozenset)) else frozenset()


@attrs.define
class Context:
    """What a check's test runs with: its examples per check, and the registry (built on first use)."""

    max_examples: int
    registry_: Registry | None

    @property
    def registry(self) -> Registry:
        """Where an advantage's ``default_baseline`` is looked up: the check's, else the installed plugins'."""
        if self.registry_ is None:
            self.registry_ = default_registry()
        return self.registry_

    def given(self, strategy: st.SearchStrategy[_T], test: Callable[[_T], None]) -> None:
        """Run `test` on `max_examples` examples drawn from `strategy` (deterministic; shrinks a failure)."""

        @hypothesis.settings(
            max_examples=self.max_examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink),
            print_blob=False,
            report_multiple_bugs=False,
        )
        @hypothesis.given(example=strategy)
        def check_example(example: _T) -> None:
            test(example)

        try:
            check_example()
        except HypothesisException as exc:
            # e.g. Flaky: the same example passed once and failed once, so the part is not a pure function.
            raise CheckFailure(f"hypothesis could not check it: {type(exc).__name__}: {exc}") from exc


Runner = Callable[[Part, Context], None]
"""What a `Check` runs: raises `CheckFailure` when the part breaks the contract."""
