"""An objective's own options (aggregation, KL, entropy and value terms, the anchor): `Options`."""

from __future__ import annotations

import math
import numbers

import attrs
from attrs.validators import in_

from proxim import aggregation


def _given(value: object) -> str:
    """A value as a message shows it: its repr and its type (``'0.1' (str)``)."""
    return f"{value!r} ({type(value).__name__})"


def _is_number(value: object) -> bool:
    """A real number (int, float, numpy scalar), not a bool and not a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _coefficient(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    """A finite number >= 0: a weight of a loss term (0 turns the term off)."""
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"'{attribute.name}' must be a finite number >= 0, got {_given(value)}")


def _optional_clip(instance: object, attribute: attrs.Attribute[float | None], value: float | None) -> None:
    """None, or a finite number > 0."""
    if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"'{attribute.name}' must be None or a finite number > 0, got {_given(value)}")


def _cap(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    """A finite number >= 1: the truncation C of importance weights (a cap below 1 would shrink on-policy tokens, w = 1)."""
    if not (_is_number(value) and math.isfinite(value) and value >= 1):
        raise ValueError(
            f"'{attribute.name}' must be a finite number >= 1 (the largest importance weight kept; below 1 it would "
            f"shrink even tokens the engine and the trainer agree on), got {_given(value)}"
        )


def _optional_length(instance: object, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    """None, or a whole number of tokens >= 1."""
    if value is not None and not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"'{attribute.name}' must be None or an int >= 1 (a length in tokens, e.g. the generation limit), got {_given(value)}")


@attrs.frozen(kw_only=True)
class Options:
    """Objective-level options (not part hyperparameters).

    aggregation:   how the per-token loss becomes a scalar; see `proxim.aggregation`. Default token_mean.
    max_length:    L_max for seq_mean_token_sum_norm, an int >= 1; None uses the batch's T (pass a constant,
                   e.g. the generation limit, for exact micro-batch invariance).
    kl_coef:       beta of the KL to the reference policy, finite and >= 0. 0 turns the term off.
    kl_estimator:  "k1", "k2" or "k3" (Schulman); see `proxim.ops.kl_estimate`.
    kl_in:         "loss" (differentiated, aggregated like the policy loss; GRPO) or "reward" (from the
                   sampling-time log-probs, subtracted from the rewards before stage 1; PPO-RLHF, RLOO).
    entropy_coef:  weight of the entropy bonus, finite and >= 0; `loss()` then needs per-token `entropy`.
    value_coef:    weight of the critic loss, finite and >= 0; used when the baseline provides state values.
    value_clip:    the value-clip range, finite and > 0, or None for the unclipped squared error.
    anchor:        the trust region's reference log-probs: "old" (Rollout.old_logprobs: recomputed by the
                   trainer before the update, classic PPO/GRPO) or "rollout" (Rollout.rollout_logprobs:
                   the inference engine's, mu in DPPO/DRPO, which covers train/inference mismatch too).
    rollout_correction: "none" or "tis": truncated importance sampling (Yao et al. 2025; verl's token-level
                   ``rollout_is``). Each token's policy loss is weighted by min(exp(old - rollout), C), a
                   constant (no gradient): the tokens were sampled by the engine (mu), whose numerics differ
                   from the trainer's (pi_old), and the weight pi_old/mu moves the estimate back to pi_old,
                   truncated at C to bound its variance. Needs Rollout.rollout_logprobs. An option, not a
                   part: it multiplies whatever the region returns, so it composes with every region.
                   Refused with ``anchor="rollout"``, whose ratio is already taken against mu.
    rollout_correction_cap: C, the largest weight kept (finite, >= 1); default 2.0, as verl's
                   ``rollout_is_threshold``.
    """

    aggregation: str = attrs.field(default="token_mean", validator=in_(aggregation.MODES))
    max_length: int | None = attrs.field(default=None, validator=_optional_length)
    kl_coef: float = attrs.field(default=0.0, validator=_coefficient)
    kl_estimator: str = attrs.field(default="k3", validator=in_(("k1", "k2", "k3")))
    kl_in: str = attrs.field(default="loss", validator=in_(("loss", "reward")))
    entropy_coef: float = attrs.field(default=0.0, validator=_coefficient)
    value_coef: float = attrs.field(default=0.5, validator=_coefficient)
    value_clip: float | None = attrs.field(default=None, validator=_optional_clip)
    anchor: str = attrs.field(default="old", validator=in_(("old", "rollout")))
    rollout_correction: str = attrs.field(default="none", validator=in_(("none", "tis")))
    rollout_correction_cap: float = attrs.field(default=2.0, validator=_cap)

    def __attrs_post_init__(self) -> None:
        if self.rollout_correction != "none" and self.anchor == "rollout":
            raise ValueError(
                f"rollout_correction={self.rollout_correction!r} weights a ratio taken against the trainer's old log-probs "
                "by pi_old/mu, but anchor='rollout' already takes the ratio against the engine's log-probs mu: the mismatch "
                "would be corrected twice. Use anchor='old' with the correction, or anchor='rollout' without it."
            )


OPTION_NAMES = tuple(a.name for a in attrs.fields(Options))
"""The names of the `Options` fields, which overrides route to the objective (``objective.<name>``)."""
