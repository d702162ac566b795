"""Penalty terms beside the policy loss: the clipped value loss and KL-coefficient controllers.

KL estimators themselves live in `proxim.ops.kl_estimate`; where the KL goes (loss or reward) is an
objective option.
"""

from __future__ import annotations

import attrs
from torch import Tensor


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> Tensor:
    """Per-token critic loss [B, T] (OpenAI baselines' clipped form, not in the PPO paper).

    ``0.5 * max((V - Ret)^2, (clip(V, V_old - c, V_old + c) - Ret)^2)``; with `clip` None, ``0.5 * (V - Ret)^2``.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
    return 0.5 * unclipped.maximum(clipped)


def _positive(instance: object, attribute: attrs.Attribute, value: float) -> None:  # type: ignore[type-arg]
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


@attrs.define
class AdaptiveKLController:
    """Ziegler et al. (arXiv 1909.08593) adaptive KL coefficient, in verl's form.

    After each rollout: ``e = clip(kl / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``.
    Defaults are the StackLLaMA/legacy TRL ones: init 0.2, target 6, horizon 10000.
    """

    value: float = attrs.field(default=0.2, validator=_positive)
    target: float = attrs.field(default=6.0, validator=_positive)
    horizon: int = attrs.field(default=10000, validator=_positive)

    def update(self, observed_kl: float, n_steps: int) -> float:
        """Move the coefficient toward the target KL; returns the new value."""
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


@attrs.define
class FixedKLController:
    """A constant KL coefficient, with the same interface as `AdaptiveKLController`."""

    value: float = 0.0

    def update(self, observed_kl: float, n_steps: int) -> float:
        return self.value
