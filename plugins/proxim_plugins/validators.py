"""attrs validators shared by the built-in parts' hyperparameters."""

from __future__ import annotations

from typing import Any

import attrs

ge = attrs.validators.ge
gt = attrs.validators.gt
le = attrs.validators.le
lt = attrs.validators.lt
choice = attrs.validators.in_
optional = attrs.validators.optional


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Any:
    """A number in [low, high], with either end open on request."""
    return attrs.validators.and_(gt(low) if low_open else ge(low), lt(high) if high_open else le(high))


def boolean(instance: object, attribute: Any, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"'{attribute.name}' must be True or False, got {value!r}")
