"""The conformance checks: the contract every part keeps, and the properties a part may claim.

Each `Check` is a named, callable test of one part: ``CHECKS["masked_positions_ignored"](MyRegion())``
raises `CheckFailure` (an ``AssertionError``) with a sentence saying what broke, and hypothesis's
shrunk falsifying example attached as a note. Universal checks apply to every part of a kind;
property checks apply when the part declares the property (``Part.properties``, or
``Part.declared_properties()`` when it depends on hyperparameters).

Parts are called the way `proxim.Objective` calls them: stage-1 parts under ``torch.no_grad()`` with a
validated `Rollout`, whose rewards are each sequence's total [B] for a baseline, and for an advantage
[B, T] with zeros on padding when it is token-level, else [B]; trust regions with ``logprobs`` carrying the gradient and masked positions
holding 0 in every input. An advantage's properties are checked composed with its ``default_baseline``
(resolved by name in the registry), as ``proxim.objective(advantage=...)`` composes them; its universal
checks use a random baseline, so that a fault is the advantage's own.

This module is the catalogue (`CHECKS`) and runs it (`run_checks`). The checks live by what they test:
`proxim.testing.outputs` and `proxim.testing.purity` (the universal contract),
`proxim.testing.stage_one_properties` and `proxim.testing.region_properties` (the claimable properties),
calling parts in `proxim.testing.calling`; `Check` itself is in `proxim.testing.check`.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from proxim.parts import AXES, PART_KINDS, Part
from proxim.registry import Registry
from proxim.testing import outputs, purity, region_properties, stage_one_properties
from proxim.testing.check import Check, CheckFailure, Runner, as_instance, label, short_name
from proxim.testing.properties import PROPERTIES, Property, properties_known
from proxim.testing.settings import (
    DEFAULT_MAX_EXAMPLES,
    resolve_device,
    resolve_max_examples,
    set_default_device,
    set_default_max_examples,
)

__all__ = [
    "CHECKS",
    "DEFAULT_MAX_EXAMPLES",
    "PROPERTIES",
    "Check",
    "CheckFailure",
    "CheckResult",
    "Property",
    "as_instance",
    "checks_for",
    "label",
    "resolve_device",
    "resolve_max_examples",
    "run_checks",
    "set_default_device",
    "set_default_max_examples",
    "short_name",
]

_STAGE_ONE = frozenset({"baseline", "advantage"})
_AXES = frozenset(AXES)
_ALL = frozenset(PART_KINDS)
_PER_ROW = frozenset({"region", "preference"})

_UNIVERSAL = (
    Check("properties_known", _ALL, "every declared property is one the kit knows for this kind", False, properties_known),
    Check("shape_dtype_device", _ALL, "outputs have the documented type and shape, and keep the inputs' dtype and device", False, outputs.shape_dtype_device),
    Check(
        "finite_outputs",
        _ALL,
        "finite inputs (extreme log-ratios, singleton and degenerate groups included) give finite outputs and gradients",
        False,
        outputs.finite(False),
    ),
    Check("fully_masked_rows", _AXES, "a row with no valid token gives finite outputs everywhere", False, outputs.finite(True)),
    Check(
        "masked_positions_ignored",
        _AXES,
        "setting padded inputs to garbage (NaN and inf too, for stage 1) changes nothing at valid positions",
        False,
        outputs.masked_positions_ignored,
    ),
    Check(
        "no_gradient_leak",
        _STAGE_ONE,
        "stage-1 outputs never require grad: not under torch.no_grad(), nor when no input requires grad",
        False,
        purity.no_gradient_leak,
    ),
    Check("rows_independent", _PER_ROW, "each row's (or pair's) loss depends only on that row: no reduction over the batch", False, purity.rows_independent),
    Check("inputs_not_mutated", _ALL, "inputs are never modified in place", False, purity.inputs_not_mutated),
    Check("deterministic", _ALL, "the same inputs give bitwise the same outputs", False, purity.deterministic),
)
_PROPERTY_RUNNERS: dict[str, Runner] = {
    "group_independent": stage_one_properties.group_independent,
    "permutation_equivariant": stage_one_properties.permutation_equivariant,
    "shift_equivariant": stage_one_properties.shift_equivariant,
    "shift_invariant": stage_one_properties.shift_invariant,
    "zero_sum_per_group": stage_one_properties.zero_sum_per_group,
    "degenerate_groups_zero": stage_one_properties.degenerate_groups_zero,
    "outcome_broadcast": stage_one_properties.outcome_broadcast,
    "pg_at_anchor": region_properties.pg_at_anchor,
    "value_at_anchor": region_properties.value_at_anchor,
    "zero_grad_clipped_side": region_properties.zero_grad_clipped_side,
    "bounded_weight": region_properties.bounded_weight,
    "positively_homogeneous": region_properties.positively_homogeneous,
    "tokens_independent": region_properties.tokens_independent,
}
_PROPERTY_CHECKS = tuple(Check(p.name, p.kinds, p.meaning, True, _PROPERTY_RUNNERS[p.name]) for p in PROPERTIES.values())

CHECKS: dict[str, Check] = {c.name: c for c in (*_UNIVERSAL, *_PROPERTY_CHECKS)}
"""Every check, by name: the universal ones first, then one per property."""


def checks_for(part: Part | type[Part]) -> list[Check]:
    """The checks that apply to `part`: the universal ones of its kind, then those of its declared properties."""
    instance = as_instance(part)
    return [c for c in CHECKS.values() if c.applies_to(instance)]


@attrs.frozen
class CheckResult:
    """The outcome of one check on one part: `error` is None when it passed."""

    part: Part
    check: Check
    error: CheckFailure | None

    @property
    def passed(self) -> bool:
        return self.error is None


def run_checks(
    part: Part | type[Part],
    *,
    checks: Iterable[str] | None = None,
    max_examples: int | None = None,
    registry: Registry | None = None,
    device: str | None = None,
) -> list[CheckResult]:
    """Run every applicable check (or the named `checks`) on `part`; never raises for a failing check."""
    instance = as_instance(part)
    selected = checks_for(instance) if checks is None else [CHECKS[name] for name in checks]
    results = []
    for check in selected:
        configured = check.configured(max_examples=max_examples, registry=registry, device=device)
        try:
            configured(instance)
        except CheckFailure as exc:
            results.append(CheckResult(instance, check, exc))
        else:
            results.append(CheckResult(instance, check, None))
    return results
