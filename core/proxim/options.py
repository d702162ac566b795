"""An objective's own options (aggregation, KL, entropy and value terms, the anchor): `Options`."""

from __future__ import annotations

from typing import TypeVar

import attrs
from attrs.validators import ge, in_

from proxim import aggregation

_Number = TypeVar("_Number", int | None, float | None)


def _optional_positive(instance: object, attribute: attrs.Attribute[_Number], value: _Number) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be None or > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class Options:
    """Objective-level options (not part hyperparameters).

    aggregation:   how the per-token loss becomes a scalar; see `proxim.aggregation`. Default token_mean.
    max_length:    L_max for seq_mean_token_sum_norm; None uses the batch's T (pass a constant, e.g. the
                   generation limit, for exact micro-batch invariance).
    kl_coef:       beta of the KL to the reference policy, >= 0. 0 turns the term off.
    kl_estimator:  "k1", "k2" or "k3" (Schulman); see `proxim.ops.kl_estimate`.
    kl_in:         "loss" (differentiated, aggregated like the policy loss; GRPO) or "reward" (from the
                   sampling-time log-probs, subtracted from the rewards before stage 1; PPO-RLHF, RLOO).
    entropy_coef:  weight of the entropy bonus, >= 0; `loss()` then needs per-token `entropy`.
    value_coef:    weight of the critic loss, >= 0; used when the baseline provides state values.
    value_clip:    the value-clip range, or None for the unclipped squared error.
    anchor:        the trust region's reference log-probs: "old" (Rollout.old_logprobs: recomputed by the
                   trainer before the update, classic PPO/GRPO) or "rollout" (Rollout.rollout_logprobs:
                   the inference engine's, mu in DPPO/DRPO, which covers train/inference mismatch too).
    """

    aggregation: str = attrs.field(default="token_mean", validator=in_(aggregation.MODES))
    max_length: int | None = attrs.field(default=None, validator=_optional_positive)
    kl_coef: float = attrs.field(default=0.0, validator=ge(0.0))
    kl_estimator: str = attrs.field(default="k3", validator=in_(("k1", "k2", "k3")))
    kl_in: str = attrs.field(default="loss", validator=in_(("loss", "reward")))
    entropy_coef: float = attrs.field(default=0.0, validator=ge(0.0))
    value_coef: float = attrs.field(default=0.5, validator=ge(0.0))
    value_clip: float | None = attrs.field(default=None, validator=_optional_positive)
    anchor: str = attrs.field(default="old", validator=in_(("old", "rollout")))


OPTION_NAMES = tuple(a.name for a in attrs.fields(Options))
"""The names of the `Options` fields, which overrides route to the objective (``objective.<name>``)."""
