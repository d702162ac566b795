"""The diagnostics an objective reports beside its results: stage 1's advantage and reward statistics,
stage 2's trust-region metrics and ratio statistics. All are detached 0-d tensors; none enters a loss.
Each is finite on an empty batch (B = 0 or T = 0): 0, like a fully masked one.

A part's own metrics are published under its axis (``advantage/<key>``, ``region/<key>``); the keys the
objective publishes there itself are reserved, and a part that returns one is an error, not overwritten.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from proxim.errors import BatchError, ConfigurationError
from proxim.ops import LOG_RATIO_CLAMP, Padding, group_index, masked_mean, masked_sum, sequence_rewards
from proxim.parts import Part
from proxim.rollout import Rollout

RESERVED_METRICS: dict[str, frozenset[str]] = {
    "advantage": frozenset({"mean", "std", "zero_std_groups"}),
    "region": frozenset({"approx_kl", "ratio_mean", "ratio_max"}),
}
"""Per axis, the keys the objective publishes under ``<axis>/`` itself, which a part's metrics may not use."""


def check_declared_metrics(kind: str, part: Part) -> None:
    """`ConfigurationError` when `part` declares (``metric_names``) a key the objective reserves under its axis."""
    clash = sorted(RESERVED_METRICS.get(kind, frozenset()) & part.metric_names)
    if clash:
        raise ConfigurationError(f"{kind} {part.name!r} declares the metric {clash[0]!r}, {_reserved(kind, clash[0])}")


def check_metric_keys(kind: str, part: Part, keys: Iterable[str]) -> None:
    """`BatchError` when `part` returned a metric under a key the objective reserves under its axis."""
    reserved = RESERVED_METRICS[kind]
    for key in keys:
        if key in reserved:
            raise BatchError(f"{kind} {part.name!r} returned the metric {key!r}, {_reserved(kind, key)}")


def _reserved(kind: str, key: str) -> str:
    return f"but the objective publishes {kind}/{key} itself (reserved under {kind}/: {', '.join(sorted(RESERVED_METRICS[kind]))}). Rename the part's metric."


def mean_or_zero(x: Tensor) -> Tensor:
    """``x.mean()``, or 0 when `x` is empty (where ``mean`` is NaN)."""
    return x.mean() if x.numel() else x.new_zeros(())


def stage_one_metrics(batch: Rollout, adv: Tensor) -> dict[str, Tensor]:
    """``advantage/mean``, ``advantage/std`` and ``reward/mean``, and with group ids ``advantage/zero_std_groups``."""
    mask = batch.mask
    mean = masked_mean(adv, mask)
    count = mask.sum().clamp(min=2).to(adv.dtype)
    std = (masked_sum((adv - mean) ** 2, mask) / (count - 1)).sqrt()
    seq_rewards = sequence_rewards(batch.rewards.to(adv.dtype), mask)
    metrics = {"advantage/mean": mean, "advantage/std": std, "reward/mean": mean_or_zero(seq_rewards)}
    if batch.group is not None:
        # A group has zero spread when its largest and smallest rewards are equal: exact, unlike a std
        # taken around a rounded mean (three rewards of 0.1 have std ~1e-17). Groups of one count.
        index, k = group_index(batch.group)
        fill = torch.full((k,), torch.inf, dtype=seq_rewards.dtype, device=seq_rewards.device)
        high = (-fill).scatter_reduce(0, index, seq_rewards, "amax")
        low = fill.scatter_reduce(0, index, seq_rewards, "amin")
        metrics["advantage/zero_std_groups"] = (high == low).sum().to(adv.dtype)
    return metrics


def region_metrics(per_token: Mapping[str, Tensor], lp: Tensor, anchor: Tensor, padding: Padding) -> dict[str, Tensor]:
    """Masked means of the region's per-token metrics, and ratio statistics. `lp` and `anchor` are 0 where
    the mask is False (as `Objective.loss` passes them), so the log-ratio there is exactly 0.

    Written for the eager hot path, where it would otherwise cost as much as the loss on CPU: the
    `Padding`'s token count, boolean metrics counted in int32 (no float copy) through one scratch buffer,
    one ``expm1`` for both the ratio and the approximate KL (the ratio is taken as ``expm1(lr) + 1``,
    within one rounding of ``exp(lr)``), and in-place arithmetic on its own temporaries (on CPU a fresh
    [B, T] buffer costs more in page faults than the arithmetic written into it).
    """
    mask = padding.mask
    count = padding.tokens
    out: dict[str, Tensor] = {}
    scratch: Tensor | None = None  # one buffer for every boolean metric's `& mask`
    for key, value in per_token.items():
        value = value.detach()
        if value.dtype == torch.bool and value.shape == mask.shape:
            scratch = torch.logical_and(value, mask, out=torch.empty_like(mask) if scratch is None else scratch)
            out[f"region/{key}"] = scratch.sum(dtype=torch.int32).to(lp.dtype) / count
        elif value.dtype == torch.bool:
            out[f"region/{key}"] = (value & mask).sum(dtype=torch.int32).to(lp.dtype) / count
        else:
            out[f"region/{key}"] = padding.sum(value.to(lp.dtype)) / count
    lr = (lp - anchor).clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # ops.log_ratio, in place
    excess = torch.expm1(lr)
    out["region/approx_kl"] = lr.neg_().add_(excess).sum() / count  # expm1(lr) - lr; 0 where masked (lr = 0)
    ratio = excess.add_(1.0)  # exactly 1 where masked (lr = 0 there), so masking by multiplication is exact
    ratio = padding.zero(ratio) if padding.weights is None else ratio.mul_(padding.weights)
    out["region/ratio_mean"] = ratio.sum() / count
    out["region/ratio_max"] = ratio.amax() if ratio.numel() else ratio.new_zeros(())  # amax of nothing is an error
    return out
